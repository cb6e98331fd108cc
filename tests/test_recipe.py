import pytest
from conftest import ROOT

from hfgpu.errors import HfgpuError
from hfgpu.recipe import load_recipe, validate_recipe

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.data.path and recipe.output_dir


def test_overrides_are_type_checked_and_applied():
    r = load_recipe(
        ROOT / "recipes/demo_cpu.yaml",
        ["train.epochs=2", "data.packing=true", "train.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]"],
    )
    assert (
        r.train.epochs == 2 and r.data.packing is True and r.train.learning_rate == 1e-4 and r.lora.target_modules == ["q_proj", "v_proj"]
    )


def test_all_problems_at_once_with_did_you_mean():
    with pytest.raises(HfgpuError) as e:
        load_recipe(ROOT / "recipes/demo_cpu.yaml", ["train.epoch=2", "data.max_seq_len=long", "strategy=lorra", "data.formt=chat"])
    msg = str(e.value)
    assert "train.epoch: unknown key; did you mean 'epochs'?" in msg
    assert "data.formt: unknown key; did you mean 'format'?" in msg
    assert "data.max_seq_len='long'" in msg and "strategy='lorra'" in msg
    assert "\n" not in msg


def test_bad_recipe_files(tmp_path):
    with pytest.raises(HfgpuError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\ndata: [unclosed\n")
    with pytest.raises(HfgpuError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(HfgpuError, match="must be a YAML mapping"):
        load_recipe(bad)
    with pytest.raises(HfgpuError, match="data: required"):
        validate_recipe({"model": "x"})
    with pytest.raises(HfgpuError, match="is not key=value"):
        load_recipe(ROOT / "recipes/demo_cpu.yaml", ["train.epochs"])


def test_a_package_path_names_a_file_in_an_installed_package_or_says_how_to_install_it():
    from hfgpu.recipe import resolve_path

    assert resolve_path("package:hfgpu/resources/demo/dates_eval.jsonl").endswith("hfgpu/resources/demo/dates_eval.jsonl")
    with pytest.raises(HfgpuError, match="the Python package 'no_such_pkg_x' is not installed: pip install no-such-pkg-x"):
        resolve_path("package:no_such_pkg_x/model.gguf")
