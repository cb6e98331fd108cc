"""Faults a real run meets, each with what must hold afterwards: stop signals (SIGTERM, SIGUSR1),
a second run on the same folder, a damaged newest checkpoint, a job requeued before its first
checkpoint, resume drift (data, learning rate, LoRA rank, RNG files), divergence, a full disk, and
an overwrite that fails validation."""

import hashlib
import json
import signal

import pytest
import torch
import yaml
from conftest import DEMO, limit, recipe_dict, write_jsonl
from safetensors.torch import load_file
from test_crash import run as _run
from test_crash import start, wait_for, write

from hfgpu.errors import HfgpuError
from hfgpu.finetune import finetune
from hfgpu.recipe import validate_recipe

QUIET = lambda *a, **k: None


def _recipe(tmp_path, model_dir, out, name="r", **over):
    return write(tmp_path, name, model_dir, out, **over)


def _steps(out):
    f = out / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line)["step"] for line in f.read_text().splitlines() if '"loss"' in line]


def _one_error_line(stderr: str) -> str:
    """The user's error: the one `hfgpu:` line, and the last line of stderr (after any progress bars)."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("hfgpu:")]
    assert len(ours) == 1 and lines[-1] == ours[0] and "Traceback" not in stderr, stderr[-2000:]
    return ours[0]


def _snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


LONG = {"max_steps": 400, "save_every": None, "eval_every": None}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signals_checkpoint_and_resume(tiny_model_dir, tmp_path, sig):
    out = tmp_path / "sig"
    recipe = _recipe(tmp_path, tiny_model_dir, out, train={**LONG, "max_steps": 12}, data={"eval_path": None})
    proc = start(recipe)
    wait_for(lambda: len(_steps(out)) >= 3, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=limit(120))
    assert proc.returncode == 128 + sig
    line = _one_error_line(stderr)
    assert "interrupted at step" in line and sig.name in line and "resume=auto" in line
    step = int(line.split("interrupted at step ")[1].split()[0])
    assert (out / "checkpoints" / f"step-{step:07d}" / "state.json").is_file()
    if sig == signal.SIGTERM:
        r = _run(recipe, "resume=auto")
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"at step {step}" in r.stdout and _steps(out) == list(range(1, 13))


@pytest.mark.slow
def test_a_job_killed_before_its_first_checkpoint_starts_over_with_resume_auto(tiny_model_dir, tmp_path):
    out = tmp_path / "early"
    recipe = _recipe(tmp_path, tiny_model_dir, out, train={**LONG, "max_steps": 6}, data={"eval_path": None})
    proc = start(recipe, "train.max_steps=400")
    wait_for(lambda: len(_steps(out)) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = _run(recipe, "resume=auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no checkpoint" in r.stdout and "starting from step 0" in r.stdout
    assert _steps(out) == list(range(1, 7)) and (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_is_refused_with_the_holders_pid(tiny_model_dir, tmp_path):
    out = tmp_path / "busy"
    recipe = _recipe(tmp_path, tiny_model_dir, out, train=LONG, data={"eval_path": None})
    first = start(recipe)
    try:
        wait_for(lambda: len(_steps(out)) >= 1, first)
        before = _steps(out)
        second = _run(recipe, "resume=auto")
        assert second.returncode == 2
        line = _one_error_line(second.stderr)
        assert f"in use by another hfgpu run (pid {first.pid})" in line and "choose another output_dir" in line
        assert _steps(out)[: len(before)] == before  # the first run's log was not touched
    finally:
        first.kill()
        first.wait()


# --- in-process: a finished run turned into one that stopped after its last checkpoint ----------


def _train(model_dir, out, **over):
    over.setdefault("train", {})
    over["train"] = {"max_steps": 6, "save_every": 2, "keep_last": 3, "eval_every": None, **over["train"]}
    over.setdefault("data", {"eval_path": None})
    said = []
    result = finetune(validate_recipe(recipe_dict(model_dir, out, **over)), say=said.append)
    return result, said


def _as_if_stopped(out):
    """What a run killed after its last checkpoint leaves: no final model, no final metrics."""
    for name in ("final_metrics.json", "adapter_model.safetensors", "adapter_config.json", "loss.png"):
        (out / name).unlink()


@pytest.fixture
def stopped_run(tiny_model_dir, tmp_path):
    """A 6-step run with checkpoints at steps 2 and 4, stopped after step 6; its finished twin's adapter."""
    out = tmp_path / "run"
    _train(tiny_model_dir, out)
    whole = load_file(str(out / "adapter_model.safetensors"))
    _as_if_stopped(out)
    return out, whole


def _resume(model_dir, out, **over):
    return _train(model_dir, out, resume="auto", **over)


def test_a_damaged_newest_checkpoint_is_passed_over_and_the_log_is_cut_to_the_resumed_step(tiny_model_dir, stopped_run):
    out, whole = stopped_run
    optimizer = out / "checkpoints" / "step-0000004" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # power loss: a short file
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    _, said = _resume(tiny_model_dir, out)
    assert any("checkpoint step-0000004 is damaged (optimizer.pt is" in s for s in said), said
    assert any("resumed from" in s and "step-0000002" in s for s in said)
    assert _steps(out) == [1, 2, 3, 4, 5, 6]  # steps 3-6 of the stopped run were dropped, then written again
    resumed = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # still exact


def test_a_missing_rng_file_makes_a_checkpoint_unusable(tiny_model_dir, stopped_run):
    out, _ = stopped_run
    (out / "checkpoints" / "step-0000004" / "rng-0.pt").unlink()
    with pytest.raises(HfgpuError, match="rng-0.pt is missing: use resume=auto to fall back"):
        _train(tiny_model_dir, out, resume=str(out / "checkpoints" / "step-0000004"))
    _, said = _resume(tiny_model_dir, out)
    assert any("step-0000004 is damaged (rng-0.pt is missing)" in s for s in said)
    assert any("resumed from" in s and "step-0000002" in s for s in said)


@pytest.mark.parametrize(
    "change,words",
    [
        ({"train": {"learning_rate": 0.01}}, ["train.learning_rate 0.003 → 0.01"]),
        ({"lora": {"r": 4, "dropout": 0.0}}, ["lora.r 8 → 4"]),
        ({"data": {"path": "EDITED", "eval_path": None}}, ["the tokenized training data changed"]),
    ],
)
def test_resume_refuses_a_changed_setting_and_rewrites_nothing(tiny_model_dir, stopped_run, tmp_path, change, words):
    out, _ = stopped_run
    if change.get("data", {}).get("path") == "EDITED":
        rows = [json.loads(line) for line in (DEMO / "capitals_train.jsonl").read_text().splitlines()]
        rows[0]["output"] = "Somewhere else"
        change = {"data": {"path": str(write_jsonl(tmp_path / "edited.jsonl", rows)), "eval_path": None}}
    before = _snapshot(out)
    with pytest.raises(HfgpuError) as e:
        _resume(tiny_model_dir, out, **change)
    msg = str(e.value)
    assert "written with other settings" in msg and "resume_force=true" in msg
    for w in words:
        assert w in msg, msg
    assert _snapshot(out) == before  # plan.json, resolved_recipe.yaml, metrics.jsonl untouched


def test_resume_force_applies_the_new_learning_rate_from_the_checkpoint(tiny_model_dir, stopped_run):
    out, _ = stopped_run
    _, said = _resume(tiny_model_dir, out, train={"learning_rate": 0.01}, resume_force=True)
    assert any("resume_force=true" in s and "train.learning_rate" in s for s in said)
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert lrs[:4] == [0.003] * 4 and lrs[4:] == [0.01, 0.01]  # resumed at step 4 (the newest), constant schedule
    assert yaml.safe_load((out / "resolved_recipe.yaml").read_text())["train"]["learning_rate"] == 0.01


def test_resume_force_with_another_lora_rank_is_refused_by_shape(tiny_model_dir, stopped_run):
    out, _ = stopped_run
    with pytest.raises(HfgpuError, match=r"parameters of another shape .*: \[8, \d+\] saved, \[4, \d+\] now; lora.r or the model changed"):
        _resume(tiny_model_dir, out, lora={"r": 4, "dropout": 0.0}, resume_force=True)


@pytest.mark.slow
def test_divergence_stops_at_the_first_non_finite_loss_and_writes_no_final_model(tiny_model_dir, tmp_path):
    out = tmp_path / "nan"
    recipe = _recipe(
        tmp_path,
        tiny_model_dir,
        out,
        train={"max_steps": 8, "save_every": 1, "learning_rate": 1e30, "max_grad_norm": None},
        data={"eval_path": None},
    )
    r = _run(recipe)
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert (
        "training diverged at step" in line
        and "not finite" in line
        and "train.learning_rate (now 1e+30)" in line
        and "train.max_grad_norm" in line
    )
    assert not (out / "adapter_model.safetensors").exists() and not (out / "final_metrics.json").exists()
    step = int(line.split("diverged at step ")[1].split(":")[0])
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept[-1] == f"step-{step - 1:07d}"  # the last good step, never the diverged one
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoints" / kept[-1] / "trainable.safetensors")).values())
    # the advice is one command that works (not a resume: the checkpoints hold the run's rate and may hold the blow-up)
    assert "run the same command with overwrite=true train.learning_rate=0.0002" in line and "resume=auto" not in line
    again = _run(recipe, "overwrite=true", "train.learning_rate=0.0002")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "final_metrics.json").read_text())["after"]["steps"] == 8


def test_a_full_disk_in_torch_save_is_the_same_clean_error(tiny_model_dir, tmp_path, monkeypatch):
    import signal as sig

    from hfgpu import checkpoint

    real, calls = checkpoint.torch.save, {"n": 0}

    def full(obj, f, *a, **k):
        calls["n"] += 1
        if str(f).endswith("optimizer.pt") and calls["n"] > 3:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"
            )
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    handler = sig.getsignal(sig.SIGINT)
    with pytest.raises(HfgpuError, match=r"could not write checkpoint step 4 .*file write failed.*step-0000002 is intact"):
        _train(tiny_model_dir, tmp_path / "full")
    assert sig.getsignal(sig.SIGINT) is handler  # handlers restored after an error in the loop


def test_overwrite_keeps_the_earlier_run_until_the_new_one_is_ready(tiny_model_dir, tmp_path):
    out = tmp_path / "keep"
    _train(tiny_model_dir, out, train={"max_steps": 2})
    before = _snapshot(out)
    for bad in ({"data": {"path": str(tmp_path / "typo.jsonl")}}, {"model": str(tmp_path / "no-model")}):
        with pytest.raises(HfgpuError):
            finetune(validate_recipe(recipe_dict(tiny_model_dir, out, overwrite=True, **bad)), say=QUIET)
        assert _snapshot(out) == before


def test_a_failed_run_leaves_no_empty_output_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(HfgpuError):
        finetune(validate_recipe(recipe_dict(tiny_model_dir, out, data={"path": str(tmp_path / "typo.jsonl")})), say=QUIET)
    assert not out.exists()


def test_a_run_from_a_local_folder_loads_with_plain_peft_and_no_other_argument(tiny_model_dir, tmp_path, monkeypatch):
    """adapter_config.json records a local base by its absolute path (as peft does), so
    AutoPeftModelForCausalLM.from_pretrained(run_dir) loads it from anywhere; a Hub-cache folder is its Hub id."""
    import torch
    from peft import AutoPeftModelForCausalLM

    from hfgpu.hub import Run, generate, recorded_base

    out = tmp_path / "portable"
    monkeypatch.chdir(tiny_model_dir.parent)
    _train(tiny_model_dir.name, out, train={"max_steps": 2})  # a relative model path
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert yaml.safe_load((out / "resolved_recipe.yaml").read_text())["model"] == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere, with no other argument
    plain = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    ours, _ = Run(out).load(dtype=torch.float32)
    ids = torch.tensor([[5, 60, 70, 80, 90]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours.eval()(input_ids=ids).logits, rtol=0, atol=0)
    card = (out / "README.md").read_text()  # hfgpu's card, not peft's empty template
    assert "More Information Needed" not in card and f'AutoPeftModelForCausalLM.from_pretrained("{out.resolve()}")' in card
    assert "| strategy | lora |" in card and "base_model:" not in card  # a local path is not a Hub base
    assert Run(out).base_model_path == str(tiny_model_dir.resolve())
    assert isinstance(generate(out, "Capital of Peru?", max_new_tokens=2), str)
    snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert recorded_base(str(snap)) == "Qwen/Qwen2.5-0.5B"
    assert recorded_base("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_overwrite_replaces_an_hfgpu_run_and_refuses_any_other_folder(tiny_model_dir, tmp_path):
    """overwrite=true (and resume) act on a folder that holds an hfgpu run only; a folder that merely has files named
    like a run's (another tool's adapter, a model folder) is refused in one line with nothing touched, and files that
    are not the run's survive a replaced run."""
    foreign = tmp_path / "peft-adapter"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (foreign / "adapter_model.safetensors").write_bytes(b"theirs")
    before = _snapshot(foreign)
    for over in ({"overwrite": True}, {"resume": "auto"}, {}):
        with pytest.raises(HfgpuError, match=r"holds files that are not an hfgpu run \(adapter_config.json, adapter_model.safetensors\)"):
            _train(tiny_model_dir, foreign, **over)
        assert _snapshot(foreign) == before

    out = tmp_path / "run"
    _train(tiny_model_dir, out, train={"max_steps": 2})
    (out / "notes.txt").write_text("mine")
    (out / "tokenizer.model").write_bytes(b"a stale sentencepiece file of an earlier run")
    _train(tiny_model_dir, out, overwrite=True, train={"max_steps": 3, "save_every": None})
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "tokenizer.model").exists() and not (out / "checkpoints").exists()
    assert json.loads((out / "final_metrics.json").read_text())["after"]["steps"] == 3
