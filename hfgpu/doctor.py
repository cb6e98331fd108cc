"""`hfgpu doctor`: can this machine fine-tune, and if not, what to do.

The facts come from a `SystemProbe` (what torch.cuda, bitsandbytes, flash-attn, accelerate and
huggingface_hub report); `diagnose()` turns them into checks. Tests pass their own probes; the logic
is the same either way.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from hfgpu.knobs import PASCAL_TORCH
from hfgpu.units import gib


@dataclass
class Device:
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int]


@dataclass
class SystemProbe:
    torch_version: str
    cuda_version: str | None  # the CUDA the torch wheel was built for; None: a CPU build
    arch_list: list[str]  # torch.cuda.get_arch_list(): sm_XY (binaries) and compute_XY (PTX)
    devices: list[Device]
    bitsandbytes: str | None  # version, or None when it does not import
    flash_attn: str | None
    accelerate_config: str | None  # path of accelerate's default config, when one exists
    hub_logged_in: bool


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


@dataclass
class Report:
    probe: SystemProbe
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def to_dict(self) -> dict:
        p = asdict(self.probe)
        for d in p["devices"]:
            d["compute_capability"] = "{}.{}".format(*d.pop("capability"))
        return {"system": p, "checks": [asdict(c) for c in self.checks], "ok": self.ok}


def probe_system() -> SystemProbe:
    """What this machine reports. Never raises: a missing piece is reported as missing."""
    import importlib

    import torch

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
            except RuntimeError:  # a wheel without this card's kernels can still list it
                free, total = 0, props.total_memory
            devices.append(Device(props.name, int(total), int(free), (props.major, props.minor)))

    def version(module: str) -> str | None:
        try:
            return getattr(importlib.import_module(module), "__version__", "installed")
        except Exception:
            return None

    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    cfg = os.environ.get("ACCELERATE_CONFIG_FILE") or os.path.join(home, "accelerate", "default_config.yaml")
    try:
        from huggingface_hub import get_token

        logged_in = bool(get_token())
    except Exception:
        logged_in = False
    return SystemProbe(
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        arch_list=list(torch.cuda.get_arch_list()) if torch.version.cuda else [],
        devices=devices,
        bitsandbytes=version("bitsandbytes"),
        flash_attn=version("flash_attn"),
        accelerate_config=cfg if os.path.isfile(cfg) else None,
        hub_logged_in=logged_in,
    )


def wheel_runs_on(arch_list: list[str], cc: tuple[int, int]) -> bool:
    """A wheel runs a card if it has a binary for the same major at a lower-or-equal minor (cubins are
    forward compatible within a major), or PTX for an equal-or-lower capability (JIT-compiled)."""
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit():
            continue
        major, minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and major == cc[0] and minor <= cc[1]:
            return True
        if kind == "compute" and (major, minor) <= cc:
            return True
    return False


def diagnose(p: SystemProbe) -> Report:
    r = Report(p)
    add = lambda *a: r.checks.append(Check(*a))
    add(
        "torch",
        "ok",
        f"torch {p.torch_version}"
        + (f", built for CUDA {p.cuda_version} ({' '.join(p.arch_list)})" if p.cuda_version else ", a CPU build"),
    )
    if not p.devices:
        fix = "" if p.cuda_version else "install a CUDA build of torch for your card (see the README), or run the CPU demo"
        add("gpu", "warn", "no CUDA GPU visible: only CPU runs (the demo) will work", fix)
    for i, d in enumerate(p.devices):
        cc = f"{d.capability[0]}.{d.capability[1]}"
        add(f"gpu {i}", "ok", f"{d.name}: {gib(d.total_bytes)}, {gib(d.free_bytes)} free now, compute capability {cc}")
        if wheel_runs_on(p.arch_list, d.capability):
            add(f"gpu {i} kernels", "ok", f"torch's wheel has kernels for sm_{d.capability[0]}{d.capability[1]}")
        elif d.capability[0] < 7:
            add(
                f"gpu {i} kernels",
                "fail",
                f"torch {p.torch_version} has no sm_{d.capability[0]}x kernels ('no kernel image is available'): only the "
                f"CUDA 12.6 builds of torch ≤ 2.14 still carry Pascal",
                PASCAL_TORCH,
            )
        else:
            add(
                f"gpu {i} kernels",
                "fail",
                f"torch {p.torch_version} was not built for sm_{d.capability[0]}{d.capability[1]}",
                "install a torch build whose CUDA supports this card (pytorch.org/get-started)",
            )
        add(
            f"gpu {i} bf16",
            "ok" if d.capability >= (8, 0) else "warn",
            "bf16: native (cc ≥ 8.0)"
            if d.capability >= (8, 0)
            else f"bf16: not native on cc {cc} (torch.cuda.is_bf16_supported() may still say True through emulation): hfgpu uses "
            + ("fp16" if d.capability >= (7, 0) else "fp32"),
        )
        if d.capability >= (8, 0):
            add(
                f"gpu {i} flash-attn",
                "ok" if p.flash_attn else "warn",
                f"FlashAttention-2: {'flash-attn ' + p.flash_attn if p.flash_attn else 'supported by the card, package not installed'}",
                "" if p.flash_attn else "optional: pip install flash-attn --no-build-isolation (sdpa works without it)",
            )
        else:
            add(f"gpu {i} flash-attn", "ok", "FlashAttention-2 needs cc ≥ 8.0: sdpa's memory-efficient kernel is used instead")
        if p.bitsandbytes:
            features = ["NF4 4-bit (QLoRA)", "8-bit optimizers"] if d.capability >= (6, 0) else []
            if d.capability >= (7, 5):
                features.append("LLM.int8")
            add(
                f"gpu {i} bitsandbytes",
                "ok" if features else "fail",
                f"bitsandbytes {p.bitsandbytes}: " + (", ".join(features) if features else "needs cc ≥ 6.0"),
            )
    if p.bitsandbytes and not p.devices:
        add("bitsandbytes", "ok", f"bitsandbytes {p.bitsandbytes} imports (NF4 and 8-bit optimizers also run on CPU)")
    if not p.bitsandbytes:
        add("bitsandbytes", "warn", "bitsandbytes does not import: QLoRA and 8-bit optimizers are unavailable", "pip install bitsandbytes")
    add(
        "accelerate config",
        "ok",
        p.accelerate_config
        or "none: `accelerate launch` uses one process per run; `accelerate config` or accelerate_configs/ for several GPUs",
    )
    add(
        "hub login",
        "ok" if p.hub_logged_in else "warn",
        "a Hub token is available" if p.hub_logged_in else "no Hub token: pushing needs one",
        "" if p.hub_logged_in else "hf auth login (or set HF_TOKEN)",
    )
    return r
