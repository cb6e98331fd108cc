"""Chunked causal-LM cross-entropy: lm_head and the loss over slices of the sequence, the slices'
logits recomputed in backward, so no full tokens × vocab tensor ever exists.

On the plain transformers path the logits are the hidden peak for large vocabularies (b · s · V
values in 16 bits, again in fp32 for the loss, and again as their gradient). Here at most
`chunk_size` × V logits exist at once, forward or backward. Pure torch: it runs and is tested on CPU
(loss and gradients equal the plain path within float tolerance).

Opt-in (`chunked_loss: true` in a recipe, `--chunked-loss` for `hfgpu plan`); the planner does not
choose it by itself yet.
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
                valid = (y != IGNORE).unsqueeze(1).float()
                # d(loss)/d(logits) = softmax - one-hot on valid tokens, 0 elsewhere (dense ops: no data-dependent shapes)
                probs.scatter_add_(1, y.clamp(min=0).unsqueeze(1), -valid)
                probs *= valid * scale
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


LOSS_CHUNK = 1024  # tokens per slice: at most LOSS_CHUNK × vocab logits exist at once


def model_loss(model, batch: dict, chunk_size: int | None = None, lm_head_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's mean next-token loss: transformers' own path, or the chunked one.

    The chunked path still calls `model` itself (so DDP's hooks run), keeping one position of logits
    and reading the final hidden states, then computes the loss slice by slice."""
    if not chunk_size:
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, logits_to_keep=1, output_hidden_states=True)
    weight = lm_head_weight if lm_head_weight is not None else model.get_output_embeddings().weight
    return chunked_causal_lm_loss(out.hidden_states[-1], weight, batch["labels"], chunk_size)
