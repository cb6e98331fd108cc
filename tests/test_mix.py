"""data.mix: several datasets, each with its own format, columns and share, mixed deterministically, counted and
evaluated per source."""

import json

import pytest
from conftest import DEMO, recipe_dict, write_jsonl

from hfgpu.data import IGNORE, mix_counts, prepare_data, tokenized_fingerprint
from hfgpu.errors import HfgpuError
from hfgpu.finetune import finetune
from hfgpu.recipe import MixSource, validate_recipe

CAPITALS = str(DEMO / "capitals_train.jsonl")


@pytest.fixture(scope="module")
def sums(tmp_path_factory):
    """A prompt/completion set (another format than the capitals' alpaca), with its own column names."""
    path = tmp_path_factory.mktemp("sums") / "sums.jsonl"
    rows = [{"question": f"{a} plus {b} is", "answer": f" {a + b}"} for a in range(6) for b in range(5)]
    return str(write_jsonl(path, rows))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def sums_source(sums, **amount):
    """The sums as a data.mix entry: its own format and column names."""
    return {
        "path": sums,
        "name": "sums",
        "format": "prompt_completion",
        "columns": {"prompt": "question", "completion": "answer"},
        **amount,
    }


def data_cfg(sums, **over):
    mix = [{"path": CAPITALS, "weight": 2}, sums_source(sums, weight=1)]
    raw = recipe_dict("unused", "unused", data={"path": None, "eval_path": None, "mix": mix, **over})
    return validate_recipe(raw).data


def test_shares_follow_the_weights_without_repeating_and_samples_are_exact():
    src = lambda **k: MixSource(path="x", **k)  # noqa: E731
    assert mix_counts([100, 30], [src(weight=2), src(weight=1)]) == [60, 30]  # the scarcer source sets the size
    assert mix_counts([100, 30], [src(weight=1), src(weight=1)]) == [30, 30]
    assert mix_counts([100, 30], [src(), src(samples=50)]) == [100, 50]  # all of one, 50 of the other (repeated)
    assert mix_counts([100, 30, 7], [src(weight=3), src(weight=1), src(samples=5)]) == [90, 30, 5]


def test_each_source_keeps_its_format_and_the_mixture_is_the_same_every_run(sums, tokenizer):
    cfg = data_cfg(sums)
    a = prepare_data(cfg, tokenizer, 128, 2)
    b = prepare_data(cfg, tokenizer, 128, 2)
    assert tokenized_fingerprint(a.train) == tokenized_fingerprint(b.train)  # seeded: resumes see the same examples
    sources = {s["name"]: s for s in a.stats["sources"]}
    assert sources["sums"]["used"] == 30 and sources["capitals_train"]["used"] == 60 and len(a.train) == 90
    decoded = [tokenizer.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != IGNORE]) for ex in a.train]
    prompts = [tokenizer.decode(ex["input_ids"]) for ex in a.train]
    # the sums learn only their answer (prompt_completion with renamed columns); the capitals their alpaca output
    assert sum("plus" in p for p in prompts) == 30 and not any("plus" in d for d in decoded)
    assert sum("### Response:" in p for p in prompts) == 60 and not any("### Response:" in d for d in decoded)
    first_half = [("plus" in p) for p in prompts[:45]]
    assert 0 < sum(first_half) < 45  # shuffled together, not one source after the other


def test_a_mixed_run_reports_each_source_and_evaluates_each(sums, tiny_model_dir, tmp_path):
    mix = [{"path": CAPITALS, "weight": 1}, sums_source(sums, samples=40)]
    said = []
    raw = recipe_dict(
        tiny_model_dir,
        tmp_path / "mixed",
        data={"path": None, "eval_path": None, "mix": mix, "eval_fraction": 0.2},
        train={"max_steps": 12, "eval_every": 12},
    )
    res = finetune(validate_recipe(raw), say=lambda *a, **k: said.append(" ".join(map(str, a))))
    text = "\n".join(said)
    assert "sums: 40 of its 24 examples (repeated ×1.67), 6 eval examples" in text, text
    rows = [json.loads(line) for line in (res.output_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval_loss" in r][-1]
    assert {"eval_loss/capitals_train", "eval_loss/sums", "eval_token_accuracy/sums"} <= set(last)
    first = rows[0]
    assert last["eval_loss/sums"] < first["eval_loss/sums"] and last["eval_loss"] < first["eval_loss"]
    # the overall loss is the token-weighted mean of the sources'
    assert (
        min(last["eval_loss/sums"], last["eval_loss/capitals_train"])
        <= last["eval_loss"]
        <= max(last["eval_loss/sums"], last["eval_loss/capitals_train"])
    )


@pytest.mark.parametrize(
    "data,message",
    [
        ({"mix": [{"path": CAPITALS}]}, "data.path and data.mix both name the training data: keep one"),
        ({"path": None, "mix": [{"path": CAPITALS, "weight": -1}]}, "data.mix.0.weight=-1: input should be greater than 0"),
        ({"path": None, "mix": [{"path": CAPITALS, "weight": 1, "samples": 5}]}, "weight=1 and samples=5 both size"),
        ({"path": None, "mix": [{"path": CAPITALS, "samples": 0}]}, "data.mix.0.samples=0: input should be greater than or equal to 1"),
        ({"path": None, "mix": [{"path": CAPITALS}], "split": "train[:50%]"}, "data.split with data.mix: give each dataset its own split"),
        ({"path": None, "mix": [{"path": CAPITALS}, {"path": CAPITALS}]}, "are called 'capitals_train': give one a name"),
        ({"path": None, "mix": []}, "data.mix"),
    ],
)
def test_a_bad_mixture_is_refused_in_one_line(data, message):
    raw = recipe_dict("m", "o", data={"eval_path": None, **data})
    with pytest.raises(HfgpuError) as e:
        validate_recipe(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_source_in_another_format_without_its_own_format_names_the_key(sums, tokenizer):
    cfg = data_cfg(sums)
    cfg.mix[1].format = None  # the sums are prompt/completion rows, read as alpaca (data.format)
    cfg.mix[1].columns = None
    with pytest.raises(
        HfgpuError,
        match=r"data\.mix\[1\] .* for format 'alpaca' .*: set data\.mix\[1\]\.format \(it is alpaca\), "
        r"or set data\.mix\[1\]\.columns\.instruction",
    ):
        prepare_data(cfg, tokenizer, 128, 2)
