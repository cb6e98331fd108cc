"""The plan's words: each knob's reason, quoting what the planner's search saw (the peaks of the options it passed
over, the throughput model's costs), and the plan's warnings. hfgpu.planner calls them once a plan is chosen;
torch-free like it."""

from __future__ import annotations

import math
from dataclasses import replace

from hfgpu import memory, objectives
from hfgpu.gpus import GPU
from hfgpu.knobs import (
    ALL_LINEAR,
    NO_SDPA_MODEL_TYPES,
    PASCAL_TORCH,
    RMSNORM_BY_MODEL_TYPE,
    auto_frozen_dtype,
    auto_precision,
    batch_unit,
    planning_cc,
)
from hfgpu.models import ModelSpec
from hfgpu.search import (
    DEFAULT_LORA_R,
    DEFAULT_MAX_SEQ_LEN,
    NEEDS_CHECKPOINTING,
    SAVERS,
    SPEED_RESOLUTION,
    TIGHT_SHARE,
    Found,
    Problem,
    is_tight,
)
from hfgpu.throughput import (
    CHUNKED_LOSS_COST,
    PCIE_BYTES_PER_S,
    TILED_MLP_COST,
    checkpointing_cost,
    compute_tokens_per_second,
    reference_cost,
)
from hfgpu.units import gib


def reasons(c: Problem, found: Found, accum: int) -> dict[str, str]:
    """Each knob's reason, quoting what the search saw (`rejected`: the smallest peak of each option it passed over)."""
    kn, mem, rejected = found.setup, found.mem, found.rejected
    spec, card, k, seq, global_batch = c.spec, c.gpu, c.fixed, kn.seq_len, c.base.global_batch_size
    fixed = "fixed by you"
    r: dict[str, str] = {}

    def least(*key) -> str:
        return f"at least {gib(rejected[key])}" if key in rejected else "more"

    if objectives.objective(kn.objective).preference:
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
                f"the fastest of the {found.roomy} plans that fit with room, by the throughput model (within its "
                f"{SPEED_RESOLUTION:.0%} resolution, the one with fewer time-costing savers and the larger micro-batch)"
                if found.roomy
                else "of the plans that fit only tightly, the one with the most room"
            )
            + f" ({gib(mem.activations + mem.logits)} of activations and logits)"
        )
        if found.runner_up is not None and found.speeds[0] > 0:
            r["micro_batch_size"] += f"; the runner-up, {_difference(kn, found.runner_up)}, is estimated " + _runner_up(
                kn, found.runner_up, found.speeds[1] / found.speeds[0]
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
    o = objectives.objective(kn.objective)
    text = o.reason.format(paper=o.paper, micro_batch=kn.micro_batch_size, sequences=memory.step_tokens(kn) // kn.seq_len)
    if not o.reference:
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


SAVER_LABELS = (
    ("gradient_checkpointing", "checkpointing"),
    ("chunked_loss", "the chunked loss"),
    ("activation_offloading", "offloading"),
    ("tiled_mlp", "the tiled MLP"),
)


def _runner_up(chosen: memory.Setup, other: memory.Setup, ratio: float) -> str:
    """How much faster or slower the runner-up is estimated, and, when it is not slower, why the chosen plan was kept:
    in words that agree with the choice (the chunked loss costs no time and is kept for its room; otherwise the
    runner-up would add a saver or a smaller micro-batch for less than the model's resolution)."""
    if ratio < 1 - 5e-4:
        return f"{1 - ratio:.1%} slower"
    pace = "as fast" if ratio < 1 + 5e-4 else f"{ratio - 1:.1%} faster"
    if chosen.chunked_loss and not other.chunked_loss:
        return f"{pace}: the chunked loss costs no time and leaves more room, so it stays on"
    resolution = f"within the throughput model's {SPEED_RESOLUTION:.0%} resolution"
    added = [label for name, label in SAVER_LABELS if getattr(other, name) and not getattr(chosen, name)]
    if other.micro_batch_size < chosen.micro_batch_size:
        added.append("a smaller micro-batch")
    return f"{pace}, {resolution}: not enough to take on " + (" and ".join(added) if added else "the change")


def _difference(chosen: memory.Setup, other: memory.Setup) -> str:
    """How `other` differs from the chosen setup, in a few words: "micro-batch 2 without the chunked loss"."""
    words = []
    if other.micro_batch_size != chosen.micro_batch_size:
        words.append(f"micro-batch {other.micro_batch_size}")
    for name, label in SAVER_LABELS:
        if getattr(other, name) != getattr(chosen, name):
            words.append(("with " if getattr(other, name) else "without ") + label)
    return " ".join(words) or "the same knobs"


def _saver_reasons(c: Problem, kn: memory.Setup, mem: memory.MemoryBreakdown) -> dict[str, str]:
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


def plan_warnings(spec: ModelSpec, card: GPU, kn: memory.Setup, mem: memory.MemoryBreakdown, accum: int, global_batch: int) -> list[str]:
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
    if is_tight(kn, mem):
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
