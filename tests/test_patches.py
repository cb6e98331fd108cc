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
