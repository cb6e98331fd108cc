"""plan(): choose the knobs of a fine-tuning run that fits a card, with a reason for each.

The planner is pure: a model config (never weights), a GPU spec and the knobs the user fixed. Any
knob given is kept; the rest are searched in this order: strategy by quality (full > LoRA > QLoRA),
then the optimizer (exact 32-bit state before 8-bit), then, among every micro-batch × memory-saver
combination that fits with room, the fastest by the throughput model (within SPEED_RESOLUTION, the one
with fewer savers, then the larger micro-batch; the free chunked loss counts as none). Facts
from the hardware (bf16 from cc 8.0, fp16 on Turing, fp32 compute on Pascal, FlashAttention-2 from
cc 8.0, LLM.int8 from cc 7.5) are rules, not choices (hfgpu.knobs); the speed estimate and the
savers' time costs are in hfgpu.throughput.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from hfgpu import memory
from hfgpu.corrections import correction_for
from hfgpu.errors import DoesNotFit, HfgpuError
from hfgpu.gpus import GPU, catalog, get_gpu
from hfgpu.knobs import (
    ALL_LINEAR,
    KNOB_FIELDS,
    KNOB_NAMES,
    NO_SDPA_MODEL_TYPES,
    OBJECTIVE_PAPERS,
    PREFERENCE_OBJECTIVES,
    PYTHON,
    REFERENCE_OBJECTIVES,
    RMSNORM_BY_MODEL_TYPE,
    STRATEGIES,
    Knobs,
    Surface,
    auto_frozen_dtype,
    auto_precision,
    batch_unit,
    chunked_loss_blocker,
    default_attention,
    planning_cc,
    recipe_key,
    tiled_mlp_blocker,
    validate,
)
from hfgpu.models import ModelSpec, catalog_models, model_spec
from hfgpu.throughput import (
    CHUNKED_LOSS_COST,
    PCIE_BYTES_PER_S,
    TILED_MLP_COST,
    checkpointing_cost,
    compute_tokens_per_second,
    reference_cost,
    tokens_per_second,
)
from hfgpu.units import GIB, gib

DEFAULT_GLOBAL_BATCH = 16  # sequences per optimizer step
DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_LORA_R = 16

PASCAL_TORCH = "pip install 'torch<=2.14' --index-url https://download.pytorch.org/whl/cu126"


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """A fine-tuning run for one model on one card: every knob resolved, its reason, and the memory it needs.

    The knobs are the resolved record `knobs` (hfgpu.knobs.Knobs, no "auto" left); each is also an
    attribute (`plan.seq_len`). `fixed` is the record as the user gave it."""

    model: str
    spec: ModelSpec = field(repr=False)
    gpu: GPU
    knobs: Knobs
    memory: memory.MemoryBreakdown  # per process (one per card)
    reasons: dict[str, str]
    warnings: tuple[str, ...]
    tokens_per_second_estimate: float | None
    fixed: Knobs = field(default_factory=Knobs, repr=False)
    simulation: dict | None = None  # plan(..., verify=True): one step simulated on fake tensors (hfgpu.simulate)

    def __getattr__(self, name: str) -> Any:
        if name in KNOB_NAMES:
            return getattr(object.__getattribute__(self, "knobs"), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def lora(self) -> LoraSettings | None:
        k = self.knobs
        return (
            None
            if k.strategy == "full"
            else LoraSettings(r=k.lora_r, alpha=k.lora_alpha, dropout=float(k.lora_dropout), target_modules=k.lora_targets)
        )

    @property
    def fits(self) -> bool:
        return self.memory.fits

    @property
    def tight(self) -> bool:
        """Fits, but by less than the memory model's known error (memory.known_error) or within 5 % of the budget:
        a real step may not. `--verify` settles it (see `fit`)."""
        return _tight(self.setup(), self.memory)

    @property
    def fit(self) -> str:
        """One word for where the plan stands: "verified" (a simulated step fits), "rejected" (the plan fits, a
        simulated step does not), "tight" (unverified and within the model's known error of the budget),
        "fits", or "does not fit"."""
        if not self.fits:
            return "does not fit"
        if self.simulation is not None:
            return "verified" if self.simulation["fits"] else "rejected"
        return "tight" if self.tight else "fits"

    @property
    def params_total(self) -> int:
        return self.spec.params_total

    @property
    def params_trainable(self) -> int:
        return memory.trainable_params(self.spec, self.setup())

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step as planned (micro-batch × accumulation × cards); `knobs.global_batch_size` is the target."""
        return self.micro_batch_size * self.grad_accum_steps * self.gpu.count

    @property
    def hours_per_million_tokens(self) -> float | None:
        t = self.tokens_per_second_estimate
        return None if not t else 1e6 / t / 3600

    def to_dict(self) -> dict:
        """plan.json: the model, the card, every knob (the lora_* ones as `lora`, named as in a recipe), memory and reasons."""
        cc = self.gpu.compute_capability
        knobs: dict[str, Any] = {}
        for f in KNOB_FIELDS:
            v = getattr(self.knobs, f.name)
            if f.name.startswith("lora_"):
                knobs.setdefault("lora", {})[recipe_key(f.name).split(".")[-1]] = list(v) if isinstance(v, tuple) else v
            else:
                knobs[f.name] = v
        if self.lora is None:
            knobs["lora"] = None
        knobs["double_quant"] = self.double_quant if self.quantization in ("nf4", "fp4") else None
        knobs["global_batch_size"] = self.global_batch_size
        return {
            "model": self.model,
            "gpu": {
                "name": self.gpu.name,
                "count": self.gpu.count,
                "vram_gb": self.gpu.vram_gb,
                "compute_capability": None if cc is None else f"{cc[0]}.{cc[1]}",
            },
            **knobs,
            "world_size": self.gpu.count,
            "offloaded_bytes_per_step": memory.offloaded_bytes(self.spec, self.setup()),
            "params_total": self.params_total,
            "params_trainable": self.params_trainable,
            "memory": self.memory.to_dict(),
            "fits": self.fits,
            "fit": self.fit,
            "reasons": dict(self.reasons),
            "warnings": list(self.warnings),
            "tokens_per_second_estimate": None if self.tokens_per_second_estimate is None else round(self.tokens_per_second_estimate, 1),
            "hours_per_million_tokens_estimate": None if self.hours_per_million_tokens is None else round(self.hours_per_million_tokens, 3),
            **({"simulation": self.simulation} if self.simulation is not None else {}),
        }

    @staticmethod
    def knobs_of(record: dict) -> Knobs:
        """The resolved knob record a plan.json holds: `to_dict`'s knob keys read back. A full run records
        no LoRA knobs and a run without 4-bit weights no double_quant: those come back as the record's defaults;
        global_batch_size is the batch as planned (micro-batch × accumulation × cards)."""
        lora = record.get("lora") or {}
        values: dict[str, Any] = {}
        for f in KNOB_FIELDS:
            v = lora.get(recipe_key(f.name).split(".")[-1]) if f.name.startswith("lora_") else record.get(f.name)
            if v is not None:
                values[f.name] = tuple(v) if isinstance(v, list) else v
        return Knobs(**values)

    def setup(self) -> memory.Setup:
        """The resolved knobs and the process count, as the memory model and the simulation take them."""
        return memory.Setup.of(self.knobs, self.gpu.count)

    def __str__(self) -> str:
        from hfgpu.report import plan_text

        return plan_text(self)


# --- the search --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
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


def _tight(s: memory.Setup, m: memory.MemoryBreakdown) -> bool:
    """Fits, by less than the memory model's known error for this mode, or above TIGHT_SHARE of the budget."""
    return m.fits and (m.margin < memory.known_error(s) * m.tensor_peak or m.total > TIGHT_SHARE * m.budget)


SAVERS = ("gradient_checkpointing", "chunked_loss", "activation_offloading", "tiled_mlp")
NEEDS_CHECKPOINTING = ("activation_offloading", "tiled_mlp")  # they act on checkpointed layers


def _saver_rules(c: _Ctx) -> tuple[dict[str, tuple[bool, ...]], dict[str, str]]:
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
    if f.objective in PREFERENCE_OBJECTIVES and f.chunked_loss == "auto":
        allowed["chunked_loss"] = (True,)
        rule["chunked_loss"] = f"on: objective {f.objective} computes its log-probabilities by slices of tokens (always)"
    blockers = {
        "chunked_loss": chunked_loss_blocker(spec, c.base.distributed) if f.objective not in PREFERENCE_OBJECTIVES else None,
        "tiled_mlp": tiled_mlp_blocker(spec),
        "activation_offloading": "no GPU" if gpu.is_cpu else None,
    }
    for name, blocker in blockers.items():
        if blocker is not None and getattr(f, name) == "auto":
            allowed[name] = (False,)
            rule[name] = f"off: {blocker}"
    return allowed, rule


def _savers(c: _Ctx, **chosen: Any) -> list[dict[str, bool]]:
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
class _Found:
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


def _speed(c: _Ctx, s: memory.Setup) -> float:
    """The throughput model's tokens/s (a card without FLOPS figures, e.g. "12GB", is timed as a 30-TFLOPS one)."""
    gpu = c.gpu if c.gpu.tensor_tflops or c.gpu.fp32_tflops else replace(c.gpu, fp32_tflops=30.0)
    return tokens_per_second(c.spec, gpu, s) or 0.0


def _search(c: _Ctx) -> _Found:
    """Strategies in order of quality (full, LoRA, QLoRA), and within one the exact 32-bit optimizer state before
    8-bit: the first (strategy, optimizer) with plans that fit with room (not `_tight`) gives the fastest of them
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
                    if mem.fits and not _tight(s, mem):
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
                return _Found(
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
            return _Found(s, mem, True, rejected)
    assert smallest is not None
    return _Found(smallest[0], smallest[1], False, rejected)


def _context(model: Any, gpu: Any, fixed: Knobs, surface: Surface, calibrated: bool) -> _Ctx:
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
    return _Ctx(spec, gpu, fixed, base, calibration, surface, calibrated)


def plan(model: Any, gpu: Any = "auto", *, verify: bool = False, calibrated: bool = True, **knobs: Any) -> Plan:
    """Plan a fine-tuning run of `model` on `gpu`. Knobs given are kept; "auto" ones are chosen.

    The knobs are the fields of `hfgpu.knobs.Knobs` (strategy, precision, seq_len, lora_r, …; see the
    signature). `verify=True` also runs one training step of the planned model on fake tensors (about
    10 s for an 8B model) and attaches its tensor peak as `plan.simulation`.
    Raises `DoesNotFit` (carrying the closest plan and what would fit instead) when nothing fits,
    and `HfgpuError` for a bad model, card or knob.
    """
    return plan_knobs(model, gpu, Knobs.from_kwargs(knobs), verify=verify, calibrated=calibrated)


def plan_knobs(model: Any, gpu: Any, knobs: Knobs, *, surface: Surface = PYTHON, verify: bool = False, calibrated: bool = True) -> Plan:
    """`plan` for a knob record; `surface` names knobs in errors as the user typed them (recipe key, flag, keyword)."""
    c = _context(model, gpu, knobs, surface, calibrated)
    result = _plan(c)
    if verify:
        c, result = _verified(c, result)
    if not result.fits:
        raise DoesNotFit(_does_not_fit_message(result, alts := _alternatives(c, result)), closest=result, alternatives=alts)
    return result


VERIFY_REPLANS = 2  # --verify: how many times a plan the simulation rejects is re-planned to the simulation's numbers


def _simulated(p: Plan) -> dict:
    from hfgpu.simulate import simulate

    sim = simulate(p.spec.config, p.setup(), p.spec).to_dict()
    # several cards: the simulation runs the whole model in one process; each process holds the planner's
    # (exact) share of weights and state, and what the simulation measured on top of them
    sim["total"] = p.memory.weights + p.memory.trainable_state + sim["transient"] + p.memory.overhead
    sim["fits"] = sim["total"] <= p.memory.budget
    return sim


def _verified(c: _Ctx, p: Plan) -> tuple[_Ctx, Plan]:
    """`--verify`: simulate the plan's step; when the simulated step does not fit, plan again with the
    activations, logits and per-step transients scaled to what the simulation measured (as a card's stored
    calibration would scale them) and simulate that, up to VERIFY_REPLANS times. A plan is only called
    verified when its own simulated step fits."""
    first = p
    for attempt in range(VERIFY_REPLANS + 1):
        sim = _simulated(p)
        if sim["fits"] or not p.fits or attempt == VERIFY_REPLANS:
            break
        m = p.memory
        ratio = sim["transient"] / max(m.activations + m.logits + m.transient, 1)
        c = replace(c, calibration={**(c.calibration or {}), "factor": c.correction * max(ratio, 1.01)})
        p = _plan(c)
    notes: tuple[str, ...] = ()
    if p is not first:
        notes = (
            f"--verify: the first plan (micro-batch {first.micro_batch_size}, seq_len {first.seq_len}, checkpointing "
            f"{'on' if first.gradient_checkpointing else 'off'}) fitted on paper but its simulated step did not; this plan "
            f"scales activations, logits and transients ×{c.correction:.2f} to the simulation",
        )
    if p.fits and not sim["fits"]:
        notes += (
            f"the simulated step needs {gib(sim['total'])}, more than the budget of {gib(p.memory.budget)}: "
            "trust the simulation — lower the micro-batch or seq_len, or turn on gradient checkpointing",
        )
    warnings = p.warnings
    if sim["fits"] and any(w.startswith("tight fit:") for w in warnings):
        warnings = tuple(w for w in warnings if not w.startswith("tight fit:")) + (
            f"tight fit, verified: the simulated step needs {gib(sim['total'], 2)} of {gib(p.memory.budget, 2)}; "
            "close other programs using the GPU",
        )
    return c, replace(p, simulation=sim, warnings=warnings + notes)


def _signature() -> inspect.Signature:
    """plan()'s signature as help() and editors show it: the keywords are the record's fields."""
    P = inspect.Parameter
    params = [
        P("model", P.POSITIONAL_OR_KEYWORD),
        P("gpu", P.POSITIONAL_OR_KEYWORD, default="auto"),
        P("verify", P.KEYWORD_ONLY, default=False),
        P("calibrated", P.KEYWORD_ONLY, default=True),
    ]
    params += [P(f.name, P.KEYWORD_ONLY, default=f.default, annotation=f.type) for f in KNOB_FIELDS]
    return inspect.Signature(params, return_annotation="Plan")


plan.__signature__ = _signature()  # type: ignore[attr-defined]


def plan_or_closest(model: Any, gpu: Any = "auto", *, calibrated: bool = True, **knobs: Any) -> Plan:
    """Like `plan`, but returns the closest plan (`fits == False`) instead of raising DoesNotFit."""
    return _plan(_context(model, gpu, Knobs.from_kwargs(knobs, "plan_or_closest()"), PYTHON, calibrated))


def _plan(c: _Ctx) -> Plan:
    found = _search(c)
    s, mem = found.setup, found.mem
    f, card = c.fixed, c.gpu
    global_batch = c.base.global_batch_size
    accum = f.grad_accum_steps if f.grad_accum_steps != "auto" else max(1, math.ceil(global_batch / (s.micro_batch_size * card.count)))
    resolved = Knobs(**{name: getattr(s, name) for name in KNOB_NAMES}).replace(grad_accum_steps=accum)
    return Plan(
        model=c.spec.name,
        spec=c.spec,
        gpu=card,
        knobs=resolved,
        memory=mem,
        reasons=_reasons(c, found, accum),
        warnings=tuple(_warnings(c.spec, card, s, mem, accum, global_batch)),
        tokens_per_second_estimate=tokens_per_second(c.spec, card, s),
        fixed=f,
    )


def _reasons(c: _Ctx, found: _Found, accum: int) -> dict[str, str]:
    """Each knob's reason, quoting what the search saw (`rejected`: the smallest peak of each option it passed over)."""
    kn, mem, rejected = found.setup, found.mem, found.rejected
    spec, card, k, seq, global_batch = c.spec, c.gpu, c.fixed, kn.seq_len, c.base.global_batch_size
    fixed = "fixed by you"
    r: dict[str, str] = {}

    def least(*key) -> str:
        return f"at least {gib(rejected[key])}" if key in rejected else "more"

    if kn.objective != "sft":
        r["objective"] = _objective_reason(kn)
    if k.strategy != "auto":
        r["strategy"] = fixed
    elif kn.strategy == "full":
        r["strategy"] = f"full fine-tuning fits ({gib(mem.total)} of {gib(mem.budget)}): best quality, every weight trains"
    elif kn.strategy == "lora":
        r["strategy"] = (
            f"LoRA: full fine-tuning does not fit in {gib(mem.budget)} (it needs {least('full')}); "
            "a 16-bit frozen base with trainable adapters does"
        )
    else:
        r["strategy"] = (
            f"QLoRA: neither full fine-tuning ({least('full')}) nor LoRA on a 16-bit base ({least('lora')}) fits in "
            f"{gib(mem.budget)}; a 4-bit base does"
        )
    r["precision"] = fixed if k.precision != "auto" else auto_precision(card)[1]
    if k.frozen_dtype != "auto":
        r["frozen_dtype"] = fixed
    else:
        r["frozen_dtype"] = auto_frozen_dtype(card, kn.strategy, kn.precision)[1]
        if memory.upcast(kn):
            as_compute = c.breakdown(replace(kn, frozen_dtype=kn.precision))
            r["frozen_dtype"] += f" ({gib(as_compute.total - mem.total)} less than an fp32 base)"
    if k.quantization != "auto":
        r["quantization"] = fixed
    elif kn.quantization == "none":
        r["quantization"] = "none: the base model stays in " + ("fp32 master weights" if kn.strategy == "full" else kn.precision)
    else:
        r["quantization"] = (
            "NF4 4-bit base"
            + (" with double quantization (≈4.13 bits/weight)" if k.double_quant else "")
            + ": the QLoRA recipe (Dettmers et al. 2023); works from cc 6.0"
        )
    _, rule = c.saver_rules
    cost = f"costs one extra forward pass (≈ +{checkpointing_cost(kn.strategy):.0%} step time)"
    if "gradient_checkpointing" in rule:
        r["gradient_checkpointing"] = rule["gradient_checkpointing"] + (
            f"; {cost}" if kn.gradient_checkpointing and k.gradient_checkpointing == "auto" else ""
        )
    elif kn.gradient_checkpointing:
        r["gradient_checkpointing"] = (
            f"on: without it even micro-batch 1 does not fit (it needs {least(kn.strategy, kn.optimizer, False)}); {cost}"
        )
    else:
        r["gradient_checkpointing"] = "off: the run fits without recomputing activations, so no speed is lost"
    if k.micro_batch_size != "auto":
        r["micro_batch_size"] = fixed
    else:
        r["micro_batch_size"] = (
            f"{kn.micro_batch_size}: "
            + (
                f"the fastest of the {found.roomy} plans that fit with room, by the throughput model (within "
                f"{SPEED_RESOLUTION:.0%}, the one with fewer savers)"
                if found.roomy
                else "of the plans that fit only tightly, the one with the most room"
            )
            + f" ({gib(mem.activations + mem.logits)} of activations and logits)"
        )
        if found.runner_up is not None and found.speeds[0] > 0:
            r["micro_batch_size"] += f"; the runner-up, {_difference(kn, found.runner_up)}, is estimated " + (
                f"{1 - found.speeds[1] / found.speeds[0]:.1%} slower"
                if found.speeds[1] < found.speeds[0]
                else f"{found.speeds[1] / found.speeds[0] - 1:.1%} faster (not enough to add a saver)"
            )
        doubled = c.breakdown(replace(kn, micro_batch_size=2 * kn.micro_batch_size))
        if 2 * kn.micro_batch_size <= math.ceil(c.base.global_batch_size / card.count) and doubled.fits:
            r["micro_batch_size"] += f"; {2 * kn.micro_batch_size} would fit only tightly ({gib(doubled.margin, 2)} to spare)"
    r["grad_accum_steps"] = (
        fixed
        if k.grad_accum_steps != "auto"
        else f"{accum}: micro-batch {kn.micro_batch_size} × {accum}"
        + (f" × {card.count} GPUs" if card.count > 1 else "")
        + f" reaches the global batch of {global_batch} "
        + batch_unit(kn.objective)
    )
    r["seq_len"] = fixed if k.seq_len != "auto" else f"{seq}: min({DEFAULT_MAX_SEQ_LEN}, the model's maximum {spec.max_seq_len})"
    if k.optimizer != "auto":
        r["optimizer"] = fixed
    elif kn.optimizer == "adamw_8bit":
        wide = c.breakdown(replace(kn, optimizer="adamw_torch"))
        r["optimizer"] = (
            f"8-bit AdamW (bitsandbytes): 2 bytes of state per parameter instead of 8 saves {gib(wide.total - mem.total)}; "
            f"32-bit state does not fit with any saver (it needs {least(kn.strategy, 'adamw_torch')})"
        )
    elif kn.strategy == "full":
        r["optimizer"] = "AdamW with fp32 state (8 bytes/parameter): it fits, and it is the reference optimizer"
    else:
        r["optimizer"] = "AdamW with fp32 state: it fits, and it is the reference optimizer"
    cc = planning_cc(card)
    if k.attention != "auto":
        r["attention"] = fixed
    elif spec.model_type in NO_SDPA_MODEL_TYPES:
        r["attention"] = (
            f"eager: transformers has no sdpa path for {spec.model_type} ({NO_SDPA_MODEL_TYPES[spec.model_type]}); eager keeps each "
            "layer's s × s scores, which the plan counts"
            + ("; flash_attention_2 (flash-attn ≥ 2.6) avoids them" if cc >= (8, 0) and not card.is_cpu else "")
        )
    elif card.is_cpu:
        r["attention"] = "sdpa: PyTorch's fused attention, on CPU too"
    elif cc >= (8, 0):
        r["attention"] = (
            "sdpa: PyTorch's fused flash/memory-efficient kernels, no extra package; flash_attention_2 is an option with the "
            "flash-attn package"
        )
    else:
        r["attention"] = (
            f"sdpa: PyTorch's memory-efficient kernel runs from cc 5.0; FlashAttention-2 needs cc ≥ 8.0 (this card: {cc[0]}.{cc[1]})"
        )
    r.update(_saver_reasons(c, kn, mem))
    norm = RMSNORM_BY_MODEL_TYPE.get(spec.model_type)
    r["rmsnorm"] = (
        f"lean: {norm} is swapped for hfgpu's (always on; same math), which keeps each norm's 16-bit input for backward "
        f"instead of an fp32 copy ({4 * kn.micro_batch_size * seq * spec.hidden_size / 2**20:,.0f} MiB per norm at this micro-batch)"
        if norm
        else f"transformers': {spec.model_type} has no Llama-style RMSNorm that hfgpu swaps (hfgpu.patches)"
    )
    if (cal := c.calibration) and "date" in cal:
        r["memory"] = (
            f"calibrated on this machine's {card.name} on {cal['date']} ({cal['rows']} measured steps of {cal['model']}): "
            f"activations, logits and overhead × {cal['factor']} (hfgpu calibrate)"
        )
    elif cal:  # --verify re-planned to its simulated step (_verified)
        r["memory"] = f"activations, logits and transients × {cal['factor']:.2f}: scaled to the simulated step (--verify)"
    mode = c.base.distributed
    if k.distributed != "auto":
        r["distributed"] = fixed
    elif mode == "ddp":
        r["distributed"] = f"ddp: each of the {card.count} cards holds a full replica and 1/{card.count} of each global batch"
    else:
        r["distributed"] = "none: one card"
    if kn.strategy != "full":
        every = "every linear layer" + (" (all-linear, as you asked)" if k.lora_targets == (ALL_LINEAR,) else "")
        r["lora"] = (
            f"r={DEFAULT_LORA_R} on {every} (QLoRA paper: all layers matter more than rank), alpha = 2r"
            if k.lora_r == "auto" and k.lora_targets in ("auto", (ALL_LINEAR,))
            else "r and targets fixed by you"
        )
        if k.lora_dropout == 0:
            r["lora"] += "; dropout 0: a dropout keeps a copy of every adapter's input"
    return r


def _objective_reason(kn: memory.Setup) -> str:
    """What the preference objective costs: two sequences per example in one forward, and DPO/IPO's reference."""
    if kn.objective == "kto":
        text = (
            f"{OBJECTIVE_PAPERS['kto']}: each example is a prompt and one completion labelled desirable or not; its KL "
            "baseline comes from mismatched prompt/completion sequences run without gradients; log-probabilities by "
            "slices of tokens"
        )
    else:
        text = (
            f"{OBJECTIVE_PAPERS[kn.objective]}: each example is a prompt with a chosen and a rejected response, both in "
            f"one forward (micro-batch {kn.micro_batch_size} = {memory.step_tokens(kn) // kn.seq_len} sequences of seq_len), "
            "log-probabilities by slices of tokens"
        )
    if kn.objective not in REFERENCE_OBJECTIVES:
        return text + "; no reference model"
    where = (
        "precomputed in one no-grad pass before training (full fine-tuning keeps no frozen copy)"
        if kn.strategy == "full"
        else "the base with the adapters disabled (no second copy in memory), a no-grad forward before the policy's "
        "(its tensors are freed before the step's peak)"
    )
    return text + f"; the reference: {where}: ≈ +{reference_cost(kn):.0%} compute"


def _relative_speed(ratio: float) -> str:
    if abs(ratio - 1) < 0.0005:
        return "as fast (within 0.05%): the simpler plan is kept"
    if ratio < 1:
        return f"{1 - ratio:.1%} slower"
    return f"{ratio - 1:.1%} faster, less than the {SPEED_RESOLUTION:.0%} it takes to add a saver"


def _difference(chosen: memory.Setup, other: memory.Setup) -> str:
    """How `other` differs from the chosen setup, in a few words: "micro-batch 2 without the chunked loss"."""
    words = []
    if other.micro_batch_size != chosen.micro_batch_size:
        words.append(f"micro-batch {other.micro_batch_size}")
    for name, label in (
        ("gradient_checkpointing", "checkpointing"),
        ("chunked_loss", "the chunked loss"),
        ("activation_offloading", "offloading"),
        ("tiled_mlp", "the tiled MLP"),
    ):
        if getattr(other, name) != getattr(chosen, name):
            words.append(("with " if getattr(other, name) else "without ") + label)
    return " ".join(words) or "the same knobs"


def _saver_reasons(c: _Ctx, kn: memory.Setup, mem: memory.MemoryBreakdown) -> dict[str, str]:
    """Why the chunked loss, activation offloading and the tiled MLP are on or off, and what each saves
    and costs. A saver a rule decided gets the rule's reason (`_saver_rules`); one the search turned on
    says what it saves, measured against the same plan without it; one it left off was not needed by
    the fastest combination that fits."""
    spec, card, seq = c.spec, c.gpu, kn.seq_len
    _, rule = c.saver_rules
    r: dict[str, str] = {}

    def without(**change) -> memory.MemoryBreakdown:
        return c.breakdown(replace(kn, **change))

    for name in SAVERS[1:]:
        on = getattr(kn, name)
        if on and name == "chunked_loss":
            plain = without(chunked_loss=False)
            why = (
                f"on: lm_head and the loss run over slices of {memory.loss_chunk_tokens(spec.vocab_size)} tokens, so the full "
                f"logits never exist: "
                f"saves {gib(plain.logits - mem.logits)} (logits {gib(plain.logits)} → {gib(mem.logits)}); costs "
                f"≈{CHUNKED_LOSS_COST:.0%} of step time"
            )
        elif on and name == "activation_offloading":
            moved = memory.offloaded_bytes(spec, kn)
            compute = compute_tokens_per_second(spec, card, kn)
            cost = (moved / PCIE_BYTES_PER_S) / (kn.micro_batch_size * seq / compute) if compute else None
            why = f"on: the checkpointed layer inputs ({gib(moved)} per micro-batch) wait in pinned CPU memory"
            if cost is not None:
                why += (
                    f": saves {gib(without(activation_offloading=False).total - mem.total)} on the card; costs ≈{cost:.1%} of step time "
                    f"(copied back over PCIe at ~{PCIE_BYTES_PER_S / 1e9:.0f} GB/s)"
                )
        elif on:
            why = (
                f"on: in backward the MLP runs over tiles of {memory.MLP_TILE} tokens, so its intermediate tensors exist for "
                f"one tile only: "
                f"saves {gib(without(tiled_mlp=False).total - mem.total)}; costs ≈{TILED_MLP_COST:.0%} of step time"
            )
        elif name in rule:
            why = rule[name]
        elif name in NEEDS_CHECKPOINTING and not kn.gradient_checkpointing:
            why = "off: only with gradient checkpointing"
        else:
            why = "off: the run fits without it" if mem.fits else "off"
        if name in rule and rule[name].endswith("(fixed by you)") and on:
            why += " (fixed by you)"
        r[name] = why
    return r


def _warnings(spec: ModelSpec, card: GPU, kn: memory.Setup, mem: memory.MemoryBreakdown, accum: int, global_batch: int) -> list[str]:
    w = [card.note] if card.note else []
    if (drift := memory.version_drift()) is not None:
        w.append(drift)
    cc = card.compute_capability
    if card.is_cpu:
        pass
    elif cc is None:
        w.append("compute capability unknown: planned as cc 8.0 (bf16); for a 20-series or older card pass precision fp16 or fp32")
    elif cc < (7, 0):
        w.append(
            f"{card.architecture} (cc {cc[0]}.{cc[1]}): current torch wheels lack its kernels; use torch ≤ 2.14 built for "
            f"CUDA 12.6: {PASCAL_TORCH}"
        )
    if kn.precision == "fp16" and cc is not None and cc < (7, 0):
        w.append("fp16 on Pascal runs at 1/64 of fp32 speed: prefer precision fp32")
    if kn.precision == "fp32" and cc is not None and cc >= (7, 0):
        w.append("fp32 compute leaves this card's tensor cores idle: bf16/fp16 is several times faster")
    if spec.num_experts:
        w.append(
            f"mixture of experts ({spec.num_experts} experts): expert weights are counted, but LoRA targets and quantization "
            f"cover only nn.Linear layers"
        )
    if _tight(kn, mem):
        w.append(
            f"tight fit: {gib(mem.total, 2)} of {gib(mem.budget, 2)} leaves {gib(mem.margin, 2)}, less than the memory model's "
            f"known error for {kn.strategy} ({memory.known_error(kn):.1%} of the peak) or {1 - TIGHT_SHARE:.0%} of the budget: "
            "check it with --verify, or lower the micro-batch or seq_len; "
            "close other programs using the GPU"
        )
    if kn.packing and kn.attention != "flash_attention_2" and (mask := kn.micro_batch_size * kn.seq_len * kn.seq_len) >= 0.02 * mem.budget:
        # transformers builds an explicit b × s × s mask for packed rows unless FlashAttention-2 reads the restarting position ids
        w.append(
            f"packing with {kn.attention} attention builds a {kn.micro_batch_size} × {kn.seq_len} × {kn.seq_len} attention mask "
            f"(≥ {gib(mask)}) that the plan does not count: use attention flash_attention_2, or packing off"
        )
    if kn.micro_batch_size * accum * card.count != global_batch:
        w.append(f"global batch is {kn.micro_batch_size * accum * card.count}, not {global_batch}: it is not a multiple of the micro-batch")
    return w


# --- which card -------------------------------------------------------------------------------------


def best_of(plans: list[Plan]) -> Plan | None:
    """The plan to recommend among fitting plans given in order of preference (full, LoRA, QLoRA): the first
    with room; the first, tight, only when none has room."""
    return next((p for p in plans if not p.tight), plans[0] if plans else None)


def fit_table(
    model: str, seq_len: Any = "auto", tokens: float = 10e6, budget: float | None = None, surface: Surface = PYTHON
) -> list[dict]:
    """For each consumer card: per-strategy peaks and margins, the best strategy that fits (the first of full,
    LoRA, QLoRA that fits with room; a tight one only when none has room), speed and price."""
    spec = model_spec(model)
    rows = []
    for g in (g for g in catalog() if g.is_consumer):
        per = {s: _plan(_context(spec, g, Knobs(strategy=s, seq_len=seq_len), surface, True)) for s in STRATEGIES}
        fitting = [per[s] for s in STRATEGIES if per[s].fits]
        best = best_of(fitting)
        note = ""
        if best is not None and fitting[0] is not best:
            f = fitting[0]
            note = f"{f.strategy} fits only tightly ({gib(f.memory.margin, 2)} to spare); {best.strategy} has {gib(best.memory.margin, 2)}"
        elif best is not None and best.tight:
            note = f"tight: {gib(best.memory.margin, 2)} to spare, check with --verify"
        tps = best.tokens_per_second_estimate if best else None
        rows.append(
            {
                "gpu": g.name,
                "vram_gb": g.vram_gb,
                "launch_price_usd": g.msrp_usd,
                "budget_gib": round(per["full"].memory.budget / GIB, 2),
                "peak_gib": {s: round(per[s].memory.total / GIB, 2) for s in STRATEGIES},
                "margin_gib": {s: round(per[s].memory.margin / GIB, 2) for s in STRATEGIES},
                "fits": {s: per[s].fits for s in STRATEGIES},
                "tight": {s: per[s].tight for s in STRATEGIES},
                "fit_note": note,
                "best_strategy": best.strategy if best else None,
                "best_peak_gib": round(best.memory.total / GIB, 2) if best else None,
                "tokens_per_second_estimate": round(tps, 1) if tps else None,
                "hours_estimate": round(tokens / tps / 3600, 2) if tps else None,
                "cheapest_for": [],
                "fastest_within_budget": False,
            }
        )
    for s in STRATEGIES:
        cands = [r for r in rows if r["best_strategy"] == s and r["launch_price_usd"]]
        if cands:
            min(cands, key=lambda r: r["launch_price_usd"])["cheapest_for"].append(s)
    if budget is not None:
        cands = [r for r in rows if r["tokens_per_second_estimate"] and r["launch_price_usd"] and r["launch_price_usd"] <= budget]
        if cands:
            max(cands, key=lambda r: r["tokens_per_second_estimate"])["fastest_within_budget"] = True
    return rows


# --- when nothing fits -------------------------------------------------------------------------------


def _generation(name: str) -> str:
    """A model's family and generation from its name: Llama-3.1-8B and Llama-3.2-1B → "llama-3", Qwen2.5-7B → "qwen2"."""
    m = re.match(r"[A-Za-z]+-?\d+", name.split("/")[-1])
    return m.group(0).lower() if m else name.lower()


def _smaller_models(spec: ModelSpec) -> list[ModelSpec]:
    """Catalog models of the same family (owner and architecture) with fewer parameters: the same generation
    first (Llama-3.2-3B before Llama-2-7b for Llama-3.1-8B), largest first within each."""
    owner = spec.name.split("/")[0].lower() if "/" in spec.name else None
    out = []
    for name in catalog_models():
        if owner is None or name.split("/")[0].lower() != owner:
            continue
        other = model_spec(name)
        if other.model_type == spec.model_type and other.params_total < spec.params_total:
            out.append(other)
    return sorted(out, key=lambda m: (_generation(m.name) != _generation(spec.name), -m.params_total))


def _alternatives(c: _Ctx, closest: Plan) -> list[str]:
    """What fits instead, nearest first and each named as the user would type it: on the user's own card a
    lighter strategy (LoRA before QLoRA), then a shorter sequence, then a smaller model of the same family;
    then a larger card."""
    alts: list[str] = []
    spec, card, k, use = c.spec, c.gpu, c.fixed, c.surface.setting

    def retry(gpu: GPU | None = None, model: ModelSpec | None = None, **change: Any) -> Plan | None:
        if gpu is None and model is None:
            return _plan(replace(c, fixed=k.replace(**change), base=c.base.replace(**change)))
        try:
            return _plan(_context(model or spec, gpu or card, k, c.surface, c.calibrated))  # that problem's rules
        except HfgpuError:
            return None

    lighter = {"full": ("lora", "qlora"), "lora": ("qlora",)}.get(k.strategy, ())
    for strategy in lighter:
        p = retry(strategy=strategy, quantization="auto")
        if p.fits:
            alts.append(f"{use('strategy', strategy)} fits ({gib(p.memory.total)} of {gib(p.memory.budget)})")
            break
    seq = closest.seq_len // 2
    while seq >= 128:
        p = retry(seq_len=seq)
        if p.fits:
            alts.append(f"{use('seq_len', seq)} fits with {p.strategy} ({gib(p.memory.total)})")
            break
        seq //= 2
    fitting = [p for p in (retry(model=m) for m in _smaller_models(spec)) if p is not None and p.fits]
    if p := best_of(fitting):  # the nearest that fits with room; a tight one only when none has room
        alts.append(f"the smaller {p.model} fits with {p.strategy} ({gib(p.memory.total)} of {gib(p.memory.budget)})")
    consumer = sorted((g for g in catalog() if g.is_consumer and g.vram_gb > card.vram_gb), key=lambda g: (g.msrp_usd or 1e9, -g.vram_gb))
    for g in consumer:
        p = retry(replace(g, count=card.count))
        if p is not None and p.fits:
            alts.append(f"a {g.name} ({g.vram_gb:g} GB, launch price ${g.msrp_usd:,.0f}) fits with {p.strategy} ({gib(p.memory.total)})")
            break
    return alts


def _does_not_fit_message(p: Plan, alts: list[str]) -> str:
    head = (
        f"{p.model} does not fit on {p.gpu.display_name} ({p.gpu.vram_gb:g} GB): the smallest plan tried "
        f"({p.strategy}, micro-batch {p.micro_batch_size}, seq_len {p.seq_len}, checkpointing "
        f"{'on' if p.gradient_checkpointing else 'off'}) "
        f"needs {gib(p.memory.total)} of {gib(p.memory.budget)}"
    )
    return head + ("; what fits instead: " + "; ".join(alts) if alts else "; nothing smaller fits: choose a smaller model")
