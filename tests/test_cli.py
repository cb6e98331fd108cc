"""The `hfgpu` command as a user runs it: a subprocess, its stdout, stderr and exit code."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, limit


def hfgpu(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hfgpu", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=limit(120))


def test_plan_json_prints_exactly_one_object_and_exit_0_when_it_fits():
    r = hfgpu("plan", "Qwen/Qwen2.5-1.5B", "--gpu", "RTX 4090", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["fits"] is True and d["model"] == "Qwen/Qwen2.5-1.5B" and d["gpu"]["compute_capability"] == "8.9"
    assert d["memory"]["total"] <= d["memory"]["budget"]


def test_plan_flags_mirror_the_knobs(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, vocab_size=4000, max_position_embeddings=2048
    ).save_pretrained(tmp_path)
    r = hfgpu(
        "plan",
        str(tmp_path),
        "--gpu",
        "1080",
        "--strategy",
        "lora",
        "--seq-len",
        "1024",
        "--gradient-checkpointing",
        "on",
        "--micro-batch-size",
        "4",
        "--optimizer",
        "adamw_8bit",
        "--attention",
        "eager",
        "--lora-r",
        "8",
        "--lora-targets",
        "q_proj,v_proj",
        "--precision",
        "fp32",
        "--quantization",
        "none",
        "--lora-dropout",
        "0.05",
        "--chunked-loss",
        "--activation-offloading",
        "off",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (
        d["strategy"],
        d["seq_len"],
        d["gradient_checkpointing"],
        d["micro_batch_size"],
        d["grad_accum_steps"],
        d["optimizer"],
        d["attention"],
        d["precision"],
    ) == ("lora", 1024, True, 4, 4, "adamw_8bit", "eager", "fp32")
    assert d["lora"] == {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    assert (d["chunked_loss"], d["activation_offloading"]) == (True, False)
    assert "fixed by you" in d["reasons"]["chunked_loss"] and "fixed by you" in d["reasons"]["activation_offloading"]


def test_plan_that_does_not_fit_still_prints_the_plan_and_exits_3():
    r = hfgpu("plan", "meta-llama/Llama-3.1-8B", "--gpu", "GTX 1060 3GB", "--json")
    assert r.returncode == 3
    d = json.loads(r.stdout)
    assert d["fits"] is False and d["memory"]["total"] > d["memory"]["budget"] and d["alternatives"]
    table = hfgpu("plan", "meta-llama/Llama-3.1-8B", "--gpu", "GTX 1060 3GB")
    assert table.returncode == 3 and "DOES NOT FIT" in table.stdout and "What fits instead" in table.stdout


def test_plan_table_explains_every_knob():
    r = hfgpu("plan", "Qwen/Qwen2.5-7B", "--gpu", "RTX 3060", "--seq-len", "512")
    assert r.returncode == 0, r.stderr
    for word in ("strategy", "qlora", "gradient_checkpointing", "micro_batch_size", "total (peak)", "tokens/s", "ambiguous"):
        assert word in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["plan", "Qwen/Qwen2.5-0.5B", "--gpu", "RTX 9999"], "unknown GPU 'RTX 9999'"),
        (["plan", "nobody/nothing", "--gpu", "4090"], "not in hfgpu's offline catalog"),
        (["plan", "Qwen/Qwen2.5-0.5B", "--gpu", "4090", "--seq-len", "0"], "--seq-len 0 must be"),
        (["plan", "Qwen/Qwen2.5-0.5B", "--gpu", "4090", "--micro-batch-size", "0"], "--micro-batch-size 0"),
        (["plan", "Qwen/Qwen2.5-0.5B", "--gpu", "1080", "--attention", "flash_attention_2"], "flash_attention_2 needs compute capability"),
        (["plan", "Qwen/Qwen2.5-0.5B", "--gpu", "2080 Ti", "--precision", "bf16"], "use --precision fp16"),
        (["plan", "Qwen/Qwen2.5-0.5B", "--gpu", "4090", "--strategy", "qlora", "--quantization", "none"], "--strategy qlora quantizes"),
        (["plan", "Qwen/Qwen2.5-0.5B", "--gpu", "4090", "--gradient-checkpointing", "maybe"], "use on, off or auto"),
        (["plan", "Qwen/Qwen2.5-0.5B", "--gpu", "4090", "--seq-len", "long"], "whole number"),
        (["fit", "Qwen/Qwen2.5-0.5B", "--tokens", "-5"], "--tokens -5 must be positive"),
        (["plna", "x"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_exit_2_no_traceback(args, needle):
    r = hfgpu(*args)
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_malformed_config_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    r = hfgpu("plan", str(tmp_path), "--gpu", "4090")
    assert r.returncode == 2 and "not valid JSON" in r.stderr and "Traceback" not in r.stderr


def test_gpus_table_and_json():
    r = hfgpu("gpus")
    assert r.returncode == 0 and "GeForce RTX 4090" in r.stdout and "GeForce GTX 1080 Ti" in r.stdout
    cards = json.loads(hfgpu("gpus", "--json").stdout)
    assert len(cards) == 53 and {"name", "vram_gb", "compute_capability", "msrp_usd"} <= set(cards[0])


def test_fit_answers_which_card_to_buy():
    r = hfgpu("fit", "meta-llama/Llama-3.1-8B", "--seq-len", "1024", "--budget", "600", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    rows = {g["gpu"]: g for g in d["gpus"]}
    assert rows["GeForce RTX 4090"]["best_strategy"] in ("lora", "qlora") and rows["GeForce RTX 4090"]["hours_estimate"] > 0
    assert rows["GeForce GTX 1050 Ti"]["best_strategy"] is None
    assert sum(bool(g["cheapest_for"]) for g in d["gpus"]) >= 1
    fastest = [g for g in d["gpus"] if g["fastest_within_budget"]]
    assert len(fastest) == 1 and fastest[0]["launch_price_usd"] <= 600
    table = hfgpu("fit", "meta-llama/Llama-3.1-8B", "--seq-len", "1024")
    assert table.returncode == 0 and "cheapest" in table.stdout


@pytest.mark.slow
def test_runs_from_a_folder_that_holds_a_directory_named_hfgpu(tmp_path):
    """`python -m hfgpu …` puts the working directory first on sys.path, where a folder named hfgpu (a
    checkout's parent, an output folder) merges into a namespace package: shipped files still load."""
    import os
    import subprocess
    import sys

    (tmp_path / "hfgpu").mkdir()
    (tmp_path / "hfgpu" / "notes.txt").write_text("mine")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hfgpu.finetune",
            str(ROOT / "recipes" / "demo_cpu.yaml"),
            f"output_dir={tmp_path / 'out'}",
            "train.max_steps=1",
            "train.eval_every=null",
            "data.eval_path=null",
            "eval.metrics=[]",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=limit(300),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()  # the recipe's hfgpu: paths resolved to the package


def test_the_speed_of_several_cards_says_total_and_per_card():
    import hfgpu
    from hfgpu.report import speed_line

    one, two = hfgpu.plan("Qwen/Qwen2.5-3B", "RTX 3090"), hfgpu.plan("Qwen/Qwen2.5-3B", "2x RTX 3090")
    assert "per card" not in speed_line(one)
    total = two.tokens_per_second_estimate
    assert f"~{total:,.0f} tokens/s in total over 2 cards (~{total / 2:,.0f} per card)" in speed_line(two)


def test_bitsandbytes_optional_cpu_kernel_notice_is_hidden_and_other_library_warnings_are_not(caplog):
    """bitsandbytes logs, at import on an AVX512-BF16 CPU, that its optional Hub kernel could not be loaded (its own
    fallback computes the op): a command hides that one line unless HFGPU_WARNINGS=1, and nothing else it logs."""
    import importlib.util
    import logging

    import bitsandbytes.backends.cpu.ops as cpu_ops

    from hfgpu.errors import run_command

    def body() -> int:
        cpu_ops.logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        cpu_ops.logger.warning("another bitsandbytes warning")
        logging.getLogger("kernels._internals.hf_hub").warning(
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode."
        )
        return 0

    assert cpu_ops.logger.name == "bitsandbytes.backends.cpu.ops"  # the loggers hfgpu filters are the ones they log on
    if importlib.util.find_spec("kernels"):  # transformers ≥ 5.25 installs it
        from kernels._internals import hf_hub

        assert hf_hub.logger.name == "kernels._internals.hf_hub"
    caplog.clear()  # what importing bitsandbytes logged on this CPU
    try:
        assert run_command(body) == 0
        said = [r.getMessage() for r in caplog.records]
        assert said == ["another bitsandbytes warning"]
    finally:
        for logger in (cpu_ops.logger, logging.getLogger("kernels._internals.hf_hub")):
            for f in list(logger.filters):
                logger.removeFilter(f)
    caplog.clear()
    cpu_ops.logger.warning("Failed to load CPU gemm_4bit_forward: shown outside hfgpu's commands")
    assert len(caplog.records) == 1


@pytest.mark.slow
def test_the_python_api_hides_the_same_library_notices_as_the_command_line(tmp_path):
    """hfgpu.finetune(...) with gradient checkpointing: transformers' FutureWarning (peft calls the deprecated name)
    is hidden as on the command line, and shown with HFGPU_WARNINGS=1; the filters do not outlive the call."""
    import subprocess
    import sys

    from conftest import ROOT, limit

    code = (
        "import warnings, hfgpu\n"
        f"r = hfgpu.load_recipe('recipes/demo_cpu.yaml', ['output_dir={tmp_path / 'run'}', 'train.max_steps=2', 'overwrite=true', "
        "'gradient_checkpointing=true', 'eval.metrics=[]'])\n"
        "hfgpu.finetune(r, say=lambda *a, **k: None)\n"
        "warnings.warn('the caller own FutureWarning', FutureWarning)\n"
    )
    for shown in ("0", "1"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HFGPU_WARNINGS": shown}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=limit(300))
        assert r.returncode == 0, r.stderr[-2000:]
        assert ("is_gradient_checkpointing` is deprecated" in r.stderr) == (shown == "1"), r.stderr[-2000:]
        assert "the caller own FutureWarning" in r.stderr  # the user's own warnings, after the call, are theirs
