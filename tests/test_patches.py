"""The lean RMSNorm computes what transformers' does (output and gradients) and keeps less for backward."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hfgpu.memtrack import PeakTracker
from hfgpu.patches import lean_rmsnorm


def pair(dtype, trainable):
    torch.manual_seed(0)
    ref = LlamaRMSNorm(256, eps=1e-6)
    ref.weight.data = (1 + 0.1 * torch.randn(256)).to(torch.float32 if trainable else dtype)
    ref.weight.requires_grad_(trainable)
    lean = LlamaRMSNorm(256, eps=1e-6)
    lean.weight.data = ref.weight.data.clone()
    lean.weight.requires_grad_(trainable)
    assert lean_rmsnorm(lean) == 1
    return ref, lean


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("trainable", [False, True])
def test_output_and_gradients_equal_transformers(dtype, tol, trainable):
    ref, lean = pair(dtype, trainable)
    x = (3 * torch.randn(2, 64, 256)).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 64, 256).to(dtype)
    y1, y2 = ref(x1), lean(x2)
    assert y1.dtype == y2.dtype
    torch.testing.assert_close(y2, y1, rtol=tol, atol=tol)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=tol, atol=tol)
    if trainable:
        torch.testing.assert_close(lean.weight.grad, ref.weight.grad, rtol=tol, atol=tol * 10)


def test_keeps_less_for_backward():
    def kept(norm):
        x = torch.randn(4, 1024, 256, dtype=torch.bfloat16, requires_grad=True)
        with PeakTracker(baseline=[x]) as t:
            y = norm(x)
        return t.current_bytes - t.baseline_bytes - y.numel() * y.element_size()

    ref, lean = pair(torch.bfloat16, False)
    assert kept(ref) >= 4 * 1024 * 256 * 4  # an fp32 copy of the input
    assert kept(lean) < 4 * 1024 * 16  # only 1/rms per token


@pytest.mark.parametrize("strategy,tile", [("full", 24), ("lora", 24), ("lora-dropout", 1000)])
def test_tiled_mlp_gives_the_same_loss_and_gradients_under_checkpointing(strategy, tile):
    """With dropout, one tile covers the batch, so the masks equal the untiled run's: backward must
    replay forward's random state (more tiles draw other, equally valid masks)."""
    from conftest import tiny_llama
    from transformers import AutoModelForCausalLM

    from hfgpu.patches import tile_mlps

    def run(tiled: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_llama())
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if strategy != "full":
            from peft import LoraConfig, get_peft_model

            model.enable_input_require_grads()
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1 if "dropout" in strategy else 0.0))
        if tiled:
            assert tile_mlps(model, tile=tile) == 2
        model.train()
        ids = torch.randint(0, 1000, (2, 50), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss0, grads0 = run(False)
    loss1, grads1 = run(True)
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys() and any("mlp" in n for n in grads0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-5, msg=name)


# --- every model type the patches claim: the swap applies, and changes nothing ------------------------

MOE = dict(
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)


def _tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **MOE,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).float()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


from hfgpu.knobs import TILED_MLP_MODEL_TYPES  # noqa: E402
from hfgpu.patches import RMSNORM_BY_MODEL_TYPE  # noqa: E402


@pytest.mark.parametrize("model_type", sorted(RMSNORM_BY_MODEL_TYPE))
def test_the_lean_rmsnorm_applies_to_every_claimed_model_type_and_changes_nothing(model_type):
    model = _tiny(model_type)
    norms = [m for m in model.modules() if type(m).__name__ == RMSNORM_BY_MODEL_TYPE[model_type]]
    assert norms, f"{RMSNORM_BY_MODEL_TYPE[model_type]} is not in transformers' {model_type} any more"
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, ids)
    assert lean_rmsnorm(model) == len(norms) >= 2 * 2 + 1  # two per layer and the final one (more with q/k norms)
    loss2, grads2 = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", sorted(TILED_MLP_MODEL_TYPES))
def test_the_tiled_mlp_applies_to_every_claimed_model_type_and_changes_nothing(model_type):
    from hfgpu.patches import tile_mlps

    model = _tiny(model_type)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, ids)
    assert tile_mlps(model, tile=7) == 2  # one per decoder layer; 48 tokens in tiles of 7
    loss2, grads2 = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], rtol=1e-4, atol=1e-6)


def test_a_missing_lean_norm_class_is_loud_and_the_plan_shows_the_swap(monkeypatch):
    """The plan says which norm the run uses; if transformers renamed a claimed class, preparing the model warns."""
    import hfgpu
    from hfgpu import modeling

    assert hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 3060").reasons["rmsnorm"].startswith("lean: Qwen2RMSNorm is swapped")
    assert hfgpu.plan("google/gemma-2-2b", "RTX 3060").reasons["rmsnorm"].startswith("transformers': gemma2 has no")
    model = _tiny("llama")
    monkeypatch.setattr(modeling, "lean_rmsnorm", lambda m: 0)  # as if LlamaRMSNorm had been renamed
    with pytest.warns(UserWarning, match="the plan assumed the lean RMSNorm, but this model has no LlamaRMSNorm"):
        modeling.apply_settings(model, modeling.ModelSettings(strategy="full", precision="fp32"))
