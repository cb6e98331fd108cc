"""plan(): choose the knobs of a fine-tuning run that fits a card, with a reason for each.

The planner is pure: a model config (never weights), a GPU spec and the knobs the user fixed. Any
knob given is kept; the rest are searched in this order: strategy by quality (full > LoRA > QLoRA),
then the optimizer (exact 32-bit state before 8-bit), then the memory savers by their time cost
(none; chunked loss ≈3 %; gradient checkpointing ≈33 %; + chunked loss; + activation offloading,
whose cost is the PCIe copy back; + tiled MLP ≈5 %), then the largest micro-batch that fits. Facts
from the hardware (bf16 from cc 8.0, fp16 on Turing, fp32 compute on Pascal, FlashAttention-2 from
cc 8.0, LLM.int8 from cc 7.5) are rules, not choices (hfgpu.knobs); the speed estimate and the
savers' time costs are in hfgpu.throughput.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from hfgpu import memory
from hfgpu.errors import DoesNotFit, HfgpuError
from hfgpu.gpus import GPU, catalog, get_gpu
from hfgpu.knobs import STRATEGIES, auto_precision, planning_cc, validate
from hfgpu.models import ModelSpec, model_spec
from hfgpu.throughput import (CHUNKED_LOSS_COST, PCIE_BYTES_PER_S, TILED_MLP_COST, checkpointing_cost, compute_tokens_per_second,
                              tokens_per_second)

DEFAULT_GLOBAL_BATCH = 16  # sequences per optimizer step
DEFAULT_MAX_SEQ_LEN = 2048

PASCAL_TORCH = "pip install 'torch<=2.14' --index-url https://download.pytorch.org/whl/cu126"


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": list(self.target_modules)}


@dataclass(frozen=True)
class Plan:
    """A fine-tuning run for one model on one card: every knob, its reason, and the memory it needs."""

    model: str
    spec: ModelSpec = field(repr=False)
    gpu: GPU
    strategy: str
    precision: str
    quantization: str
    double_quant: bool
    gradient_checkpointing: bool
    micro_batch_size: int
    grad_accum_steps: int
    seq_len: int
    optimizer: str
    attention: str
    lora: LoraSettings | None
    memory: memory.MemoryBreakdown  # per process (one per card)
    reasons: dict[str, str]
    warnings: tuple[str, ...]
    tokens_per_second_estimate: float | None
    distributed: str = "none"
    chunked_loss: bool = False
    activation_offloading: bool = False
    tiled_mlp: bool = False
    simulation: dict | None = None  # plan(..., verify=True): one step simulated on fake tensors (hfgpu.simulate)

    @property
    def fits(self) -> bool:
        return self.memory.fits

    @property
    def params_total(self) -> int:
        return self.spec.params_total

    @property
    def params_trainable(self) -> int:
        return memory.trainable_params(self.spec, self.setup())

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.gpu.count

    @property
    def hours_per_million_tokens(self) -> float | None:
        t = self.tokens_per_second_estimate
        return None if not t else 1e6 / t / 3600

    def to_dict(self) -> dict:
        cc = self.gpu.compute_capability
        return {
            "model": self.model,
            "gpu": {"name": self.gpu.name, "count": self.gpu.count, "vram_gb": self.gpu.vram_gb, "compute_capability": None if cc is None else f"{cc[0]}.{cc[1]}"},
            "strategy": self.strategy,
            "precision": self.precision,
            "quantization": self.quantization,
            "double_quant": self.double_quant if self.quantization in ("nf4", "fp4") else None,
            "gradient_checkpointing": self.gradient_checkpointing,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum_steps": self.grad_accum_steps,
            "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len,
            "optimizer": self.optimizer,
            "attention": self.attention,
            "distributed": self.distributed,
            "world_size": self.gpu.count,
            "chunked_loss": self.chunked_loss,
            "activation_offloading": self.activation_offloading,
            "offloaded_bytes_per_step": memory.offloaded_bytes(self.spec, self.setup()),
            "tiled_mlp": self.tiled_mlp,
            "lora": self.lora.to_dict() if self.lora else None,
            "params_total": self.params_total,
            "params_trainable": self.params_trainable,
            "memory": self.memory.to_dict(),
            "fits": self.fits,
            "reasons": dict(self.reasons),
            "warnings": list(self.warnings),
            "tokens_per_second_estimate": None if self.tokens_per_second_estimate is None else round(self.tokens_per_second_estimate, 1),
            "hours_per_million_tokens_estimate": None if self.hours_per_million_tokens is None else round(self.hours_per_million_tokens, 3),
            **({"simulation": self.simulation} if self.simulation is not None else {}),
        }

    def setup(self) -> memory.Setup:
        """The knobs that decide memory, as the memory model and the simulation take them."""
        return memory.Setup(
            strategy=self.strategy, precision=self.precision, quantization=self.quantization, double_quant=self.double_quant,
            gradient_checkpointing=self.gradient_checkpointing, micro_batch_size=self.micro_batch_size, seq_len=self.seq_len,
            optimizer=self.optimizer, attention=self.attention, lora_r=self.lora.r if self.lora else 16,
            lora_targets=self.lora.target_modules if self.lora else (), distributed=self.distributed, world_size=self.gpu.count,
            chunked_loss=self.chunked_loss, offload=self.activation_offloading, lora_dropout=self.lora.dropout if self.lora else 0.0,
            tiled_mlp=self.tiled_mlp,
        )

    def __str__(self) -> str:
        from hfgpu.report import plan_text

        return plan_text(self)


# --- the search --------------------------------------------------------------------------------------


def _chunked_loss_allowed(spec: ModelSpec, k: dict) -> bool:
    return memory.plain_logits(spec.config) and k["distributed_resolved"] not in ("fsdp", "zero3")


@dataclass(frozen=True)
class _Knobs:
    precision: str
    strategy: str
    quantization: str
    optimizer: str
    gradient_checkpointing: bool
    micro_batch_size: int
    chunked_loss: bool = False
    offload: bool = False
    tiled: bool = False


def _setup(k: dict, kn: _Knobs, seq_len: int, targets: tuple[str, ...]) -> memory.Setup:
    return memory.Setup(
        strategy=kn.strategy,
        precision=kn.precision,
        quantization=kn.quantization,
        double_quant=k["double_quant"],
        gradient_checkpointing=kn.gradient_checkpointing,
        micro_batch_size=kn.micro_batch_size,
        seq_len=seq_len,
        optimizer=kn.optimizer,
        attention=k["attention_resolved"],
        lora_r=k["lora_r_resolved"],
        lora_targets=targets,
        distributed=k["distributed_resolved"],
        world_size=k["world_size"],
        chunked_loss=kn.chunked_loss,
        offload=kn.offload,
        tiled_mlp=kn.tiled,
        lora_dropout=float(k["lora_dropout"]) if kn.strategy != "full" else 0.0,
    )


def _savers(spec: ModelSpec, gpu: GPU, k: dict, seq_len: int, precision: str, strategy: str, q: str, optimizer: str) -> list[tuple[bool, bool, bool, bool]]:
    """(checkpointing, chunked loss, offloading, tiled MLP) combinations allowed by the fixed knobs, fastest first."""
    fixed_ckpt, fixed_chunk, fixed_off, fixed_tile = k["gradient_checkpointing"], k["chunked_loss"], k["activation_offloading"], k["tiled_mlp"]
    ckpts = [False, True] if fixed_ckpt == "auto" else [fixed_ckpt]
    if fixed_off is True or fixed_tile is True:
        ckpts = [True]
    chunks = ([False, True] if _chunked_loss_allowed(spec, k) else [False]) if fixed_chunk == "auto" else [fixed_chunk]
    combos = []
    for ckpt in ckpts:
        offs = [False] if not ckpt or gpu.is_cpu else ([False, True] if fixed_off == "auto" else [fixed_off])
        tiles = [False] if not ckpt else ([False, True] if fixed_tile == "auto" and spec.model_type in memory.TILED_MLP_MODEL_TYPES else [fixed_tile is True])
        combos += [(ckpt, chunk, off, tile) for chunk in chunks for off in offs for tile in tiles]

    def seconds_per_token(combo) -> float:
        kn = _Knobs(precision, strategy, q, optimizer, combo[0], 1, combo[1], combo[2], combo[3])
        tps = tokens_per_second(spec, gpu if gpu.tensor_tflops or gpu.fp32_tflops else replace(gpu, fp32_tflops=30.0), _setup(k, kn, seq_len, k["targets_resolved"]))
        return 1 / tps if tps else 0.0

    return sorted(combos, key=seconds_per_token)  # stable: with equal cost, fewer savers first


def _search(spec: ModelSpec, gpu: GPU, k: dict, seq_len: int) -> tuple[_Knobs, memory.MemoryBreakdown, bool]:
    """The first fitting combination in preference order, else the one with the smallest peak."""
    precision = k["precision"] if k["precision"] != "auto" else auto_precision(gpu)[0]
    strategies = STRATEGIES if k["strategy"] == "auto" else (k["strategy"],)
    if k["strategy"] == "auto" and k["quantization"] != "auto":
        strategies = {"none": ("full", "lora"), "int8": ("lora",)}.get(k["quantization"], ("qlora",))
    per_process_batch = max(1, math.ceil(k["global_batch_size_resolved"] / gpu.count))
    if k["micro_batch_size"] != "auto":
        batches = [k["micro_batch_size"]]
    else:
        top = 1 << (per_process_batch.bit_length() - 1)
        batches = [top >> i for i in range(top.bit_length())]  # e.g. 16, 8, 4, 2, 1
    smallest: tuple[_Knobs, memory.MemoryBreakdown] | None = None
    for strategy in strategies:
        q = k["quantization"]
        if q == "auto":
            q = "nf4" if strategy == "qlora" else "none"
        if strategy == "lora" and q in ("nf4", "fp4"):
            continue  # only reachable with strategy auto: a 4-bit base is the qlora candidate
        if k["optimizer"] != "auto":
            optimizers = [k["optimizer"]]
        else:
            optimizers = ["adamw_torch", "adamw_8bit"]  # exact 32-bit state first; 8-bit when only it fits
        for optimizer in optimizers:
            for ckpt, chunk, off, tile in _savers(spec, gpu, k, seq_len, precision, strategy, q, optimizer):
                for mb in batches:
                    kn = _Knobs(precision, strategy, q, optimizer, ckpt, mb, chunk, off, tile)
                    targets = k["targets_resolved"]
                    mem = memory.breakdown(spec, _setup(k, kn, seq_len, targets), gpu.vram_bytes, k["correction"])
                    if mem.fits:
                        return kn, mem, True
                    if smallest is None or mem.total < smallest[1].total:
                        smallest = (kn, mem)
    assert smallest is not None
    return smallest[0], smallest[1], False


def _resolve(spec: ModelSpec, gpu: GPU, knobs: dict) -> dict:
    errs = validate(spec, gpu, knobs)
    if errs:
        raise HfgpuError("; ".join(errs))
    k = dict(knobs)
    k["attention_resolved"] = "sdpa" if k["attention"] == "auto" else k["attention"]
    k["lora_r_resolved"] = 16 if k["lora_r"] == "auto" else k["lora_r"]
    t = k["lora_targets"]
    if t == "auto":
        k["targets_resolved"] = tuple(spec.linear_names)
    else:
        k["targets_resolved"] = tuple(x.strip() for x in (t.split(",") if isinstance(t, str) else t) if x.strip())
    k["global_batch_size_resolved"] = DEFAULT_GLOBAL_BATCH if k["global_batch_size"] == "auto" else k["global_batch_size"]
    k["world_size"] = gpu.count
    k["calibration"] = None
    if k["calibrated"] and not gpu.is_cpu:
        from hfgpu.calibrate import correction_for

        k["calibration"] = correction_for(gpu.name)
    k["correction"] = k["calibration"]["factor"] if k["calibration"] else 1.0
    if k["distributed"] == "auto":
        k["distributed_resolved"] = "ddp" if gpu.count > 1 else "none"
    else:
        k["distributed_resolved"] = k["distributed"]
    return k


def _default_seq_len(spec: ModelSpec) -> int:
    return min(DEFAULT_MAX_SEQ_LEN, spec.max_seq_len)


def plan(
    model: Any,
    gpu: Any = "auto",
    *,
    strategy: str = "auto",
    precision: str = "auto",
    quantization: str = "auto",
    double_quant: bool = True,
    gradient_checkpointing: bool | str = "auto",
    micro_batch_size: int | str = "auto",
    grad_accum_steps: int | str = "auto",
    global_batch_size: int | str = "auto",
    seq_len: int | str = "auto",
    optimizer: str = "auto",
    attention: str = "auto",
    lora_r: int | str = "auto",
    lora_alpha: int | str = "auto",
    lora_dropout: float = 0.0,
    lora_targets: str | list[str] = "auto",
    distributed: str = "auto",
    chunked_loss: bool | str = "auto",
    activation_offloading: bool | str = "auto",
    tiled_mlp: bool | str = "auto",
    verify: bool = False,
    calibrated: bool = True,
    **unknown: Any,
) -> Plan:
    """Plan a fine-tuning run of `model` on `gpu`. Knobs given are kept; "auto" ones are chosen.

    `verify=True` also runs one training step of the planned model on fake tensors (about 10 s for
    an 8B model) and attaches its tensor peak as `plan.simulation`.
    Raises `DoesNotFit` (carrying the closest plan and what would fit instead) when nothing fits,
    and `HfgpuError` for a bad model, card or knob.
    """
    _check_keywords(unknown)
    spec = model_spec(model)
    card = get_gpu(gpu)
    knobs = dict(locals())
    for name in ("model", "gpu", "spec", "card", "verify", "unknown"):
        knobs.pop(name)
    result = _plan(spec, card, knobs)
    if verify:
        from hfgpu.simulate import simulate

        sim = simulate(spec.config, result.setup(), spec).to_dict()
        sim["total"] = sim["peak"] + result.memory.overhead
        sim["fits"] = sim["total"] <= result.memory.budget
        extra = ()
        if result.fits and not sim["fits"]:
            extra = (f"the simulated step needs {sim['total'] / memory.GIB:.1f} GiB, more than the budget of {result.memory.budget / memory.GIB:.1f} GiB: "
                     "trust the simulation — lower the micro-batch or seq_len, or turn on gradient checkpointing",)
        result = replace(result, simulation=sim, warnings=result.warnings + extra)
    if not result.fits:
        raise DoesNotFit(_does_not_fit_message(result, alts := _alternatives(spec, card, knobs, result)), closest=result, alternatives=alts)
    return result


def _check_keywords(knobs: dict) -> None:
    """An unknown keyword is a typo: one line with the nearest knob names, never a TypeError or a silent no-op."""
    from hfgpu._fuzzy import did_you_mean

    known = list(plan.__kwdefaults__)
    for name in knobs:
        if name not in known:
            raise HfgpuError(f"plan() has no knob {name!r}: {did_you_mean(name, known, n=2, cutoff=0.5) or 'known: ' + ', '.join(known)}")


def plan_or_closest(model: Any, gpu: Any = "auto", **knobs: Any) -> Plan:
    """Like `plan`, but returns the closest plan (`fits == False`) instead of raising DoesNotFit."""
    _check_keywords(knobs)
    defaults = {k: v for k, v in plan.__kwdefaults__.items() if k != "verify"}
    return _plan(model_spec(model), get_gpu(gpu), {**defaults, **knobs})


def _plan(spec: ModelSpec, card: GPU, knobs: dict) -> Plan:
    k = _resolve(spec, card, knobs)
    seq = _default_seq_len(spec) if k["seq_len"] == "auto" else k["seq_len"]
    kn, mem, fits = _search(spec, card, k, seq)
    global_batch = k["global_batch_size_resolved"]
    if k["grad_accum_steps"] != "auto":
        accum = k["grad_accum_steps"]
    else:
        accum = max(1, math.ceil(global_batch / (kn.micro_batch_size * card.count)))
    setup = _setup(k, kn, seq, k["targets_resolved"])
    lora = None
    if kn.strategy != "full":
        r = k["lora_r_resolved"]
        lora = LoraSettings(r=r, alpha=2 * r if k["lora_alpha"] == "auto" else k["lora_alpha"], dropout=float(k["lora_dropout"]), target_modules=k["targets_resolved"])
    reasons = _reasons(spec, card, k, kn, mem, seq, accum, global_batch)
    return Plan(
        model=spec.name,
        spec=spec,
        gpu=card,
        strategy=kn.strategy,
        precision=kn.precision,
        quantization=kn.quantization,
        double_quant=k["double_quant"],
        gradient_checkpointing=kn.gradient_checkpointing,
        micro_batch_size=kn.micro_batch_size,
        grad_accum_steps=accum,
        seq_len=seq,
        optimizer=kn.optimizer,
        attention=k["attention_resolved"],
        lora=lora,
        memory=mem,
        reasons=reasons,
        warnings=tuple(_warnings(spec, card, kn, mem, accum, global_batch)),
        tokens_per_second_estimate=tokens_per_second(spec, card, setup),
        distributed=k["distributed_resolved"],
        chunked_loss=kn.chunked_loss,
        activation_offloading=kn.offload,
        tiled_mlp=kn.tiled,
    )


def _gib(n: int) -> str:
    return f"{n / memory.GIB:.1f} GiB"


def _reasons(spec, card, k, kn: _Knobs, mem, seq, accum, global_batch) -> dict[str, str]:
    fixed = "fixed by you"
    r: dict[str, str] = {}
    if k["strategy"] != "auto":
        r["strategy"] = fixed
    elif kn.strategy == "full":
        r["strategy"] = f"full fine-tuning fits ({_gib(mem.total)} of {_gib(mem.budget)}): best quality, every weight trains"
    elif kn.strategy == "lora":
        r["strategy"] = f"LoRA: full fine-tuning does not fit in {_gib(mem.budget)}; a 16-bit frozen base with trainable adapters does"
    else:
        r["strategy"] = f"QLoRA: neither full fine-tuning nor LoRA on a 16-bit base fits in {_gib(mem.budget)}; a 4-bit base does"
    r["precision"] = fixed if k["precision"] != "auto" else auto_precision(card)[1]
    if k["quantization"] != "auto":
        r["quantization"] = fixed
    elif kn.quantization == "none":
        r["quantization"] = "none: the base model stays in " + ("fp32 master weights" if kn.strategy == "full" else kn.precision)
    else:
        r["quantization"] = "NF4 4-bit base" + (" with double quantization (≈4.13 bits/weight)" if k["double_quant"] else "") + ": the QLoRA recipe (Dettmers et al. 2023); works from cc 6.0"
    if k["gradient_checkpointing"] != "auto":
        r["gradient_checkpointing"] = fixed
    elif kn.gradient_checkpointing:
        cost = f"costs one extra forward pass (≈ +{checkpointing_cost(kn.strategy):.0%} step time)"
        needs = [name for name in ("activation_offloading", "tiled_mlp") if k[name] is True]
        r["gradient_checkpointing"] = (f"on: {' and '.join(needs)} (fixed) needs it; {cost}" if needs
                                       else f"on: without it even micro-batch 1 does not fit; {cost}")
    else:
        r["gradient_checkpointing"] = "off: the run fits without recomputing activations, so no speed is lost"
    if k["micro_batch_size"] != "auto":
        r["micro_batch_size"] = fixed
    else:
        r["micro_batch_size"] = f"{kn.micro_batch_size}: the largest power of two ≤ the global batch that fits ({_gib(mem.activations + mem.logits)} of activations and logits)"
    r["grad_accum_steps"] = fixed if k["grad_accum_steps"] != "auto" else f"{accum}: micro-batch {kn.micro_batch_size} × {accum}" + (f" × {card.count} GPUs" if card.count > 1 else "") + f" reaches the global batch of {global_batch} sequences"
    r["seq_len"] = fixed if k["seq_len"] != "auto" else f"{seq}: min({DEFAULT_MAX_SEQ_LEN}, the model's maximum {spec.max_seq_len})"
    if k["optimizer"] != "auto":
        r["optimizer"] = fixed
    elif kn.optimizer == "adamw_8bit":
        wide = memory.breakdown(spec, _setup(k, replace(kn, optimizer="adamw_torch"), seq, k["targets_resolved"]), card.vram_bytes, k["correction"])
        r["optimizer"] = (f"8-bit AdamW (bitsandbytes): 2 bytes of state per parameter instead of 8 saves {_gib(wide.total - mem.total)}; "
                          "32-bit state does not fit")
    elif kn.strategy == "full":
        r["optimizer"] = "AdamW with fp32 state (8 bytes/parameter): it fits, and it is the reference optimizer"
    else:
        r["optimizer"] = "AdamW with fp32 state: it fits, and it is the reference optimizer"
    cc = planning_cc(card)
    if k["attention"] != "auto":
        r["attention"] = fixed
    elif card.is_cpu:
        r["attention"] = "sdpa: PyTorch's fused attention, on CPU too"
    elif cc >= (8, 0):
        r["attention"] = "sdpa: PyTorch's fused flash/memory-efficient kernels, no extra package; flash_attention_2 is an option with the flash-attn package"
    else:
        r["attention"] = f"sdpa: PyTorch's memory-efficient kernel runs from cc 5.0; FlashAttention-2 needs cc ≥ 8.0 (this card: {cc[0]}.{cc[1]})"
    r.update(_saver_reasons(spec, card, k, kn, mem, seq))
    c = k["calibration"]
    if c:
        r["memory"] = f"calibrated on this machine's {card.name} on {c['date']} ({c['rows']} measured steps of {c['model']}): activations, logits and overhead × {c['factor']} (hfgpu calibrate)"
    mode = k["distributed_resolved"]
    if k["distributed"] != "auto":
        r["distributed"] = fixed
    elif mode == "ddp":
        r["distributed"] = f"ddp: each of the {card.count} cards holds a full replica and 1/{card.count} of each global batch"
    else:
        r["distributed"] = "none: one card"
    if kn.strategy != "full":
        r["lora"] = ("r and targets fixed by you" if k["lora_r"] != "auto" or k["lora_targets"] != "auto" else "r=16 on every linear layer (QLoRA paper: all layers matter more than rank), alpha = 2r")
        if k["lora_dropout"] == 0:
            r["lora"] += "; dropout 0: a dropout keeps a copy of every adapter's input"
    return r


def _saver_reasons(spec, card, k, kn: _Knobs, mem, seq) -> dict[str, str]:
    """Why the chunked loss, activation offloading and the tiled MLP are on or off, and what each saves and costs."""
    r: dict[str, str] = {}

    def without(**change) -> memory.MemoryBreakdown:
        return memory.breakdown(spec, _setup(k, replace(kn, **change), seq, k["targets_resolved"]), card.vram_bytes, k["correction"])

    setup = _setup(k, kn, seq, k["targets_resolved"])
    if kn.chunked_loss:
        plain = without(chunked_loss=False)
        r["chunked_loss"] = (f"on: lm_head and the loss run over slices of {memory.loss_chunk_tokens(spec.vocab_size)} tokens, so the full logits never exist: "
                             f"saves {_gib(plain.logits - mem.logits)} (logits {_gib(plain.logits)} → {_gib(mem.logits)}); costs ≈{CHUNKED_LOSS_COST:.0%} of step time")
    elif k["chunked_loss"] == "auto":
        r["chunked_loss"] = ("off: the run fits without it" if mem.fits else "off") if _chunked_loss_allowed(spec, k) else (
            "off: soft-capped or rescaled logits" if not memory.plain_logits(spec.config) else f"off: {k['distributed_resolved']} shards lm_head")
    if kn.offload:
        moved = memory.offloaded_bytes(spec, setup)
        compute = compute_tokens_per_second(spec, card, setup)
        cost = (moved / PCIE_BYTES_PER_S) / (kn.micro_batch_size * seq / compute) if compute else None
        r["activation_offloading"] = (f"on: the checkpointed layer inputs ({_gib(moved)} per micro-batch) wait in pinned CPU memory: saves {_gib(without(offload=False).total - mem.total)} "
                                      f"on the card; costs ≈{cost:.1%} of step time (copied back over PCIe at ~{PCIE_BYTES_PER_S / 1e9:.0f} GB/s)" if cost is not None else
                                      f"on: the checkpointed layer inputs ({_gib(moved)} per micro-batch) wait in pinned CPU memory")
    elif k["activation_offloading"] == "auto":
        r["activation_offloading"] = "off: no GPU" if card.is_cpu else ("off: only with gradient checkpointing" if not kn.gradient_checkpointing else "off: the run fits without it")
    if kn.tiled:
        r["tiled_mlp"] = (f"on: in backward the MLP runs over tiles of {memory.MLP_TILE} tokens, so its intermediate tensors exist for one tile only: "
                          f"saves {_gib(without(tiled=False).total - mem.total)}; costs ≈{TILED_MLP_COST:.0%} of step time")
    elif k["tiled_mlp"] == "auto":
        r["tiled_mlp"] = ("off: only with gradient checkpointing" if not kn.gradient_checkpointing else
                          "off: the run fits without it" if spec.model_type in memory.TILED_MLP_MODEL_TYPES else f"off: not for {spec.model_type} models")
    for name in ("chunked_loss", "activation_offloading", "tiled_mlp"):
        if k[name] is not True and k[name] is not False:
            continue
        r[name] = r.get(name, "off") + " (fixed by you)" if k[name] else "off (fixed by you)"
    return r


def _warnings(spec, card, kn: _Knobs, mem, accum, global_batch) -> list[str]:
    w = [card.note] if card.note else []
    if (drift := memory.version_drift()) is not None:
        w.append(drift)
    cc = card.compute_capability
    if card.is_cpu:
        pass
    elif cc is None:
        w.append("compute capability unknown: planned as cc 8.0 (bf16); for a 20-series or older card pass precision fp16 or fp32")
    elif cc < (7, 0):
        w.append(f"{card.architecture} (cc {cc[0]}.{cc[1]}): current torch wheels lack its kernels; use torch ≤ 2.14 built for CUDA 12.6: {PASCAL_TORCH}")
    if kn.precision == "fp16" and cc is not None and cc < (7, 0):
        w.append("fp16 on Pascal runs at 1/64 of fp32 speed: prefer precision fp32")
    if kn.precision == "fp32" and cc is not None and cc >= (7, 0):
        w.append("fp32 compute leaves this card's tensor cores idle: bf16/fp16 is several times faster")
    if spec.num_experts:
        w.append(f"mixture of experts ({spec.num_experts} experts): expert weights are counted, but LoRA targets and quantization cover only nn.Linear layers")
    if mem.fits and mem.total > 0.95 * mem.budget:
        w.append(f"tight fit: {_gib(mem.total)} of {_gib(mem.budget)}; close other programs using the GPU")
    if kn.micro_batch_size * accum * card.count != global_batch:
        w.append(f"global batch is {kn.micro_batch_size * accum * card.count}, not {global_batch}: it is not a multiple of the micro-batch")
    return w


# --- when nothing fits -------------------------------------------------------------------------------


def _alternatives(spec: ModelSpec, card: GPU, knobs: dict, closest: Plan) -> list[str]:
    alts: list[str] = []
    if knobs["strategy"] not in ("auto", "qlora"):
        relaxed = {**knobs, "strategy": "qlora", "quantization": "auto"}
        p = _plan(spec, card, relaxed)
        if p.fits:
            alts.append(f"strategy qlora fits ({_gib(p.memory.total)} of {_gib(p.memory.budget)})")
    seq = closest.seq_len // 2
    while seq >= 128:
        p = _plan(spec, card, {**knobs, "seq_len": seq})
        if p.fits:
            alts.append(f"seq_len {seq} fits with {p.strategy} ({_gib(p.memory.total)})")
            break
        seq //= 2
    consumer = sorted((g for g in catalog() if g.is_consumer and g.vram_gb > card.vram_gb), key=lambda g: (g.msrp_usd or 1e9, -g.vram_gb))
    for g in consumer:
        p = _plan(spec, replace(g, count=card.count), knobs)
        if p.fits:
            alts.append(f"a {g.name} ({g.vram_gb:g} GB, launch price ${g.msrp_usd:,.0f}) fits with {p.strategy} ({_gib(p.memory.total)})")
            break
    return alts


def _does_not_fit_message(p: Plan, alts: list[str]) -> str:
    head = (
        f"{p.model} does not fit on {p.gpu.display_name} ({p.gpu.vram_gb:g} GB): the smallest plan tried "
        f"({p.strategy}, micro-batch {p.micro_batch_size}, seq_len {p.seq_len}, checkpointing {'on' if p.gradient_checkpointing else 'off'}) "
        f"needs {_gib(p.memory.total)} of {_gib(p.memory.budget)}"
    )
    return head + ("; what fits instead: " + "; ".join(alts) if alts else "; nothing smaller fits: choose a smaller model")
