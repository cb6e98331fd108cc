"""The fake-tensor simulation equals a real CPU training step; --verify; calibration plumbing."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, limit, tiny_llama

import hfgpu
from hfgpu import memory
from hfgpu.measure import measure_step
from hfgpu.modeling import ModelSettings
from hfgpu.models import model_spec
from hfgpu.simulate import simulate

MID = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=4000)


@pytest.mark.parametrize("shape", ["tiny", "mid"])
@pytest.mark.parametrize(
    "strategy,precision,ckpt,attention,optimizer",
    [
        ("lora", "bf16", False, "sdpa", "adamw_torch"),
        ("lora", "bf16", True, "sdpa", "adamw_torch"),
        ("lora", "fp32", False, "eager", "adamw_torch"),
        ("full", "bf16", False, "sdpa", "adamw_torch"),
        ("full", "fp32", True, "sdpa", "adamw_8bit"),
        ("qlora", "bf16", True, "sdpa", "adamw_torch"),
        ("qlora", "fp32", False, "sdpa", "adamw_torch"),
    ],
)
def test_simulated_peak_equals_the_real_step_within_2_percent(shape, strategy, precision, ckpt, attention, optimizer):
    cfg = tiny_llama() if shape == "tiny" else tiny_llama(**MID)
    spec = model_spec(cfg)
    s = memory.Setup(
        strategy=strategy,
        precision=precision,
        quantization="nf4" if strategy == "qlora" else "none",
        double_quant=True,
        gradient_checkpointing=ckpt,
        micro_batch_size=2,
        seq_len=96,
        optimizer=optimizer,
        attention=attention,
        lora_r=16,
        lora_targets=tuple(spec.linear_names),
    )
    real = measure_step(
        cfg,
        ModelSettings(
            strategy=strategy, precision=precision, quantization=s.quantization, gradient_checkpointing=ckpt, attention=attention
        ),
        2,
        96,
        optimizer=optimizer,
    )
    sim = simulate(cfg.to_dict(), s, spec)
    gpu_only = memory.dequant_workspace_bytes(spec, s)  # bitsandbytes on CUDA dequantizes a whole weight; its CPU path does not
    assert sim.weights == real.weights and sim.trainable_state == real.trainable_state
    assert sim.peak - gpu_only == pytest.approx(real.peak, rel=0.02)


@pytest.mark.slow
def test_plan_verify_attaches_the_simulation():
    p = hfgpu.plan("HuggingFaceTB/SmolLM2-135M", "RTX 3060 12GB", strategy="lora", seq_len=256, micro_batch_size=2, verify=True)
    sim = p.simulation
    assert set(sim) == {"weights", "trainable_state", "transient", "peak", "peak_phase", "seconds", "total", "fits"}
    assert sim["peak_phase"] in ("forward", "backward", "optimizer") and p.fit in ("verified", "rejected")
    assert sim["total"] == sim["peak"] + p.memory.overhead and sim["fits"] == (sim["total"] <= p.memory.budget)
    assert sim["trainable_state"] == p.memory.trainable_state and sim["weights"] == p.memory.weights
    assert 0.5 < sim["peak"] / (p.memory.tensor_peak) < 1.5
    assert p.to_dict()["simulation"] == sim


@pytest.mark.slow
def test_cli_verify_prints_both_side_by_side():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "hfgpu", "plan", "HuggingFaceTB/SmolLM2-135M", "--gpu", "RTX 3060 12GB", "--seq-len", "256", "--verify"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=limit(300),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for needle in ("verified", "simulated", "activations + logits", "tensor peak", "simulated / planned"):
        assert needle in r.stdout
    j = subprocess.run(
        [
            sys.executable,
            "-m",
            "hfgpu",
            "plan",
            "HuggingFaceTB/SmolLM2-135M",
            "--gpu",
            "RTX 3060 12GB",
            "--seq-len",
            "256",
            "--verify",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=limit(300),
    )
    assert json.loads(j.stdout)["simulation"]["peak"] > 0


@pytest.mark.slow
def test_calibration_grid_skips_cleanly_without_cuda(tmp_path):
    out = tmp_path / "cal.csv"
    r = subprocess.run(
        [sys.executable, "benchmarks/memory_calibration.py", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=limit(300),
    )
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the grid would run for real")
    assert r.returncode == 0 and "no CUDA GPU" in r.stdout and not out.exists()
    c = subprocess.run(
        [sys.executable, "-m", "hfgpu", "calibrate", "Qwen/Qwen2.5-0.5B"], capture_output=True, text=True, cwd=ROOT, timeout=limit(120)
    )
    assert c.returncode == 2 and "torch sees no CUDA device" in c.stderr and len(c.stderr.strip().splitlines()) == 1


def test_a_stored_card_correction_changes_later_plans_and_says_so():
    from hfgpu.corrections import calibration_file

    path = calibration_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"GeForce RTX 4090": {"factor": 1.5, "date": "2026-11-28", "model": "Qwen/Qwen2.5-0.5B", "rows": 8}}))
    try:
        knobs = dict(strategy="lora", seq_len=512, micro_batch_size=1, gradient_checkpointing=False)
        raw = hfgpu.plan("Qwen/Qwen2.5-0.5B", "4090", calibrated=False, **knobs)
        cal = hfgpu.plan("Qwen/Qwen2.5-0.5B", "4090", **knobs)
        assert cal.memory.activations == pytest.approx(1.5 * raw.memory.activations, rel=1e-6)
        assert cal.memory.weights == raw.memory.weights and cal.memory.trainable_state == raw.memory.trainable_state
        assert "calibrated on this machine's GeForce RTX 4090" in cal.reasons["memory"] and "× 1.5" in cal.reasons["memory"]
        assert "memory" not in hfgpu.plan("Qwen/Qwen2.5-0.5B", "3090", **knobs).reasons  # other cards unaffected
    finally:
        path.unlink()


def test_calibration_grid_plans_and_covers_the_memory_savers():
    from hfgpu.calibrate import grid

    rows = grid("Qwen/Qwen2.5-0.5B", short=False)
    plans = [hfgpu.plan_or_closest("Qwen/Qwen2.5-0.5B", "RTX 4090", calibrated=False, **knobs) for knobs in rows]
    assert {(p.chunked_loss, p.activation_offloading) for p in plans} == {(False, False), (True, False), (True, True)}
    assert all(p.seq_len == k["seq_len"] and p.gradient_checkpointing == k["gradient_checkpointing"] for p, k in zip(plans, rows))


@pytest.mark.parametrize("ckpt", [False, True])
def test_the_measured_step_holds_what_trainings_accelerate_step_holds(ckpt):
    """What measure/simulate check the planner against is training's own step: the model prepared by accelerate
    (autocast over the forward only, outputs in fp32), the chunked loss in the compute dtype, accelerate's
    backward. Full bf16 fine-tuning, where the autocast copies and lm_head's dtype matter, to the byte."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from hfgpu.measure import tracked_step
    from hfgpu.memtrack import PeakTracker, state_tensors
    from hfgpu.modeling import prepare_model
    from hfgpu.optim import make_optimizer
    from hfgpu.step import forward_backward

    cfg = tiny_llama(**MID)
    settings = ModelSettings(strategy="full", precision="bf16", gradient_checkpointing=ckpt)
    ids = torch.randint(0, cfg.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    chunk = 64

    model = prepare_model(cfg, settings)
    model.train()
    measured = tracked_step(model, make_optimizer(list(model.parameters()), "adamw_torch"), ids, "bf16", chunk)

    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = prepare_model(cfg, settings)
    model.train()
    model, optimizer = accelerator.prepare(model, make_optimizer(list(model.parameters()), "adamw_torch"))
    batch = {"input_ids": ids, "labels": ids}

    def step():
        forward_backward(
            model, batch, chunk=chunk, adapters_16bit=True, offload=False, loss_dtype=torch.bfloat16, backward=accelerator.backward
        )
        optimizer.step()

    step()
    with PeakTracker(baseline=state_tensors(model, optimizer)) as tracker:
        step()
    AcceleratorState._reset_state()
    assert tracker.peak_bytes == measured.peak


@pytest.mark.slow
def test_verify_replans_a_plan_its_simulation_rejects_and_calls_only_the_survivor_verified():
    """--verify: when the simulated step of a plan does not fit, the planner plans again with the activations
    scaled to what the simulation measured and simulates that; the plan returned is one whose own simulated
    step fits. A stored correction that makes the model three times too optimistic forces the first rejection."""
    from hfgpu.corrections import calibration_file

    path = calibration_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"GeForce GTX 1060 6GB": {"factor": 0.3, "date": "2026-12-02", "model": "test", "rows": 1}}))
    try:
        knobs = dict(strategy="lora", seq_len=1024, gradient_checkpointing=False, chunked_loss=True)
        optimistic = hfgpu.plan("HuggingFaceTB/SmolLM2-135M", "GTX 1060 6GB", **knobs)
        p = hfgpu.plan("HuggingFaceTB/SmolLM2-135M", "GTX 1060 6GB", verify=True, **knobs)
    finally:
        path.unlink()
    assert p.fit == "verified" and p.simulation["fits"] and p.simulation["total"] <= p.memory.budget
    assert p.micro_batch_size < optimistic.micro_batch_size
    assert any(w.startswith("--verify: the first plan (micro-batch") for w in p.warnings)
