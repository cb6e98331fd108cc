"""Leaner building blocks swapped into transformers models (same math, less memory).

`lean_rmsnorm(model)`: transformers' Llama-style RMSNorm upcasts its input to fp32 and autograd keeps
that fp32 copy for backward (tokens × hidden × 4 bytes, twice per decoder layer). The replacement
keeps the 16-bit input and the per-token 1/rms instead and rebuilds the rest in backward. Output and
gradients equal transformers' within rounding (tests/test_patches.py). Only classes known to compute
`weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)` are swapped (Gemma's `1 + weight` is not).
"""

from __future__ import annotations

import torch

RMSNORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Qwen2MoeRMSNorm",
                   "MixtralRMSNorm", "PhiMoERMSNorm", "Phi3RMSNorm", "OlmoeRMSNorm", "GraniteRMSNorm"}


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = (x32 * rstd).to(x.dtype)
        del x32
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad.float() * xhat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        gy = grad.float() * weight.float()
        grad_x = rstd * (gy - xhat * (gy * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w, None


def _lean_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def lean_rmsnorm(model: torch.nn.Module) -> int:
    """Swap the forward of every known Llama-style RMSNorm in `model`; returns how many."""
    n = 0
    for module in model.modules():
        if type(module).__name__ in RMSNORM_CLASSES and hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            module.forward = _lean_forward.__get__(module)
            n += 1
    return n
