"""Every plan the docs tables and the shipped recipes show was simulated at full depth and fits by its simulation
(benchmarks/results/verified_plans.json, written by scripts/verify_plans.py), and the stored numbers are reproduced."""

import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import verify_plans  # noqa: E402


@pytest.fixture(scope="module")
def shown():
    return verify_plans.shown_plans()


@pytest.fixture(scope="module")
def recorded():
    return json.loads(verify_plans.OUT.read_text())["plans"]


def test_every_shown_plan_is_recorded_with_its_current_knobs(shown, recorded):
    stale = [f"{p.model} on {p.gpu.display_name} ({p.strategy})" for p in shown if verify_plans.key(p) not in recorded]
    assert not stale, f"not simulated as planned now: {stale[:5]}: run python scripts/verify_plans.py"
    assert len(shown) >= 60  # the matrix, the per-model tables, the multi-card table and the recipes


def test_no_shown_plan_is_rejected_by_its_simulation(shown, recorded):
    for p in shown:
        r = recorded[verify_plans.key(p)]
        assert r["planned_total"] == p.memory.total and r["budget"] == p.memory.budget
        assert r["fits"] and r["simulated_total"] <= r["budget"], f"{p.model} on {p.gpu.display_name}: the simulated step does not fit"


@pytest.mark.slow
def test_a_recorded_simulation_is_reproduced(shown, recorded):
    p = min(shown, key=lambda p: (p.params_total, p.seq_len * p.micro_batch_size))
    again = verify_plans.simulate_one(verify_plans.record(p))
    assert again["simulated_peak"] == recorded[verify_plans.key(p)]["simulated_peak"]
