"""Chunked causal-LM cross-entropy: lm_head and the loss over slices of the sequence, the slices'
logits recomputed in backward, so no full tokens × vocab tensor ever exists.

On the plain transformers path the logits are the hidden peak for large vocabularies (b · s · V
values in 16 bits, again in fp32 for the loss, and again as their gradient). Here at most
`chunk_size` × V logits exist at once, forward or backward. Pure torch: it runs and is tested on CPU
(loss and gradients equal the plain path within float tolerance).

Not yet wired into training or the planner (issue "Use less memory than the best peers").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
        n_valid = (labels != IGNORE).sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(hidden.dtype)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                logits = (hidden[start : start + chunk_size] @ w.t()).float()
                total += F.cross_entropy(logits, labels[start : start + chunk_size], ignore_index=IGNORE, reduction="sum")
        ctx.save_for_backward(hidden, weight, labels, n_valid)
        ctx.chunk_size = chunk_size
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, labels, n_valid = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.to(hidden.dtype)
        scale = (grad_out / n_valid).float()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                h = hidden[start : start + ctx.chunk_size]
                y = labels[start : start + ctx.chunk_size]
                probs = torch.softmax((h @ w.t()).float(), dim=-1)
                valid = y != IGNORE
                probs[valid, y[valid]] -= 1.0  # d(loss)/d(logits) = softmax - one-hot, per valid token
                probs[~valid] = 0.0
                probs *= scale
                if need_h:
                    grad_h[start : start + ctx.chunk_size] = (probs.to(hidden.dtype) @ w).to(hidden.dtype)
                if need_w:
                    grad_w += probs.t() @ h.float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden` (b, s, h) through `weight` (V, h) against `labels`
    (b, s; -100 ignored), shifted as transformers' causal LM loss does, without materialising the
    full logits."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    return _ChunkedLinearCrossEntropy.apply(h, weight, y, chunk_size)
