"""Calibration against a real GPU: measure training steps, compare with the planner, store a correction.

`measure_cuda_step` runs a few real steps of a model built from its config (random weights: memory
does not depend on their values) and reads torch.cuda's counters. `hfgpu calibrate MODEL` runs a
short grid on the user's own card and stores, per card, the ratio of measured to planned memory
beyond the exact parts; later plans on that card apply it and say so in their reasons.
benchmarks/memory_calibration.py runs the full grid and writes a CSV.
"""

from __future__ import annotations

import datetime
import statistics

from hfgpu import memory
from hfgpu.corrections import store_correction
from hfgpu.errors import HfgpuError
from hfgpu.models import model_spec, pretrained_config
from hfgpu.planner import plan_or_closest
from hfgpu.units import GIB, gib


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise HfgpuError(
            "calibration measures real training steps on your GPU, and torch sees no CUDA device here: run it on the machine with the card"
        )


def measure_cuda_step(config, s: memory.Setup, steps: int = 3) -> dict:
    """Peak memory of `steps` real training steps on cuda:0, in bytes (allocated, reserved, device-wide used)."""
    import torch

    from hfgpu.measure import forward_backward
    from hfgpu.modeling import ModelSettings, prepare_model
    from hfgpu.optim import make_optimizer

    settings = ModelSettings.from_knobs(s)
    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info()
    model = prepare_model(config, settings, device="cuda")
    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], s.optimizer)
    ids = torch.randint(0, config.vocab_size, (s.micro_batch_size, s.seq_len), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    used_peak = 0
    chunk = memory.loss_chunk_tokens(config.vocab_size) if s.chunked_loss else None
    for _ in range(steps):
        loss = forward_backward(model, ids, s.precision, chunk, offload=s.activation_offloading and s.gradient_checkpointing)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep gradients alive, as under accumulation
        torch.cuda.synchronize()
        used_peak = max(used_peak, free_before - torch.cuda.mem_get_info()[0])
    result = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(), "device_used": used_peak}
    del model, optimizer, ids, loss
    torch.cuda.empty_cache()
    return result


def grid(model: str, short: bool = True) -> list[dict]:
    """Plan knobs for the calibration grid of one model."""
    strategies = ("lora", "qlora") if short else ("full", "lora", "qlora")
    seqs = (256, 1024) if short else (256, 1024, 2048)
    batches = (1, 2) if short else (1, 4)
    rows = [
        dict(strategy=st, seq_len=sq, micro_batch_size=mb, gradient_checkpointing=ck, chunked_loss=False, activation_offloading=False)
        for st in strategies
        for sq in seqs
        for mb in batches
        for ck in (False, True)
    ]
    # the memory savers, at the longest sequence: chunked loss, and with checkpointing + offloading
    rows += [
        dict(
            strategy=st,
            seq_len=seqs[-1],
            micro_batch_size=batches[-1],
            gradient_checkpointing=True,
            chunked_loss=True,
            activation_offloading=off,
        )
        for st in strategies
        for off in (False, True)
    ]
    return rows


def calibrate(model: str, gpu: str = "auto", say=print) -> dict:
    """Measure the short grid for `model` on this machine's card; store and return the correction."""
    require_cuda()
    spec = model_spec(model)
    config = pretrained_config(spec.config)
    ratios, card = [], None
    for knobs in grid(model):
        p = plan_or_closest(model, gpu, calibrated=False, **knobs)
        card = p.gpu
        if not p.fits:
            continue
        measured = measure_cuda_step(config, p.setup())
        exact = p.memory.weights + p.memory.trainable_state
        planned_rest = p.memory.activations + p.memory.logits + p.memory.transient + p.memory.overhead
        measured_rest = measured["device_used"] - exact
        ratios.append(measured_rest / planned_rest)
        say(
            f"{knobs}: planned {gib(p.memory.total, 2)}, measured {gib(measured['device_used'], 2)} (reserved "
            f"{measured['reserved'] / GIB:.2f})"
        )
    if not ratios:
        raise HfgpuError(f"no calibration run of {model} fits this card: calibrate with a smaller model")
    entry = {
        "factor": round(max(statistics.median(ratios), max(ratios) * 0.95), 3),
        "date": datetime.date.today().isoformat(),
        "model": model,
        "rows": len(ratios),
    }
    path = store_correction(card.name, entry)
    say(f"{card.name}: transient memory × {entry['factor']} from {len(ratios)} measured steps; stored in {path}")
    return entry
