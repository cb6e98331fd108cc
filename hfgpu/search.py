"""The planner's search: one planning problem (the model, the card, the knobs as given and resolved before the
search) and the search over strategy, optimizer, micro-batch and memory savers that hfgpu.planner turns into a Plan.
Torch-free, like the planner."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from hfgpu import memory, objectives
from hfgpu.corrections import correction_for
from hfgpu.errors import HfgpuError
from hfgpu.gpus import GPU, get_gpu
from hfgpu.knobs import (
    ALL_LINEAR,
    STRATEGIES,
    Knobs,
    Surface,
    auto_frozen_dtype,
    auto_precision,
    chunked_loss_blocker,
    default_attention,
    tiled_mlp_blocker,
    validate,
)
from hfgpu.models import ModelSpec, model_spec
from hfgpu.throughput import (
    tokens_per_second,
)

DEFAULT_GLOBAL_BATCH = 16  # sequences per optimizer step
DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_LORA_R = 16


@dataclass(frozen=True)
class Problem:
    """One planning problem: the model, the card, the knobs as given and as resolved before the search."""

    spec: ModelSpec
    gpu: GPU
    fixed: Knobs  # as the user gave them
    base: Knobs  # attention, LoRA, batch target, seq_len, distributed resolved; the searched knobs still as given
    calibration: dict | None  # this card's stored correction (hfgpu calibrate), when asked for and present
    surface: Surface
    calibrated: bool = True

    @property
    def correction(self) -> float:
        return self.calibration["factor"] if self.calibration else 1.0

    @cached_property
    def saver_rules(self) -> tuple[dict[str, tuple[bool, ...]], dict[str, str]]:
        """`_saver_rules` of this problem, decided once for the search and the reasons."""
        return _saver_rules(self)

    def setup(self, **searched: Any) -> memory.Setup:
        return memory.Setup.of(self.base.replace(**searched), self.gpu.count)

    def breakdown(self, s: memory.Setup) -> memory.MemoryBreakdown:
        return memory.breakdown(self.spec, s, self.gpu.vram_bytes, self.correction)


TIGHT_SHARE = 0.95  # a plan using more of the budget than this is tight whatever the model's known error


def is_tight(s: memory.Setup, m: memory.MemoryBreakdown) -> bool:
    """Fits, by less than the memory model's known error for this mode, or above TIGHT_SHARE of the budget."""
    return m.fits and (m.margin < memory.known_error(s) * m.tensor_peak or m.total > TIGHT_SHARE * m.budget)


SAVERS = ("gradient_checkpointing", "chunked_loss", "activation_offloading", "tiled_mlp")
NEEDS_CHECKPOINTING = ("activation_offloading", "tiled_mlp")  # they act on checkpointed layers


def _saver_rules(c: Problem) -> tuple[dict[str, tuple[bool, ...]], dict[str, str]]:
    """The values the search may try for each saver, and, where a rule (not the search) decides, the
    reason: written once, here, and quoted by the plan's reasons as they are."""
    spec, gpu, f = c.spec, c.gpu, c.fixed
    allowed: dict[str, tuple[bool, ...]] = {}
    rule: dict[str, str] = {}
    for name in SAVERS:
        v = getattr(f, name)
        allowed[name] = (False, True) if v == "auto" else (v,)
        if v != "auto":
            rule[name] = "fixed by you" if name == "gradient_checkpointing" else ("on" if v else "off") + " (fixed by you)"
    needs = [name for name in NEEDS_CHECKPOINTING if getattr(f, name) is True]
    if needs and f.gradient_checkpointing == "auto":
        allowed["gradient_checkpointing"] = (True,)
        rule["gradient_checkpointing"] = f"on: {' and '.join(needs)} (fixed) needs it"
    preference = objectives.objective(f.objective).preference
    if preference and f.chunked_loss == "auto":
        allowed["chunked_loss"] = (True,)
        rule["chunked_loss"] = f"on: objective {f.objective} computes its log-probabilities by slices of tokens (always)"
    blockers = {
        "chunked_loss": chunked_loss_blocker(spec, c.base.distributed) if not preference else None,
        "tiled_mlp": tiled_mlp_blocker(spec),
        "activation_offloading": "no GPU" if gpu.is_cpu else None,
    }
    for name, blocker in blockers.items():
        if blocker is not None and getattr(f, name) == "auto":
            allowed[name] = (False,)
            rule[name] = f"off: {blocker}"
    return allowed, rule


def _savers(c: Problem, **chosen: Any) -> list[dict[str, bool]]:
    """(checkpointing, chunked loss, offloading, tiled MLP) combinations allowed by the fixed knobs and
    the rules (`_saver_rules`), fastest first."""
    allowed, _ = c.saver_rules
    combos = []
    for ckpt in allowed["gradient_checkpointing"]:
        offs = allowed["activation_offloading"] if ckpt else (False,)
        tiles = allowed["tiled_mlp"] if ckpt else (False,)
        combos += [
            dict(gradient_checkpointing=ckpt, chunked_loss=chunk, activation_offloading=off, tiled_mlp=tile)
            for chunk in sorted(allowed["chunked_loss"], reverse=True)  # free (CHUNKED_LOSS_COST): on first, for the room
            for off in offs
            for tile in tiles
        ]

    def seconds_per_token(combo: dict) -> float:
        tps = _speed(c, c.setup(**chosen, **combo, micro_batch_size=1))
        return 1 / tps if tps else 0.0

    return sorted(combos, key=seconds_per_token)  # stable: with equal cost, fewer savers first (but the free chunked loss)


@dataclass(frozen=True)
class Found:
    """What the search found: the plan's setup and memory, whether it fits, the smallest peak of each option it
    passed over (`rejected`, as the reasons quote it), and the runner-up among the roomy plans of the chosen
    strategy and optimizer with the estimated tokens/s of both (`speeds`), and how many fitted with room."""

    setup: memory.Setup
    mem: memory.MemoryBreakdown
    fits: bool
    rejected: dict
    runner_up: memory.Setup | None = None
    speeds: tuple[float, float] = (0.0, 0.0)
    roomy: int = 0


# The throughput model's resolution: a plan with more savers or a smaller micro-batch than another that fits is
# chosen only when it is estimated at least this much faster (the estimate is not finer than that)
SPEED_RESOLUTION = 0.01


def _speed(c: Problem, s: memory.Setup) -> float:
    """The throughput model's tokens/s (a card without FLOPS figures, e.g. "12GB", is timed as a 30-TFLOPS one)."""
    gpu = c.gpu if c.gpu.tensor_tflops or c.gpu.fp32_tflops else replace(c.gpu, fp32_tflops=30.0)
    return tokens_per_second(c.spec, gpu, s) or 0.0


def search(c: Problem) -> Found:
    """Strategies in order of quality (full, LoRA, QLoRA), and within one the exact 32-bit optimizer state before
    8-bit: the first (strategy, optimizer) with plans that fit with room (not `is_tight`) gives the fastest of them
    by the throughput model, over every micro-batch × saver combination (ties: fewer savers, larger micro-batch).
    A strategy whose every fitting plan is tight gives the tight one with the most room before the next strategy
    is tried; else the plan with the smallest peak."""
    f, gpu = c.fixed, c.gpu
    precision = f.precision if f.precision != "auto" else auto_precision(gpu)[0]
    strategies = STRATEGIES if f.strategy == "auto" else (f.strategy,)
    if f.strategy == "auto" and f.quantization != "auto":
        strategies = {"none": ("full", "lora"), "int8": ("lora",)}.get(f.quantization, ("qlora",))
    per_process_batch = max(1, math.ceil(c.base.global_batch_size / gpu.count))
    if f.micro_batch_size != "auto":
        batches = [f.micro_batch_size]
    else:
        top = 1 << (per_process_batch.bit_length() - 1)
        batches = [top >> i for i in range(top.bit_length())]  # e.g. 16, 8, 4, 2, 1
    smallest: tuple[memory.Setup, memory.MemoryBreakdown] | None = None
    rejected: dict[tuple, int] = {}

    def saw(s: memory.Setup, total: int) -> None:
        for key in ((s.strategy,), (s.strategy, s.optimizer), (s.strategy, s.optimizer, s.gradient_checkpointing)):
            rejected[key] = min(rejected.get(key, total), total)

    if f.frozen_dtype in ("bf16", "fp16"):
        strategies = tuple(x for x in strategies if x != "full")  # a 16-bit frozen base is LoRA/QLoRA's (validate)
    for strategy in strategies:
        tight: list[tuple[memory.Setup, memory.MemoryBreakdown]] = []
        frozen = f.frozen_dtype if f.frozen_dtype != "auto" and strategy != "full" else auto_frozen_dtype(gpu, strategy, precision)[0]
        q = f.quantization
        if q == "auto":
            q = "nf4" if strategy == "qlora" else "none"
        if strategy == "lora" and q in ("nf4", "fp4"):
            continue  # only reachable with strategy auto: a 4-bit base is the qlora candidate
        # exact 32-bit state first; 8-bit when only it fits
        optimizers = [f.optimizer] if f.optimizer != "auto" else ["adamw_torch", "adamw_8bit"]
        for optimizer in optimizers:
            chosen = dict(
                precision=precision,
                frozen_dtype=frozen,
                strategy=strategy,
                quantization=q,
                optimizer=optimizer,
                lora_dropout=float(f.lora_dropout) if strategy != "full" else 0.0,
            )
            roomy: list[tuple[float, memory.Setup, memory.MemoryBreakdown]] = []
            for savers in _savers(c, **chosen):
                for mb in batches:
                    s = c.setup(**chosen, **savers, micro_batch_size=mb)
                    mem = c.breakdown(s)
                    if mem.fits and not is_tight(s, mem):
                        roomy.append((_speed(c, s), s, mem))
                    elif mem.fits:
                        tight.append((s, mem))
                    else:
                        saw(s, mem.total)
                        if smallest is None or mem.total < smallest[1].total:
                            smallest = (s, mem)
            if roomy:
                # the first in search order (fewer savers, then larger micro-batch) within SPEED_RESOLUTION of the fastest
                fastest = max(t[0] for t in roomy)
                best = next(t for t in roomy if t[0] * (1 + SPEED_RESOLUTION) >= fastest)
                others = [t for t in roomy if t is not best]
                second = max(others, key=lambda t: t[0]) if others else None
                ranked = roomy
                return Found(
                    best[1],
                    best[2],
                    True,
                    rejected,
                    runner_up=second[1] if second else None,
                    speeds=(best[0], second[0] if second else 0.0),
                    roomy=len(ranked),
                )
        if tight:
            s, mem = max(tight, key=lambda t: t[1].margin)  # the most room of the tight plans (first in ties)
            return Found(s, mem, True, rejected)
    assert smallest is not None
    return Found(smallest[0], smallest[1], False, rejected)


def problem(model: Any, gpu: Any, fixed: Knobs, surface: Surface, calibrated: bool) -> Problem:
    """The planning problem: the model (a name or a ModelSpec), the card (a name or a GPU), the checked knobs."""
    spec = model if isinstance(model, ModelSpec) else model_spec(model)
    gpu = gpu if isinstance(gpu, GPU) else get_gpu(gpu)
    errs = validate(spec, gpu, fixed, surface)
    if errs:
        raise HfgpuError("; ".join(errs))
    r = DEFAULT_LORA_R if fixed.lora_r == "auto" else fixed.lora_r
    base = fixed.replace(
        attention=default_attention(spec) if fixed.attention == "auto" else fixed.attention,
        lora_r=r,
        lora_alpha=2 * r if fixed.lora_alpha == "auto" else fixed.lora_alpha,
        lora_targets=tuple(spec.linear_names) if fixed.lora_targets in ("auto", (ALL_LINEAR,)) else fixed.lora_targets,
        global_batch_size=DEFAULT_GLOBAL_BATCH if fixed.global_batch_size == "auto" else fixed.global_batch_size,
        distributed=("ddp" if gpu.count > 1 else "none") if fixed.distributed == "auto" else fixed.distributed,
        seq_len=min(DEFAULT_MAX_SEQ_LEN, spec.max_seq_len) if fixed.seq_len == "auto" else fixed.seq_len,
    )
    calibration = None
    if calibrated and not gpu.is_cpu:
        calibration = correction_for(gpu.name)
    return Problem(spec, gpu, fixed, base, calibration, surface, calibrated)
