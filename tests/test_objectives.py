"""The objective registry (hfgpu.objectives): one record per objective, read by attribute everywhere.

A new pair objective is one record plus its loss: the test registers a toy one (a hinge on the reference log-ratio
margin, SLiC's form: max(0, 1 − β·(Δ_c − Δ_r))) in a fresh process, before hfgpu builds its knob choices and recipe
schema, then plans it, trains one step with it, and writes its recipe, with nothing else changed."""

import ast
import subprocess
import sys

from conftest import DEMO, ROOT, limit

from hfgpu import objectives
from hfgpu.knobs import OBJECTIVES, PAIR_OBJECTIVES, PREFERENCE_DEFAULTS, REFERENCE_OBJECTIVES, batch_unit


def test_the_registry_is_what_the_knobs_and_the_losses_read():
    assert OBJECTIVES == ("sft", "dpo", "ipo", "simpo", "orpo", "kto") == objectives.names()
    assert PAIR_OBJECTIVES == ("dpo", "ipo", "simpo", "orpo") and REFERENCE_OBJECTIVES == ("dpo", "ipo", "kto")
    assert PREFERENCE_DEFAULTS["simpo"] == {"beta": 2.0, "gamma_ratio": 0.5} and batch_unit("kto") == "labelled completions"
    from hfgpu.preference import PAIR_LOSSES

    assert set(PAIR_LOSSES) == set(PAIR_OBJECTIVES)  # every pair objective has its loss, and no loss lacks a record
    kto = objectives.objective("kto")
    assert (kto.sequences_per_example, kto.batch_sequences, kto.reference_passes) == (1, 2, 3.0)


def test_no_module_outside_the_registry_compares_an_objective_name_as_a_string():
    """`objective == "kto"`, `!= "sft"`: such comparisons are what the registry replaced (a record attribute says it)."""
    names = set(objectives.names())
    found = []
    for path in sorted((ROOT / "hfgpu").glob("*.py")):
        if path.name == "objectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                sides = [node.left, *node.comparators]
                named = any(isinstance(x, ast.Constant) and x.value in names for x in sides)
                about = any("objective" in ast.unparse(x) or "goal" in ast.unparse(x) for x in sides)
                if named and about:
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


TOY = """
import json, sys
from hfgpu import objectives
from hfgpu.objectives import Hyper, Objective
objectives.register(Objective(
    "hinge", "a hinge on the log-ratio margin (SLiC's form)", "preference", "prompt/chosen/rejected pairs", "pairs", 2, True, 1.0,
    "pair", hyper=(Hyper("beta", 0.5, "β: the margin's scale"),),
    reason="{paper}: each example is a prompt with a chosen and a rejected response ({sequences} sequences of seq_len)",
))
import torch
from hfgpu import preference
preference.PAIR_LOSSES["hinge"] = lambda c, r, len_c, len_r, beta, g: torch.relu(1 - beta * (c - r))
import hfgpu
from hfgpu.recipe import validate_recipe
from hfgpu.recipe_writer import ULTRAFEEDBACK, recipe_yaml
p = hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 4090", objective="hinge", strategy="lora")
recipe = recipe_yaml(p, ULTRAFEEDBACK)
r = json.loads(sys.argv[1])
result = hfgpu.finetune(validate_recipe(r), say=lambda *a, **k: None)
print(json.dumps({"reason": p.reasons["objective"], "unit": p.to_dict().get("global_batch_size"), "recipe": recipe,
                  "steps": result.metrics["steps"], "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, float)}}))
"""


def test_a_toy_pair_objective_is_one_record_and_its_loss(tiny_model_dir, tmp_path):
    import json

    from conftest import recipe_dict

    recipe = recipe_dict(
        tiny_model_dir,
        tmp_path / "hinge",
        objective="hinge",
        data={
            "path": str(DEMO / "style_pairs_train.jsonl"),
            "eval_path": str(DEMO / "style_pairs_eval.jsonl"),
            "format": "preference",
            "max_seq_len": 64,
        },
        eval={"metrics": []},
        train={"max_steps": 1, "global_batch_size": 4, "learning_rate": 1e-3},
    )
    r = subprocess.run(
        [sys.executable, "-c", TOY, json.dumps(recipe)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        timeout=limit(300),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["reason"].startswith("a hinge on the log-ratio margin (SLiC's form): each example is a prompt with a chosen")
    assert "; the reference: the base with the adapters disabled" in out["reason"]  # reference=True, LoRA
    assert "objective: hinge" in out["recipe"] and "beta: 0.5" in out["recipe"].replace("  ", " ").replace("  ", " ")
    assert out["steps"] == 1 and "eval_rewards/accuracy" in out["metrics"]
    card = (tmp_path / "hinge" / "README.md").read_text()
    assert "a hinge on the log-ratio margin" in card and "| preference | hinge, β=0.5 |" in card


def _imports(path) -> set[str]:
    """The hfgpu modules a module imports anywhere (inside functions too), but not under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for t in ast.walk(tree) if isinstance(t, ast.If) and "TYPE_CHECKING" in ast.unparse(t.test) for n in ast.walk(t)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hfgpu":
            found |= {f"hfgpu.{a.name}" for a in node.names} if node.module == "hfgpu" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hfgpu.")}
    return found


def test_no_import_cycle_among_hfgpu_modules():
    """Arrows point one way (export ⇄ hub opened by hfgpu.run, data ⇄ preference_data by hfgpu.tokenizing)."""
    modules = {f"hfgpu.{p.stem}": p for p in (ROOT / "hfgpu").glob("*.py")}
    graph = {m: {d for d in _imports(p) if d in modules and d != m} for m, p in modules.items()}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(graph[m]):
            visit(d)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, [" → ".join(c) for c in cycles]
