"""A full disk at each place hfgpu writes a lot — a checkpoint, the final save, a GGUF export, a merge — is the same
clean stop: one line naming the folder and the space needed, exit 2, no traceback, nothing earlier lost. Each case
runs hfgpu in a private mount namespace on a real tmpfs of a few hundred KiB (`unshare -m` + `mount -t tmpfs`,
root only), so the write fails as it does on a full disk, with torch's or safetensors' own error."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, limit

pytestmark = [
    pytest.mark.slow,  # subprocesses
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare to mount a small tmpfs"),
]


def on_small_disk(size: str, args: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `python -m hfgpu… args` with DISK in args replaced by a fresh tmpfs of `size`; returns the result and
    what the tmpfs held afterwards (relative paths), read inside the namespace."""
    disk = tmp_path / "disk"
    disk.mkdir()
    argv = " ".join(f"'{a}'".replace("DISK", str(disk)) for a in [sys.executable, *args])
    script = f"mount -t tmpfs -o size={size} tmpfs '{disk}' || exit 99; {argv}; rc=$?; cd '{disk}' && find . -mindepth 1 >&3; exit $rc"
    r = subprocess.run(
        ["unshare", "-m", "bash", "-c", f"exec 3>'{tmp_path / 'files.txt'}'; {script}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=limit(300),
    )
    if r.returncode == 99:
        pytest.skip("cannot mount a tmpfs here")
    return r, sorted((tmp_path / "files.txt").read_text().split())


def assert_one_line(r, *needles):
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("hfgpu: error: could not write") and "the disk is full" in last, last
    assert re.search(r"about \d+\.\d MiB needed", last), last
    for needle in needles:
        assert needle in last, last


TRAIN = ["-m", "hfgpu.finetune", "recipes/demo_cpu.yaml", "train.epochs=2", "eval.metrics=[]", "data.eval_path=null"]


def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path):
    r, files = on_small_disk("2m", [*TRAIN, "output_dir=DISK/run", "train.save_every=1"], tmp_path)
    assert_one_line(r, "checkpoint step", "/run/checkpoints", "is intact", "resume=auto")
    kept = re.search(r"the previous checkpoint (step-\d+) is intact", r.stderr).group(1)
    assert f"./run/checkpoints/{kept}/state.json" in files  # whole, and nothing half-written beside it
    assert not any(".tmp" in f for f in files)


def test_the_final_save_on_a_full_disk_leaves_no_half_finished_run(tmp_path):
    r, files = on_small_disk("200k", [*TRAIN, "output_dir=DISK/run"], tmp_path)
    assert_one_line(r, "the trained adapter", "/run:", "free space, then run again")
    assert "./run/plan.json" in files
    for name in ("adapter_model.safetensors", "adapter_config.json", "final_metrics.json"):
        assert f"./run/{name}" not in files  # not taken for a finished run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import train_demo

    return train_demo(tmp_path_factory.mktemp("runs") / "run", *TRAIN[4:], "train.epochs=1")


@pytest.mark.parametrize(
    "args,needles",
    [
        (["export", "RUN", "--out", "DISK/model.gguf", "--quant", "f16"], ["model.gguf", "nothing was written"]),
        (["merge", "RUN", "--out", "DISK/merged"], ["the merged model", "is untouched"]),
    ],
)
def test_an_export_or_merge_on_a_full_disk_writes_nothing(run_dir, tmp_path, args, needles):
    before = {f.name: f.stat().st_size for f in run_dir.iterdir()}
    r, files = on_small_disk("500k", ["-m", "hfgpu", *[a.replace("RUN", str(run_dir)) for a in args]], tmp_path)
    assert_one_line(r, *needles)
    assert files == []  # no partial file or empty folder left
    assert {f.name: f.stat().st_size for f in run_dir.iterdir()} == before
