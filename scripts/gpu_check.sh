#!/usr/bin/env bash
# The GPU check on a bare CUDA machine with no network: `bash scripts/gpu_check.sh OUTDIR` (what `make gpu-check` runs).
#
# No venv, no pip index: the wheels `make gpu-wheels` put in .gpu-wheels/ (carried with the tree) are installed with
# --no-index --no-deps --target into a temporary folder in front of the image's own packages, hfgpu is imported from
# this tree, then tests/gpu and the quick calibration grid run, each under a time limit, and every result goes into
# OUTDIR: gpu_tests.txt and gpu_tests.jsonl, memory_calibration.txt and .csv, versions.json, summary.txt. Progress is
# printed with the time since the start. Without CUDA the same plumbing runs (imports, the GPU tests' bodies on CPU,
# the calibration's own "no CUDA" path) and it ends with "no CUDA", exit 0.
#
#   PYTHON=python3.12  WHEELS=.gpu-wheels  GPU_TESTS_S=240  CALIBRATION_S=210  (the defaults; 8 minutes in all on one H100)
#   python scripts/apply_gpu_results.py OUTDIR   then writes what the results update into the package
set -uo pipefail
OUTDIR=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$ROOT/.gpu-wheels}
GPU_TESTS_S=${GPU_TESTS_S:-240}
CALIBRATION_S=${CALIBRATION_S:-210}
START=$(date +%s)
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)"
say() { echo "[gpu-check +$(($(date +%s) - START))s] $*" | tee -a "$OUTDIR/summary.txt"; }
fail() { say "FAILED: $*"; exit 1; }

command -v "$PYTHON" >/dev/null || fail "no $PYTHON on this machine (set PYTHON=…)"
ls "$WHEELS"/*.whl >/dev/null 2>&1 || fail "no wheels in $WHEELS: run \`make gpu-wheels\` where the package registries are reachable, and carry .gpu-wheels"
DEPS=$(mktemp -d "${TMPDIR:-/tmp}/hfgpu-gpu-deps.XXXXXX")
trap 'rm -rf "$DEPS"' EXIT

say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $DEPS (--no-index --no-deps --target)"
if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$DEPS" "$WHEELS"/*.whl >"$OUTDIR/install.txt" 2>&1 \
        || { cat "$OUTDIR/install.txt"; fail "pip could not install the wheels (see install.txt)"; }
else  # no pip on the image: a wheel is a zip of what goes into site-packages
    "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$DEPS" "$WHEELS"/*.whl \
        || fail "could not unpack the wheels"
fi
export PYTHONPATH="$DEPS:$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 HFGPU_RESULTS_DIR="$OUTDIR"
export HFGPU_CACHE="$OUTDIR/.cache" MPLBACKEND=Agg

"$PYTHON" - "$OUTDIR/versions.json" <<'EOF' || fail "hfgpu or a dependency does not import (see above)"
import json, platform, sys
from importlib import metadata
import torch, transformers, peft, accelerate, datasets, pydantic, bitsandbytes, hfgpu, hfgpu.finetune  # noqa: F401
from hfgpu.memory import activation_coefficients
names = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "pydantic", "pytest")
d = {"python": platform.python_version(), "hfgpu_from": hfgpu.__file__, **{n: metadata.version(n) for n in names}}
d["cuda"] = torch.version.cuda
d["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
if d["device"]:  # the card as hfgpu plans for it (catalog entry, or what torch reports): apply_gpu_results.py plans on it
    import dataclasses
    from hfgpu.gpus import detect
    d["card"] = dataclasses.asdict(detect())
d["fitted_on"] = activation_coefficients()["measured"]["versions"]
json.dump(d, open(sys.argv[1], "w"), indent=1)
print(json.dumps(d))
EOF
CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')
say "imports fine; CUDA: $([ "$CUDA" = 1 ] && echo yes || echo no)"

if [ "$CUDA" = 1 ]; then
    say "tests/gpu (at most ${GPU_TESTS_S}s)"
    timeout "$GPU_TESTS_S" "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu -m gpu 2>&1 | tee "$OUTDIR/gpu_tests.txt"
    say "tests/gpu: $(tail -1 "$OUTDIR/gpu_tests.txt")"
    say "the quick calibration grid (at most ${CALIBRATION_S}s)"
    timeout "$CALIBRATION_S" "$PYTHON" benchmarks/memory_calibration.py --quick --out "$OUTDIR/memory_calibration.csv" 2>&1 \
        | tee "$OUTDIR/memory_calibration.txt"
    say "calibration: $(tail -1 "$OUTDIR/memory_calibration.txt")"
    say "done: results in $OUTDIR; apply them with: python scripts/apply_gpu_results.py $OUTDIR"
else
    say "no CUDA: the GPU tests' bodies on CPU (HFGPU_GPU_TESTS_ON_CPU=1) to prove the plumbing"
    HFGPU_GPU_TESTS_ON_CPU=1 timeout "$GPU_TESTS_S" "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUTDIR/gpu_tests.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || fail "the GPU tests' bodies failed on CPU (see gpu_tests.txt)"
    "$PYTHON" benchmarks/memory_calibration.py --quick --out "$OUTDIR/memory_calibration.csv" 2>&1 | tee "$OUTDIR/memory_calibration.txt"
    say "no CUDA"
fi
exit 0
