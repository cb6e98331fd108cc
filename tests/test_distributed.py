"""Several processes compute what one process computes: gradients, reported loss and eval metrics
under 2-process DDP (gloo, CPU) equal the single-process full-batch reference."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, limit, recipe_dict, write_jsonl

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _uneven_batch(vocab: int, seq: int = 24) -> dict:
    """4 rows with 1, 2, 7 and 18 label tokens: per-rank means differ a lot from the global mean."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (4, seq), generator=g)
    labels = torch.full_like(ids, -100)
    for row, n in enumerate((1, 2, 7, 18)):
        labels[row, seq - n :] = ids[row, seq - n :]
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _reference(model_dir, batch):
    from hfgpu.modeling import ModelSettings, prepare_model

    model = prepare_model(str(model_dir), ModelSettings(strategy="full", precision="fp32"), seed=0)
    model.train()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = (
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
        / (batch["labels"][:, 1:] != -100).sum()
    )
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_two_process_gradients_equal_one_full_batch(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    batch = _uneven_batch(AutoConfig.from_pretrained(tiny_model_dir).vocab_size)
    torch.save(batch, tmp_path / "batch.pt")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    r = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(ROOT / "tests" / "ddp_grad_check.py"),
            str(tiny_model_dir),
            str(tmp_path / "batch.pt"),
            str(tmp_path / "out.pt"),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=limit(300),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    ref_loss, ref_grads = _reference(tiny_model_dir, batch)
    assert got["grads"].keys() == ref_grads.keys()
    flat = lambda g: torch.cat([g[n].flatten() for n in sorted(g)])
    rel = (flat(got["grads"]) - flat(ref_grads)).norm() / flat(ref_grads).norm()
    assert rel < 1e-5, f"relative L2 error {rel:.2e}"
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-6)


def _torchrun_check(model_dir, tmp_path, batch: dict, objective: str) -> dict:
    torch.save(batch, tmp_path / "batch.pt")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    argv = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(ROOT / "tests" / "ddp_grad_check.py")]
    argv += [str(model_dir), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt"), objective]
    r = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=limit(300))
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def test_two_process_dpo_gradients_equal_one_full_batch_of_pairs(tiny_model_dir, tmp_path):
    """4 preference pairs of uneven lengths, 2 per process, full fine-tuning with precomputed reference log-probs:
    the gradient and the loss equal the single-process DPO loss of the 4 pairs from the full logits."""
    from transformers import AutoTokenizer

    from hfgpu.modeling import ModelSettings, prepare_model
    from hfgpu.preference import preference_loss
    from hfgpu.preference_data import collate_pairs, flat_pairs, tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(x) for x in (ROOT / "hfgpu/resources/demo/style_pairs_train.jsonl").read_text().splitlines()[:4]]
    rows[0]["rejected"][0]["content"] *= 4  # uneven lengths: per-process padding differs
    pairs, _ = tokenize_pairs(rows, tokenizer, max_len=128)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    batch["ref_logps"] = -torch.arange(8, dtype=torch.float32).reshape(4, 2) - 20.0
    got = _torchrun_check(tiny_model_dir, tmp_path, batch, "dpo")

    model = prepare_model(str(tiny_model_dir), ModelSettings(strategy="full", precision="fp32"), seed=0)
    model.train()
    flat = flat_pairs(batch)
    logits = model(input_ids=flat["input_ids"], attention_mask=flat["attention_mask"]).logits[:, :-1]
    per_token = logits.log_softmax(-1).gather(2, flat["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = flat["completion_mask"][:, 1:].float()
    stats = preference_loss("dpo", (per_token * mask).sum(1), mask.sum(1), flat["ref_logps"], beta=0.1)
    stats.loss.backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got["grads"].keys() == ref_grads.keys()
    flat_g = lambda g: torch.cat([g[n].flatten() for n in sorted(g)])  # noqa: E731
    rel = (flat_g(got["grads"]) - flat_g(ref_grads)).norm() / flat_g(ref_grads).norm()
    assert rel < 1e-5, f"relative L2 error {rel:.2e}"
    assert got["loss"] == pytest.approx(stats.loss.item(), rel=1e-6)


def test_two_process_eval_counts_each_row_once(tiny_model_dir, tmp_path):
    """30 eval rows over 2 processes at micro-batch 4: accelerate pads the last shard with repeated
    rows; the eval loss must equal the 1-process value."""
    rows = [json.loads(line) for line in (ROOT / "hfgpu/resources/demo/capitals_eval.jsonl").read_text().splitlines()]
    evalfile = write_jsonl(tmp_path / "eval30.jsonl", (rows * 30)[:30])
    results = {}
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    for n in (1, 2):
        out = tmp_path / f"eval-{n}"
        recipe = tmp_path / f"r{n}.yaml"
        import yaml

        recipe.write_text(
            yaml.safe_dump(
                recipe_dict(
                    tiny_model_dir,
                    out,
                    micro_batch_size=4,
                    data={"eval_path": str(evalfile)},
                    train={"max_steps": 1, "global_batch_size": 8, "learning_rate": 1e-12},
                )
            )
        )
        launch = (
            [
                accelerate,
                "launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "--main_process_port",
                "0",
            ]
            if n == 2
            else [sys.executable]
        )
        r = subprocess.run(
            [*launch, "-m", "hfgpu.finetune", str(recipe)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=limit(300)
        )
        assert r.returncode == 0, r.stderr[-3000:]
        results[n] = json.loads((out / "final_metrics.json").read_text())["before"]
    assert results[2]["eval_loss"] == pytest.approx(results[1]["eval_loss"], rel=1e-6)
    assert results[2]["eval_token_accuracy"] == pytest.approx(results[1]["eval_token_accuracy"], rel=1e-9)
