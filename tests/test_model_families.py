"""GPT-2 (transformers Conv1D layers): planned like any linear model, and it fine-tunes on CPU."""

import math
from dataclasses import replace

import pytest
import torch
from transformers import GPT2Config

import hfgpu
from hfgpu.modeling import ModelSettings, prepare_model
from hfgpu.optim import make_optimizer
from hfgpu.step import forward_backward

GPT2 = dict(
    n_layer=2,
    n_embd=64,
    n_head=4,
    vocab_size=1000,
    n_positions=256,
    bos_token_id=0,
    eos_token_id=0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_gpt2_conv1d_layers_are_planned_and_adapted_as_peft_does(strategy):
    cfg = GPT2Config(**GPT2)
    p = hfgpu.plan(cfg, "RTX 3060", strategy=strategy)
    assert set(p.lora_targets) == {"c_attn", "c_fc", "c_proj"}  # Conv1D, not skipped
    model = prepare_model(cfg, replace(ModelSettings.from_plan(p), precision="fp32"))  # CPU: fp32 compute (bitsandbytes NF4 runs on CPU)
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    assert trainable == p.params_trainable > 0  # peft's own count on the real model
    ids = (torch.arange(64) % 8 + 10).repeat(2, 1)  # a repeating pattern the adapters can learn
    opt = make_optimizer([x for x in model.parameters() if x.requires_grad], "adamw_torch")
    for group in opt.param_groups:
        group["lr"] = 3e-3
    losses = []
    for _ in range(40):
        losses.append(forward_backward(model, {"input_ids": ids, "labels": ids}, chunk=None, adapters_16bit=False, offload=False).item())
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.5, losses  # the Conv1D adapters train (the frozen random head limits how far)


# --- every family of the offline catalog, with the planner's defaults -----------------------------------


def _catalog_families() -> dict:
    from hfgpu.models import catalog_models, load_config

    out = {}
    for repo_id in catalog_models():
        config = load_config(repo_id)[2]
        out.setdefault(config["model_type"], config)
    return out


SMALL = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=1000,
    max_position_embeddings=512,
)


def _small(config: dict) -> dict:
    """The family's config with SMALL's sizes, under the family's own key names (GPT-2's n_embd …), for the keys
    it has (OPT's ffn_dim and the MoE expert sizes stay: 2 layers keep them cheap)."""
    from transformers import AutoConfig

    aliases = {v: k for k, v in AutoConfig.for_model(config["model_type"]).attribute_map.items()}  # n_embd → hidden_size
    small = {**config, **{key: SMALL[aliases.get(key, key)] for key in config if aliases.get(key, key) in SMALL}}
    small.pop("layer_types", None)  # one entry per layer of the full model
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # inside the small vocabulary
        if isinstance(small.get(key), int) and small[key] >= SMALL["vocab_size"]:
            small[key] = 0
    return small


@pytest.mark.parametrize("model_type", sorted(_catalog_families()))
def test_every_catalog_family_plans_verifies_and_trains_with_defaults(model_type):
    """The planner's default attention is one transformers builds for the model (Gemma-2 has no sdpa path),
    the plan verifies by simulation, and a real CPU training step runs as planned."""
    from hfgpu.knobs import NO_SDPA_MODEL_TYPES
    from hfgpu.models import pretrained_config

    config = _small(_catalog_families()[model_type])
    # mixture of experts: simulated in bf16 only (simulate's error says why); the real step runs in bf16 on CPU too
    moe = {"precision": "bf16"} if config.get("num_local_experts") or config.get("num_experts") else {}
    p = hfgpu.plan(config, "cpu", strategy="lora", seq_len=64, verify=True, **moe)
    assert p.attention == ("eager" if model_type in NO_SDPA_MODEL_TYPES else "sdpa")
    assert p.simulation is not None and p.simulation["peak"] > 0
    cfg = pretrained_config(config)
    if model_type in NO_SDPA_MODEL_TYPES:  # the table is not stale: transformers still refuses sdpa for it
        from transformers import AutoModelForCausalLM

        with pytest.raises(ValueError, match="does not support"):
            AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = prepare_model(cfg, ModelSettings.from_plan(p))
    assert sum(x.numel() for x in model.parameters() if x.requires_grad) == p.params_trainable  # peft's count
    # it fine-tunes: a repeating pattern the adapters learn within a few AdamW steps
    ids = (torch.arange(64) % 8 + 10).repeat(2, 1)
    opt = make_optimizer([x for x in model.parameters() if x.requires_grad], "adamw_torch")
    for group in opt.param_groups:
        group["lr"] = 5e-3
    losses = []
    for _ in range(12):
        loss = forward_backward(model, {"input_ids": ids, "labels": ids}, chunk=None, adapters_16bit=False, offload=False)
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.1, losses


def test_an_moe_lora_target_that_is_not_a_linear_layer_is_refused_naming_the_choices():
    """transformers 5 fuses Mixtral's experts into 3-D tensors: the old w1/w2/w3 Linear names are gone, and LoRA
    targets attention (what people tune on MoE models); naming an expert layer is one line with the choices.
    bitsandbytes quantizes nn.Linear layers only, so the experts stay 16-bit and a QLoRA of it does not fit 24 GB."""
    p = hfgpu.plan_or_closest("mistralai/Mixtral-8x7B-v0.1", "RTX 4090", strategy="qlora", seq_len=512)
    assert set(p.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert p.params_total == 46702792704 and any("mixture of experts (8 experts)" in w for w in p.warnings)
    assert not p.fits and p.memory.weights > 2 * p.spec.other_params  # the experts' 45 B weights at 2 bytes
    with pytest.raises(hfgpu.HfgpuError, match=r"lora_targets w1 not among .*'s linear layers: choose from k_proj, o_proj, q_proj, v_proj"):
        hfgpu.plan("mistralai/Mixtral-8x7B-v0.1", "RTX 4090", lora_targets="w1")
