"""The lean RMSNorm computes what transformers' does (output and gradients) and keeps less for backward."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hfgpu.memtrack import PeakTracker
from hfgpu.patches import lean_rmsnorm


def pair(dtype, trainable):
    torch.manual_seed(0)
    ref = LlamaRMSNorm(256, eps=1e-6)
    ref.weight.data = (1 + 0.1 * torch.randn(256)).to(torch.float32 if trainable else dtype)
    ref.weight.requires_grad_(trainable)
    lean = LlamaRMSNorm(256, eps=1e-6)
    lean.weight.data = ref.weight.data.clone()
    lean.weight.requires_grad_(trainable)
    assert lean_rmsnorm(lean) == 1
    return ref, lean


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("trainable", [False, True])
def test_output_and_gradients_equal_transformers(dtype, tol, trainable):
    ref, lean = pair(dtype, trainable)
    x = (3 * torch.randn(2, 64, 256)).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 64, 256).to(dtype)
    y1, y2 = ref(x1), lean(x2)
    assert y1.dtype == y2.dtype
    torch.testing.assert_close(y2, y1, rtol=tol, atol=tol)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=tol, atol=tol)
    if trainable:
        torch.testing.assert_close(lean.weight.grad, ref.weight.grad, rtol=tol, atol=tol * 10)


def test_keeps_less_for_backward():
    def kept(norm):
        x = torch.randn(4, 1024, 256, dtype=torch.bfloat16, requires_grad=True)
        with PeakTracker(baseline=[x]) as t:
            y = norm(x)
        return t.current_bytes - t.baseline_bytes - y.numel() * y.element_size()
    ref, lean = pair(torch.bfloat16, False)
    assert kept(ref) >= 4 * 1024 * 256 * 4  # an fp32 copy of the input
    assert kept(lean) < 4 * 1024 * 16  # only 1/rms per token


@pytest.mark.parametrize("strategy,tile", [("full", 24), ("lora", 24), ("lora-dropout", 1000)])
def test_tiled_mlp_gives_the_same_loss_and_gradients_under_checkpointing(strategy, tile):
    """With dropout, one tile covers the batch, so the masks equal the untiled run's: backward must
    replay forward's random state (more tiles draw other, equally valid masks)."""
    from transformers import AutoModelForCausalLM

    from hfgpu.patches import tile_mlps
    from conftest import tiny_llama

    def run(tiled: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_llama())
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if strategy != "full":
            from peft import LoraConfig, get_peft_model

            model.enable_input_require_grads()
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1 if "dropout" in strategy else 0.0))
        if tiled:
            assert tile_mlps(model, tile=tile) == 2
        model.train()
        ids = torch.randint(0, 1000, (2, 50), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss0, grads0 = run(False)
    loss1, grads1 = run(True)
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys() and any("mlp" in n for n in grads0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-5, msg=name)
