"""Preference losses (hfgpu.preference) against TRL on the same model, batch and β, loss and gradients:
DPOTrainer (DPO, IPO), CPOTrainer (SimPO), ORPOTrainer (ORPO)."""

import pytest
import torch

from hfgpu.preference import preference_loss, reference_logps, sequence_logps, token_logps
from hfgpu.preference_data import collate_pairs, flat_pairs, tokenize_pairs

PAIRS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " a large city in Europe with many people."},
    {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five."},
    {"prompt": "Say hello:", "chosen": " Hello!", "rejected": " Goodbye, and see you later."},
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green with purple dots."},
]


def _move_adapters_off_zero(model) -> None:
    """LoRA's B starts at zero (policy = reference); move it so that the two differ."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


def _trl_trainer(tiny_model_dir, tmp_path, kind: str = "dpo", rows=None, **config):
    """One of TRL's trainers on the tiny model, given the base and a LoRA config: DPOTrainer and KTOTrainer (trl), or
    CPOTrainer (SimPO is its loss_type simpo with cpo_alpha 0) and ORPOTrainer (trl.experimental). Given a LoRA
    config, DPO's and KTO's reference is the base with the adapters disabled, as hfgpu's is (given a model that
    already has an adapter, TRL takes a copy of it instead)."""
    import importlib

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = importlib.import_module("trl" if kind in ("dpo", "kto") else f"trl.experimental.{kind}")
    Config, Trainer = getattr(module, f"{kind.upper()}Config"), getattr(module, f"{kind.upper()}Trainer")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = {"beta": 0.1, **config}
    args = Config(output_dir=str(tmp_path / kind), per_device_train_batch_size=4, max_length=64, report_to=[], use_cpu=True, **config)
    return Trainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows or PAIRS),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )


def _trl_step(trainer):
    """TRL's loss on its first batch, with the adapters moved off zero, and its gradients; the model's are zeroed."""
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    _move_adapters_off_zero(model)
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = _grads(model)
    model.zero_grad()
    return batch, model, loss, grads


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().clone() for p in model.parameters() if p.requires_grad and p.grad is not None])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trls_dpo_trainer(tiny_model_dir, tmp_path, loss_type):
    trainer = _trl_trainer(tiny_model_dir, tmp_path, loss_type=[loss_type])
    batch, model, trl_loss, trl_grads = _trl_step(trainer)

    logps, lengths = sequence_logps(model, batch, chunk_size=7)  # several slices of tokens, the last one short
    ref = reference_logps(model, batch, chunk_size=7)
    stats = preference_loss("dpo" if loss_type == "sigmoid" else "ipo", logps, lengths, ref, beta=0.1)
    stats.loss.backward()
    assert stats.loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert abs(trl_loss.item() - 0.6931) > 1e-3 or loss_type == "ipo"  # the policy is not the reference: not log 2
    # to 1e-5 of the largest gradient (float32 summation order differs: TRL's fused head vs hfgpu's slices)
    torch.testing.assert_close(_grads(model), trl_grads, rtol=1e-5, atol=1e-5 * trl_grads.abs().max().item())
    assert 0 <= stats.accuracy <= 1 and stats.rewards_chosen.shape == (4,)


def test_sliced_log_probs_equal_the_full_logits_and_their_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    ids = torch.randint(0, 50, (2, 9))
    sliced = token_logps(hidden, weight, ids, chunk_size=5)
    full = torch.gather((hidden[:, :-1] @ weight.t()).log_softmax(-1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(sliced, full)
    g_sliced = torch.autograd.grad(sliced.sum(), (hidden, weight))
    g_full = torch.autograd.grad(full.sum(), (hidden, weight))
    for a, b in zip(g_sliced, g_full):
        torch.testing.assert_close(a, b)


def test_simpo_and_orpo_follow_their_papers_formulas():
    """No reference model; length-normalised log-probs (SimPO eq. 6, ORPO eq. 6-7), written out by hand here."""
    logps = torch.tensor([-4.0, -6.0, -9.0, -8.0])  # chosen 1, chosen 2, rejected 1, rejected 2
    lengths = torch.tensor([2.0, 3.0, 3.0, 2.0])
    avg_c, avg_r = torch.tensor([-2.0, -2.0]), torch.tensor([-3.0, -4.0])
    simpo = preference_loss("simpo", logps, lengths, beta=2.0, gamma_ratio=0.5)
    expected = -torch.nn.functional.logsigmoid(2.0 * (avg_c - avg_r) - 1.0).mean()
    assert simpo.loss.item() == pytest.approx(expected.item(), rel=1e-6) and simpo.accuracy == 1.0
    orpo = preference_loss("orpo", logps, lengths, beta=0.1)
    odds = lambda a: a - torch.log(1 - torch.exp(a))  # noqa: E731
    expected = (-avg_c - 0.1 * torch.nn.functional.logsigmoid(odds(avg_c) - odds(avg_r))).mean()
    assert orpo.loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    "objective,kwargs,message",
    [("dpo", {"beta": 0.0}, "beta=0.0 must be > 0"), ("dpo", {}, "needs the reference"), ("xyz", {}, "not one of")],
)
def test_bad_preference_settings_are_refused_naming_them(objective, kwargs, message):
    with pytest.raises(ValueError, match=message):
        preference_loss(objective, torch.zeros(4), torch.ones(4), **kwargs)


def test_pairs_are_tokenized_as_trls_dpo_trainer_does_and_give_its_loss(tiny_model_dir, tmp_path):
    """hfgpu's own pipeline end to end — rows → tokenize_pairs → collate_pairs → log-probs → DPO loss — against
    TRL's on the same rows and adapters: the same token ids, the same response masks, the same loss."""
    trainer = _trl_trainer(tiny_model_dir, tmp_path)
    tokenizer = trainer.processing_class
    pairs, dropped = tokenize_pairs(PAIRS, tokenizer, max_len=64)
    assert not dropped and len(pairs) == 4
    for ours, theirs in zip(pairs, trainer.train_dataset):
        for side in ("chosen", "rejected"):
            assert ours[f"{side}_ids"] == theirs["prompt_ids"] + theirs[f"{side}_ids"]
            assert ours[f"{side}_mask"] == [0] * len(theirs["prompt_ids"]) + [1] * len(theirs[f"{side}_ids"])
    model = trainer.model
    _move_adapters_off_zero(model)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(trl_batch))
        batch = flat_pairs(collate_pairs(pairs, tokenizer.pad_token_id))
        ours = preference_loss(
            "dpo", sequence_logps(model, batch)[0], sequence_logps(model, batch)[1], reference_logps(model, batch), beta=0.1
        )
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)


def test_malformed_pairs_are_dropped_under_the_rule_that_names_why(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = PAIRS[:1] + [
        {"prompt": "p", "chosen": " same", "rejected": " same "},
        {"prompt": "p", "chosen": " ", "rejected": " no"},
        {"prompt": "p", "chosen": " yes"},
        {"prompt": "p", "chosen": [" list"], "rejected": " no"},
    ]
    pairs, dropped = tokenize_pairs(rows, tokenizer, max_len=64)
    assert len(pairs) == 1
    assert dropped == {
        "chosen and rejected identical": [2],
        "empty response": [3],
        "missing 'rejected'": [4],
        "list-valued 'chosen'": [5],
    }


def _ours_from_trls_batch(trainer, batch) -> dict:
    """TRL's concatenated [chosen; rejected] batch in hfgpu's layout: the response is where its labels are."""
    pad = trainer.pad_token_id if hasattr(trainer, "pad_token_id") else trainer.padding_value
    cat = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=pad, device=torch.device("cpu"))
    return {
        "input_ids": cat["concatenated_input_ids"],
        "attention_mask": cat["concatenated_attention_mask"],
        "completion_mask": (cat["concatenated_labels"] != -100).long(),
    }


def test_simpo_equals_trls_cpo_trainer_with_its_simpo_loss(tiny_model_dir, tmp_path):
    """SimPO's paper defaults (β 2.0, γ = 0.5·β) in hfgpu and in TRL's CPOTrainer (loss_type simpo, cpo_alpha 0, its
    simpo_gamma being γ itself): the same loss and gradients on the same batch."""
    trainer = _trl_trainer(tiny_model_dir, tmp_path, "cpo", loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0)
    batch, model, trl_loss, trl_grads = _trl_step(trainer)
    logps, lengths = sequence_logps(model, _ours_from_trls_batch(trainer, batch), chunk_size=7)
    stats = preference_loss("simpo", logps, lengths)  # β 2.0 and γ/β 0.5 are the defaults
    stats.loss.backward()
    assert stats.loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    torch.testing.assert_close(_grads(model), trl_grads, rtol=1e-5, atol=1e-5 * trl_grads.abs().max().item())


def test_orpos_odds_ratio_term_equals_trls_orpo_trainer(tiny_model_dir, tmp_path):
    """ORPO = NLL of the chosen response − λ · log σ(log odds ratio). The odds-ratio term and its gradient equal TRL's
    ORPOTrainer's to 1e-5. The NLL term differs on purpose: TRL averages it over every token of the chosen
    sequences in the batch, prompt included; hfgpu takes the paper's per-response mean of the response tokens
    (so that splitting a batch into micro-batches gives the same gradient), checked here from the full logits."""
    trainer = _trl_trainer(tiny_model_dir, tmp_path, "orpo", beta=0.1)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    _move_adapters_off_zero(model)

    model.zero_grad()
    out = trainer.concatenated_forward(model, dict(batch))
    trl_term = -trainer.odds_ratio_loss(out[0], out[1])[0].mean()
    trl_term.backward()
    trl_grads = _grads(model)

    model.zero_grad()
    ours = _ours_from_trls_batch(trainer, batch)
    logps, lengths = sequence_logps(model, ours, chunk_size=7)
    total = preference_loss("orpo", logps, lengths, beta=0.1).loss
    nll = -(logps.chunk(2)[0] / lengths.chunk(2)[0]).mean()
    (total - nll).backward()
    assert (total - nll).item() == pytest.approx(trl_term.item(), rel=1e-5)
    torch.testing.assert_close(_grads(model), trl_grads, rtol=1e-5, atol=1e-5 * trl_grads.abs().max().item())

    with torch.no_grad():  # the NLL term: the chosen responses' mean per-token NLL, one response at a time
        logits = model(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"]).logits[:, :-1]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ours["input_ids"][:, 1:], reduction="none")
        mask = ours["completion_mask"][:, 1:].float()
        expected = ((per_token * mask).sum(1) / mask.sum(1))[:4].mean()
    assert nll.item() == pytest.approx(expected.item(), rel=1e-5)


UNPAIRED = [
    {"prompt": "The sky is", "completion": " blue.", "label": True},
    {"prompt": "Two plus two is", "completion": " five.", "label": False},
    {"prompt": "Say hello:", "completion": " Hello!", "label": True},
    {"prompt": "The capital of France is", "completion": " a large city in Europe with many people.", "label": False},
]


def test_unpaired_rows_are_tokenized_as_trls_kto_trainer_does(tiny_model_dir, tmp_path):
    """Each completion and its KL sequence (its prompt with the previous example's completion, the first taking the
    last's): the token ids and completion masks of TRL's KTOTrainer, whose KL rotation runs over a batch of 4."""
    from hfgpu.preference_data import tokenize_unpaired

    trainer = _trl_trainer(tiny_model_dir, tmp_path, "kto", UNPAIRED)
    examples, dropped = tokenize_unpaired(UNPAIRED, trainer.processing_class, max_len=64)
    assert not dropped and [e["label"] for e in examples] == [True, False, True, False]
    for ours, theirs in zip(examples, trainer.train_dataset):
        prompt = theirs["prompt_ids"]
        assert ours["completion_ids"] == prompt + theirs["completion_ids"]
        assert ours["completion_mask"] == [0] * len(prompt) + [1] * len(theirs["completion_ids"])
        assert ours["kl_ids"] == prompt + theirs["KL_completion_ids"]
        assert ours["kl_mask"] == [0] * len(prompt) + [1] * len(theirs["KL_completion_ids"])


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_trls_kto_trainer(tiny_model_dir, tmp_path, weights):
    """KTO (β 0.1, the KL baseline from the batch's mismatched sequences, desirable/undesirable weights) in hfgpu's
    pair_loss and in TRL's KTOTrainer on the same batch and adapters: the same loss and gradients."""
    from hfgpu.preference import Objective, pair_loss

    desirable, undesirable = weights
    trainer = _trl_trainer(tiny_model_dir, tmp_path, "kto", UNPAIRED, desirable_weight=desirable, undesirable_weight=undesirable)
    batch, model, trl_loss, trl_grads = _trl_step(trainer)

    width = max(batch["input_ids"].shape[1], batch["KL_input_ids"].shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731  (masked out: attention 0)
    ours = {k: torch.stack([pad(batch[k]), pad(batch[f"KL_{k}"])], dim=1) for k in ("input_ids", "attention_mask", "completion_mask")}
    ours["label"] = batch["label"]
    objective = Objective("kto", beta=0.1, desirable_weight=desirable, undesirable_weight=undesirable)
    loss, sums = pair_loss(model, ours, objective, chunk_size=7)
    loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    torch.testing.assert_close(_grads(model), trl_grads, rtol=1e-5, atol=1e-5 * trl_grads.abs().max().item())
    assert sums[1].item() == 2 and sums[3].item() == 2 and sums[5].item() == 4  # desirable, undesirable, all


def test_kto_labels_that_are_not_booleans_are_refused_naming_the_row(tiny_model_dir):
    from transformers import AutoTokenizer

    from hfgpu.errors import HfgpuError
    from hfgpu.preference_data import tokenize_unpaired

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = UNPAIRED[:2] + [{"prompt": "p", "completion": " c", "label": "yes"}]
    with pytest.raises(HfgpuError, match=r"row 3: label 'yes' is not a boolean: .* true .* or false"):
        tokenize_unpaired(rows, tokenizer, max_len=64)
    rows = UNPAIRED[:2] + [{"prompt": "p", "completion": " ", "label": True}, {"prompt": "p", "label": False}]
    examples, dropped = tokenize_unpaired(rows, tokenizer, max_len=64)
    assert len(examples) == 2 and dropped == {"empty completion": [3], "missing 'completion'": [4]}
