"""Chunked causal-LM cross-entropy: lm_head and the loss over slices of the sequence, so no full
tokens × vocab tensor ever exists.

On the plain transformers path the logits are the hidden peak for large vocabularies (b · s · V
values in 16 bits, again in fp32 for the loss, and again as their gradient). Here at most
`chunk` × V logits exist at once. The gradient of each slice is computed in the forward pass, right
after its loss (the loss is the graph's last node, so its gradient is known up to a scale): backward
only multiplies, nothing is recomputed. What stays alive between forward and backward is the
gradient of the hidden states (tokens × hidden) and, when lm_head trains (full fine-tuning), an fp32
gradient the size of lm_head. Pure torch: it runs and is tested on CPU (loss and gradients equal the
plain path within float tolerance, tests/test_loss.py).

The planner turns it on when it saves memory (`chunked_loss: auto`); `true`/`false` force it.
"""

from __future__ import annotations

import torch

from hfgpu.data import IGNORE  # the label of tokens the loss skips (transformers' ignore_index)
from hfgpu.patches import sliced_linear, sliced_linear_grad


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_valid = (labels != IGNORE).sum().clamp(min=1)
        inv = 1.0 / n_valid.float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        # a frozen 16-bit lm_head under fp32 compute (GTX 10): cast to fp32 by slices of the vocabulary, so no
        # fp32 copy of the whole head exists (hfgpu.patches.upcast_per_use); else one copy in the matmul dtype
        sliced = not need_w and weight.dtype in (torch.float16, torch.bfloat16) and dtype == torch.float32
        w = None if sliced else weight.to(dtype)

        def head(x: torch.Tensor) -> torch.Tensor:  # x @ weight.T, fp32 out
            return sliced_linear(x, weight) if sliced else (x @ w.t()).float()

        def head_grad(g: torch.Tensor) -> torch.Tensor:  # g @ weight
            return sliced_linear_grad(g, weight) if sliced else g @ w

        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)
                y = labels[start : start + chunk_size]
                valid = (y != IGNORE).float()
                target = y.clamp(min=0).unsqueeze(1)
                logits = head(h)
                lse = torch.logsumexp(logits, dim=-1)
                total += ((lse - logits.gather(1, target).squeeze(1)) * valid).sum()
                if need_h or need_w:
                    # d(mean loss)/d(logits) = (softmax - one-hot) / n_valid on valid tokens, 0 elsewhere,
                    # built in place in the fp32 logits (dense ops: no data-dependent shapes)
                    probs = logits.sub_(lse.unsqueeze(1)).exp_()
                    probs.scatter_add_(1, target, -valid.unsqueeze(1))
                    probs.mul_((valid * inv).unsqueeze(1))
                    g = probs.to(dtype)
                    del logits, probs
                    if need_h:
                        grad_h[start : start + chunk_size] = head_grad(g)
                    if need_w:
                        grad_w.add_(g.t() @ h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total * inv

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        # in place: a second lm_head-sized fp32 tensor here would sit on top of every activation (the loss's
        # backward runs first); the saved gradient is not read again (no retain_graph in training)
        gw = grad_w.mul_(grad_out.float()).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def chunked_causal_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden` (b, s, h) through `weight` (V, h) against `labels`
    (b, s; -100 ignored), shifted as transformers' causal LM loss does, without materialising the
    full logits. `dtype`: the matmuls' dtype (default: autocast's when it is on, else `hidden`'s)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if dtype is None:
        kind = hidden.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    return _ChunkedLinearCrossEntropy.apply(h, weight, y, chunk_size, dtype)


def _decoder(model) -> torch.nn.Module:
    """The decoder stack under DDP / peft wrappers (its output is the final, normed hidden states)."""
    m = getattr(model, "module", model)  # DDP
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()  # peft
    return m.get_decoder()


def final_hidden_states(model, inputs: dict) -> torch.Tensor:
    """The decoder's final (normed) hidden states, through `model` itself (so DDP's hooks run) keeping
    one position of logits: a forward hook on the decoder takes them (asking for
    `output_hidden_states` would keep every layer's input alive, defeating activation offloading)."""
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = _decoder(model).register_forward_hook(keep)
    try:
        model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def model_loss(
    model, batch: dict, chunk_size: int | None = None, lm_head_weight: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The batch's mean next-token loss: transformers' own path, or the chunked one (its matmuls in `dtype`:
    the compute dtype in mixed precision, as lm_head runs under autocast on the plain path)."""
    if not chunk_size:
        return model(**batch).loss
    weight = lm_head_weight if lm_head_weight is not None else getattr(model, "module", model).get_output_embeddings().weight
    return chunked_causal_lm_loss(final_hidden_states(model, batch), weight, batch["labels"], chunk_size, dtype=dtype)


@torch.no_grad()
def chunked_token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Per row: (loss sum, label tokens, correct top-1 predictions) of next-token prediction, slice by
    slice: evaluation without the full logits. Shape (batch, 3), float64."""
    b = hidden.shape[0]
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    w = weight.to(h.dtype)
    loss = torch.zeros(y.shape[0], dtype=torch.float64, device=h.device)
    correct = torch.zeros(y.shape[0], dtype=torch.float64, device=h.device)
    for start in range(0, h.shape[0], chunk_size):
        logits = (h[start : start + chunk_size] @ w.t()).float()
        target = y[start : start + chunk_size]
        loss[start : start + chunk_size] = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none").double()
        correct[start : start + chunk_size] = ((logits.argmax(-1) == target) & (target != IGNORE)).double()
    valid = (y != IGNORE).double()
    return torch.stack([loss.view(b, -1).sum(1), valid.view(b, -1).sum(1), correct.view(b, -1).sum(1)], dim=1)
