"""Without network and without HF_HUB_OFFLINE, every command that would ask the Hub says so in one line at once:
one short connection attempt, then huggingface_hub, transformers and datasets read only the local cache (no retry
chatter: huggingface_hub alone retries five times over ~24 s). The Hub here is a closed port on this machine
(HF_ENDPOINT=http://127.0.0.1:1), which refuses connections as a machine without network does."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, limit

from hfgpu import online


@pytest.fixture()
def fresh(monkeypatch):
    monkeypatch.setattr(online, "_reachable", {})
    monkeypatch.setattr(online, "_switched", [])
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)


def test_the_probe_tells_a_listening_endpoint_from_a_closed_one(fresh, monkeypatch):
    import huggingface_hub.constants

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert online.hub_reachable() and "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    started = time.perf_counter()
    assert not online.hub_reachable()
    assert time.perf_counter() - started < online.PROBE_TIMEOUT_S + 0.5
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert not online.offline_asked()  # hfgpu switched, the user did not ask: errors say the Hub cannot be reached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_ENDPOINT": "http://127.0.0.1:1", "HF_TOKEN": "hf_offlineTestToken", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _run(args, tmp_path):
    started = time.perf_counter()
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=limit(120))
    return r, time.perf_counter() - started


def test_plan_of_a_hub_model_offline_is_one_line_at_once(tmp_path):
    r, took = _run(["-m", "hfgpu", "plan", "some-org/model-7b", "--gpu", "4090"], tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "'some-org/model-7b'" in r.stderr and "cannot be reached" in r.stderr and "Retry" not in r.stderr
    assert took < 5, took


@pytest.fixture(scope="module")
def hub_base_run(tmp_path_factory):
    """A finished run whose records name a Hub base (as a run on a Hub model records it)."""
    from conftest import DEMO, train_demo

    out = train_demo(tmp_path_factory.mktemp("runs") / "run", "train.max_steps=1", "eval.metrics=[]")
    recipe = (out / "resolved_recipe.yaml").read_text().replace(str(DEMO / "model"), "some-org/base-7b")
    (out / "resolved_recipe.yaml").write_text(recipe)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "some-org/base-7b"}))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,needles",
    [
        (["-m", "hfgpu", "generate", "RUN", "--prompt", "hi"], ["'some-org/base-7b'", "couldn't connect"]),
        (["-m", "hfgpu", "merge", "RUN", "--out", "OUT"], ["'some-org/base-7b'", "couldn't connect"]),
        (["-m", "hfgpu", "push", "RUN", "--repo-id", "me/x"], ["push to me/x", "cannot be reached", "is unchanged"]),
        (
            ["-m", "hfgpu.finetune", "recipes/demo_cpu.yaml", "output_dir=OUT", "data.path=some-org/dataset"],
            ["'some-org/dataset'", "cannot be reached"],
        ),
        (
            ["-m", "hfgpu.finetune", "recipes/demo_cpu.yaml", "output_dir=OUT", "model=some-org/model-7b"],
            ["'some-org/model-7b'", "cannot be reached"],
        ),
    ],
    ids=["generate", "merge", "push", "finetune-hub-data", "finetune-hub-model"],
)
def test_each_command_on_a_hub_base_or_data_offline_is_one_line(hub_base_run, tmp_path, args, needles):
    out = tmp_path / "out"
    r, took = _run([a.replace("RUN", str(hub_base_run)).replace("OUT", str(out)) for a in args], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("hfgpu: error:") and all(n in last for n in needles), last
    assert "Retry" not in r.stderr and "Traceback" not in r.stderr and "thrown while requesting" not in r.stderr, r.stderr
    assert not out.exists()
    assert took < 30, took  # imports (torch, transformers) take the time, not the network: ~24 s of retries before
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
