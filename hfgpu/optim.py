"""The optimizers a plan may name. Kept apart from the training loop so that measuring and
simulating a step (hfgpu.measure, hfgpu.simulate, `plan --verify`) do not import the loop."""

from __future__ import annotations

import torch


def make_optimizer(params, name: str, lr: float = 1e-4, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The plan's optimizer. Fused AdamW: no foreach temporaries (the memory model assumes none)."""
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)
