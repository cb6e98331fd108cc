"""Activation offloading: the tensors a training step keeps for backward wait in CPU memory.

With gradient checkpointing on, what a step keeps between forward and backward is each decoder
layer's input (torch's non-reentrant checkpoint saves its inputs through `save_for_backward`, where
saved-tensor hooks see them; everything inside a layer is recomputed). `offload_activations()`
packs those tensors into pinned CPU memory and brings each back when backward needs it, so the
step keeps L × tokens × hidden × 2 bytes fewer on the GPU (1 GiB for Llama-3.1-8B at 2 × 2048).

On CUDA the copy out runs on a side stream, overlapped with the next layers' forward; the copy back
is queued on the compute stream just before the layer's recompute (from pinned memory: it does not
block the host). Its time cost is that copy back over PCIe, which the planner adds to its
throughput estimate (hfgpu.planner). Parameters and tensors under `min_bytes` stay where they are.

`simulate=True` is for fake-tensor simulation (hfgpu.simulate): it keeps only the tensor's shape
and makes an empty one in backward, so a memory tracker sees the GPU bytes leave and come back.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

MIN_BYTES = 1024**2


class _Offloader:
    def __init__(self, min_bytes: int, simulate: bool):
        self.min_bytes = min_bytes
        self.simulate = simulate
        self.packed = 0  # tensors moved out (for tests and logs)
        self.packed_bytes = 0
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() and not simulate else None
        self._seen: dict[int, tuple] = {}  # the same live tensor saved twice (e.g. rotary tables) moves once

    def pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if isinstance(t, torch.nn.Parameter) or nbytes < self.min_bytes or t.layout != torch.strided or not t.is_contiguous():
            return t
        if t.device.type not in ("cuda", "cpu"):
            return t  # other accelerators: kept where it is
        if self.simulate:
            self.packed += 1
            self.packed_bytes += nbytes
            return ("meta", t.shape, t.dtype, t.device)
        key = id(t)
        seen = self._seen.get(key)
        if seen is not None and seen[0]() is t and seen[1] == t._version:
            return seen[2]
        self.packed += 1
        self.packed_bytes += nbytes
        if t.device.type == "cpu":  # nothing to move to: a copy keeps the path exercised on CPU
            packed = ("cpu", t.clone())
            self._seen[key] = (weakref.ref(t), t._version, packed)
            return packed
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            event = self.stream.record_event()
        t.record_stream(self.stream)  # the GPU block is not reused before the copy has read it
        packed = ("cuda", host, event, t.device)
        self._seen[key] = (weakref.ref(t), t._version, packed)
        return packed

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        kind = packed[0]
        if kind == "meta":
            _, shape, dtype, device = packed
            return torch.empty(shape, dtype=dtype, device=device)
        if kind == "cpu":
            return packed[1]
        _, host, event, device = packed
        current = torch.cuda.current_stream(device)
        current.wait_event(event)
        return host.to(device, non_blocking=True)


@contextlib.contextmanager
def offload_activations(enabled: bool = True, min_bytes: int | None = None, simulate: bool = False):
    """Saved-for-backward tensors of the forward run inside go to CPU memory (see module docs).

    with offload_activations():
        loss = model_loss(model, batch)
    loss.backward()   # the hooks set at save time bring each tensor back
    """
    if not enabled:
        yield None
        return
    off = _Offloader(MIN_BYTES if min_bytes is None else min_bytes, simulate)
    try:
        with torch.autograd.graph.saved_tensors_hooks(off.pack, off.unpack):
            yield off
    finally:
        off._seen.clear()  # weak references only, but no need to keep them past the forward
