"""Preference objectives through hfgpu's own loop (hfgpu.train): gradients of a window of micro-batches equal one
full batch of pairs, the embedded DPO demo learns the preferred style on held-out pairs and writes an adapter that
plain peft loads (and that reproduces the logged rewards), full fine-tuning precomputes and caches the reference,
and resume is exact."""

import json
import shutil

import pytest
import torch
from conftest import DEMO, ROOT, recipe_dict

from hfgpu.finetune import finetune
from hfgpu.preference import Objective, preference_loss
from hfgpu.preference_data import collate_pairs, flat_pairs, tokenize_pairs
from hfgpu.recipe import load_recipe, validate_recipe
from hfgpu.train import LoopConfig, window_backward

QUIET = dict(say=lambda *a, **k: None)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / name).read_text().splitlines()]


def pair_recipe(model_dir, out, **over) -> dict:
    """recipe_dict on the demo's preference pairs."""
    data = {
        "path": str(DEMO / "style_pairs_train.jsonl"),
        "eval_path": str(DEMO / "style_pairs_eval.jsonl"),
        "format": "preference",
        **over.pop("data", {}),
    }
    return recipe_dict(model_dir, out, objective="dpo", data=data, **over)


def _lora_model(model_dir):
    """The tiny model with LoRA r=4, its B moved off zero so that the policy is not the reference."""
    from hfgpu.modeling import ModelSettings, prepare_model

    model = prepare_model(str(model_dir), ModelSettings(strategy="lora", precision="fp32", lora_r=4, lora_alpha=8), seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def _full_logps(model, part: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs, response tokens) per sequence from the full logits: plain torch, no slices."""
    logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits[:, :-1].float()
    per_token = logits.log_softmax(-1).gather(2, part["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = part["completion_mask"][:, 1:].float()
    return (per_token * mask).sum(1), mask.sum(1)


def _loop_config(objective: str, accumulation: int) -> LoopConfig:
    return LoopConfig.bare(2, accumulation, 1, loss_chunk=5, objective=Objective(objective, beta=0.1))


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo"])
def test_a_window_of_micro_batches_gives_the_gradient_of_one_full_batch_of_pairs(tiny_model_dir, objective):
    """4 pairs as 2 micro-batches of 2 (and each split again in two, the OOM back-off) through window_backward:
    the loss and every adapter gradient equal those of the 4 pairs' mean loss in one batch, computed from the
    full logits with plain torch and peft."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs, _ = tokenize_pairs(_rows("style_pairs_train.jsonl")[:4], tokenizer, max_len=64)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)

    ref_model = _lora_model(tiny_model_dir)
    flat = flat_pairs(batch)

    with torch.no_grad(), ref_model.disable_adapter():
        ref = _full_logps(ref_model, flat)[0]
    logps, lengths = _full_logps(ref_model, flat)
    expected = preference_loss(objective, logps, lengths, ref, beta=0.1)
    expected.loss.backward()
    want = {n: p.grad.clone() for n, p in ref_model.named_parameters() if p.grad is not None}

    model = _lora_model(tiny_model_dir)
    acc = Accelerator(cpu=True)
    window = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
    sums = torch.zeros(6)
    loss = window_backward(acc, model, window, 2, _loop_config(objective, 2), pair_sums=sums)
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    # every pair counted once, whatever the split; a reward is beta × a difference of summed log-probs of ~1e2, so
    # float32 summed in another order (chunks of 5 positions against the full logits) moves it by up to ~eps × 1e2 × beta
    atol = 0.1 * 8 * torch.finfo(torch.float32).eps * float(logps.abs().max())
    torch.testing.assert_close(sums, expected.sums, rtol=1e-5, atol=atol)


def test_the_dpo_demo_learns_the_preferred_style_on_held_out_pairs(tmp_path):
    """The shipped recipe, shortened: held-out reward accuracy goes from 0 (policy = reference) to ≥ 0.9, the
    logged rewards exist per step, and the adapter plain peft loads reproduces the final eval rewards."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe(str(ROOT / "recipes" / "demo_dpo_cpu.yaml"), [f"output_dir={tmp_path / 'run'}", "train.epochs=3"])
    result = finetune(recipe, **QUIET)
    out = result.output_dir
    before, after = result.initial_metrics, result.metrics
    assert before["eval_rewards/accuracy"] == 0 and before["eval_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert after["eval_rewards/accuracy"] >= 0.9 and after["eval_loss"] < 0.3 and after["eval_rewards/margin"] > 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all({"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"} <= r.keys() for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (out / "loss.png").is_file()
    from hfgpu.hub import Run, model_card

    card = str(model_card(Run(out), "me/style-dpo"))
    assert "| objective | dpo |" in card and "| preference | dpo, β=0.1 |" in card and "Trained with DPO" in card
    assert f"| eval_rewards/accuracy | 0 | {after['eval_rewards/accuracy']:.4g} |" in card
    assert "- dpo" in card  # a tag the Hub can filter on

    # plain transformers + peft, full logits: the held-out pairs' rewards are what the run logged
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(str(DEMO / "model"))
    model = PeftModel.from_pretrained(base, out).eval()
    pairs, _ = tokenize_pairs(_rows("style_pairs_eval.jsonl"), tokenizer, max_len=64)
    flat = flat_pairs(collate_pairs(pairs, tokenizer.pad_token_id))

    def logps():
        logits = model(input_ids=flat["input_ids"], attention_mask=flat["attention_mask"]).logits[:, :-1]
        per_token = logits.log_softmax(-1).gather(2, flat["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
        return (per_token * flat["completion_mask"][:, 1:]).sum(1)

    with torch.no_grad():
        policy = logps()
        with model.disable_adapter():
            ref = logps()
    stats = preference_loss("dpo", policy, torch.ones_like(policy), ref, beta=0.1)
    assert stats.accuracy == pytest.approx(after["eval_rewards/accuracy"])
    assert stats.margin == pytest.approx(after["eval_rewards/margin"], rel=1e-4)
    assert stats.loss.item() == pytest.approx(after["eval_loss"], rel=1e-3, abs=1e-5)


def test_full_fine_tuning_precomputes_the_reference_once_and_resumes_exactly(tiny_model_dir, tmp_path):
    """strategy full + dpo: the reference log-probs are computed before the first step (the model before training)
    and cached in the run folder; a run stopped at step 2 and resumed reads them back and ends where an
    uninterrupted run ends."""
    common = dict(strategy="full", data={"max_seq_len": 64}, train={"max_steps": 4, "save_every": 2, "learning_rate": 1e-3})
    said: list[str] = []
    whole = finetune(validate_recipe(pair_recipe(tiny_model_dir, tmp_path / "whole", **common)), say=said.append)
    assert any("precomputed before training" in s for s in said)
    cache = json.loads((whole.output_dir / "reference_logps.json").read_text())
    assert len(cache["train"]) == 96 and len(cache["eval"]) == 30
    assert whole.initial_metrics["eval_rewards/accuracy"] == 0  # the reference is the model before training
    assert whole.initial_metrics["eval_loss"] == pytest.approx(0.693147, abs=1e-4)

    # the same run stopped after its step-2 checkpoint (its final files gone), then resumed
    part = tmp_path / "part"
    shutil.copytree(whole.output_dir, part)
    for name in ("final_metrics.json", "model.safetensors", "config.json", "loss.png"):
        (part / name).unlink()
    said.clear()
    resumed = finetune(validate_recipe(pair_recipe(tiny_model_dir, part, resume="auto", **common)), say=said.append)
    assert any("resumed from" in s and "step 2" in s for s in said)
    assert any("read from reference_logps.json" in s for s in said)
    assert resumed.metrics["eval_loss"] == pytest.approx(whole.metrics["eval_loss"], rel=1e-6)
    lines = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    last = lambda run: [r for r in lines(run) if "loss" in r][-1]  # noqa: E731
    assert last(part)["loss"] == pytest.approx(last(whole.output_dir)["loss"], rel=1e-6)


def unpaired_rows() -> list[dict]:
    """The demo's pairs as KTO rows: each chosen answer desirable, each rejected one not."""
    rows = []
    for r in _rows("style_pairs_train.jsonl"):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return rows


def test_kto_takes_its_kl_baseline_over_the_whole_step(tiny_model_dir):
    """6 KTO examples as 3 micro-batches of 2 through window_backward: z₀ is the mean over all 6 KL sequences (as one
    full batch computes it, not per micro-batch), and the loss and gradients equal the full batch's."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from hfgpu.preference import kto_loss
    from hfgpu.preference_data import tokenize_unpaired

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples, _ = tokenize_unpaired(unpaired_rows()[:6], tokenizer, max_len=64)
    batch = collate_pairs(examples, tokenizer.pad_token_id)

    model = _lora_model(tiny_model_dir)
    completions = {k: batch[k][:, 0] for k in ("input_ids", "attention_mask", "completion_mask")}
    kl_seqs = {k: batch[k][:, 1] for k in ("input_ids", "attention_mask", "completion_mask")}
    with torch.no_grad():
        with model.disable_adapter():
            ref, ref_kl = _full_logps(model, completions)[0], _full_logps(model, kl_seqs)[0]
        kl = (_full_logps(model, kl_seqs)[0] - ref_kl).mean().clamp(min=0)
    assert kl.item() > 0  # the baseline matters in this check
    expected = kto_loss(_full_logps(model, completions)[0], ref, batch["label"], kl, beta=0.1)
    expected.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = _lora_model(tiny_model_dir)
    window = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2, 4)]
    sums = torch.zeros(6)
    loss = window_backward(Accelerator(cpu=True), model, window, 1, _loop_config("kto", 3), pair_sums=sums)
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    for name, grad in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sums, expected.sums, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_a_kto_run_learns_which_completions_are_desirable(tiny_model_dir, tmp_path, strategy):
    """KTO through finetune on the demo's answers labelled desirable or not: the eval loss falls, desirable rewards rise
    above undesirable ones, the per-step metrics are logged; full fine-tuning precomputes the reference of both the
    completions and their KL sequences."""
    from conftest import write_jsonl

    rows = unpaired_rows()
    train = write_jsonl(tmp_path / "kto_train.jsonl", rows[:160])
    held = write_jsonl(tmp_path / "kto_eval.jsonl", rows[160:])
    said: list[str] = []
    recipe = recipe_dict(
        tiny_model_dir,
        tmp_path / "run",
        strategy=strategy,
        objective="kto",
        data={"path": str(train), "eval_path": str(held), "format": "unpaired"},
        train={"max_steps": 12, "learning_rate": 3e-3 if strategy == "lora" else 1e-3},
    )
    result = finetune(validate_recipe(recipe), say=said.append)
    before, after = result.initial_metrics, result.metrics
    assert after["eval_loss"] < before["eval_loss"] - 0.05
    assert after["eval_rewards/margin"] > 0.5 and after["eval_rewards/accuracy"] > 0.7
    records = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/accuracy" in r for r in records if "loss" in r)
    assert any(s.startswith("data: 160 labelled completions") for s in said)
    assert "kto: 80 desirable, 80 undesirable completions; weighted ratio 1.00, in the paper's [1, 4/3]" in said
    if strategy == "full":
        cache = json.loads((result.output_dir / "reference_logps.json").read_text())
        assert len(cache["train"]) == 160 and len(cache["train"][0]) == 2  # completion and KL sequence


def test_data_columns_rename_the_pairs_fields(tiny_model_dir, tmp_path):
    from conftest import write_jsonl
    from transformers import AutoTokenizer

    from hfgpu.data import prepare_data
    from hfgpu.recipe import DataConfig

    rows = [{"question": r["prompt"], "better": r["chosen"], "worse": r["rejected"]} for r in _rows("style_pairs_train.jsonl")[:8]]
    path = write_jsonl(tmp_path / "renamed.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DataConfig(path=str(path), format="preference", columns={"prompt": "question", "chosen": "better", "rejected": "worse"})
    data = prepare_data(cfg, tokenizer, 64, 4)
    assert len(data.train) == 8 and data.stats["dropped"] == 0
    first = data.train[0]
    learned = tokenizer.decode([t for t, m in zip(first["chosen_ids"], first["chosen_mask"]) if m])
    assert learned.startswith(rows[0]["better"][0]["content"])


def test_a_reference_precompute_that_runs_out_of_memory_says_what_to_change(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Full fine-tuning with DPO: when even one pair's reference forward runs out of memory, the run stops before its
    first step with one line (exit 2) naming the card and seq_len and the fix, and writes nothing."""
    import yaml

    import hfgpu.preference
    from hfgpu.finetune import main as finetune_main

    calls = []

    def out_of_memory(model, pairs, pad_id, batch_size, *args, **kwargs):
        calls.append(batch_size)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(hfgpu.preference, "precompute_reference", out_of_memory)
    recipe = tmp_path / "full_dpo.yaml"
    recipe.write_text(yaml.safe_dump(pair_recipe(tiny_model_dir, tmp_path / "run", strategy="full", micro_batch_size=4)))
    assert finetune_main([str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hfgpu: error: the reference log-probs of objective dpo do not fit on CPU even one pair at a time")
    assert "lower data.max_seq_len, or use strategy=lora" in err
    assert calls == [4, 2, 1]  # halved down to one pair before giving up
    assert not (tmp_path / "run" / "reference_logps.json").exists() and not (tmp_path / "run" / "plan.json").exists()
