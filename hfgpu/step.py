"""One micro-batch's forward and backward, exactly as training runs it; measuring and simulating run the same.

Training (hfgpu.train.window_backward) calls it with accelerate's backward and the window's token
weighting; the memory measurements (hfgpu.measure, hfgpu.simulate, hfgpu.calibrate) call it on a
batch of random ids. One function, so what the planner is checked against is what training does.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from hfgpu.loss import model_loss
from hfgpu.modeling import adapters_in_compute_dtype
from hfgpu.offload import offload_activations

PAIR_CHUNK = 1024  # tokens per slice of a preference objective's log-probs when the plan names no loss chunk


@contextlib.contextmanager
def accelerate_autocast(model, dtype: torch.dtype | None, device_type: str):
    """The model's forward as accelerate's `prepare` leaves it in mixed precision: autocast over the forward
    only (its weight-cast cache ends with the forward) and the outputs converted to fp32. `dtype=None`: unchanged."""
    if dtype is None:
        yield
        return
    from accelerate.utils import convert_outputs_to_fp32

    had = "forward" in vars(model)
    original = model.forward
    model.forward = convert_outputs_to_fp32(torch.autocast(device_type, dtype=dtype)(original))
    try:
        yield
    finally:
        if had:
            model.forward = original
        else:
            del model.forward


def forward_backward(
    model,
    batch: dict,
    *,
    chunk: int | None,
    adapters_16bit: bool,
    offload: bool,
    lm_head=None,
    autocast: torch.dtype | None = None,
    loss_dtype: torch.dtype | None = None,
    weight: torch.Tensor | None = None,
    scale: torch.Tensor | float | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    simulate: bool = False,
    objective=None,
    pair_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of `batch` (× `weight`, e.g. its label-token count), backpropagated × `scale`; returns it detached.

    `chunk`: the chunked loss's slice (None: full logits). `adapters_16bit`: LoRA layers take 16-bit
    inputs under autocast (hfgpu.modeling.adapters_in_compute_dtype), over forward and backward both,
    since a checkpointed layer recomputes in backward. `offload`: activation offloading. `autocast`:
    the compute dtype when the caller has no accelerate wrapper (measurement, simulation): the model's
    forward is wrapped as accelerate wraps it in training (accelerate_autocast), so both hold the same
    tensors. `loss_dtype`: the chunked loss's matmul dtype (the compute dtype in mixed precision; it runs
    outside the forward's autocast; default `autocast`). `backward`: accelerate's (loss scaling,
    DeepSpeed); torch's by default. `simulate`: fake tensors. `objective`: a preference objective
    (hfgpu.preference.Objective) computes its pair loss on a batch of pairs (pairs, 2, tokens) in place of the
    next-token loss, adding what a step logs (rewards, wins, pairs) into `pair_sums`."""
    pairs = objective is not None and objective.preference
    with adapters_in_compute_dtype(model, adapters_16bit):
        with accelerate_autocast(model, autocast, batch["input_ids"].device.type), offload_activations(offload, simulate=simulate):
            if pairs:
                from hfgpu.preference import pair_loss

                loss, sums = pair_loss(model, batch, objective, chunk or PAIR_CHUNK, loss_dtype or autocast, lm_head)
                if pair_sums is not None:
                    pair_sums += sums.to(pair_sums.device)
            else:
                loss = model_loss(model, batch, chunk, lm_head, dtype=loss_dtype or autocast)
            if weight is not None:
                loss = loss * weight
        (backward or torch.Tensor.backward)(loss if scale is None else loss * scale)
    return loss.detach()
