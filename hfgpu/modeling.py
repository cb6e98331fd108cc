"""Load a model exactly as a plan says: dtype, 4-bit quantization, LoRA, checkpointing, attention.

Nothing here chooses a knob; the planner did. `prepare_model` is used by training and by the memory
measurements that check the planner's model (tests/test_memory.py, benchmarks/memory_cpu.py).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, fields
from typing import Any

import torch

from hfgpu import online
from hfgpu.knobs import RMSNORM_BY_MODEL_TYPE
from hfgpu.patches import lean_rmsnorm, tile_mlps, upcast_per_use

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelSettings:
    """The knobs of a Plan that decide how the model is built (see hfgpu.planner.Plan)."""

    strategy: str  # full | lora | qlora
    precision: str  # bf16 | fp16 | fp32: the compute dtype
    frozen_dtype: str = ""  # LoRA/QLoRA: the frozen base's storage dtype (default: the compute dtype)
    quantization: str = "none"  # none | nf4 | fp4 | int8
    double_quant: bool = True
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()  # empty: every Linear except lm_head
    shard_quantized: bool = False  # FSDP / ZeRO-3: store 4-bit weights in the compute dtype so they shard
    tiled_mlp: bool = False  # the MLP's backward over tiles of tokens (hfgpu.patches.tile_mlps); with checkpointing

    @classmethod
    def from_knobs(cls, k: Any) -> "ModelSettings":
        """From a resolved knob record (a Plan's `knobs`, or a memory.Setup): every field of the same name."""
        names = {f.name for f in fields(cls)} - {"shard_quantized"}
        return cls(**{n: getattr(k, n) for n in names}, shard_quantized=k.distributed in ("fsdp", "zero3"))

    @classmethod
    def from_plan(cls, p: Any) -> "ModelSettings":
        return cls.from_knobs(p.knobs)

    @property
    def storage_dtype(self) -> torch.dtype:
        # Full fine-tuning keeps fp32 master weights (autocast computes in 16-bit); LoRA and QLoRA store the
        # frozen base in frozen_dtype: the compute dtype, or 16 bits under fp32 compute (Pascal: cast per use).
        return torch.float32 if self.strategy == "full" else DTYPES[self.frozen_dtype or self.precision]

    @property
    def upcast(self) -> bool:
        """Frozen weights stored in 16 bits and computed in fp32 (hfgpu.patches.upcast_per_use)."""
        return self.strategy != "full" and self.storage_dtype != DTYPES[self.precision]


def _bnb_config(s: ModelSettings):
    from transformers import BitsAndBytesConfig

    if s.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    extra = {"bnb_4bit_quant_storage": DTYPES[s.precision]} if s.shard_quantized else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=s.quantization,
        bnb_4bit_use_double_quant=s.double_quant,
        bnb_4bit_compute_dtype=DTYPES[s.precision],
        **extra,
    )


def prepare_model(
    source: Any, s: ModelSettings, seed: int = 0, trust_remote_code: bool = False, device: str | None = None
) -> torch.nn.Module:
    """A causal LM from a folder/repo id (`str`) or a `PretrainedConfig` (random weights), prepared per `s`.

    `device="cuda"` puts it on the first GPU (calibration); training leaves placement to accelerate."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    torch.manual_seed(seed)
    quantized = s.quantization != "none"
    if isinstance(source, PretrainedConfig):
        if not quantized:
            model = AutoModelForCausalLM.from_config(source, dtype=s.storage_dtype, attn_implementation=s.attention)
        else:  # bitsandbytes quantizes while loading: save random weights, then load them quantized
            with tempfile.TemporaryDirectory() as tmp:
                AutoModelForCausalLM.from_config(source, dtype=s.storage_dtype).save_pretrained(tmp)
                model = _load(tmp, s, device=device)
    else:
        model = _load(source, s, trust_remote_code, device=device)
    if device is not None and not quantized:
        model = model.to(device)
    return apply_settings(model, s)


def apply_settings(model: torch.nn.Module, s: ModelSettings, plain_path: bool = False) -> torch.nn.Module:
    """What `prepare_model` does to a loaded base: no cache, the lean RMSNorm, frozen quantized base,
    checkpointing, LoRA, the tiled MLP. hfgpu.simulate calls it on a base built on fake tensors.
    `plain_path`: keep transformers' RMSNorm (the plain path hfgpu is compared with)."""
    model.config.use_cache = False  # a cache in train mode wastes memory and breaks packed attention
    if not plain_path:
        swapped = lean_rmsnorm(model)  # same math, no fp32 copy of each norm's input kept for backward (hfgpu.patches)
        expected = RMSNORM_BY_MODEL_TYPE.get(getattr(model.config, "model_type", None))
        if expected and not swapped:  # the plan said "lean": say loudly that it is not
            import warnings

            import transformers

            warnings.warn(
                f"hfgpu: the plan assumed the lean RMSNorm, but this model has no {expected} (renamed in transformers "
                f"{transformers.__version__}?): activations will be larger than planned",
                stacklevel=2,
            )
    if s.quantization != "none":
        # What peft's prepare_model_for_kbit_training does, except that the frozen parameters bitsandbytes
        # left unquantized (embeddings, lm_head, norms) stay in the compute dtype instead of fp32: as in
        # LoRA on a 16-bit base; for Llama-3.1-8B that is 2 GB less, and no 16-bit autocast copy of lm_head.
        for p in model.parameters():
            p.requires_grad_(False)
    if s.upcast:  # GTX 10 (Pascal): a 16-bit frozen base, fp32 compute; peft freezes the same parameters
        for p in model.parameters():
            p.requires_grad_(False)
        upcast_per_use(model, DTYPES[s.precision])
    if s.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x; the old name goes in v6
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if s.strategy != "full":
            model.enable_input_require_grads()
    if s.strategy in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=s.lora_r,
            lora_alpha=s.lora_alpha,
            lora_dropout=s.lora_dropout,
            target_modules=list(s.lora_targets) or "all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if s.tiled_mlp and s.gradient_checkpointing:
        if tile_mlps(model) == 0:  # after peft: the tiles' trainable parameters are the adapters
            from hfgpu.errors import HfgpuError

            raise HfgpuError(
                f"tiled_mlp is on but no decoder-layer mlp of model_type {getattr(model.config, 'model_type', '?')!r} was "
                f"found to tile: set tiled_mlp=false"
            )
    return model


def adapters_in_compute_dtype(model: torch.nn.Module, autocast: bool):
    """Under 16-bit autocast, LoRA layers take their 16-bit input as it is instead of copying it to
    the fp32 adapters' dtype (peft's default): autocast runs the adapter matmuls in 16 bits either
    way, and the fp32 copies were the largest tensors of a recomputed layer (224 MiB for
    Llama-3.1-8B's down_proj at 2 × 2048). Wrap forward and backward both: a checkpointed layer
    recomputes in backward and must take the same path."""
    if not autocast:
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


def _load(path: str, s: ModelSettings, trust_remote_code: bool = False, device: str | None = None):
    from transformers import AutoModelForCausalLM

    from hfgpu.models import gguf_source

    kwargs: dict[str, Any] = {
        "dtype": s.storage_dtype,
        "attn_implementation": s.attention,
        "trust_remote_code": trust_remote_code,
    }
    if s.quantization != "none":
        kwargs["quantization_config"] = _bnb_config(s)
        if device is not None:
            kwargs["device_map"] = {"": device}
    if s.quantization == "none" or not gguf_source(path)[1]:
        return from_pretrained(path, **kwargs)
    # transformers will not quantize while reading a GGUF file: dequantize it once into a 16-bit checkpoint (on CPU,
    # freed before the quantized load), then let bitsandbytes quantize that as it loads
    with tempfile.TemporaryDirectory(prefix="hfgpu-gguf-") as tmp:
        from_pretrained(path, dtype=s.storage_dtype).save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, **kwargs)


def from_pretrained(path: str, **kwargs):
    """AutoModelForCausalLM.from_pretrained for a folder, a Hub id or a .gguf file. transformers dequantizes a GGUF
    file's tensors into plain nn.Linear weights of the load dtype but marks the model "gguf"-quantized, which refuses
    save_pretrained: the mark goes, the weights stay (so such a base merges, saves and trains like any other).
    A GGUF file's config comes from hfgpu's cache of its metadata (hfgpu.models.load_config), so transformers
    parses the file once, for its tensors, instead of twice (SmolLM2's file: 16 s → 10 s on 2 cores)."""
    from transformers import AutoModelForCausalLM

    from hfgpu.models import gguf_source, load_config, pretrained_config

    folder, extra = gguf_source(path)
    online.probe_unless_local(folder)
    if extra and "config" not in kwargs:
        kwargs["config"] = pretrained_config(load_config(path)[2])
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs, **extra)
    if extra:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    return model


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer; a missing pad token becomes EOS (padding is masked out of the loss)."""
    from transformers import AutoTokenizer

    from hfgpu.errors import HfgpuError
    from hfgpu.models import gguf_source

    try:
        folder, extra = gguf_source(path)
        online.probe_unless_local(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise HfgpuError(
            f"cannot load a tokenizer from {path!r} ({str(e).splitlines()[0][:140]}): pass a model folder or a Hub repo id that has one"
        ) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise HfgpuError(
                f"the tokenizer of {path!r} has neither an eos_token nor a pad_token, which training needs to end and pad examples: "
                'set "eos_token" (and "pad_token") in its tokenizer_config.json'
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
