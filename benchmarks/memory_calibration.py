"""Calibrate the memory model on a real CUDA GPU: a grid of real training steps beside the predictions.

    python benchmarks/memory_calibration.py [--quick] [--out benchmarks/results/memory_calibration.csv]

For 3 small models (built from their catalog configs with random weights: memory does not depend
on weight values) × full / LoRA / QLoRA × seq 256–2048 × micro-batch 1–4 × checkpointing on/off, and
the memory savers (chunked loss; + activation offloading) at the longest sequence, it
runs a few real steps and records torch.cuda.max_memory_allocated, max_memory_reserved and the
device-wide use from mem_get_info, beside the planner's total and tensor peak and the fake-tensor
simulation's peak. It writes a CSV and prints the median and worst relative error of the planner
(total vs device-wide use) and of the simulation (tensor peak vs max_memory_allocated).
Without CUDA it says so and exits 0 (tests/test_simulate.py runs it that way).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ["HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B"]
FIELDS = [
    "model",
    "gpu",
    "strategy",
    "seq_len",
    "micro_batch_size",
    "gradient_checkpointing",
    "chunked_loss",
    "activation_offloading",
    "planned_total",
    "planned_tensor_peak",
    "planned_activations_logits",
    "simulated_peak",
    "max_allocated",
    "max_reserved",
    "device_used",
    "planner_error",
    "simulation_error",
    "seconds",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 model, the short grid")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_calibration.csv"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: the calibration grid needs one (nothing measured, nothing written)")
        return 0
    warnings.filterwarnings("ignore")
    from hfgpu.calibrate import grid, measure_cuda_step
    from hfgpu.models import model_spec, pretrained_config
    from hfgpu.planner import plan_or_closest
    from hfgpu.simulate import simulate

    rows = []
    for model in MODELS[:1] if args.quick else MODELS:
        spec = model_spec(model)
        config = pretrained_config(spec.config)
        for knobs in grid(model, short=args.quick):
            p = plan_or_closest(model, "auto", calibrated=False, **knobs)
            if p.memory.weights + p.memory.trainable_state > 0.9 * p.memory.budget:
                continue
            start = time.time()
            try:
                measured = measure_cuda_step(config, p.setup())
            except torch.cuda.OutOfMemoryError:
                measured = {"allocated": None, "reserved": None, "device_used": None}
                torch.cuda.empty_cache()
            sim = simulate(spec.config, p.setup(), spec)
            tensor_peak = p.memory.tensor_peak
            row = {
                "model": model,
                "gpu": p.gpu.name,
                **knobs,
                "planned_total": p.memory.total,
                "planned_tensor_peak": tensor_peak,
                "planned_activations_logits": p.memory.activations + p.memory.logits,
                "simulated_peak": sim.peak,
                "max_allocated": measured["allocated"],
                "max_reserved": measured["reserved"],
                "device_used": measured["device_used"],
                "seconds": round(time.time() - start, 1),
            }
            row["planner_error"] = round(p.memory.total / measured["device_used"] - 1, 4) if measured["device_used"] else None
            row["simulation_error"] = round(sim.peak / measured["allocated"] - 1, 4) if measured["allocated"] else None
            rows.append(row)
            print(
                {
                    k: row[k]
                    for k in (
                        "model",
                        "strategy",
                        "seq_len",
                        "micro_batch_size",
                        "gradient_checkpointing",
                        "chunked_loss",
                        "activation_offloading",
                        "planner_error",
                        "simulation_error",
                    )
                },
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    for name in ("planner_error", "simulation_error"):
        errs = [abs(r[name]) for r in rows if r[name] is not None]
        if errs:
            print(f"{name}: median {statistics.median(errs):.1%}, worst {max(errs):.1%} over {len(errs)} rows")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
