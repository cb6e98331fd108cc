"""The catalogue of bad input: every case exits 2 with one line on stderr that names the bad value and
what would be accepted, no traceback, and no file of an earlier run changed. Where a Python API
exists, it raises an HfgpuError with the same message."""

import hashlib

import pytest
import yaml

import hfgpu
from hfgpu.cli import main as hfgpu_main
from hfgpu.errors import HfgpuError
from hfgpu.finetune import finetune, main as finetune_main
from hfgpu.recipe import load_recipe, validate_recipe
from conftest import recipe_dict, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """An earlier finished run, and the bad files the cases point at."""
    root = tmp_path_factory.mktemp("bad")
    earlier = root / "earlier-run"
    finetune(validate_recipe(recipe_dict(tiny_model_dir, earlier, train={"max_steps": 2})), say=lambda *a, **k: None)
    (root / "broken-model").mkdir()
    (root / "broken-model" / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    (root / "empty.jsonl").write_text("")
    (root / "data.xml").write_text("<rows/>")
    write_jsonl(root / "robot.jsonl", [{"messages": [{"role": "robot", "content": "beep"}]}])
    (root / "broken.yaml").write_text("model: x\ndata: {path: [unclosed\n")
    (root / "a-file").write_text("not a folder")
    (root / "full-folder").mkdir()
    (root / "full-folder" / "keep.txt").write_text("mine")

    def recipe(name, **over):
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, root / f"out-{name}", **over)))
        return str(path)

    return {"root": root, "earlier": earlier, "recipe": recipe, "model": tiny_model_dir}


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


M = "Qwen/Qwen2.5-0.5B"

# (id, command, argv builder, words the one line must contain, Python API call or None)
CASES = [
    ("unknown-gpu", "hfgpu", lambda w: ["plan", M, "--gpu", "RTX 9999"], ["'RTX 9999'", "did you mean"], lambda w: hfgpu.plan(M, "RTX 9999")),
    ("zero-memory-gpu", "hfgpu", lambda w: ["plan", M, "--gpu", "0GB"], ["'0GB'", "must be positive"], lambda w: hfgpu.plan(M, "0GB")),
    ("empty-gpu", "hfgpu", lambda w: ["plan", M, "--gpu", " "], ["' '", "'RTX 3060', '12GB' or 'auto'"], lambda w: hfgpu.plan(M, " ")),
    ("gpu-auto-without-cuda", "hfgpu", lambda w: ["plan", M, "--gpu", "auto"], ["'auto'", "name your card"], lambda w: hfgpu.plan(M, "auto")),
    ("model-not-in-catalog-offline", "hfgpu", lambda w: ["plan", "nobody/nothing", "--gpu", "4090"], ["'nobody/nothing'", "pass that folder"], lambda w: hfgpu.plan("nobody/nothing", "4090")),
    ("model-path-missing", "hfgpu", lambda w: ["plan", "./no-such-model", "--gpu", "4090"], ["'./no-such-model'", "existing folder"], lambda w: hfgpu.plan("./no-such-model", "4090")),
    ("model-name-typo", "hfgpu", lambda w: ["plan", "qwen2.5-7", "--gpu", "4090"], ["'qwen2.5-7'", "did you mean 'Qwen/Qwen2.5-7B'"], lambda w: hfgpu.plan("qwen2.5-7", "4090")),
    ("malformed-config", "hfgpu", lambda w: ["plan", str(w["root"] / "broken-model"), "--gpu", "4090"], ["config.json", "not valid JSON"], lambda w: hfgpu.plan(str(w["root"] / "broken-model"), "4090")),
    ("seq-len-zero", "hfgpu", lambda w: ["plan", M, "--gpu", "4090", "--seq-len", "0"], ["seq_len=0", "≥ 1"], lambda w: hfgpu.plan(M, "4090", seq_len=0)),
    ("seq-len-too-long", "hfgpu", lambda w: ["plan", M, "--gpu", "4090", "--seq-len", "100000"], ["seq_len=100000", "≤ 32768"], lambda w: hfgpu.plan(M, "4090", seq_len=100000)),
    ("seq-len-not-a-number", "hfgpu", lambda w: ["plan", M, "--gpu", "4090", "--seq-len", "long"], ["'long'", "whole number or auto"], None),
    ("micro-batch-zero", "hfgpu", lambda w: ["plan", M, "--gpu", "4090", "--micro-batch-size", "0"], ["micro_batch_size=0", "≥ 1"], lambda w: hfgpu.plan(M, "4090", micro_batch_size=0)),
    ("strategy-typo", "hfgpu", lambda w: ["plan", M, "--gpu", "4090", "--strategy", "lorra"], ["'lorra'", "full, lora, qlora"], lambda w: hfgpu.plan(M, "4090", strategy="lorra")),
    ("bf16-on-turing", "hfgpu", lambda w: ["plan", M, "--gpu", "2080 Ti", "--precision", "bf16"], ["precision=bf16", "use precision fp16"], lambda w: hfgpu.plan(M, "2080 Ti", precision="bf16")),
    ("fa2-on-pascal", "hfgpu", lambda w: ["plan", M, "--gpu", "1080", "--attention", "flash_attention_2"], ["flash_attention_2", "use attention sdpa"], lambda w: hfgpu.plan(M, "1080", attention="flash_attention_2")),
    ("qlora-full-precision", "hfgpu", lambda w: ["plan", M, "--gpu", "4090", "--strategy", "qlora", "--quantization", "none"], ["quantization=none", "use quantization nf4"], lambda w: hfgpu.plan(M, "4090", strategy="qlora", quantization="none")),
    ("int8-on-pascal", "hfgpu", lambda w: ["plan", M, "--gpu", "1080", "--strategy", "lora", "--quantization", "int8"], ["quantization=int8", "strategy qlora"], lambda w: hfgpu.plan(M, "1080", strategy="lora", quantization="int8")),
    ("unknown-lora-target", "hfgpu", lambda w: ["plan", M, "--gpu", "4090", "--lora-targets", "q_proj,zz_proj"], ["zz_proj", "choose from"], lambda w: hfgpu.plan(M, "4090", lora_targets="q_proj,zz_proj")),
    ("lora-dropout-out-of-range", "hfgpu", lambda w: ["plan", M, "--gpu", "4090", "--lora-dropout", "1.5"], ["lora_dropout=1.5", "[0, 1)"], lambda w: hfgpu.plan(M, "4090", lora_dropout=1.5)),
    ("sharding-on-one-card", "hfgpu", lambda w: ["plan", M, "--gpu", "4090", "--distributed", "fsdp"], ["distributed=fsdp", "2x"], lambda w: hfgpu.plan(M, "4090", distributed="fsdp")),
    ("offloading-on-cpu", "hfgpu", lambda w: ["plan", M, "--gpu", "cpu", "--activation-offloading"], ["activation_offloading", "use activation_offloading false"], lambda w: hfgpu.plan(M, "cpu", activation_offloading=True)),
    ("offloading-without-checkpointing", "hfgpu", lambda w: ["plan", M, "--gpu", "4090", "--activation-offloading", "on", "--gradient-checkpointing", "off"], ["activation_offloading", "gradient_checkpointing true"], lambda w: hfgpu.plan(M, "4090", activation_offloading=True, gradient_checkpointing=False)),
    ("chunked-loss-maybe", "hfgpu", lambda w: ["plan", M, "--gpu", "4090", "--chunked-loss", "maybe"], ["'maybe'", "on, off or auto"], None),
    ("checkpointing-maybe", "hfgpu", lambda w: ["plan", M, "--gpu", "4090", "--gradient-checkpointing", "maybe"], ["'maybe'", "on, off or auto"], None),
    ("unknown-command", "hfgpu", lambda w: ["plna", M], ["'plna'", "choose from"], None),
    ("fit-negative-tokens", "hfgpu", lambda w: ["fit", M, "--tokens", "-5"], ["--tokens -5", "positive"], None),
    ("fit-zero-budget", "hfgpu", lambda w: ["fit", M, "--budget", "0"], ["--budget 0", "positive price"], None),
    ("recipe-missing", "finetune", lambda w: [str(w["root"] / "nope.yaml")], ["nope.yaml", "not found"], lambda w: load_recipe(w["root"] / "nope.yaml")),
    ("recipe-invalid-yaml", "finetune", lambda w: [str(w["root"] / "broken.yaml")], ["broken.yaml", "not valid YAML (line"], lambda w: load_recipe(w["root"] / "broken.yaml")),
    ("override-typo", "finetune", lambda w: [w["recipe"]("typo"), "train.epoch=2"], ["train.epoch", "did you mean 'epochs'"], lambda w: load_recipe(w["recipe"]("typo"), ["train.epoch=2"])),
    ("override-wrong-type", "finetune", lambda w: [w["recipe"]("type"), "train.learning_rate=fast"], ["train.learning_rate='fast'", "valid number"], lambda w: load_recipe(w["recipe"]("type"), ["train.learning_rate=fast"])),
    ("override-not-key-value", "finetune", lambda w: [w["recipe"]("kv"), "train.epochs"], ["'train.epochs'", "key=value"], lambda w: load_recipe(w["recipe"]("kv"), ["train.epochs"])),
    ("override-bad-choice", "finetune", lambda w: [w["recipe"]("choice"), "data.format=csv"], ["data.format='csv'", "'alpaca'"], None),
    ("data-missing", "finetune", lambda w: [w["recipe"]("nodata", data={"path": "nowhere.jsonl"})], ["'nowhere.jsonl'", "check data.path"], None),
    ("data-empty", "finetune", lambda w: [w["recipe"]("empty", data={"path": str(w["root"] / "empty.jsonl")})], ["empty.jsonl", "no rows"], None),
    ("data-extension", "finetune", lambda w: [w["recipe"]("xml", data={"path": str(w["root"] / "data.xml")})], ["'.xml'", ".jsonl"], None),
    ("data-misnamed-columns", "finetune", lambda w: [w["recipe"]("cols", data={"format": "prompt_completion"})], ["'prompt'", "data.columns.prompt"], None),
    ("data-unknown-columns-key", "finetune", lambda w: [w["recipe"]("colkey", data={"columns": {"answer": "output"}})], ["answer", "instruction, input, output"], None),
    ("chat-unknown-role", "finetune", lambda w: [w["recipe"]("robot", data={"path": str(w["root"] / "robot.jsonl"), "format": "chat", "eval_path": None})], ["'robot'", "assistant, system, tool, user"], None),
    ("output-dir-holds-a-run", "finetune", lambda w: [w["recipe"]("again"), f"output_dir={w['earlier']}"], ["already holds a run", "resume=auto", "overwrite=true"], None),
    ("output-dir-is-a-file", "finetune", lambda w: [w["recipe"]("file"), f"output_dir={w['root'] / 'a-file'}"], ["a-file", "is a file"], None),
    ("resume-without-checkpoints", "finetune", lambda w: [w["recipe"]("resume"), f"output_dir={w['earlier']}", "resume=auto"], ["no checkpoint to resume", "overwrite=true"], None),
    ("hub-repo-id-malformed", "finetune", lambda w: [w["recipe"]("hub"), "hub.repo_id=bad id"], ["'bad id'", "owner/name"], None),
    ("gpu-recipe-without-cuda", "finetune", lambda w: [w["recipe"]("gpu", gpu="RTX 4090")], ["GeForce RTX 4090", "gpu=cpu"], None),
    ("push-malformed-repo", "hfgpu", lambda w: ["push", str(w["earlier"]), "--repo-id", "not a repo"], ["'not a repo'", "owner/name"], lambda w: hfgpu_push(w["earlier"], "not a repo")),
    ("push-unfinished-run", "hfgpu", lambda w: ["push", str(w["root"]), "--repo-id", "me/x"], ["is not a finished hfgpu run", "output_dir"], lambda w: hfgpu_push(w["root"], "me/x")),
    ("push-without-token", "hfgpu", lambda w: ["push", str(w["earlier"]), "--repo-id", "me/x"], ["no Hugging Face token", "HF_TOKEN"], lambda w: hfgpu_push(w["earlier"], "me/x")),
    ("merge-into-non-empty", "hfgpu", lambda w: ["merge", str(w["earlier"]), "--out", str(w["root"] / "full-folder")], ["full-folder", "empty or new folder"], None),
    ("generate-zero-tokens", "hfgpu", lambda w: ["generate", str(w["earlier"]), "--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens 0", "at least 1"], None),
]


def hfgpu_push(run, repo):
    from hfgpu.hub import push

    return push(run, repo)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, world, capsys, monkeypatch):
    name, command, argv, words, api = case
    if name in ("gpu-auto-without-cuda", "gpu-recipe-without-cuda"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(world["root"])
    before = snapshot(world["earlier"])
    keep = (world["root"] / "full-folder" / "keep.txt").read_text()
    rc = (hfgpu_main if command == "hfgpu" else finetune_main)(argv(world))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("hfgpu:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert snapshot(world["earlier"]) == before
    assert (world["root"] / "full-folder" / "keep.txt").read_text() == keep
    if api is not None:
        with pytest.raises(HfgpuError) as e:
            api(world)
        assert lines[0] == f"hfgpu: error: {e.value}"


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 30
    assert issubclass(hfgpu.DoesNotFit, HfgpuError)
