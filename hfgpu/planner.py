"""plan(): choose the knobs of a fine-tuning run that fits a card, with a reason for each.

The planner is pure: a model config (never weights), a GPU spec and the knobs the user fixed. Any
knob given is kept; the rest are searched in this order: strategy by quality (full > LoRA > QLoRA),
then the optimizer (exact 32-bit state before 8-bit), then, among every micro-batch × memory-saver
combination that fits with room, the fastest by the throughput model (within SPEED_RESOLUTION, the one
with fewer savers, then the larger micro-batch; the free chunked loss counts as none). Facts
from the hardware (bf16 from cc 8.0, fp16 on Turing, fp32 compute on Pascal, FlashAttention-2 from
cc 8.0, LLM.int8 from cc 7.5) are rules, not choices (hfgpu.knobs); the speed estimate and the
savers' time costs are in hfgpu.throughput. The search itself is hfgpu.search, the words hfgpu.reasons.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from hfgpu import memory
from hfgpu.errors import DoesNotFit, HfgpuError
from hfgpu.gpus import GPU, catalog
from hfgpu.knobs import (
    KNOB_FIELDS,
    KNOB_NAMES,
    PYTHON,
    STRATEGIES,
    Knobs,
    Surface,
    recipe_key,
)
from hfgpu.models import ModelSpec, catalog_models, model_spec
from hfgpu.reasons import plan_warnings, reasons
from hfgpu.search import Problem, is_tight, problem, search
from hfgpu.throughput import (
    tokens_per_second,
)
from hfgpu.units import GIB, gib


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
        return is_tight(self.setup(), self.memory)

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
    c = problem(model, gpu, knobs, surface, calibrated)
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


def _verified(c: Problem, p: Plan) -> tuple[Problem, Plan]:
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
    return _plan(problem(model, gpu, Knobs.from_kwargs(knobs, "plan_or_closest()"), PYTHON, calibrated))


def _plan(c: Problem) -> Plan:
    found = search(c)
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
        reasons=reasons(c, found, accum),
        warnings=tuple(plan_warnings(c.spec, card, s, mem, accum, global_batch)),
        tokens_per_second_estimate=tokens_per_second(c.spec, card, s),
        fixed=f,
    )


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
        per = {s: _plan(problem(spec, g, Knobs(strategy=s, seq_len=seq_len), surface, True)) for s in STRATEGIES}
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


def _alternatives(c: Problem, closest: Plan) -> list[str]:
    """What fits instead, nearest first and each named as the user would type it: on the user's own card a
    lighter strategy (LoRA before QLoRA), then a shorter sequence, then a smaller model of the same family;
    then a larger card."""
    alts: list[str] = []
    spec, card, k, use = c.spec, c.gpu, c.fixed, c.surface.setting

    def retry(gpu: GPU | None = None, model: ModelSpec | None = None, **change: Any) -> Plan | None:
        if gpu is None and model is None:
            return _plan(replace(c, fixed=k.replace(**change), base=c.base.replace(**change)))
        try:
            return _plan(problem(model or spec, gpu or card, k, c.surface, c.calibrated))  # that problem's rules
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
