"""Apply what `make gpu-check` measured: one command from its OUTDIR to the package files to commit.

    python scripts/apply_gpu_results.py OUTDIR          # writes, and prints each value before → after
    python scripts/apply_gpu_results.py OUTDIR --dry-run

From OUTDIR (scripts/gpu_check.sh's results):
- memory_calibration.csv (real steps on the card beside the planner) →
  hfgpu/resources/cuda_measured.json "memory": the CUDA context (the most the card used beyond the caching
  allocator's reserve, device-wide use minus max_memory_reserved) and the allocator's fragmentation (the most
  reserved beyond allocated, as a share of the planned activations and logits, the tensors it applies to);
  hfgpu/resources/activation_coefficients.json "known_error": a mode's "under" widened where the planner's total
  fell further below the card's device-wide use than the recorded bound (it is never narrowed here);
- gpu_tests.jsonl "tokens_per_second" (Qwen2.5-0.5B LoRA at micro-batch 1, 2, 4) → cuda_measured.json
  "throughput": a line through the seconds per micro-batch gives the fixed part (the kernel launches:
  launch_seconds_per_layer_pass) and the per-token part (LoRA's utilization of peak FLOPS);
- every file → benchmarks/results/gpu/DATE-DEVICE/, to commit beside them.
hfgpu.memory.COEFFICIENTS and hfgpu.throughput read cuda_measured.json at import.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESOURCES = ROOT / "hfgpu" / "resources"
MiB = 2**20


def _num(v: str) -> float | None:
    return float(v) if v not in ("", "None", None) else None


def memory_values(rows: list[dict]) -> dict:
    measured = [r for r in rows if _num(r["device_used"]) and _num(r["max_reserved"]) and _num(r["max_allocated"])]
    if not measured:
        return {}
    context = max(_num(r["device_used"]) - _num(r["max_reserved"]) for r in measured)
    frag = [
        (_num(r["max_reserved"]) - _num(r["max_allocated"])) / _num(r["planned_activations_logits"])
        for r in measured
        if _num(r.get("planned_activations_logits"))
    ]
    out = {"cuda_context_bytes": int(-(-context // (16 * MiB)) * 16 * MiB)}  # up to 16 MiB
    if frag:
        out["fragmentation"] = round(min(0.5, max(0.0, max(frag))), 3)
    return out


def widened_known_error(rows: list[dict], known: dict, card) -> dict:
    """known_error with each mode's "under" at least the card's worst under-estimate (planned total vs device-wide use)."""
    from hfgpu.memory import mode_key
    from hfgpu.planner import plan_or_closest

    known = {k: dict(v) for k, v in known.items()}
    for r in rows:
        err = _num(r.get("planner_error"))
        if err is None or err >= 0:
            continue
        names = ("strategy", "seq_len", "micro_batch_size", "gradient_checkpointing", "chunked_loss", "activation_offloading")
        knobs = {k: r[k] for k in names}
        knobs = {k: (v == "True" if v in ("True", "False") else int(v) if v.isdigit() else v) for k, v in knobs.items()}
        key = mode_key(plan_or_closest(r["model"], card, calibrated=False, **knobs).setup())
        entry = known.setdefault(key, {"under": 0.0, "over": 0.0})
        entry["under"] = max(entry.get("under", 0.0), round(-err + 0.005, 3))
    return known


def card_of(versions: dict):
    """The GPU the check ran on, as hfgpu planned for it there (versions.json "card")."""
    from hfgpu.gpus import GPU

    d = dict(versions["card"])
    d["compute_capability"] = tuple(d["compute_capability"]) if d.get("compute_capability") else None
    d["aliases"] = tuple(d.get("aliases") or ())
    return GPU(**d)


def throughput_values(records: list[dict], card) -> dict:
    """From the tokens/s rows: t(mb) = seconds per micro-batch; a least-squares line a·mb + b against the model's own
    split (its fixed part and per-token part at the same setups) scales the launch constant and LoRA's utilization."""
    from hfgpu import throughput
    from hfgpu.models import model_spec
    from hfgpu.planner import plan_or_closest

    rec = next((r for r in records if r.get("test") == "tokens_per_second" and r.get("device") not in (None, "cpu")), None)
    if rec is None or not all(r.get("estimated") for r in rec["rows"]):
        return {}  # no measurement, or a card without FLOPS figures (the model has no estimate to correct)
    seq, pts = rec["seq_len"], [(r["micro_batch"], r["micro_batch"] * rec["seq_len"] / r["measured"]) for r in rec["rows"]]
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    a = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    b = my - a * mx
    spec = model_spec(rec["model"])
    p = plan_or_closest(rec["model"], card, calibrated=False, strategy="lora", seq_len=seq, micro_batch_size=1)
    fixed = throughput.micro_batch_seconds(spec, p.gpu, p.setup())
    per_mb = seq / throughput.compute_tokens_per_second(spec, p.gpu, p.setup())
    out = {}
    if b > 0 and fixed > 0:
        out["launch_seconds_per_layer_pass"] = round(throughput.LAUNCH_SECONDS_PER_LAYER_PASS * b / fixed, 7)
    if a > 0:
        out["utilization"] = {"lora": round(throughput.UTILIZATION["lora"] * per_mb / a, 3)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    parser.add_argument("--resources", default=str(RESOURCES), help="where the package's resource files are (tests)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "gpu"), help="where the raw results are copied")
    args = parser.parse_args()
    outdir, resources = Path(args.outdir), Path(args.resources)
    versions = json.loads((outdir / "versions.json").read_text()) if (outdir / "versions.json").is_file() else {}
    if not versions.get("device"):
        print(f"{outdir}: the check ran without CUDA (versions.json names no device): nothing to apply")
        return 2
    rows = list(csv.DictReader((outdir / "memory_calibration.csv").open())) if (outdir / "memory_calibration.csv").is_file() else []
    tests = outdir / "gpu_tests.jsonl"
    records = [json.loads(x) for x in tests.read_text().splitlines() if x.strip()] if tests.is_file() else []
    measured_path = resources / "cuda_measured.json"
    before = json.loads(measured_path.read_text()) if measured_path.is_file() else {}
    after = {
        "about": "What a GPU check measured (scripts/gpu_check.sh, then apply_gpu_results.py); read by hfgpu.memory, hfgpu.throughput",
        "memory": {**before.get("memory", {}), **memory_values(rows)},
        "throughput": {**before.get("throughput", {}), **throughput_values(records, card_of(versions))},
        "measured": {
            "date": datetime.date.today().isoformat(),
            "device": versions["device"],
            "versions": {k: versions.get(k) for k in ("torch", "cuda", "transformers", "peft", "bitsandbytes")},
            "calibration_rows": len(rows),
        },
    }
    from hfgpu.memory import COEFFICIENTS
    from hfgpu.throughput import LAUNCH_SECONDS_PER_LAYER_PASS, UTILIZATION

    now = {**COEFFICIENTS, "launch_seconds_per_layer_pass": LAUNCH_SECONDS_PER_LAYER_PASS, "utilization": UTILIZATION}
    for section in ("memory", "throughput"):
        for k, v in after[section].items():
            print(f"{section}.{k}: {now.get(k)} → {v}")
    coef_path = resources / "activation_coefficients.json"
    coef = json.loads(coef_path.read_text())
    widened = widened_known_error(rows, coef.get("known_error", {}), card_of(versions))
    for k, v in widened.items():
        if v != coef.get("known_error", {}).get(k):
            print(f"known_error.{k}: {coef.get('known_error', {}).get(k)} → {v}")
    if args.dry_run:
        return 0
    measured_path.write_text(json.dumps(after, indent=1) + "\n")
    coef["known_error"] = dict(sorted(widened.items()))
    coef_path.write_text(json.dumps(coef, indent=1, ensure_ascii=False) + "\n")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", versions["device"]).strip("-")
    dest = Path(args.results) / f"{after['measured']['date']}-{slug}"
    dest.mkdir(parents=True, exist_ok=True)
    for f in outdir.iterdir():
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    print(f"wrote {measured_path}, {coef_path}; results copied to {dest}: commit them together")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
