"""The knob record: every knob a user can fix, in one place, and the rules the hardware sets for them.

`Knobs` is the one list. Its fields are `plan()`'s keywords; the `hfgpu plan` flags (`--seq-len`)
and the recipe keys (`data.max_seq_len`) are generated from it (hfgpu.cli, hfgpu.recipe), the Plan
carries the resolved record (no "auto" left), and the memory model, the model builder and the loop
read it (`memory.Setup`, `modeling.ModelSettings.from_plan`, `train.LoopConfig.from_plan`). A new
knob is one field here, its decision in the planner, its term in the memory model and the code
that applies it.

Each surface names a knob the way the user typed it: errors say `seq_len=0` to Python, `--seq-len 0`
on the command line and `data.max_seq_len=0` about a recipe (`Surface`).

Torch-free (imported by every plan).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from hfgpu import objectives
from hfgpu._fuzzy import did_you_mean
from hfgpu.errors import HfgpuError
from hfgpu.gpus import GPU
from hfgpu.models import ModelSpec

AUTO = "auto"

STRATEGIES = ("full", "lora", "qlora")
PRECISIONS = ("bf16", "fp16", "fp32")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")
DISTRIBUTED = ("none", "ddp", "fsdp", "zero2", "zero3")
# the objectives (hfgpu.objectives: one record each); these views are what the knob's choices and older callers read
OBJECTIVES = objectives.names()
PREFERENCE_OBJECTIVES = tuple(n for n in OBJECTIVES if objectives.objective(n).preference)  # not next tokens (hfgpu.preference)
PAIR_OBJECTIVES = tuple(n for n in OBJECTIVES if objectives.objective(n).pairs)  # prompt/chosen/rejected pairs
REFERENCE_OBJECTIVES = tuple(n for n in OBJECTIVES if objectives.objective(n).reference)  # compared with a frozen reference
CPU_4BIT_BLOCK = 32  # bitsandbytes' CPU 4-bit weight packing: output rows in blocks of 32 (functional._convert_weight_packed_for_cpu)
OBJECTIVE_PAPERS = {n: objectives.objective(n).paper for n in PREFERENCE_OBJECTIVES}


def batch_unit(objective: str) -> str:
    """What the global batch counts: sequences (sft), pairs, or KTO's labelled completions."""
    return objectives.objective(objective).unit


PREFERENCE_DEFAULTS = {n: objectives.objective(n).defaults for n in PREFERENCE_OBJECTIVES}


def _knob(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] = (),
    kind: str = "choice",
    recipe: str | None = None,
    auto: bool = True,
    minimum: int | None = None,
) -> Any:
    """A field of the record. kind: choice | int | bool | float | names; recipe: the key in a recipe
    (default: the field's name at the top level)."""
    return field(
        default=default, metadata={"help": help, "choices": choices, "kind": kind, "recipe": recipe, "auto": auto, "minimum": minimum}
    )


@dataclass(frozen=True)
class Knobs:
    """What a user may fix. Every field may be "auto" (the planner chooses) unless its type says otherwise."""

    objective: str = _knob(
        "sft",
        "sft: next-token loss on the responses · dpo, ipo: preference pairs against the frozen model (the reference) · "
        "simpo, orpo: preference pairs, no reference · kto: completions labelled desirable or not, against the reference",
        choices=OBJECTIVES,
        auto=False,
    )
    strategy: str = _knob(
        AUTO, "full: every weight trains · lora: adapters on a 16-bit base · qlora: adapters on a 4-bit base", choices=STRATEGIES
    )
    precision: str = _knob(
        AUTO, "compute dtype: bf16 from cc 8.0 (RTX 30), fp16 with loss scaling on RTX 20, fp32 on GTX 10", choices=PRECISIONS
    )
    frozen_dtype: str = _knob(
        AUTO,
        "LoRA/QLoRA: the frozen base's storage dtype; 16-bit under fp32 compute casts each weight to fp32 per use "
        "(auto: the compute dtype, fp16 on GTX 10)",
        choices=PRECISIONS,
    )
    quantization: str = _knob(AUTO, "base weights: nf4/fp4 (4-bit, QLoRA), int8 (LLM.int8), none (16-bit)", choices=QUANTIZATIONS)
    double_quant: bool = _knob(
        True, "4-bit bases: also quantize the quantization constants (≈0.37 bits per weight saved)", kind="bool", auto=False
    )
    gradient_checkpointing: Union[bool, str] = _knob(
        AUTO, "recompute each layer's activations in backward: far less memory, one extra forward", kind="bool"
    )
    micro_batch_size: Union[int, str] = _knob(
        AUTO, "sequences per forward pass: larger is faster and needs more activation memory", kind="int", minimum=1
    )
    grad_accum_steps: Union[int, str] = _knob(
        AUTO, "micro-batches per optimizer step (auto: reach global_batch_size)", kind="int", minimum=1, recipe="train.grad_accum_steps"
    )
    global_batch_size: Union[int, str] = _knob(
        AUTO, "sequences per optimizer step, across all cards (auto: 16)", kind="int", minimum=1, recipe="train.global_batch_size"
    )
    seq_len: Union[int, str] = _knob(
        AUTO, "tokens per sequence (auto: min(2048, the model's maximum))", kind="int", minimum=1, recipe="data.max_seq_len"
    )
    optimizer: str = _knob(
        AUTO, "adamw_torch: fp32 state, 8 bytes per trained weight · adamw_8bit (bitsandbytes): 2 bytes", choices=OPTIMIZERS
    )
    attention: str = _knob(
        AUTO, "sdpa: PyTorch's fused kernels · eager · flash_attention_2 (cc 8.0 and the flash-attn package)", choices=ATTENTIONS
    )
    distributed: str = _knob(
        AUTO, "how several cards ('2x RTX 3090') share the run (auto: ddp, or what `accelerate launch` set up)", choices=DISTRIBUTED
    )
    chunked_loss: Union[bool, str] = _knob(AUTO, "lm_head and the loss over slices of tokens: the full logits never exist", kind="bool")
    activation_offloading: Union[bool, str] = _knob(
        AUTO, "checkpointed layer inputs wait in CPU memory (needs gradient checkpointing)", kind="bool"
    )
    tiled_mlp: Union[bool, str] = _knob(
        AUTO, "the MLP's backward over tiles of tokens, for long sequences (needs gradient checkpointing)", kind="bool"
    )
    packing: bool = _knob(
        False,
        "several examples per sequence (position_ids keep them apart): less padding, faster",
        kind="bool",
        auto=False,
        recipe="data.packing",
    )
    lora_r: Union[int, str] = _knob(
        AUTO, "LoRA rank: higher learns more and costs more memory (auto: 16)", kind="int", minimum=1, recipe="lora.r"
    )
    lora_alpha: Union[int, str] = _knob(AUTO, "LoRA scaling (auto: 2 × r)", kind="int", minimum=1, recipe="lora.alpha")
    lora_dropout: float = _knob(
        0.0,
        "dropout on each adapter's input, in [0, 1): 0 keeps no copy of it (less memory); 0.05-0.1 regularises small data",
        kind="float",
        auto=False,
        recipe="lora.dropout",
    )
    lora_targets: Union[tuple, str] = _knob(
        AUTO,
        "the linear layers that get adapters (e.g. q_proj,v_proj); all-linear (peft's word) or auto: all but the output head",
        kind="names",
        recipe="lora.target_modules",
    )

    def __post_init__(self) -> None:
        t = self.lora_targets
        if isinstance(t, str) and t != AUTO:
            object.__setattr__(self, "lora_targets", tuple(x.strip() for x in t.split(",") if x.strip()))
        elif isinstance(t, list):
            object.__setattr__(self, "lora_targets", tuple(t))

    @classmethod
    def from_kwargs(cls, given: dict[str, Any], where: str = "plan()") -> "Knobs":
        """The record from keyword arguments; an unknown name is a typo: one line with the nearest names."""
        for name in given:
            if name not in KNOB_NAMES:
                hint = did_you_mean(name, list(KNOB_NAMES), n=2, cutoff=0.5) or "known: " + ", ".join(KNOB_NAMES)
                raise HfgpuError(f"{where} has no knob {name!r}: {hint}")
        return cls(**given)

    replace = dataclasses.replace


KNOB_FIELDS: tuple[dataclasses.Field, ...] = tuple(dataclasses.fields(Knobs))
KNOB_NAMES: tuple[str, ...] = tuple(f.name for f in KNOB_FIELDS)


def knob_field(name: str) -> dataclasses.Field:
    return next(f for f in KNOB_FIELDS if f.name == name)


def recipe_key(name: str) -> str:
    """The knob's key in a recipe: `seq_len` → `data.max_seq_len`."""
    return knob_field(name).metadata["recipe"] or name


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Surface:
    """How errors name a knob: the way the user typed it."""

    kind: Literal["python", "cli", "recipe"] = "python"

    def key(self, name: str) -> str:
        return {"python": name, "cli": cli_flag(name), "recipe": recipe_key(name)}[self.kind]

    def value(self, value: Any) -> str:
        """A value as the user would write it here: `'fp16'`/`True` in Python, `on` on the command line, `true` in a recipe."""
        if isinstance(value, bool):
            return {"python": str(value), "cli": "on" if value else "off", "recipe": "true" if value else "false"}[self.kind]
        if isinstance(value, tuple):
            return ",".join(value) if self.kind != "python" else repr(list(value))
        return repr(value) if self.kind == "python" else str(value)

    def setting(self, name: str, value: Any) -> str:
        """`name=value` as the user would write it here: `precision='fp16'`, `--precision fp16`, `precision=fp16`."""
        return f"{self.key(name)} {self.value(value)}" if self.kind == "cli" else f"{self.key(name)}={self.value(value)}"


PYTHON, CLI, RECIPE = Surface("python"), Surface("cli"), Surface("recipe")
# Pascal (cc 6.x): only torch's CUDA 12.6 wheels still carry sm50/sm60 kernels, and bitsandbytes follows torch's CUDA
# (shared/reference/gpus_notes.md, bitsandbytes and PyTorch wheels sections)
PASCAL_TORCH = "pip install 'torch<=2.14' --index-url https://download.pytorch.org/whl/cu126"

ALL_LINEAR = "all-linear"  # peft's keyword for lora_targets: every linear layer but the output head, as auto resolves it


# --- eligibility: which models and setups a saver applies to ------------------------------------------

# model type → its Llama-style RMSNorm class, which hfgpu.patches.lean_rmsnorm swaps (always on; the plan
# says so). tests/test_patches.py builds each and checks the swap applies and changes nothing: a rename in
# transformers shows up there, not as a silent no-op
RMSNORM_BY_MODEL_TYPE = {
    "llama": "LlamaRMSNorm",
    "mistral": "MistralRMSNorm",
    "qwen2": "Qwen2RMSNorm",
    "qwen3": "Qwen3RMSNorm",
    "qwen3_moe": "Qwen3MoeRMSNorm",
    "qwen2_moe": "Qwen2MoeRMSNorm",
    "mixtral": "MixtralRMSNorm",
    "phi3": "Phi3RMSNorm",
    "olmoe": "OlmoeRMSNorm",
    "granite": "GraniteRMSNorm",
}
# model types transformers builds without an sdpa attention path (it raises "does not support an attention
# implementation through torch.nn.functional.scaled_dot_product_attention"): Gemma-2's soft-capped scores.
# tests/test_model_families.py builds every catalog family with the planner's default and checks this table.
NO_SDPA_MODEL_TYPES = {"gemma2": "Gemma-2's soft-capped attention scores"}


def default_attention(spec: Any) -> str:
    """sdpa, unless transformers has no sdpa path for the model: then eager."""
    return "eager" if spec.model_type in NO_SDPA_MODEL_TYPES else "sdpa"


# model types whose decoder layers' `mlp` is dense and per token (hfgpu.patches.tile_mlps tiles them)
TILED_MLP_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo", "olmo2"}


def plain_logits(config: dict) -> bool:
    """Logits that are plain lm_head outputs, as the chunked loss computes them: not soft-capped
    (Gemma-2) or rescaled (Cohere's logit_scale, Granite's logits_scaling)."""
    return (
        not config.get("final_logit_softcapping")
        and config.get("logit_scale", 1) in (1, None)
        and config.get("logits_scaling", 1) in (1, None)
    )


def chunked_loss_blocker(spec: ModelSpec, distributed: str) -> str | None:
    """Why the chunked loss cannot be used for this model and launch, or None when it can."""
    if not plain_logits(spec.config):
        return f"{spec.name}'s logits are soft-capped or rescaled"
    if distributed in ("fsdp", "zero3"):
        return f"it reads lm_head's weight outside the forward pass, which distributed={distributed} shards"
    return None


def tiled_mlp_blocker(spec: ModelSpec) -> str | None:
    if spec.model_type not in TILED_MLP_MODEL_TYPES:
        return f"not for {spec.model_type} models (dense MLPs of {', '.join(sorted(TILED_MLP_MODEL_TYPES))})"
    return None


# --- hardware rules ----------------------------------------------------------------------------------


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


def auto_frozen_dtype(gpu: GPU, strategy: str, precision: str) -> tuple[str, str]:
    """Where the frozen base is stored (LoRA/QLoRA): in the compute dtype, except under fp32 compute on a GPU
    (Pascal): fp16 there, cast to fp32 per use, which halves the embeddings, lm_head and 16-bit linears.
    fp16 rather than bf16: it is Pascal's native 16-bit type (bf16 conversions are emulated before cc 8.0),
    it keeps more mantissa, and model weights lie far inside its range."""
    if strategy == "full":
        return "fp32", "full fine-tuning: fp32 master weights, no frozen base"
    if precision != "fp32" or gpu.is_cpu:
        return precision, f"the frozen base is stored in the compute dtype ({precision})"
    return "fp16", (
        "fp16 storage, fp32 compute: each frozen weight (embeddings, lm_head"
        + (")" if strategy == "qlora" else ", linears)")
        + " is cast to fp32 where it is used, so the card holds 2 bytes per weight instead of 4"
    )


def _type_errors(k: Knobs, n: Surface) -> dict[str, str]:
    """Each field against its declared kind, choices and minimum: {field: problem}."""
    errs: dict[str, str] = {}
    for f in KNOB_FIELDS:
        v, meta, name = getattr(k, f.name), f.metadata, f.name
        if v == AUTO and meta["auto"]:
            continue
        kind = meta["kind"]
        or_auto = " (or auto)" if meta["auto"] else ""
        if kind == "choice" and v not in meta["choices"]:
            errs[name] = f"{n.setting(name, v)} is not one of {', '.join(meta['choices'])}{or_auto}"
        elif kind == "bool" and not isinstance(v, bool):
            errs[name] = f"{n.setting(name, v)} must be true, false" + (" or auto" if meta["auto"] else "")
        elif kind == "int" and (not isinstance(v, int) or isinstance(v, bool) or v < (meta["minimum"] or 0)):
            errs[name] = f"{n.setting(name, v)} must be a whole number ≥ {meta['minimum']}"
        elif kind == "float" and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1):
            errs[name] = f"{n.setting(name, v)} must be a number in [0, 1)"
        elif kind == "names" and (not isinstance(v, tuple) or not all(isinstance(x, str) for x in v)):
            errs[name] = f"{n.setting(name, v)} must be layer names"
    return errs


def validate(spec: ModelSpec, gpu: GPU, k: Knobs, n: Surface = PYTHON) -> list[str]:
    """Every problem with the fixed knobs, each a sentence naming the value and the fix as the user typed them."""
    bad = _type_errors(k, n)
    errs = list(bad.values())
    k = k.replace(**{name: knob_field(name).default for name in bad})  # the rules below see only well-typed values
    use = n.setting
    if k.distributed not in (AUTO, "none") and gpu.count < 2:
        errs.append(f"{use('distributed', k.distributed)} needs several cards: pass the count with the card, e.g. gpu '2x {gpu.name}'")
    cc = gpu.compute_capability
    ccs = "unknown" if cc is None else f"{cc[0]}.{cc[1]}"
    if k.precision == "bf16" and cc is not None and cc < (8, 0):
        errs.append(
            f"{use('precision', 'bf16')} needs compute capability ≥ 8.0 (RTX 30 series or newer); {gpu.name} is {ccs}: use "
            f"{use('precision', 'fp16')}" + (f" or {use('precision', 'fp32')}" if cc < (7, 0) else "")
        )
    if k.attention == "sdpa" and spec.model_type in NO_SDPA_MODEL_TYPES:
        errs.append(
            f"{use('attention', 'sdpa')}: transformers has no sdpa path for {spec.model_type} ({NO_SDPA_MODEL_TYPES[spec.model_type]}): "
            f"use {use('attention', 'eager')} (or auto)"
        )
    if k.attention == "flash_attention_2":
        fa = use("attention", "flash_attention_2")
        if gpu.is_cpu:
            errs.append(f"{fa} needs a CUDA GPU, not the CPU: use {use('attention', default_attention(spec))}")
        if cc is not None and cc < (8, 0):
            errs.append(f"{fa} needs compute capability ≥ 8.0; {gpu.name} is {ccs}: use {use('attention', default_attention(spec))}")
        if k.precision == "fp32":
            errs.append(f"{fa} runs in fp16/bf16 only, not {use('precision', 'fp32')}: use {use('attention', default_attention(spec))}")
    s, q = k.strategy, k.quantization
    if k.frozen_dtype != AUTO:
        fd = use("frozen_dtype", k.frozen_dtype)
        compute = k.precision if k.precision != AUTO else auto_precision(gpu)[0]
        if s == "full":
            if k.frozen_dtype != "fp32":  # fp32: what full fine-tuning stores (a resolved recipe says so)
                errs.append(
                    f"{fd}: {use('strategy', 'full')} trains every weight (fp32 master weights), nothing is frozen: "
                    f"use {use('frozen_dtype', 'auto')}, or {use('strategy', 'lora')}"
                )
        elif compute != "fp32" and k.frozen_dtype != compute:
            errs.append(
                f"{fd} with {use('precision', compute)}: in 16-bit training the frozen base is stored in the compute "
                f"dtype; use {use('frozen_dtype', compute)} (or auto)"
            )
    if s == "qlora" and q in ("none", "int8"):
        errs.append(
            f"{use('strategy', 'qlora')} quantizes the base to 4 bits, not {use('quantization', q)}: use "
            f"{use('quantization', 'nf4')} (or fp4), "
            f"or {use('strategy', 'lora')}"
        )
    if s == "full" and q not in (AUTO, "none"):
        errs.append(
            f"{use('strategy', 'full')} trains every weight and cannot use {use('quantization', q)}: use {use('strategy', 'qlora')}, "
            f"or {use('quantization', 'none')}"
        )
    if s == "lora" and q in ("nf4", "fp4"):
        errs.append(f"LoRA on a 4-bit base is {use('strategy', 'qlora')}: use {use('strategy', 'qlora')} with {use('quantization', q)}")
    if q == "int8" and cc is not None and cc < (7, 5):
        errs.append(
            f"{use('quantization', 'int8')} (LLM.int8) needs compute capability ≥ 7.5; {gpu.name} is {ccs}: use {use('strategy', 'qlora')} "
            "(nf4 works from cc 6.0)"
        )
    if k.optimizer in ("adamw_8bit", "paged_adamw_8bit") and cc is not None and cc < (6, 0):
        errs.append(
            f"{use('optimizer', k.optimizer)} (bitsandbytes) needs compute capability ≥ 6.0; {gpu.name} is {ccs}: use "
            f"{use('optimizer', 'adamw_torch')}"
        )
    if k.seq_len != AUTO and k.seq_len > spec.max_seq_len:
        errs.append(
            f"{use('seq_len', k.seq_len)} is beyond {spec.name}'s maximum of {spec.max_seq_len} tokens (max_position_embeddings): "
            f"use {n.key('seq_len')} ≤ {spec.max_seq_len}"
        )
    ckpt_off = k.gradient_checkpointing is False
    four_bit = k.quantization in ("nf4", "fp4") or (k.strategy == "qlora" and k.quantization == AUTO)
    if gpu.is_cpu and four_bit:
        odd = sorted({f"{g.name} ({g.out_features})" for g in spec.linears if g.out_features % CPU_4BIT_BLOCK})
        if odd:
            what = use("quantization", k.quantization) if k.quantization != AUTO else use("strategy", "qlora")
            errs.append(
                f"{what} on CPU: bitsandbytes' CPU 4-bit kernel needs every quantized layer's output size divisible by "
                f"{CPU_4BIT_BLOCK}, and {spec.name}'s {', '.join(odd[:3])} are not: use {use('strategy', 'lora')} on CPU, or a GPU"
            )
    if objectives.objective(k.objective).preference:
        obj = use("objective", k.objective)
        if not plain_logits(spec.config):
            errs.append(
                f"{obj} computes log-probabilities from lm_head by slices of tokens, and {spec.name}'s logits are soft-capped "
                f"or rescaled: use {use('objective', 'sft')}, or another model"
            )
        if k.chunked_loss is False:
            errs.append(
                f"{use('chunked_loss', False)} with {obj}: preference log-probabilities are always computed by slices of "
                f"tokens (the logits of both responses never exist at once): use {use('chunked_loss', 'auto')}"
            )
        if k.packing is True:
            errs.append(
                f"{use('packing', True)} with {obj}: a preference example's sequences are never packed; use {use('packing', False)}"
            )
        if k.distributed in ("fsdp", "zero3"):
            errs.append(
                f"{obj} reads lm_head's weight outside the forward pass, which {use('distributed', k.distributed)} shards: "
                "use distributed ddp or zero2"
            )
    if k.chunked_loss is True and (why := chunked_loss_blocker(spec, k.distributed)) is not None:
        errs.append(
            f"{use('chunked_loss', True)} cannot be used: {why}; use {use('chunked_loss', False)}"
            + (", or distributed ddp or zero2" if k.distributed in ("fsdp", "zero3") else "")
        )
    if k.activation_offloading is True:
        if gpu.is_cpu:
            errs.append(
                f"{use('activation_offloading', True)} moves activations from a GPU to CPU memory, and this plan is for the CPU: "
                f"use {use('activation_offloading', False)}"
            )
        if ckpt_off:
            errs.append(
                f"{use('activation_offloading', True)} moves the checkpointed layer inputs, so it needs gradient checkpointing: "
                f"set {use('gradient_checkpointing', True)} (or auto)"
            )
    if k.tiled_mlp is True:
        if (why := tiled_mlp_blocker(spec)) is not None:
            errs.append(f"{use('tiled_mlp', True)} cannot be used: {why}; use {use('tiled_mlp', False)}")
        if ckpt_off:
            errs.append(
                f"{use('tiled_mlp', True)} recomputes the MLP inside checkpointed layers, so it needs gradient checkpointing: "
                f"set {use('gradient_checkpointing', True)} (or auto)"
            )
    if k.lora_targets not in (AUTO, (ALL_LINEAR,)):
        unknown = [t for t in k.lora_targets if t not in spec.linear_names]
        if unknown or not k.lora_targets:
            errs.append(
                f"{n.key('lora_targets')} {', '.join(unknown) or '(empty)'} not among {spec.name}'s linear layers: "
                f"choose from {', '.join(spec.linear_names)}"
            )
    return errs


def markdown_table() -> str:
    """The README's knob table: each knob's Python keyword, flag, recipe key, values and meaning."""
    rows = ["| `plan()` keyword | `hfgpu plan` flag | recipe key | values | what it does |", "|---|---|---|---|---|"]
    for f in KNOB_FIELDS:
        meta = f.metadata
        values = {
            "choice": " \\| ".join(meta["choices"]),
            "bool": "on/off (true/false)",
            "int": "N",
            "float": "0 ≤ P < 1",
            "names": "a,b,c",
        }[meta["kind"]]
        default = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
        values += " \\| auto" if meta["auto"] else f" (default {default})"
        text = meta["help"].replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{cli_flag(f.name)}` | `{recipe_key(f.name)}` | {values} | {text} |")
    return "\n".join(rows)
