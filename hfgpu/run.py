"""A run folder: what hfgpu writes into output_dir and reads back from it, in one place.

`Run` / `RunPlan` read a finished run (its plan, resolved recipe, metrics and weights: push, merge, generate and
export all start from it); `recorded_base` is what its adapter names as the base; `RUN_FILES`, `is_run_folder`,
`check_output_dir`, `RunLock` and `clear_run` decide what a new run may do to a folder. hfgpu.hub (cards, push,
merge) and hfgpu.export (GGUF) both import it; it imports neither.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hfgpu.errors import HfgpuError
from hfgpu.knobs import Knobs

if TYPE_CHECKING:
    from hfgpu.recipe import Recipe

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


# --- runs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """A run's plan.json, typed: the resolved knobs, the card, the planned memory and parameter counts."""

    knobs: Knobs
    card: str
    cards: int
    vram_gb: float
    peak_bytes: int
    budget_bytes: int
    params_total: int
    params_trainable: int

    @classmethod
    def read(cls, path: Path) -> "RunPlan":
        from hfgpu.planner import Plan

        try:
            d = json.loads(path.read_text())
            return cls(
                knobs=Plan.knobs_of(d),
                card=d["gpu"]["name"],
                cards=d["gpu"].get("count", 1),
                vram_gb=d["gpu"]["vram_gb"],
                peak_bytes=d["memory"]["total"],
                budget_bytes=d["memory"]["budget"],
                params_total=d["params_total"],
                params_trainable=d["params_trainable"],
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise HfgpuError(
                f"{str(path)!r} is not a plan.json hfgpu wrote (damaged or from another tool): re-run training, or restore the file"
            ) from None


def hub_id_of(model: str) -> str | None:
    """The Hub repo `model` came from, when that is known locally: typed as owner/name (and not a local path), or a
    file or folder inside the Hub cache (…/models--OWNER--NAME/snapshots/REV/…); else None."""
    from hfgpu._package import resolve_path

    local = Path(resolve_path(model)).expanduser()
    if not local.exists():
        return model if REPO_ID.match(model) else None
    parts = local.resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and parts[i + 1 : i + 2] == ("snapshots",):
            return part[len("models--") :].replace("--", "/")
    return None


def recorded_base(model: str) -> str:
    """What adapter_config.json records as the base, so that plain peft loads the run folder with no other argument
    (`AutoPeftModelForCausalLM.from_pretrained(run_dir)`): the Hub id when the model came from the Hub, else the base's
    absolute path, as peft itself records a local base. A GGUF file's base is its folder: transformers reads the file
    from there given `gguf_file=NAME`, which the run's README.md shows."""
    from hfgpu._package import resolve_path

    hub_id = hub_id_of(model)
    if hub_id:
        return hub_id
    local = Path(resolve_path(model)).expanduser().resolve()
    return str(local.parent if local.suffix.lower() == ".gguf" else local)


def hub_base_of(model: str, base_model_id: str | None = None, where: str = "the base") -> str:
    """The Hub id a pushed adapter names as its base: `base_model_id` when given, else the Hub repo the base came
    from (owner/name as typed, or the Hub cache folder it was read from). A base known only as a local folder or
    file is refused: a downloaded adapter could not find it."""
    if base_model_id is not None:
        if not REPO_ID.match(base_model_id):
            raise HfgpuError(
                f"--base-model-id {base_model_id!r} is not a Hub id (owner/name), e.g. --base-model-id HuggingFaceTB/SmolLM2-135M-Instruct"
            )
        return base_model_id
    found = hub_id_of(model)
    if found is None:
        kind = "file" if str(model).lower().endswith(".gguf") else "folder"
        raise HfgpuError(
            f"{where} is the local {kind} {model!r}, which a downloaded adapter cannot find: name its Hub repo with "
            "--base-model-id OWNER/NAME (hub.base_model_id in a recipe), e.g. the repo it was downloaded from; nothing was uploaded"
        )
    return found


class Run:
    """A finished hfgpu run folder: its plan, resolved recipe, metrics and weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise HfgpuError(f"{str(path)!r} is not a folder: pass the output_dir of a finished hfgpu run")
        missing = [f for f in ("plan.json", "resolved_recipe.yaml", "final_metrics.json") if not (self.path / f).is_file()]
        self.is_adapter = all((self.path / f).is_file() for f in ADAPTER_FILES)
        self.is_full = all((self.path / f).is_file() for f in MODEL_FILES)
        if missing or not (self.is_adapter or self.is_full):
            what = ", ".join(missing + ([] if (self.is_adapter or self.is_full) else ["adapter_model.safetensors or model.safetensors"]))
            raise HfgpuError(f"{str(path)!r} is not a finished hfgpu run (missing {what}): let training finish, or pass its output_dir")
        from hfgpu.recipe import load_recipe

        self.plan = RunPlan.read(self.path / "plan.json")
        self.recipe = load_recipe(self.path / "resolved_recipe.yaml")
        try:
            self.metrics: dict = json.loads(
                (self.path / "final_metrics.json").read_text()
            )  # {"before": {…}, "after": {…}}: free-form metric names
        except json.JSONDecodeError:
            raise HfgpuError(f"{str(self.path / 'final_metrics.json')!r} is not valid JSON: re-run training, or restore the file") from None

    @property
    def base_model(self) -> str:
        """The base as adapter_config.json names it (a Hub id, or a local folder's absolute path)."""
        if self.is_adapter:
            return json.loads((self.path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return self.recipe.model

    @property
    def base_model_path(self) -> str:
        """Where to load the base from: the local folder the run trained on when it is still there
        (resolved_recipe.yaml keeps its full path), else the adapter's recorded base."""
        from hfgpu._package import resolve_path

        local = Path(resolve_path(self.recipe.model)).expanduser()
        return str(local) if local.is_dir() or (local.is_file() and local.suffix == ".gguf") else self.base_model

    @property
    def gguf_file(self) -> str | None:
        """The GGUF file's name when the run trained on one (transformers loads it with `gguf_file=`)."""
        from hfgpu.models import gguf_source

        return gguf_source(self.recipe.model)[1].get("gguf_file")

    def hub_base(self, base_model_id: str | None = None) -> str:
        return hub_base_of(self.recipe.model, base_model_id, where=f"the base of {str(self.path)!r}")

    def load(self, dtype=None):
        """(model, tokenizer): the base with the adapter applied (or the full model), for inference."""
        from hfgpu.errors import library_notices_hidden

        with library_notices_hidden():
            return self._load(dtype)

    def _load(self, dtype=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path)
        dtype = dtype or (torch.float32 if self.plan.knobs.precision == "fp32" or not torch.cuda.is_available() else torch.bfloat16)
        if self.is_full:
            return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype), tokenizer
        from peft import PeftModel

        from hfgpu.modeling import from_pretrained

        try:
            base = from_pretrained(self.base_model_path, dtype=dtype)  # a GGUF base dequantizes again, as training loaded it
        except OSError as e:
            raise HfgpuError(
                f"cannot load the base model {self.base_model_path!r} ({str(e).splitlines()[0][:120]}): make it available locally or online"
            ) from None
        return PeftModel.from_pretrained(base, self.path), tokenizer


# --- what a run may do to a folder ------------------------------------------------------------------


RUN_FILES = (
    "resolved_recipe.yaml",
    "plan.json",
    "metrics.jsonl",
    "loss.png",
    "final_metrics.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "model.safetensors",
    "config.json",
    "reference_logps.json",
    "checkpoints",
)


def check_output_dir(recipe: Recipe) -> Path:
    """Refuse to overwrite an earlier run unless resume or overwrite is asked; nothing is touched when refusing."""
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise HfgpuError(f"output_dir {str(out)!r} is a file: choose a folder, e.g. output_dir=outputs/run")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise HfgpuError(f"output_dir {str(out)!r} is inside {str(parent)!r}, which is a file: choose a folder elsewhere")
            break
    present = [f for f in RUN_FILES if (out / f).exists()]
    if not present:
        return out
    if not is_run_folder(out):
        raise HfgpuError(
            f"output_dir {str(out)!r} holds files that are not an hfgpu run ({', '.join(present[:3])}): hfgpu writes into a new "
            "or empty folder, or replaces its own run (overwrite=true); choose another output_dir, or move those files"
        )
    if recipe.overwrite:
        return out  # cleared by the main process once data and model are ready
    if recipe.resume != "never":
        if (out / "checkpoints").is_dir() or not (out / "final_metrics.json").exists():
            return out  # a checkpoint to resume, or a run stopped before its first one (it starts again)
        raise HfgpuError(
            f"output_dir {str(out)!r} holds a finished run with no checkpoint to resume: set overwrite=true to replace it, or "
            f"choose another output_dir"
        )
    raise HfgpuError(
        f"output_dir {str(out)!r} already holds a run ({', '.join(present[:3])}): set resume=auto to continue it, "
        f"overwrite=true to replace it, or choose another output_dir"
    )


class RunLock:
    """An advisory lock on output_dir for the run's lifetime (main process): a second run on the same
    folder is refused with the holder's pid. Released by the OS when the process ends, even on kill -9.
    Taking it also proves the folder is writable before anything is loaded."""

    NAME = ".hfgpu.lock"

    def __init__(self, out: Path):
        self.out, self.fd, self.created = out, None, False

    def acquire(self) -> "RunLock":
        import errno
        import fcntl

        try:
            self.created = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.out / self.NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            raise HfgpuError(f"output_dir {str(self.out)!r} is not writable: fix its permissions or choose another output_dir") from None
        except OSError as e:
            raise HfgpuError(f"output_dir {str(self.out)!r} cannot be used ({e.strerror or e}): choose another output_dir") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = None
            raise HfgpuError(
                f"output_dir {str(self.out)!r} is in use by another hfgpu run (pid {holder}): wait for it to finish, stop it, "
                f"or choose another output_dir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def release(self, failed: bool = False) -> None:
        if self.fd is None:
            return
        lock = self.out / self.NAME
        if failed and self.created and [p.name for p in self.out.iterdir()] == [self.NAME]:
            lock.unlink(missing_ok=True)  # a run that failed before writing anything leaves no folder behind
            self.out.rmdir()
        os.close(self.fd)
        self.fd = None


def is_run_folder(out: Path) -> bool:
    """Whether `out` holds an hfgpu run (finished or not): the records written before its first step, plan.json as
    hfgpu writes it and resolved_recipe.yaml, or hfgpu checkpoints. Only such a folder is replaced by overwrite=true
    or continued by resume."""
    try:
        plan = json.loads((out / "plan.json").read_text())
        hfgpu_plan = isinstance(plan, dict) and {"gpu", "memory", "strategy", "micro_batch_size"} <= set(plan)
        if hfgpu_plan and (out / "resolved_recipe.yaml").is_file():
            return True
    except (OSError, ValueError):
        pass
    # or hfgpu checkpoints alone (copied to another machine to resume there): a state.json with its file table
    for state in (out / "checkpoints").glob("step-*/state.json"):
        try:
            if {"files", "fingerprint"} <= set(json.loads(state.read_text())):
                return True
        except (OSError, ValueError, TypeError):
            continue
    return False


def clear_run(out: Path) -> None:
    """An earlier run's files (a run folder only: check_output_dir refused any other); anything else stays."""
    for name in (*RUN_FILES, *TOKENIZER_FILES, "README.md", "eval_answers.jsonl"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
