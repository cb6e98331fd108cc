"""Runs that survive kill -9, Ctrl-C, a full disk and running out of memory; secrets stay secret."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, limit, recipe_dict
from safetensors.torch import load_file

from hfgpu.errors import HfgpuError
from hfgpu.finetune import finetune
from hfgpu.recipe import validate_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def write(tmp_path, name, model_dir, out, **over):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(model_dir, out, **over)))
    return path


def start(recipe, *overrides):
    return subprocess.Popen(
        [sys.executable, "-m", "hfgpu.finetune", str(recipe), *overrides],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(recipe, *overrides):
    """`python -m hfgpu.finetune recipe overrides…` to the end (a hang guard, scaled to the machine)."""
    return subprocess.run(
        [sys.executable, "-m", "hfgpu.finetune", str(recipe), *overrides],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=limit(300),
    )


def finish(recipe, *overrides):
    r = run(recipe, *overrides)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def wait_for(pred, proc, timeout=120):
    t = time.time()
    while not pred():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t < limit(timeout)
        time.sleep(0.02)


def steps_logged(out):
    f = out / "metrics.jsonl"
    if not f.exists():
        return 0
    return max([json.loads(line)["step"] for line in f.read_text().splitlines() if '"loss"' in line] or [0])


def same_adapter(a, b):
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


TRAIN = {"max_steps": 24, "save_every": 1, "keep_last": 3, "eval_every": None}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, strategy):
    common = dict(strategy=strategy, train=TRAIN, lora={"r": 8, "dropout": 0.1}, data={"eval_path": None})
    whole = tmp_path / "whole"
    finish(write(tmp_path, "whole", tiny_model_dir, whole, **common))
    killed = tmp_path / "killed"
    recipe = write(tmp_path, "killed", tiny_model_dir, killed, **common)
    at = random.Random(13).randint(3, 18)  # seeded: a failure reproduces
    print(f"killing at step ≥ {at}")
    proc = start(recipe)
    wait_for(lambda: steps_logged(killed) >= at, proc)
    proc.send_signal(signal.SIGKILL)  # may land mid-step or mid-save
    proc.wait()
    assert not (killed / "adapter_model.safetensors").exists()
    r = finish(recipe, "resume=auto")
    assert "resumed from" in r.stdout
    assert same_adapter(whole, killed)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "int"
    recipe = write(tmp_path, "int", tiny_model_dir, out, train={**TRAIN, "save_every": None}, data={"eval_path": None})
    proc = start(recipe)
    wait_for(lambda: steps_logged(out) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=limit(120))
    assert proc.returncode == 130
    line = [x for x in stderr.splitlines() if x.startswith("hfgpu:")]
    assert len(line) == 1 and "interrupted at step" in line[0] and "resume=auto" in line[0] and "Traceback" not in stderr
    step = int(line[0].split("interrupted at step ")[1].split()[0])
    assert (out / "checkpoints" / f"step-{step:07d}" / "state.json").is_file()
    r = finish(recipe, "resume=auto")
    assert f"at step {step}" in r.stdout and (out / "adapter_model.safetensors").is_file()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from hfgpu import checkpoint

    real, calls = checkpoint.save_file, {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    out = tmp_path / "full"
    with pytest.raises(HfgpuError) as e:
        finetune(validate_recipe(recipe_dict(tiny_model_dir, out, train={"max_steps": 8, "save_every": 2})), say=lambda *a, **k: None)
    msg = str(e.value)
    assert "could not write checkpoint step 4" in msg and "the disk is full" in msg and "step-0000002 is intact" in msg
    assert "MiB needed" in msg
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-0000002"] and (out / "checkpoints" / "step-0000002" / "state.json").is_file()


def test_oom_even_at_micro_batch_1_names_the_fix_and_the_estimate(tiny_model_dir, tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    def always_oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", always_oom)
    said = []
    with pytest.raises(HfgpuError) as e:
        finetune(
            validate_recipe(recipe_dict(tiny_model_dir, tmp_path / "oom", micro_batch_size=4, data={"eval_path": None})), say=said.append
        )
    msg = str(e.value)
    assert (
        "out of memory at micro-batch 1" in msg and "the plan estimated" in msg and "gradient_checkpointing=true" in msg and "qlora" in msg
    )
    assert [s for s in said if "out of memory" in s] == [
        "CUDA out of memory: micro-batch 2, accumulation ×2 (same global batch); going on",
        "CUDA out of memory: micro-batch 1, accumulation ×4 (same global batch); going on",
    ]


@pytest.mark.slow
def test_a_sentinel_token_never_reaches_outputs_or_logs(tiny_model_dir, tmp_path):
    sentinel = "hf_SENTINEL_do_not_leak_42"
    out = tmp_path / "secret"
    recipe = write(tmp_path, "secret", tiny_model_dir, out, train={"max_steps": 3, "save_every": 2})
    r = subprocess.run(
        [sys.executable, "-m", "hfgpu.finetune", str(recipe)],
        cwd=ROOT,
        env={**ENV, "HF_TOKEN": sentinel},
        capture_output=True,
        text=True,
        timeout=limit(300),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert sentinel not in r.stdout + r.stderr
    written = [f for f in out.rglob("*") if f.is_file()]
    assert len(written) > 8 and all(sentinel.encode() not in f.read_bytes() for f in written)


def test_trust_remote_code_is_off_unless_asked_and_then_warns(tiny_model_dir, tmp_path):
    from hfgpu.recipe import Recipe

    assert Recipe.model_fields["trust_remote_code"].default is False
    said = []
    finetune(
        validate_recipe(recipe_dict(tiny_model_dir, tmp_path / "trc", trust_remote_code=True, train={"max_steps": 1})), say=said.append
    )
    assert any("trust_remote_code is on" in s and str(tiny_model_dir) in s for s in said)
