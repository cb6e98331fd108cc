"""Simulate every plan the docs tables and the shipped recipes show, at full depth, and record the results.

    python scripts/verify_plans.py          # simulate what is new or changed, write benchmarks/results/verified_plans.json
    python scripts/verify_plans.py --all    # simulate every plan again

Each plan's training step runs on fake tensors (hfgpu.simulate: the real transformers + peft modules, equal
to a real CPU step) and its tensor peak plus the planner's overhead allowance is compared with the budget.
tests/test_docs.py checks that every plan shown is recorded here with the same knobs and that none is
rejected by its simulation, and re-simulates one to show the stored numbers are reproduced.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

OUT = ROOT / "benchmarks" / "results" / "verified_plans.json"


def shown_plans() -> list:
    """Every plan in docs/choosing-a-gpu.md's tables and in recipes/ (fitting ones; each once)."""
    import make_docs
    import make_recipes

    from hfgpu.finetune import plan_for
    from hfgpu.recipe import load_recipe

    plans = []
    for model in make_docs.MODELS:
        for card in make_docs.CARDS:
            if (p := make_docs.best(model, card)) is not None:
                plans.append(p)
    plans += [p for p in make_docs.pair_plans() if p.fits]
    plans += [plan_for(load_recipe(ROOT / "recipes" / entry[0])) for entry in make_recipes.RECIPES]
    unique = {}
    for p in plans:
        unique.setdefault(key(p), p)
    return list(unique.values())


NOT_KNOBS = {
    "model", "gpu", "world_size", "offloaded_bytes_per_step", "params_total", "params_trainable", "memory", "fits", "fit",
    "reasons", "warnings", "tokens_per_second_estimate", "hours_per_million_tokens_estimate", "simulation",
}  # fmt: skip


def key(p) -> str:
    """A plan's identity: the model, the card(s) and every resolved knob, as plan.json names them."""
    knobs = {k: v for k, v in p.to_dict().items() if k not in NOT_KNOBS}
    if knobs.get("objective") == "sft":  # the default objective: plans recorded before the knob existed keep their key
        del knobs["objective"]
    return json.dumps({"model": p.model, "gpu": p.gpu.name, "count": p.gpu.count, "knobs": knobs}, sort_keys=True)


def simulate_one(item: tuple) -> dict:
    from hfgpu.memory import Setup
    from hfgpu.models import model_spec
    from hfgpu.simulate import simulate

    model, knobs, count, planned = item
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    spec = model_spec(model)
    sim = simulate(spec.config, Setup.of(knobs, count), spec)
    # one process of several (ddp, zero2/3, fsdp): the simulation runs the whole model in one process, so its
    # weights and state are replaced by the planner's per-process ones (exact); what it measures is the rest
    total = planned["weights"] + planned["trainable_state"] + sim.transient + planned["overhead"]
    return {
        "planned_total": planned["total"],
        "simulated_peak": sim.peak,
        "simulated_total": total,
        "budget": planned["budget"],
        "fits": total <= planned["budget"],
        "simulated_over_planned": round((total - planned["overhead"]) / planned["tensor_peak"], 4),
    }


def record(p) -> tuple:
    """What a worker process needs to simulate plan `p` (picklable: the resolved knob record itself)."""
    m = p.memory
    planned = {"total": m.total, "overhead": m.overhead, "budget": m.budget, "tensor_peak": m.tensor_peak}
    return p.model, p.knobs, p.gpu.count, {**planned, "weights": m.weights, "trainable_state": m.trainable_state}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="simulate every plan, not only those not yet recorded")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plans = shown_plans()
    old = json.loads(OUT.read_text())["plans"] if OUT.is_file() and not args.all else {}
    todo = [p for p in plans if key(p) not in old or not old[key(p)]["fits"]]  # new, changed, or rejected last time
    print(f"{len(plans)} plans shown; simulating {len(todo)}", flush=True)
    start = time.time()
    results = dict((k, v) for k, v in old.items() if k in {key(p) for p in plans})
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for p, r in zip(todo, pool.map(simulate_one, [record(p) for p in todo])):
            results[key(p)] = r
            flag = "ok" if r["fits"] else "REJECTED"
            print(
                f"{flag:8s} {p.model} on {p.gpu.display_name} {p.strategy}: planned {r['planned_total'] / 2**30:.2f}, simulated "
                f"{r['simulated_total'] / 2**30:.2f} of {r['budget'] / 2**30:.2f} GiB",
                flush=True,
            )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"about": __doc__.splitlines()[0], "plans": dict(sorted(results.items()))}, indent=1) + "\n")
    rejected = [k for k, r in results.items() if not r["fits"]]
    print(f"{len(results)} plans recorded, {len(rejected)} rejected by simulation, in {time.time() - start:.0f} s")
    return 1 if rejected else 0


if __name__ == "__main__":
    raise SystemExit(main())
