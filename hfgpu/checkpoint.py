"""Checkpoints that survive crashes: written to a temporary folder and renamed when complete.

A checkpoint holds only what changes in training: the trainable parameters (the adapter, or every
weight in full fine-tuning), the optimizer and scheduler state, each process's RNG state and the
loop's counters. A 4-bit base model is never re-saved (accelerate's load_state cannot read it back
strictly). Every file is fsynced, then `state.json` is written last with each file's size and
SHA-256 and the run's fingerprint (what the training data and recipe were). A folder without
state.json, or still named `*.tmp*`, is incomplete: ignored on resume and removed. A checkpoint
whose files do not match state.json (power loss, a copy cut short) is passed over on resume=auto,
with a warning, for the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hfgpu.errors import HfgpuError, write_failure

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints with a state.json, oldest first (not yet verified: see `verify`)."""
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and ".tmp" not in p.name and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def clean_incomplete(folder: Path) -> list[Path]:
    """Remove checkpoint folders a crash left half-written; returns what was removed."""
    if not folder.is_dir():
        return []
    done = set(complete_checkpoints(folder))
    removed = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p not in done]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise HfgpuError(
            f"checkpoint {path} has an unreadable state.json ({e}): use resume=auto to fall back to an earlier checkpoint"
        ) from None


def verify(path: Path) -> str | None:
    """None when every file state.json lists is there with its size and SHA-256; else what is wrong."""
    try:
        files = json.loads((path / "state.json").read_text()).get("files")
    except (OSError, ValueError):
        return "state.json is unreadable"
    if files is None:
        return None  # written before checksums existed: trusted as before
    for name, (size, digest) in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} were written"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum"
    return None


def newest_good(folder: Path, say=print) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are named and passed over."""
    for path in reversed(complete_checkpoints(folder)):
        problem = verify(path)
        if problem is None:
            return path
        say(f"warning: checkpoint {path.name} is damaged ({problem}); trying the one before it")
    return None


def _checkpoint_bytes(model, optimizer, previous: list[Path]) -> int:
    """What a checkpoint takes on disk: the last one's size when there is one (exact), else the trainable tensors
    and the optimizer's state tensors."""
    if previous:
        return sum(f.stat().st_size for f in previous[-1].iterdir() if f.is_file())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return trainable + state


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
        _fsync(tmp / f"rng-{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            save_file(_trainable(accelerator.unwrap_model(model)), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {}
            for f in sorted(tmp.iterdir()):
                _fsync(f)
                files[f.name] = [f.stat().st_size, _sha256(f)]
            state = {**counters, "world_size": accelerator.num_processes, "files": files}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            _fsync(tmp / "state.json")
            if final.exists():  # a damaged checkpoint of this step, passed over on resume: replaced
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(folder)
            for old in complete_checkpoints(folder)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except Exception as e:  # disk full, quota, permissions: the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(folder)
        kept = (
            f"the previous checkpoint {previous[-1].name} is intact (lower train.keep_last to keep fewer; resume=auto continues from it)"
            if previous
            else "no earlier checkpoint exists"
        )
        error = write_failure(e, folder, f"checkpoint step {step}", _checkpoint_bytes(model, optimizer, previous), kept)
        if error is None:
            raise
        raise error from None
    accelerator.wait_for_everyone()
    return final


def check_fingerprint(saved: dict, current: dict, path: Path, force: bool, say=print) -> None:
    """Refuse to resume when the training data or a training-relevant recipe value changed since the
    checkpoint was written (one line, the differences named), unless `force`."""
    if not saved:
        return
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a != b:
            diffs.append("the tokenized training data changed" if key == "data" else f"{key} {_short(a)} → {_short(b)}")
    if not diffs:
        return
    text = "; ".join(diffs)
    if force:
        say(f"warning: resuming {path.name} although it was written with other settings ({text}) because resume_force=true")
        return
    raise HfgpuError(
        f"checkpoint {path.name} was written with other settings ({text}): restore them, start a new run "
        "(another output_dir, or overwrite=true), or set resume_force=true to resume anyway"
    )


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def load(path: Path, saved: dict, accelerator, model, optimizer, scheduler) -> None:
    """Restore a checkpoint into the prepared objects; `saved` is its state.json (read_state)."""
    world_size = accelerator.num_processes
    if saved.get("world_size", world_size) != world_size:
        raise HfgpuError(
            f"checkpoint {path.name} was written by {saved['world_size']} processes, this run has {world_size}: "
            f"launch with --num_processes {saved['world_size']} to resume exactly, or start a new run"
        )
    unwrapped = accelerator.unwrap_model(model)
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
    except Exception as e:
        raise HfgpuError(
            f"checkpoint {path} cannot be read ({str(e)[:120]}): use resume=auto to fall back to an earlier checkpoint"
        ) from None
    params = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        raise HfgpuError(
            f"checkpoint {path} was written by a different model or LoRA setup ({len(set(tensors) ^ set(params))} parameters "
            f"differ): resume with the recipe that wrote it, or set overwrite=true"
        )
    wrong = [(n, tuple(t.shape), tuple(params[n].shape)) for n, t in tensors.items() if tuple(t.shape) != tuple(params[n].shape)]
    if wrong:
        n, was, now = wrong[0]
        raise HfgpuError(
            f"checkpoint {path.name} holds {len(wrong)} parameters of another shape ({n}: {list(was)} saved, {list(now)} now; "
            "lora.r or the model changed): resume with the recipe that wrote it, or start a new run"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng-{accelerator.process_index}.pt"
    if not rng.is_file():
        raise HfgpuError(
            f"checkpoint {path.name} has no {rng.name}: the resumed run could not be exact; use resume=auto to fall back to "
            f"an earlier checkpoint"
        )
    _set_rng_state(torch.load(rng, weights_only=False))
