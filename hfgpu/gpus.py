"""The GPU catalog: facts about NVIDIA cards that planning needs, looked up by forgiving names.

Data: `resources/gpus.csv`, copied from the project's reference table (shared/reference/gpus.csv,
compiled from Wikipedia's "List of Nvidia graphics processing units" via voidful/gpu-info-api,
NVIDIA's CUDA GPU list and whitepapers); every row keeps its `source` column.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable

from hfgpu._fuzzy import did_you_mean
from hfgpu._package import PACKAGE
from hfgpu.errors import HfgpuError
from hfgpu.units import GIB


@dataclass(frozen=True)
class GPU:
    """One card (or `count` identical cards for data-parallel runs; each process plans for one)."""

    name: str
    vram_gb: float  # as marketed: GB of 2**30 bytes (an "8 GB" card has 8 GiB)
    compute_capability: tuple[int, int] | None = None  # None: unknown (custom card)
    architecture: str = "unknown"
    series: str = ""
    bandwidth_gbps: float | None = None
    fp32_tflops: float | None = None
    tensor_tflops: float | None = None  # dense fp16/bf16 tensor-core TFLOPS with fp32 accumulate
    bf16_supported: bool | None = None
    msrp_usd: float | None = None
    source: str = ""
    count: int = 1
    note: str = ""  # how the name was resolved, when it needed explaining
    aliases: tuple[str, ...] = field(default=(), repr=False)

    @property
    def vram_bytes(self) -> int:
        return int(self.vram_gb * GIB)

    @property
    def cc(self) -> float | None:
        return None if self.compute_capability is None else self.compute_capability[0] + self.compute_capability[1] / 10

    @property
    def is_cpu(self) -> bool:
        return self.architecture == "cpu"

    @property
    def is_consumer(self) -> bool:
        return self.series.startswith("GeForce")

    @property
    def display_name(self) -> str:
        return f"{self.count}x {self.name}" if self.count > 1 else self.name

    def to_dict(self) -> dict:
        cc = self.compute_capability
        return {
            "name": self.name,
            "count": self.count,
            "vram_gb": self.vram_gb,
            "compute_capability": None if cc is None else f"{cc[0]}.{cc[1]}",
            "architecture": self.architecture,
            "bf16_supported": self.bf16_supported,
            "tensor_tflops": self.tensor_tflops,
            "fp32_tflops": self.fp32_tflops,
            "msrp_usd": self.msrp_usd,
        }


def _num(text: str) -> float | None:
    return float(text) if text.strip() else None


@lru_cache(maxsize=1)
def catalog() -> tuple[GPU, ...]:
    """Every card in the packaged CSV, in file order (oldest consumer cards first)."""
    text = PACKAGE.joinpath("resources/gpus.csv").read_text(encoding="utf-8")
    cards = []
    for row in csv.DictReader(text.splitlines()):
        major, minor = row["compute_capability"].split(".")
        cards.append(
            GPU(
                name=row["name"],
                vram_gb=float(row["vram_gb"]),
                compute_capability=(int(major), int(minor)),
                architecture=row["architecture"],
                series=row["series"],
                bandwidth_gbps=_num(row["bandwidth_gbps"]),
                fp32_tflops=_num(row["fp32_tflops"]),
                tensor_tflops=_num(row["fp16_tensor_tflops_fp32acc"]),
                bf16_supported=row["bf16_supported"] == "true",
                msrp_usd=_num(row["launch_msrp_usd"]),
                source=row["source"],
                aliases=tuple(a for a in row["aliases"].split("|") if a),
            )
        )
    return tuple(cards)


_PREFIX = re.compile(r"^(nvidia|geforce|tesla|quadro)+")
_FAMILY = re.compile(r"^(rtx|gtx|gt)")


def _key(name: str) -> str:
    k = re.sub(r"[^a-z0-9]", "", name.lower())
    return _PREFIX.sub("", k)


def _short(key: str) -> str:
    return _FAMILY.sub("", key)


@lru_cache(maxsize=1)
def _index() -> tuple[dict[str, GPU], dict[str, list[GPU]]]:
    """Exact keys (names, aliases, with and without RTX/GTX) and memory-variant groups ("3060")."""
    exact: dict[str, GPU] = {}
    variants: dict[str, list[GPU]] = {}
    for gpu in catalog():
        for label in (gpu.name, *gpu.aliases):
            k = _key(label)
            for key in (k, _short(k)):
                exact.setdefault(key, gpu)
        base = _short(_key(re.sub(r"\(.*?\)|\b\d+\s*GB\b", "", gpu.name)))
        variants.setdefault(base, []).append(gpu)
    return exact, variants


_CUSTOM_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*gi?b\s*$", re.IGNORECASE)
_MULTI = re.compile(r"^\s*(\d+)\s*[x×]\s*(.+)$", re.IGNORECASE)

Probe = Callable[[], "tuple[str, int, tuple[int, int]] | None"]


def get_gpu(spec: "str | GPU", probe: Probe | None = None) -> GPU:
    """Resolve a card: a catalog name ("4090", "RTX 4090", "GeForce RTX 4090", "1080ti"), a memory
    size ("12GB"), a count ("2x RTX 3090"), a `GPU`, or "auto" (this machine's first CUDA device)."""
    if isinstance(spec, GPU):
        if spec.vram_gb <= 0:
            raise HfgpuError(f"GPU {spec.name!r} has vram_gb={spec.vram_gb}: give its memory in GB, e.g. GPU(name=..., vram_gb=12)")
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise HfgpuError(f"GPU {spec!r} is not a card name: pass e.g. 'RTX 3060', '12GB' or 'auto'")
    text = spec.strip()
    multi = _MULTI.match(text)
    if multi and not _CUSTOM_MEM.match(text):
        count = int(multi.group(1))
        if count < 1:
            raise HfgpuError(f"GPU {spec!r}: the count must be at least 1, e.g. '2x RTX 3090'")
        one = get_gpu(multi.group(2), probe)
        note = f"{count} cards: the plan is per process (one per card, data-parallel); global batch is split across them"
        return replace(one, count=count, note="; ".join(n for n in (one.note, note) if n))
    if text.lower() == "auto":
        return detect(probe)
    if text.lower() == "cpu":
        return cpu_device()
    mem = _CUSTOM_MEM.match(text)
    if mem:
        vram = float(mem.group(1))
        if vram <= 0:
            raise HfgpuError(f"GPU {spec!r}: memory must be positive, e.g. '12GB'")
        return GPU(name=f"custom {vram:g} GB", vram_gb=vram, note="custom card: compute capability unknown")
    exact, variants = _index()
    key = _key(text)
    group = variants.get(_short(key), [])
    if len(group) > 1 and key not in {_key(g.name) for g in group}:
        chosen = exact.get(key) or exact.get(_short(key)) or group[0]
        others = ", ".join(g.name for g in group)
        return replace(chosen, note=f"{text!r} is ambiguous ({others}); using {chosen.name}: name the variant to choose another")
    gpu = exact.get(key) or exact.get(_short(key))
    if gpu is None:
        names = [g.name for g in catalog()]
        raise HfgpuError(
            f"unknown GPU {text!r}: {did_you_mean(text, names)} "
            "(`hfgpu gpus` lists the catalog; a card not in it: give its memory, e.g. '12GB')"
        )
    return gpu


def cpu_device() -> GPU:
    """This machine's CPU and RAM, planned like a card (fp32, no CUDA): for CPU runs and tests."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * GIB
    return GPU(name="CPU", vram_gb=round(ram / GIB, 1), architecture="cpu", series="CPU", note="CPU run: fp32, no CUDA")


def _torch_probe() -> "tuple[str, int, tuple[int, int]] | None":
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory), (props.major, props.minor)


def detect(probe: Probe | None = None) -> GPU:
    """This machine's first CUDA GPU (through torch.cuda, or `probe` in tests)."""
    found = (probe or _torch_probe)()
    if found is None:
        raise HfgpuError(
            "GPU 'auto': torch sees no CUDA device on this machine; name your card instead, e.g. --gpu 'RTX 3060' or --gpu 12GB"
        )
    name, total_bytes, cc = found
    vram_gb = round(total_bytes / GIB, 2)
    exact, _ = _index()
    known = exact.get(_key(name)) or exact.get(_short(_key(name)))
    if known is not None:
        return replace(known, vram_gb=min(known.vram_gb, vram_gb), note=f"detected {name} ({vram_gb:g} GiB usable)")
    return GPU(name=name, vram_gb=vram_gb, compute_capability=cc, bf16_supported=cc >= (8, 0), note=f"detected {name}, not in the catalog")
