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


def forward_backward(
    model,
    batch: dict,
    *,
    chunk: int | None,
    adapters_16bit: bool,
    offload: bool,
    lm_head=None,
    autocast: torch.dtype | None = None,
    weight: torch.Tensor | None = None,
    scale: torch.Tensor | float | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    simulate: bool = False,
) -> torch.Tensor:
    """The loss of `batch` (× `weight`, e.g. its label-token count), backpropagated × `scale`; returns it detached.

    `chunk`: the chunked loss's slice (None: full logits). `adapters_16bit`: LoRA layers take 16-bit
    inputs under autocast (hfgpu.modeling.adapters_in_compute_dtype), over forward and backward both,
    since a checkpointed layer recomputes in backward. `offload`: activation offloading. `autocast`:
    the compute dtype when the caller has no autocast of its own (accelerate wraps the model's forward
    in training). `backward`: accelerate's (loss scaling, DeepSpeed); torch's by default. `simulate`: fake tensors."""
    cast = torch.autocast(batch["input_ids"].device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with adapters_in_compute_dtype(model, adapters_16bit):
        with cast, offload_activations(offload, simulate=simulate):
            loss = model_loss(model, batch, chunk, lm_head)
            if weight is not None:
                loss = loss * weight
        (backward or torch.Tensor.backward)(loss if scale is None else loss * scale)
    return loss.detach()
