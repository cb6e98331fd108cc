"""The knob record is the one list: plan()'s keywords, the CLI flags, the recipe keys, plan.json, the
README table and the settings the model and loop take all come from it, and errors name a knob the way
the user typed it."""

import inspect
from pathlib import Path

import pytest

import hfgpu
from hfgpu.cli import build_parser
from hfgpu.cli import main as hfgpu_main
from hfgpu.errors import HfgpuError
from hfgpu.knobs import KNOB_FIELDS, KNOB_NAMES, Knobs, cli_flag, markdown_table, recipe_key
from hfgpu.recipe import Recipe, get_key, validate_recipe

ROOT = Path(__file__).resolve().parents[1]
M = "Qwen/Qwen2.5-0.5B"


def _plan_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["plan"]


def _recipe(**over):
    return validate_recipe({"model": M, "gpu": "RTX 4090", "data": {"path": "x.jsonl"}, **over})


@pytest.mark.parametrize("name", KNOB_NAMES)
def test_every_knob_is_a_keyword_a_flag_and_a_recipe_key_with_one_default_and_one_help(name):
    f = next(f for f in KNOB_FIELDS if f.name == name)
    assert inspect.signature(hfgpu.plan).parameters[name].default == f.default
    action = next(a for a in _plan_parser()._actions if cli_flag(name) in a.option_strings)
    assert action.default == f.default and action.help.replace("%%", "%") == f.metadata["help"]
    *section, leaf = recipe_key(name).split(".")
    schema = Recipe if not section else Recipe.model_fields[section[0]].annotation
    field = schema.model_fields[leaf]
    assert field.description == f.metadata["help"]
    default = get_key(_recipe(), recipe_key(name))
    assert default == f.default or (name == "seq_len" and default == "auto")


def test_the_readme_table_is_the_record():
    assert markdown_table() in (ROOT / "README.md").read_text()


def test_a_plan_carries_the_resolved_record_and_what_was_fixed():
    p = hfgpu.plan(M, "RTX 4090", strategy="lora", seq_len=512, lora_targets="q_proj,v_proj")
    assert "auto" not in [getattr(p.knobs, n) for n in KNOB_NAMES]
    assert p.fixed == Knobs(strategy="lora", seq_len=512, lora_targets=("q_proj", "v_proj"))
    assert (p.strategy, p.seq_len, p.lora.target_modules) == ("lora", 512, ("q_proj", "v_proj"))
    d = p.to_dict()
    assert d["lora"]["target_modules"] == ["q_proj", "v_proj"] and d["seq_len"] == 512
    assert set(KNOB_NAMES) - {n for n in KNOB_NAMES if n.startswith("lora_")} <= set(d)


def test_model_settings_and_the_loop_config_are_derived_from_the_plan():
    from hfgpu.modeling import ModelSettings
    from hfgpu.train import LoopConfig

    p = hfgpu.plan(M, "RTX 4060", strategy="qlora", seq_len=4096, gradient_checkpointing=True, activation_offloading=True, lora_r=8)
    s = ModelSettings.from_plan(p)
    assert (s.strategy, s.quantization, s.gradient_checkpointing, s.lora_r, s.lora_alpha, s.tiled_mlp) == (
        "qlora",
        p.quantization,
        True,
        8,
        16,
        p.tiled_mlp,
    )
    loop = LoopConfig.from_plan(p, _recipe(train={"learning_rate": 1e-4, "max_steps": 3}))
    assert (loop.micro_batch_size, loop.grad_accum_steps, loop.optimizer, loop.activation_offloading) == (
        p.micro_batch_size,
        p.grad_accum_steps,
        p.optimizer,
        True,
    )
    assert loop.learning_rate == 1e-4 and loop.max_steps == 3 and (loop.loss_chunk is not None) == p.chunked_loss


def test_a_resolved_recipe_plans_to_the_same_knobs():
    from hfgpu.finetune import plan_for, resolved

    r = _recipe(strategy="lora", data={"path": "x.jsonl", "max_seq_len": 1024})
    p = plan_for(r)
    again = plan_for(resolved(r, p))
    assert again.knobs == p.knobs
    assert get_key(resolved(r, p), "train.grad_accum_steps") == p.grad_accum_steps


@pytest.mark.parametrize(
    "surface,expected",
    [
        ("python", "seq_len=100000 is beyond"),
        ("cli", "--seq-len 100000 is beyond"),
        ("recipe", "data.max_seq_len=100000 is beyond"),
    ],
)
def test_an_error_names_the_knob_as_the_user_typed_it(surface, expected, capsys):
    if surface == "python":
        with pytest.raises(HfgpuError) as e:
            hfgpu.plan(M, "RTX 4090", seq_len=100_000)
        msg = str(e.value)
    elif surface == "cli":
        assert hfgpu_main(["plan", M, "--gpu", "RTX 4090", "--seq-len", "100000"]) == 2
        msg = capsys.readouterr().err
    else:
        from hfgpu.finetune import plan_for

        with pytest.raises(HfgpuError) as e:
            plan_for(_recipe(data={"path": "x.jsonl", "max_seq_len": 100_000}))
        msg = str(e.value)
    assert expected in msg
    fix = {"python": "use seq_len ≤ 32768", "cli": "use --seq-len ≤ 32768", "recipe": "use data.max_seq_len ≤ 32768"}[surface]
    assert fix in msg


def test_what_fits_instead_is_named_on_the_users_surface(capsys):
    assert hfgpu_main(["plan", "Qwen/Qwen2.5-7B", "--gpu", "RTX 4090", "--strategy", "full"]) == 3
    assert "--strategy lora fits" in capsys.readouterr().out


def test_an_unknown_keyword_says_did_you_mean():
    with pytest.raises(HfgpuError, match=r"no knob 'lora_rank': did you mean 'lora_r'"):
        hfgpu.plan(M, "RTX 4090", lora_rank=8)
    with pytest.raises(HfgpuError, match=r"no knob 'offload'"):
        Knobs.from_kwargs({"offload": True})


def test_finetune_help_describes_every_recipe_key():
    import subprocess
    import sys

    from hfgpu.recipe import _submodel

    out = subprocess.run([sys.executable, "-m", "hfgpu.finetune", "--help"], capture_output=True, text=True, check=True).stdout

    def keys(model, prefix=""):
        for name, f in model.model_fields.items():
            assert f.description, f"{prefix}{name} has no description"
            sub = _submodel(f.annotation)
            yield f"{prefix}{name}"
            if sub is not None and name != "early_stopping":
                yield from keys(sub, f"{prefix}{name}.")

    for key in keys(Recipe):
        assert f"\n{key} (" in out or f" {key} (" in out or f"{key}:" in out, key


def test_fit_names_the_flag_too(capsys):
    assert hfgpu_main(["fit", M, "--seq-len", "100000"]) == 2
    assert "--seq-len 100000 is beyond" in capsys.readouterr().err
