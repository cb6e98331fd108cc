"""Activation offloading: the same gradients, the layer inputs leave the device, the planner and the
simulation agree on what it saves, and the planner turns the savers on only when a run needs them."""

import dataclasses

import pytest
import torch
from conftest import tiny_llama

import hfgpu
from hfgpu import memory
from hfgpu.loss import model_loss
from hfgpu.offload import offload_activations


def step(offload: bool, peft: bool):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if peft:
        from peft import LoraConfig, get_peft_model

        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(1))
    with offload_activations(offload, min_bytes=2 * 64 * 64 * 4) as off:
        loss = model_loss(model, {"input_ids": ids, "labels": ids}, chunk_size=32)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, off


@pytest.mark.parametrize("peft", [False, True])
def test_gradients_equal_and_every_layer_input_moves(peft):
    loss0, grads0, _ = step(False, peft)
    loss1, grads1, off = step(True, peft)
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], msg=name)
    layer_input = 2 * 64 * 64 * 4  # b × s × hidden, fp32
    assert off.packed >= tiny_llama().num_hidden_layers and off.packed_bytes >= 2 * layer_input


@pytest.mark.slow
def test_simulation_shows_the_offloaded_bytes_leave_the_card():
    from hfgpu.simulate import simulate

    p = hfgpu.plan(
        "HuggingFaceTB/SmolLM2-135M",
        "RTX 4090",
        strategy="lora",
        seq_len=2048,
        micro_batch_size=2,
        gradient_checkpointing=True,
        chunked_loss=True,
        activation_offloading=False,
    )
    s = p.setup()
    on = dataclasses.replace(s, activation_offloading=True)
    with_offload = simulate(p.spec.config, on, p.spec).peak
    saved = simulate(p.spec.config, s, p.spec).peak - with_offload
    offloaded = memory.offloaded_bytes(p.spec, on)  # all layer inputs but the two a recompute holds
    layers = p.spec.num_layers
    assert offloaded <= saved <= offloaded * layers / (layers - 2) * 1.01
    planned = memory.breakdown(p.spec, on, p.gpu.vram_bytes)
    assert planned.total - planned.overhead == pytest.approx(with_offload, rel=0.05)


def test_the_planner_turns_savers_on_only_when_needed_and_says_what_they_save():
    roomy = hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 4090", strategy="lora")
    # the chunked loss costs no time (measured), so it is on wherever it is allowed; offloading costs the PCIe copy
    assert roomy.chunked_loss and not roomy.activation_offloading and not roomy.gradient_checkpointing
    assert "only with gradient checkpointing" in roomy.reasons["activation_offloading"] and "saves" in roomy.reasons["chunked_loss"]
    tight = hfgpu.plan("meta-llama/Llama-3.1-8B", "RTX 4060", strategy="qlora", micro_batch_size=1, seq_len=2048)
    assert tight.chunked_loss and tight.activation_offloading and tight.gradient_checkpointing
    assert "saves" in tight.reasons["chunked_loss"] and "saves" in tight.reasons["activation_offloading"]
    assert "pinned CPU memory" in tight.reasons["activation_offloading"]
    # each saver is needed: without either one the same run does not fit
    for knob in ("chunked_loss", "activation_offloading"):
        without = hfgpu.plan_or_closest(
            "meta-llama/Llama-3.1-8B", "RTX 4060", strategy="qlora", micro_batch_size=1, seq_len=2048, **{knob: False}
        )
        assert not without.fits or without.optimizer == "adamw_8bit", knob
    # the savers' time costs are in the throughput estimate
    assert (
        tight.tokens_per_second_estimate
        < hfgpu.plan_or_closest(
            "meta-llama/Llama-3.1-8B",
            "RTX 4060",
            strategy="qlora",
            micro_batch_size=1,
            seq_len=2048,
            chunked_loss=False,
            activation_offloading=False,
        ).tokens_per_second_estimate
    )


def test_no_offloading_on_the_cpu_and_no_chunked_loss_for_soft_capped_logits():
    cpu = hfgpu.plan("HuggingFaceTB/SmolLM2-135M", "cpu")
    assert not cpu.activation_offloading
    gemma = hfgpu.plan_or_closest("google/gemma-2-2b", "RTX 3060 8GB", strategy="qlora")
    assert not gemma.chunked_loss and "soft-capped" in gemma.reasons["chunked_loss"]


def test_8bit_state_when_only_it_fits_says_what_it_saves():
    full = hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 3060 8GB", strategy="full", seq_len=512)
    assert full.optimizer == "adamw_8bit" and "saves" in full.reasons["optimizer"]
    wide = hfgpu.plan_or_closest("Qwen/Qwen2.5-0.5B", "RTX 3060 8GB", strategy="full", seq_len=512, optimizer="adamw_torch")
    assert not wide.fits
    longer = hfgpu.plan("meta-llama/Llama-3.1-8B", "RTX 4060", strategy="qlora", micro_batch_size=1, seq_len=7168)
    assert longer.optimizer == "adamw_8bit" and longer.memory.trainable_state < 0.3 * 2**30


def test_training_with_offloading_matches_training_without(tiny_model_dir, tmp_path, monkeypatch):
    """The training loop's wiring: on CPU the planner never offloads, so the plan is edited; tensors
    are then copied (not moved) by the same hooks a GPU run uses."""
    import json

    from conftest import recipe_dict

    import hfgpu.finetune as ft
    from hfgpu import offload
    from hfgpu.recipe import validate_recipe

    real_plan_for = ft.plan_for
    packed = []
    real_pack = offload._Offloader.pack
    monkeypatch.setattr(offload, "MIN_BYTES", 1)
    monkeypatch.setattr(offload._Offloader, "pack", lambda self, t: packed.append(t.shape) or real_pack(self, t))

    def losses(offloaded: bool, name: str) -> list[float]:
        monkeypatch.setattr(
            ft,
            "plan_for",
            lambda r: (lambda p: dataclasses.replace(p, knobs=p.knobs.replace(activation_offloading=offloaded)))(real_plan_for(r)),
        )
        r = recipe_dict(tiny_model_dir, tmp_path / name, gradient_checkpointing=True, train={"max_steps": 4}, data={"eval_path": None})
        out = ft.finetune(validate_recipe(r), say=lambda *a, **k: None).output_dir
        assert json.loads((out / "plan.json").read_text())["activation_offloading"] is offloaded
        return [x["loss"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]

    plain = losses(False, "plain")
    assert not packed
    offloaded = losses(True, "offloaded")
    assert len(plain) == 4 and offloaded == pytest.approx(plain, rel=1e-5)
    assert len(packed) >= 4 * 2  # at least every layer input of every micro-batch


@pytest.mark.parametrize(
    "model,seq,tiled", [("Qwen/Qwen2.5-0.5B", 8192, False), ("Qwen/Qwen2.5-0.5B", 8192, True), ("meta-llama/Llama-3.2-1B", 4096, True)]
)
@pytest.mark.slow
def test_offloaded_and_tiled_plans_agree_with_the_simulation(model, seq, tiled):
    from hfgpu.simulate import simulate

    p = hfgpu.plan_or_closest(
        model,
        "RTX 4090",
        strategy="lora",
        seq_len=seq,
        micro_batch_size=1,
        gradient_checkpointing=True,
        chunked_loss=True,
        activation_offloading=True,
        tiled_mlp=tiled,
    )
    m = p.memory
    sim = simulate(p.spec.config, p.setup(), p.spec)
    assert sim.peak == pytest.approx(m.tensor_peak, rel=0.05)


def test_the_tiled_mlp_goes_on_only_for_long_sequences():
    short = hfgpu.plan("meta-llama/Llama-3.1-8B", "RTX 4060", strategy="qlora", micro_batch_size=1, seq_len=1024)
    long = hfgpu.plan("meta-llama/Llama-3.1-8B", "RTX 4060", strategy="qlora", micro_batch_size=1, seq_len=6144)
    assert not short.tiled_mlp and "fits without it" in short.reasons["tiled_mlp"]
    assert long.tiled_mlp and long.activation_offloading and long.chunked_loss and "saves" in long.reasons["tiled_mlp"]
    assert not hfgpu.plan_or_closest(
        "meta-llama/Llama-3.1-8B", "RTX 4060", strategy="qlora", micro_batch_size=1, seq_len=6144, tiled_mlp=False
    ).fits


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_training_with_the_tiled_mlp_matches_training_without(strategy, tiny_model_dir, tmp_path, monkeypatch):
    import json

    from hfgpu import patches
    from hfgpu.finetune import finetune

    monkeypatch.setattr(patches, "MLP_TILE", 48)  # several tiles per micro-batch of the tiny model
    from conftest import recipe_dict

    from hfgpu.recipe import validate_recipe

    def losses(tiled: bool, name: str) -> list[float]:
        r = recipe_dict(
            tiny_model_dir,
            tmp_path / name,
            strategy=strategy,
            gradient_checkpointing=True,
            tiled_mlp=tiled,
            data={"eval_path": None, "max_seq_len": 64},
            train={"max_steps": 4},
        )
        res = finetune(validate_recipe(r), say=lambda *a, **k: None)
        assert res.plan.tiled_mlp is tiled and "tiled_mlp" in res.plan.reasons
        return [x["loss"] for x in map(json.loads, (res.output_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in x]

    plain, tiled = losses(False, "plain"), losses(True, "tiled")
    assert len(plain) == 4 and tiled == pytest.approx(plain, rel=1e-5)


def test_long_packed_sequences_with_sdpa_are_warned_about_in_the_plan():
    long = dict(strategy="qlora", micro_batch_size=1, seq_len=32768)
    note = " ".join(hfgpu.plan("meta-llama/Llama-3.1-8B", "RTX 3060 12GB", packing=True, **long).warnings)
    assert "32768 × 32768" in note and "flash_attention_2" in note and "1.0 GiB" in note
    assert "packing" not in " ".join(hfgpu.plan("meta-llama/Llama-3.1-8B", "RTX 3060 12GB", **long).warnings)
    assert "packing" not in " ".join(
        hfgpu.plan("meta-llama/Llama-3.1-8B", "RTX 3060 12GB", strategy="qlora", seq_len=2048, packing=True).warnings
    )
