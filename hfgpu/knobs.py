"""The knobs a plan can fix, the rules the hardware sets for them, and the check of fixed knobs.

Torch-free (imported by every plan): names, the card's compute capability as the planner assumes
it, the automatic precision, and `validate`, which lists every problem with the fixed knobs at once.
"""

from __future__ import annotations

from typing import Any

from hfgpu import memory
from hfgpu.gpus import GPU
from hfgpu.models import ModelSpec

STRATEGIES = ("full", "lora", "qlora")
PRECISIONS = ("bf16", "fp16", "fp32")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")
DISTRIBUTED = ("none", "ddp", "fsdp", "zero2", "zero3")


def planning_cc(gpu: GPU) -> tuple[int, int]:
    # A custom card ("12GB") has no known capability: plan as a current (Ampere+) card and say so.
    return gpu.compute_capability or (8, 0)


def auto_precision(gpu: GPU) -> tuple[str, str]:
    if gpu.is_cpu:
        return "fp32", "fp32 on CPU: 16-bit autocast is slower than fp32 on most CPUs"
    cc = planning_cc(gpu)
    where = f"{gpu.name} is cc {cc[0]}.{cc[1]}"
    if cc >= (8, 0):
        return "bf16", f"bf16 mixed precision: native on cc ≥ 8.0 ({where}); no loss scaling needed"
    if cc >= (7, 0):
        return "fp16", f"fp16 mixed precision with loss scaling: bf16 needs cc ≥ 8.0 ({where})"
    return "fp32", f"fp32 compute: {where} (Pascal) runs fp16 at 1/64 rate and has no tensor cores"


def validate(spec: ModelSpec, gpu: GPU, k: dict[str, Any]) -> list[str]:
    """Every problem with the fixed knobs, each a sentence naming the value and the fix."""
    errs: list[str] = []

    def choice(name: str, allowed: tuple[str, ...]) -> None:
        v = k[name]
        if v != "auto" and v not in allowed:
            errs.append(f"{name}={v!r} is not one of {', '.join(allowed)} (or auto)")

    choice("strategy", STRATEGIES)
    choice("precision", PRECISIONS)
    choice("quantization", QUANTIZATIONS)
    choice("optimizer", OPTIMIZERS)
    choice("attention", ATTENTIONS)
    choice("distributed", DISTRIBUTED)
    if k["distributed"] not in ("auto", "none") and gpu.count < 2:
        errs.append(f"distributed={k['distributed']} needs several cards: pass the count with the card, e.g. gpu '2x {gpu.name}'")
    cc = gpu.compute_capability
    ccs = "unknown" if cc is None else f"{cc[0]}.{cc[1]}"
    if k["precision"] == "bf16" and cc is not None and cc < (8, 0):
        errs.append(f"precision=bf16 needs compute capability ≥ 8.0 (RTX 30 series or newer); {gpu.name} is {ccs}: use precision fp16" + (" or fp32" if cc < (7, 0) else ""))
    if k["attention"] == "flash_attention_2":
        if gpu.is_cpu:
            errs.append("attention=flash_attention_2 needs a CUDA GPU, not the CPU: use attention sdpa")
        if cc is not None and cc < (8, 0):
            errs.append(f"attention=flash_attention_2 needs compute capability ≥ 8.0; {gpu.name} is {ccs}: use attention sdpa")
        if k["precision"] == "fp32":
            errs.append("attention=flash_attention_2 runs in fp16/bf16 only, not precision=fp32: use attention sdpa")
    s, q = k["strategy"], k["quantization"]
    if s == "qlora" and q in ("none", "int8"):
        errs.append(f"strategy=qlora quantizes the base to 4 bits, not quantization={q}: use quantization nf4 (or fp4), or strategy lora")
    if s == "full" and q not in ("auto", "none"):
        errs.append(f"strategy=full trains every weight and cannot use quantization={q}: use strategy qlora, or quantization none")
    if s == "lora" and q in ("nf4", "fp4"):
        errs.append(f"LoRA on a 4-bit base is strategy=qlora: use strategy qlora with quantization={q}")
    if q == "int8" and cc is not None and cc < (7, 5):
        errs.append(f"quantization=int8 (LLM.int8) needs compute capability ≥ 7.5; {gpu.name} is {ccs}: use strategy qlora (nf4 works from cc 6.0)")
    if k["optimizer"] in ("adamw_8bit", "paged_adamw_8bit") and cc is not None and cc < (6, 0):
        errs.append(f"optimizer={k['optimizer']} (bitsandbytes) needs compute capability ≥ 6.0; {gpu.name} is {ccs}: use optimizer adamw_torch")
    for name in ("micro_batch_size", "grad_accum_steps", "global_batch_size", "lora_r", "lora_alpha"):
        v = k[name]
        if v != "auto" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            errs.append(f"{name}={v!r} must be a whole number ≥ 1")
    v = k["seq_len"]
    if v != "auto":
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            errs.append(f"seq_len={v!r} must be a whole number ≥ 1")
        elif v > spec.max_seq_len:
            errs.append(f"seq_len={v} is beyond {spec.name}'s maximum of {spec.max_seq_len} tokens (max_position_embeddings): use seq_len ≤ {spec.max_seq_len}")
    d = k["lora_dropout"]
    if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 <= d < 1:
        errs.append(f"lora_dropout={d!r} must be a number in [0, 1)")
    gc = k["gradient_checkpointing"]
    for name in ("gradient_checkpointing", "chunked_loss", "activation_offloading", "tiled_mlp"):
        if k[name] != "auto" and not isinstance(k[name], bool):
            errs.append(f"{name}={k[name]!r} must be true, false or auto")
    if k["chunked_loss"] is True:
        if not memory.plain_logits(spec.config):
            errs.append(f"chunked_loss is not supported for {spec.name}: its logits are soft-capped or rescaled; use chunked_loss false")
        if k["distributed"] in ("fsdp", "zero3"):
            errs.append(f"chunked_loss reads lm_head's weight outside the forward pass, which distributed={k['distributed']} shards: use chunked_loss false, or distributed ddp or zero2")
    if k["activation_offloading"] is True:
        if gpu.is_cpu:
            errs.append("activation_offloading moves activations from a GPU to CPU memory, and this plan is for the CPU: use activation_offloading false")
        if gc is False:
            errs.append("activation_offloading moves the checkpointed layer inputs, so it needs gradient checkpointing: set gradient_checkpointing true (or auto)")
    if k["tiled_mlp"] is True:
        if spec.model_type not in memory.TILED_MLP_MODEL_TYPES:
            errs.append(f"tiled_mlp supports the dense MLPs of {', '.join(sorted(memory.TILED_MLP_MODEL_TYPES))}, not {spec.model_type!r}: use tiled_mlp false")
        if gc is False:
            errs.append("tiled_mlp recomputes the MLP inside checkpointed layers, so it needs gradient checkpointing: set gradient_checkpointing true (or auto)")
    targets = k["lora_targets"]
    if targets != "auto":
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        unknown = [t for t in targets if t not in spec.linear_names]
        if unknown or not targets:
            errs.append(f"lora_targets {', '.join(unknown) or '(empty)'} not among {spec.name}'s linear layers: choose from {', '.join(spec.linear_names)}")
    return errs
