"""The GPU check's plumbing on CPU (issue: `make gpu-check` on a bare CUDA machine with no network).

scripts/gpu_check.sh runs here as on the lent GPU machine: a python that is not the project's venv, a clean
environment (env -i), an "image" that has torch, numpy, pandas and pyarrow and nothing else, and wheels installed with
--no-index --no-deps --target. The wheels are this environment's own packages repacked (scripts/gpu_wheels.py
--from-installed: no registry), since the cp312 downloads of `make gpu-wheels` do not import on this cp311 machine.
Without CUDA the script runs the GPU tests' bodies on CPU and says "no CUDA", exit 0."""

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, limit

sys.path.insert(0, str(ROOT / "scripts"))
from gpu_wheels import closure  # noqa: E402  (the script's own closure: what the image lacks is what it ships)

IMAGE = ("torch", "numpy", "pandas", "pyarrow")  # what the GPU image has besides what the wheels bring


def _image(folder: Path) -> Path:
    """A site-packages of links to torch and its own dependencies (their modules and dist-info), nothing else."""
    folder.mkdir()
    for name in closure(IMAGE, skip=frozenset(), missing_ok=True):
        dist = md.distribution(name)
        base = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if ".." not in f.parts}:
            if not (folder / top).exists() and (base / top).exists():
                (folder / top).symlink_to(base / top)
    return folder


def _python() -> str:
    """The system python when it is this interpreter's version (the repacked wheels are cp3XX builds), else the
    interpreter this venv was made from: either way not the venv."""
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system:
        version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True).stdout
        if version.strip() == str(sys.version_info[:2]):
            return system
    return sys._base_executable


@pytest.mark.slow
def test_the_gpu_check_runs_on_a_bare_python_without_cuda_and_says_so(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run(
        [sys.executable, "scripts/gpu_wheels.py", "--from-installed", "--out", str(wheels)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=limit(300),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    names = {w.name.split("-")[0] for w in wheels.glob("*.whl")}
    assert {"transformers", "peft", "bitsandbytes", "datasets", "pydantic", "pytest"} <= names and "torch" not in names
    image = _image(tmp_path / "image")
    python = _python()
    bare = subprocess.run([python, "-c", "import transformers"], capture_output=True, text=True, env={"PYTHONPATH": str(image)})
    assert bare.returncode != 0  # the "image" alone has no transformers: the wheels must bring it
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(image), "PYTHON": python, "WHEELS": str(wheels)}
    run = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=limit(600))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1].endswith("no CUDA"), run.stdout[-2000:]
    versions = json.loads((out / "versions.json").read_text())
    assert versions["transformers"] == md.version("transformers") and versions["peft"] == md.version("peft")
    assert versions["device"] is None and versions["hfgpu_from"].startswith(str(ROOT))
    tests = (out / "gpu_tests.txt").read_text()
    assert re.search(r"\d+ passed", tests) and "failed" not in tests, tests[-2000:]
    assert [json.loads(ln)["test"] for ln in (out / "gpu_tests.jsonl").read_text().splitlines()]  # the bodies recorded into OUTDIR
    assert "no CUDA GPU" in (out / "memory_calibration.txt").read_text()
    assert "[gpu-check +" in (out / "summary.txt").read_text()
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("hfgpu-gpu-deps.*"))  # the installed wheels are removed


def _synthetic_results(outdir: Path) -> dict:
    """What gpu_check.sh would write on an H100, with measurements made up from the plans: the card used 20 % more
    than planned (0.5 GiB beyond the reserve), the allocator reserved 8 % of the activations and logits beyond what
    was allocated, and micro-batches took a·mb + b seconds."""
    import csv
    import dataclasses

    from hfgpu.calibrate import grid
    from hfgpu.gpus import get_gpu
    from hfgpu.planner import plan_or_closest

    outdir.mkdir()
    card = get_gpu("H100")
    (outdir / "versions.json").write_text(
        json.dumps({"device": "NVIDIA H100 80GB HBM3", "card": dataclasses.asdict(card), "torch": "2.11"})
    )
    model = "HuggingFaceTB/SmolLM2-135M"
    rows = []
    for knobs in grid(model, short=True)[:3]:
        p = plan_or_closest(model, card, calibrated=False, **knobs)
        used = int(p.memory.total * 1.2)
        reserved = used - 2**29
        act = p.memory.activations + p.memory.logits
        rows.append(
            {
                "model": model,
                "gpu": card.name,
                **knobs,
                "planned_total": p.memory.total,
                "planned_tensor_peak": p.memory.tensor_peak,
                "planned_activations_logits": act,
                "simulated_peak": "",
                "max_allocated": int(reserved - 0.08 * act),
                "max_reserved": reserved,
                "device_used": used,
                "planner_error": round(1 / 1.2 - 1, 4),
                "simulation_error": "",
                "seconds": 1,
            }
        )
    with (outdir / "memory_calibration.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    a, b, seq = 0.004, 0.03, 512
    tps = [{"micro_batch": mb, "measured": mb * seq / (a * mb + b), "estimated": 1000.0} for mb in (1, 2, 4)]
    record = {"test": "tokens_per_second", "device": "NVIDIA H100 80GB HBM3", "model": "Qwen/Qwen2.5-0.5B", "seq_len": seq, "rows": tps}
    (outdir / "gpu_tests.jsonl").write_text(json.dumps(record) + "\n")
    return {"a": a, "b": b, "seq": seq, "card": card, "rows": rows}


def test_apply_gpu_results_turns_a_checks_outdir_into_the_package_values(tmp_path):
    """One command from OUTDIR: the CUDA context and fragmentation, LoRA's utilization and the launch constant, a
    widened known_error; hfgpu then plans with them (a copy of the package reads the written file)."""
    from hfgpu import throughput
    from hfgpu.memory import mode_key
    from hfgpu.models import model_spec
    from hfgpu.planner import plan_or_closest

    made = _synthetic_results(tmp_path / "out")
    resources = tmp_path / "resources"
    shutil.copytree(ROOT / "hfgpu" / "resources", resources)
    r = subprocess.run(
        [
            sys.executable,
            "scripts/apply_gpu_results.py",
            str(tmp_path / "out"),
            "--resources",
            str(resources),
            "--results",
            str(tmp_path / "res"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=limit(120),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    written = json.loads((resources / "cuda_measured.json").read_text())
    assert written["memory"]["cuda_context_bytes"] == 2**29 and written["memory"]["fragmentation"] == pytest.approx(0.08, abs=0.002)
    p = plan_or_closest("Qwen/Qwen2.5-0.5B", made["card"], calibrated=False, strategy="lora", seq_len=made["seq"], micro_batch_size=1)
    spec = model_spec("Qwen/Qwen2.5-0.5B")
    fixed = throughput.micro_batch_seconds(spec, p.gpu, p.setup())
    per_mb = made["seq"] / throughput.compute_tokens_per_second(spec, p.gpu, p.setup())
    assert written["throughput"]["launch_seconds_per_layer_pass"] == pytest.approx(
        throughput.LAUNCH_SECONDS_PER_LAYER_PASS * made["b"] / fixed, rel=1e-3
    )
    assert written["throughput"]["utilization"]["lora"] == pytest.approx(throughput.UTILIZATION["lora"] * per_mb / made["a"], rel=1e-2)
    key = mode_key(
        plan_or_closest(
            made["rows"][0]["model"],
            made["card"],
            calibrated=False,
            **{
                k: made["rows"][0][k]
                for k in ("strategy", "seq_len", "micro_batch_size", "gradient_checkpointing", "chunked_loss", "activation_offloading")
            },
        ).setup()
    )
    assert json.loads((resources / "activation_coefficients.json").read_text())["known_error"][key]["under"] >= 1 - 1 / 1.2
    assert (tmp_path / "res").is_dir() and any((tmp_path / "res").rglob("memory_calibration.csv"))
    # the package reads the file: a copy of hfgpu with the written resources plans with the measured values
    package = tmp_path / "pkg" / "hfgpu"
    shutil.copytree(ROOT / "hfgpu", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(resources / "cuda_measured.json", package / "resources" / "cuda_measured.json")
    code = "from hfgpu import memory, throughput; print(memory.COEFFICIENTS['cuda_context_bytes'], throughput.UTILIZATION['lora'])"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg"), "HF_HUB_OFFLINE": "1"}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=limit(60))
    assert got.stdout.split() == [str(2**29), str(written["throughput"]["utilization"]["lora"])], got.stderr[-2000:]


def test_apply_gpu_results_refuses_a_check_that_ran_without_cuda(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "versions.json").write_text(json.dumps({"device": None}))
    r = subprocess.run(
        [sys.executable, "scripts/apply_gpu_results.py", str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2 and "ran without CUDA" in r.stdout
