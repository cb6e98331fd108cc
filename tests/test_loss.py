"""Chunked cross-entropy equals the plain path (loss and gradients) and never holds the full logits."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from hfgpu.loss import chunked_causal_lm_loss
from hfgpu.memtrack import PeakTracker


def plain(hidden, weight, labels):
    logits = (hidden @ weight.to(hidden.dtype).t()).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def inputs(dtype, b=2, s=48, h=32, v=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.1).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, :10] = -100  # a prompt the loss ignores
    return hidden, weight, labels


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_loss_and_gradients_equal_the_plain_path(dtype, tol, chunk):
    h1, w1, y = inputs(dtype)
    h2, w2, _ = inputs(dtype)
    expected = plain(h1, w1, y)
    expected.backward()
    got = chunked_causal_lm_loss(h2, w2, y, chunk_size=chunk)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(h2.grad.float(), h1.grad.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=tol, atol=tol)


def test_a_real_model_gets_the_same_loss():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama())
    ids = torch.randint(0, 1000, (2, 40))
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    chunked = chunked_causal_lm_loss(out.hidden_states[-1], model.get_output_embeddings().weight, ids, chunk_size=16)
    torch.testing.assert_close(chunked, out.loss, rtol=1e-5, atol=1e-5)


def test_the_full_logits_never_exist():
    b, s, h, v = 1, 2048, 16, 8000  # logits alone: 2048 × 8000 × 4 bytes = 62.5 MiB

    def peak(fn):
        hidden, weight, labels = inputs(torch.float32, b, s, h, v)
        with PeakTracker(baseline=[hidden, weight, labels]) as t:
            fn(hidden, weight, labels).backward()
        return t.peak_bytes - t.baseline_bytes

    plain_peak = peak(plain)
    chunked_peak = peak(lambda hd, w, y: chunked_causal_lm_loss(hd, w, y, chunk_size=128))
    assert plain_peak > 2 * s * v * 4  # logits, their fp32 softmax, their gradient
    assert chunked_peak < plain_peak / 8


@pytest.mark.slow
def test_the_planner_knows_the_chunked_loss_and_the_simulation_agrees():
    import hfgpu

    knobs = dict(strategy="lora", seq_len=2048, micro_batch_size=2, gradient_checkpointing=True)
    plain_plan = hfgpu.plan("HuggingFaceTB/SmolLM2-135M", "RTX 4090", chunked_loss=False, **knobs)
    chunked = hfgpu.plan("HuggingFaceTB/SmolLM2-135M", "RTX 4090", chunked_loss=True, verify=True, **knobs)
    assert chunked.memory.logits < plain_plan.memory.logits / 3
    assert chunked.to_dict()["chunked_loss"] is True and "slices" in chunked.reasons["chunked_loss"]
    tensor_peak = chunked.memory.tensor_peak
    assert chunked.simulation["peak"] == pytest.approx(tensor_peak, rel=0.10)


def test_soft_capped_logits_refuse_the_chunked_loss():
    import hfgpu
    from hfgpu.errors import HfgpuError

    with pytest.raises(HfgpuError, match="soft-capped"):
        hfgpu.plan("google/gemma-2-2b", "RTX 4090", chunked_loss=True)


def test_training_with_the_chunked_loss_matches_the_plain_loss(tiny_model_dir, tmp_path):
    import json

    from conftest import recipe_dict

    from hfgpu.finetune import finetune
    from hfgpu.recipe import validate_recipe

    def losses(chunked, name):
        r = recipe_dict(tiny_model_dir, tmp_path / name, chunked_loss=chunked, train={"max_steps": 5}, data={"eval_path": None})
        out = finetune(validate_recipe(r), say=lambda *a, **k: None).output_dir
        return [x["loss"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]

    plain_losses, chunked_losses = losses(False, "plain"), losses(True, "chunked")
    assert len(plain_losses) == 5 and chunked_losses == pytest.approx(plain_losses, rel=1e-4)


def test_evaluation_in_slices_equals_the_full_logits():
    from transformers import AutoModelForCausalLM

    from hfgpu.loss import chunked_token_stats, final_hidden_states

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama()).eval()
    ids = torch.randint(0, 1000, (2, 40))
    labels = ids.clone()
    labels[0, :12] = -100
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, 1000), target.reshape(-1), ignore_index=-100, reduction="sum")
        correct = ((logits.argmax(-1) == target) & (target != -100)).sum()
        stats = chunked_token_stats(
            final_hidden_states(model, {"input_ids": ids}), model.get_output_embeddings().weight, labels, chunk_size=7
        ).sum(0)
    torch.testing.assert_close(
        stats, torch.tensor([loss.item(), float((target != -100).sum()), float(correct)], dtype=torch.float64), rtol=1e-5, atol=1e-4
    )
