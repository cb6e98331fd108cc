"""Rope in GGUF: the metadata (and tensors) that make llama.cpp's rope a transformers model's. Plain rope writes its
base; linear scaling its factor; Llama-3's (Llama-3.1/3.2) the `rope_freqs` divisors; Phi-3's longrope the
`rope_factors_long` / `rope_factors_short` tensors and the attention factor; YaRN its type, factor, original context
and ramp bounds. The frequencies and factors come from transformers' own rope initialisation; what llama.cpp would
compute differently is refused. Used by hfgpu.export."""

from __future__ import annotations

from hfgpu.errors import HfgpuError

ROPE_FREQS_ARCHS = {"llama"}
YARN_ARCHS = {"llama", "qwen2", "qwen3"}


def rope_parameters(config) -> dict:
    """transformers 5's `rope_parameters` (one dict, or one per attention type with the same values)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        params = dict(params.get("full_attention") or next(iter(params.values())))
    return params


def rope_metadata(writer, config, arch_name: str, head_dim: int) -> list:
    """Writes the rope metadata of `config` (base, rotary dimensions, Phi-3's original context, the scaling) and
    returns the tensors llama.cpp's rope reads beside the weights (rope_freqs, rope_factors_*), as (name, type,
    shape, make) for the GGUF writer. A scaling llama.cpp would compute differently is refused."""
    import gguf

    params = rope_parameters(config)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_rope_dimension_count(int(head_dim * params.get("partial_rotary_factor", 1.0)))
    if arch_name == "phi3":  # llama.cpp takes longrope's long factors beyond it (convert_hf_to_gguf.py writes it for every Phi-3)
        writer.add_rope_scaling_orig_ctx_len(_original_context(config))
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return []
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return []
    if rope_type == "llama3" and arch_name in ROPE_FREQS_ARCHS:
        factors = _rope_freq_factors(config)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return [(name, gguf.GGMLQuantizationType.F32, tuple(factors.shape), lambda: factors)]
    if rope_type == "longrope" and arch_name == "phi3":
        return _longrope(writer, config, params)
    if rope_type == "yarn" and arch_name in YARN_ARCHS:
        _yarn(writer, config, params)
        return []
    raise HfgpuError(
        f"cannot export rope scaling {rope_type!r} of model type {config.model_type!r} to GGUF yet: supported are "
        "plain rope, linear scaling, Llama-3's (llama), Phi-3's longrope (phi3) and yarn (llama, qwen2, qwen3); for "
        "another, use llama.cpp's convert_hf_to_gguf.py"
    )


def _yarn(writer, config, params: dict) -> None:
    """YaRN (Qwen2.5/Qwen3's long-context setting) as llama.cpp computes it: its type, factor, original context and
    ramp bounds (beta_fast, beta_slow); llama.cpp then derives the same frequencies and the attention scale
    1 + 0.1 ln(factor) as transformers. A config whose attention factor or ramp llama.cpp would not reproduce (an
    explicit attention_factor or mscale, truncate false) is refused."""
    import math

    import gguf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factor = float(params.get("factor") or config.max_position_embeddings / params["original_max_position_embeddings"])
    _, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    llama_cpp_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    if not math.isclose(float(attention_factor), llama_cpp_factor, rel_tol=1e-6):
        raise HfgpuError(
            f"cannot export this yarn rope scaling to GGUF: its attention factor {float(attention_factor):.4g} is not llama.cpp's "
            f"1 + 0.1 ln({factor:g}) = {llama_cpp_factor:.4g}; use llama.cpp's convert_hf_to_gguf.py"
        )
    if params.get("truncate", True) is False:
        raise HfgpuError(
            "cannot export this yarn rope scaling to GGUF: truncate=false (llama.cpp always rounds the ramp's bounds); "
            "use llama.cpp's convert_hf_to_gguf.py"
        )
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(factor)
    writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    writer.add_rope_scaling_yarn_beta_fast(float(params.get("beta_fast") or 32))
    writer.add_rope_scaling_yarn_beta_slow(float(params.get("beta_slow") or 1))


def _longrope(writer, config, params: dict) -> list:
    """Phi-3's long-context rope (Phi-3-*-128k, Phi-3.5-mini, Phi-4-mini) as llama.cpp reads it: the per-dimension
    `rope_factors_long` / `rope_factors_short` tensors (llama.cpp takes the long ones when its context exceeds the
    original one, transformers when the sequence does) and the attention factor transformers' own rope
    initialisation computes (√(1 + ln(max / original) / ln original) unless the config gives one)."""
    import gguf
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    writer.add_rope_scaling_attn_factors(float(attention_factor))
    tensors = []
    for key, kind in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG), ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
        values = torch.tensor(params[key], dtype=torch.float32)
        tensors.append((gguf.TENSOR_NAMES[kind] + ".weight", gguf.GGMLQuantizationType.F32, tuple(values.shape), lambda v=values: v))
    return tensors


def _original_context(config) -> int:
    return (
        rope_parameters(config).get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or config.max_position_embeddings
    )


def _rope_freq_factors(config):
    """llama.cpp's `rope_freqs` for a Llama-3-scaled rope (which leaves attention unscaled): plain rope's inverse
    frequencies divided by the scaled ones transformers computes (llama.cpp divides each frequency by its factor)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = 2 * scaled.shape[0]
    plain = 1.0 / (float(_rope_theta(config)) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / scaled.float()).contiguous()


def _rope_theta(config) -> float:
    return rope_parameters(config).get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
