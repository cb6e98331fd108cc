"""GPT-2 (transformers Conv1D layers): planned like any linear model, and it fine-tunes on CPU."""

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


@pytest.mark.parametrize("model_type", sorted(_catalog_families()))
def test_every_catalog_family_plans_verifies_and_trains_with_defaults(model_type):
    """The planner's default attention is one transformers builds for the model (Gemma-2 has no sdpa path),
    the plan verifies by simulation, and a real CPU training step runs as planned."""
    from hfgpu.knobs import NO_SDPA_MODEL_TYPES
    from hfgpu.models import pretrained_config

    config = {**_catalog_families()[model_type], **SMALL}
    p = hfgpu.plan(config, "cpu", strategy="lora", seq_len=64, verify=True)
    assert p.attention == ("eager" if model_type in NO_SDPA_MODEL_TYPES else "sdpa")
    assert p.simulation is not None and p.simulation["peak"] > 0
    cfg = pretrained_config(config)
    if model_type in NO_SDPA_MODEL_TYPES:  # the table is not stale: transformers still refuses sdpa for it
        from transformers import AutoModelForCausalLM

        with pytest.raises(ValueError, match="does not support"):
            AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = prepare_model(cfg, ModelSettings.from_plan(p))
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    loss = forward_backward(model, {"input_ids": ids, "labels": ids}, chunk=None, adapters_16bit=False, offload=False)
    assert torch.isfinite(loss) and any(x.grad is not None for x in model.parameters() if x.requires_grad)
