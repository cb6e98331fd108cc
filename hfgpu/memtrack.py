"""A lean tracker of live tensor bytes, for measuring a real training step's peak on any device.

`torch.distributed._tools.mem_tracker.MemTracker` gives the same numbers but hooks every
parameter's grad (it fails on frozen parameters) and is slow on 32-layer models; this counts each
new storage once at the dispatch level, frees it through a weakref finalizer, and rounds sizes up
to 512 bytes as the CUDA caching allocator does (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize).
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

BLOCK = 512


def _round(nbytes: int) -> int:
    return (nbytes + BLOCK - 1) // BLOCK * BLOCK


class PeakTracker(TorchDispatchMode):
    """Counts bytes of storages created while active, on top of `baseline` tensors already alive.

    with PeakTracker(baseline=model_and_optimizer_tensors) as t:
        loss = model(**batch).loss; loss.backward(); optimizer.step()
    t.peak_bytes  # the most bytes alive at once: baseline + new storages
    """

    def __init__(self, baseline: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._live: dict[int, int] = {}
        self.baseline_bytes = 0
        for t in baseline:
            self._add(t, is_baseline=True)
        self.current_bytes = self.baseline_bytes
        self.peak_bytes = self.baseline_bytes
        self.phase = "forward"  # the caller names the phase it runs ("optimizer"); backward is detected
        self.peak_phase = "forward"  # where the peak was set: forward, backward or the caller's phase

    def _add(self, t: torch.Tensor, is_baseline: bool = False) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live:
            return
        size = _round(st.nbytes())
        self._live[key] = size
        if is_baseline:
            self.baseline_bytes += size
        else:
            self.current_bytes += size
            if self.current_bytes > self.peak_bytes:
                self.peak_bytes = self.current_bytes
                self.peak_phase = "backward" if torch._C._current_graph_task_id() != -1 else self.phase
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        size = self._live.pop(key, 0)
        self.current_bytes -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Exact bytes of the distinct storages behind `tensors` (views and shared tensors count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """Every tensor a training step starts with: parameters, buffers, gradients, optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    # bitsandbytes keeps quantization constants outside parameters
    for module in model.modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        if qs is not None:
            tensors += [v for v in vars(qs).values() if isinstance(v, torch.Tensor)]
            nested = getattr(qs, "state2", None)
            if nested is not None:
                tensors += [v for v in vars(nested).values() if isinstance(v, torch.Tensor)]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors
