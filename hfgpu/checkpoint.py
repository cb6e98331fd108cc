"""Checkpoints that survive crashes: written to a temporary folder and renamed when complete.

A checkpoint holds only what changes in training: the trainable parameters (the adapter, or every
weight in full fine-tuning), the optimizer and scheduler state, each process's RNG state and the
loop's counters. A 4-bit base model is never re-saved (accelerate's load_state cannot read it back
strictly). `state.json` is written last; a folder without it, or still named `*.tmp*`, is
incomplete: ignored on resume and removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and ".tmp" not in p.name and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def clean_incomplete(folder: Path) -> list[Path]:
    """Remove checkpoint folders a crash left half-written; returns what was removed."""
    if not folder.is_dir():
        return []
    done = set(complete_checkpoints(folder))
    removed = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p not in done]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def save(folder: Path, step: int, accelerator, model, optimizer, scheduler, counters: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically (all processes call this)."""
    final = folder / f"{PREFIX}{step:07d}"
    tmp = folder / f"{final.name}.tmp"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            save_file(_trainable(accelerator.unwrap_model(model)), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "state.json").write_text(json.dumps(counters, indent=1))
            with open(tmp / "state.json") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            for old in complete_checkpoints(folder)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # disk full, quota, permissions: the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        from hfgpu.errors import HfgpuError

        previous = complete_checkpoints(folder)
        kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else "no earlier checkpoint exists"
        raise HfgpuError(f"could not write checkpoint step {step} to {folder} ({e.strerror or e}): free disk space or lower train.keep_last; {kept}") from None
    accelerator.wait_for_everyone()
    return final


def load(path: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint into the prepared objects; returns the saved counters."""
    unwrapped = accelerator.unwrap_model(model)
    tensors = load_file(str(path / "trainable.safetensors"))
    expected = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        from hfgpu.errors import HfgpuError

        raise HfgpuError(f"checkpoint {path} was written by a different model or LoRA setup ({len(set(tensors) ^ expected)} parameters differ): resume with the recipe that wrote it, or set overwrite=true")
    params = dict(unwrapped.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / "state.json").read_text())
