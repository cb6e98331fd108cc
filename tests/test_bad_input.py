"""The catalogue of bad input: every case exits 2 with one line on stderr that names the bad value and
what would be accepted, no traceback, and no file of an earlier run changed. Where a Python API
exists, it raises an HfgpuError with the same message."""

import hashlib
import json
import os
import re
import shutil

import pytest
import yaml
from conftest import DEMO, limit, recipe_dict, tiny_llama, write_jsonl

import hfgpu
from hfgpu.cli import main as hfgpu_main
from hfgpu.errors import HfgpuError
from hfgpu.finetune import RunLock, finetune
from hfgpu.finetune import main as finetune_main
from hfgpu.recipe import load_recipe, validate_recipe


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

    # a run stopped after its last checkpoint (steps 2 and 4 saved), and a copy whose newest checkpoint is damaged
    stopped = root / "stopped-run"
    finetune(
        validate_recipe(recipe_dict(tiny_model_dir, stopped, train={"max_steps": 4, "save_every": 2, "keep_last": 3})),
        say=lambda *a, **k: None,
    )
    for name in ("final_metrics.json", "adapter_model.safetensors", "adapter_config.json", "loss.png"):
        (stopped / name).unlink()
    damaged = root / "damaged-run"
    shutil.copytree(stopped, damaged)
    opt = damaged / "checkpoints" / "step-0000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    (root / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": "e\n')
    good = '{"instruction": "Capital of Peru?", "output": "Lima"}\n'
    (root / "list-row.jsonl").write_text(good * 32 + '["Paris", "France"]\n' + good)
    (root / "dup-key.jsonl").write_text('{"instruction": "Capital?", "output": "Old", "output": "City"}\n' + good * 3)
    (root / "ragged.csv").write_text("instruction,output\n" + "Capital of Peru?,Lima\n" * 3 + "Capital of France?,Paris, France\n")
    (root / "latin1.jsonl").write_bytes(
        '{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "d"}\n'.encode("latin-1")
    )
    write_jsonl(
        root / "pc-rows.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)] + [{"instruction": "x", "output": "y"}]
    )
    write_jsonl(root / "list-completions.jsonl", [{"prompt": f"q{i}", "completion": [f"a{i}"]} for i in range(3)])
    write_jsonl(
        root / "image-chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                    {"role": "assistant", "content": "a cat"},
                ]
            }
        ]
        * 3,
    )
    write_jsonl(root / "empty-completions.jsonl", [{"prompt": f"q{i}", "completion": ""} for i in range(3)])
    write_jsonl(
        root / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Capital of Peru?"},
                    {"role": "assistant", "content": "Lima"},
                    {"role": "user", "content": "And Chile?"},
                    {"role": "assistant", "content": "Santiago"},
                ]
            }
        ],
    )
    edited = [json.loads(line) for line in (DEMO / "capitals_train.jsonl").read_text().splitlines()]
    edited[0]["output"] = "Somewhere else"
    write_jsonl(root / "edited.jsonl", edited)
    noeos = root / "no-eos-model"
    shutil.copytree(tiny_model_dir, noeos)
    cfg = json.loads((noeos / "tokenizer_config.json").read_text())
    for key in ("eos_token", "pad_token", "bos_token"):
        cfg.pop(key, None)
    (noeos / "tokenizer_config.json").write_text(json.dumps(cfg))
    heads = root / "bad-heads"
    heads.mkdir()
    (heads / "config.json").write_text(json.dumps({**tiny_llama().to_dict(), "hidden_size": 65}))
    (root / "dup.yaml").write_text(f"model: {tiny_model_dir}\ndata: {{path: x.jsonl}}\ntrain: {{epochs: 1}}\ntrain: {{max_steps: 3}}\n")
    (root / "bomb.yaml").write_text(
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
        + "".join(f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
        + "model: *i\ndata: {path: x.jsonl}\n"
    )
    (root / "huge-value.yaml").write_text(f"model: {tiny_model_dir}\ndata: {{path: x.jsonl}}\nmicro_batch_size: {'x' * 5000}\n")
    (root / "recipe-latin1.yaml").write_bytes("model: caf\xe9\n".encode("latin-1"))
    pair = lambda c, r: {"prompt": "Q?", "chosen": c, "rejected": r}  # noqa: E731
    write_jsonl(root / "pairs-identical.jsonl", [pair(" same", " same") for _ in range(4)])
    write_jsonl(root / "pairs-empty.jsonl", [pair(" ", " no") for _ in range(4)])
    write_jsonl(root / "pairs-no-rejected.jsonl", [{"prompt": "Q?", "chosen": " yes"} for _ in range(4)])
    write_jsonl(
        root / "kto-labels.jsonl",
        [{"prompt": "Q?", "completion": " a", "label": True}, {"prompt": "Q?", "completion": " b", "label": "yes"}],
    )
    locked = root / "locked-run"
    lock = RunLock(locked).acquire()  # held by this process for the module: another run on it is refused

    def recipe(name, **over):
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, root / f"out-{name}", **over)))
        return str(path)

    yield {"root": root, "earlier": earlier, "recipe": recipe, "model": tiny_model_dir, "stopped": stopped, "damaged": damaged}
    lock.release()


QWEN3_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n{{ m['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _resume_stopped(w, name, *overrides):
    return [w["recipe"](name), f"output_dir={w['stopped']}", "resume=auto", *overrides]


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


M = "Qwen/Qwen2.5-0.5B"

# (id, command, argv builder, words the one line must contain, Python API call or None)
CASES = [
    (
        "unknown-gpu",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "RTX 9999"],
        ["'RTX 9999'", "did you mean"],
        lambda w: hfgpu.plan(M, "RTX 9999"),
    ),
    ("zero-memory-gpu", "hfgpu", lambda w: ["plan", M, "--gpu", "0GB"], ["'0GB'", "must be positive"], lambda w: hfgpu.plan(M, "0GB")),
    ("empty-gpu", "hfgpu", lambda w: ["plan", M, "--gpu", " "], ["' '", "'RTX 3060', '12GB' or 'auto'"], lambda w: hfgpu.plan(M, " ")),
    (
        "gpu-auto-without-cuda",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "auto"],
        ["'auto'", "name your card"],
        lambda w: hfgpu.plan(M, "auto"),
    ),
    (
        "model-not-in-catalog-offline",
        "hfgpu",
        lambda w: ["plan", "nobody/nothing", "--gpu", "4090"],
        ["'nobody/nothing'", "pass that folder"],
        lambda w: hfgpu.plan("nobody/nothing", "4090"),
    ),
    (
        "model-path-missing",
        "hfgpu",
        lambda w: ["plan", "./no-such-model", "--gpu", "4090"],
        ["'./no-such-model'", "existing folder"],
        lambda w: hfgpu.plan("./no-such-model", "4090"),
    ),
    (
        "model-name-typo",
        "hfgpu",
        lambda w: ["plan", "qwen2.5-7", "--gpu", "4090"],
        ["'qwen2.5-7'", "did you mean 'Qwen/Qwen2.5-7B'"],
        lambda w: hfgpu.plan("qwen2.5-7", "4090"),
    ),
    (
        "malformed-config",
        "hfgpu",
        lambda w: ["plan", str(w["root"] / "broken-model"), "--gpu", "4090"],
        ["config.json", "not valid JSON"],
        lambda w: hfgpu.plan(str(w["root"] / "broken-model"), "4090"),
    ),
    (
        "seq-len-zero",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--seq-len", "0"],
        ["--seq-len 0", "≥ 1"],
        lambda w: hfgpu.plan(M, "4090", seq_len=0),
    ),
    (
        "seq-len-too-long",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--seq-len", "100000"],
        ["--seq-len 100000", "use --seq-len ≤ 32768"],
        lambda w: hfgpu.plan(M, "4090", seq_len=100000),
    ),
    (
        "seq-len-not-a-number",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--seq-len", "long"],
        ["'long'", "whole number or auto"],
        None,
    ),
    (
        "micro-batch-zero",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--micro-batch-size", "0"],
        ["--micro-batch-size 0", "≥ 1"],
        lambda w: hfgpu.plan(M, "4090", micro_batch_size=0),
    ),
    (
        "strategy-typo",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--strategy", "lorra"],
        ["--strategy lorra", "full, lora, qlora"],
        lambda w: hfgpu.plan(M, "4090", strategy="lorra"),
    ),
    (
        "bf16-on-turing",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "2080 Ti", "--precision", "bf16"],
        ["--precision bf16", "use --precision fp16"],
        lambda w: hfgpu.plan(M, "2080 Ti", precision="bf16"),
    ),
    (
        "fa2-on-pascal",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "1080", "--attention", "flash_attention_2"],
        ["--attention flash_attention_2", "use --attention sdpa"],
        lambda w: hfgpu.plan(M, "1080", attention="flash_attention_2"),
    ),
    (
        "qlora-full-precision",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--strategy", "qlora", "--quantization", "none"],
        ["--quantization none", "use --quantization nf4"],
        lambda w: hfgpu.plan(M, "4090", strategy="qlora", quantization="none"),
    ),
    (
        "int8-on-pascal",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "1080", "--strategy", "lora", "--quantization", "int8"],
        ["--quantization int8", "use --strategy qlora"],
        lambda w: hfgpu.plan(M, "1080", strategy="lora", quantization="int8"),
    ),
    (
        "unknown-lora-target",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--lora-targets", "q_proj,zz_proj"],
        ["--lora-targets zz_proj", "choose from"],
        lambda w: hfgpu.plan(M, "4090", lora_targets="q_proj,zz_proj"),
    ),
    (
        "lora-dropout-out-of-range",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--lora-dropout", "1.5"],
        ["--lora-dropout 1.5", "[0, 1)"],
        lambda w: hfgpu.plan(M, "4090", lora_dropout=1.5),
    ),
    (
        "sharding-on-one-card",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--distributed", "fsdp"],
        ["--distributed fsdp", "2x"],
        lambda w: hfgpu.plan(M, "4090", distributed="fsdp"),
    ),
    (
        "offloading-on-cpu",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "cpu", "--activation-offloading"],
        ["--activation-offloading on", "use --activation-offloading off"],
        lambda w: hfgpu.plan(M, "cpu", activation_offloading=True),
    ),
    (
        "offloading-without-checkpointing",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--activation-offloading", "on", "--gradient-checkpointing", "off"],
        ["--activation-offloading on", "set --gradient-checkpointing on"],
        lambda w: hfgpu.plan(M, "4090", activation_offloading=True, gradient_checkpointing=False),
    ),
    (
        "chunked-loss-maybe",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--chunked-loss", "maybe"],
        ["'maybe'", "on, off or auto"],
        None,
    ),
    (
        "checkpointing-maybe",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--gradient-checkpointing", "maybe"],
        ["'maybe'", "on, off or auto"],
        None,
    ),
    ("unknown-command", "hfgpu", lambda w: ["plna", M], ["'plna'", "choose from"], None),
    ("fit-negative-tokens", "hfgpu", lambda w: ["fit", M, "--tokens", "-5"], ["--tokens -5", "positive"], None),
    ("fit-zero-budget", "hfgpu", lambda w: ["fit", M, "--budget", "0"], ["--budget 0", "positive price"], None),
    (
        "recipe-missing",
        "finetune",
        lambda w: [str(w["root"] / "nope.yaml")],
        ["nope.yaml", "not found"],
        lambda w: load_recipe(w["root"] / "nope.yaml"),
    ),
    (
        "recipe-invalid-yaml",
        "finetune",
        lambda w: [str(w["root"] / "broken.yaml")],
        ["broken.yaml", "not valid YAML (line"],
        lambda w: load_recipe(w["root"] / "broken.yaml"),
    ),
    (
        "override-typo",
        "finetune",
        lambda w: [w["recipe"]("typo"), "train.epoch=2"],
        ["train.epoch", "did you mean 'epochs'"],
        lambda w: load_recipe(w["recipe"]("typo"), ["train.epoch=2"]),
    ),
    (
        "override-wrong-type",
        "finetune",
        lambda w: [w["recipe"]("type"), "train.learning_rate=fast"],
        ["train.learning_rate='fast'", "valid number"],
        lambda w: load_recipe(w["recipe"]("type"), ["train.learning_rate=fast"]),
    ),
    (
        "override-not-key-value",
        "finetune",
        lambda w: [w["recipe"]("kv"), "train.epochs"],
        ["'train.epochs'", "key=value"],
        lambda w: load_recipe(w["recipe"]("kv"), ["train.epochs"]),
    ),
    ("override-bad-choice", "finetune", lambda w: [w["recipe"]("choice"), "data.format=csv"], ["data.format='csv'", "'alpaca'"], None),
    (
        "data-missing",
        "finetune",
        lambda w: [w["recipe"]("nodata", data={"path": "nowhere.jsonl"})],
        ["'nowhere.jsonl'", "check data.path"],
        None,
    ),
    (
        "data-empty",
        "finetune",
        lambda w: [w["recipe"]("empty", data={"path": str(w["root"] / "empty.jsonl")})],
        ["empty.jsonl", "no rows"],
        None,
    ),
    ("data-extension", "finetune", lambda w: [w["recipe"]("xml", data={"path": str(w["root"] / "data.xml")})], ["'.xml'", ".jsonl"], None),
    (
        "data-misnamed-columns",
        "finetune",
        lambda w: [w["recipe"]("cols", data={"format": "prompt_completion"})],
        ["'prompt'", "data.columns.prompt"],
        None,
    ),
    (
        "data-unknown-columns-key",
        "finetune",
        lambda w: [w["recipe"]("colkey", data={"columns": {"answer": "output"}})],
        ["answer", "instruction, input, output"],
        None,
    ),
    (
        "chat-unknown-role",
        "finetune",
        lambda w: [w["recipe"]("robot", data={"path": str(w["root"] / "robot.jsonl"), "format": "chat", "eval_path": None})],
        ["'robot'", "assistant, system, tool, user"],
        None,
    ),
    (
        "output-dir-holds-a-run",
        "finetune",
        lambda w: [w["recipe"]("again"), f"output_dir={w['earlier']}"],
        ["already holds a run", "resume=auto", "overwrite=true"],
        None,
    ),
    (
        "output-dir-is-a-file",
        "finetune",
        lambda w: [w["recipe"]("file"), f"output_dir={w['root'] / 'a-file'}"],
        ["a-file", "is a file"],
        None,
    ),
    (
        "resume-without-checkpoints",
        "finetune",
        lambda w: [w["recipe"]("resume"), f"output_dir={w['earlier']}", "resume=auto"],
        ["no checkpoint to resume", "overwrite=true"],
        None,
    ),
    ("hub-repo-id-malformed", "finetune", lambda w: [w["recipe"]("hub"), "hub.repo_id=bad id"], ["'bad id'", "owner/name"], None),
    ("gpu-recipe-without-cuda", "finetune", lambda w: [w["recipe"]("gpu", gpu="RTX 4090")], ["GeForce RTX 4090", "gpu=cpu"], None),
    (
        "push-malformed-repo",
        "hfgpu",
        lambda w: ["push", str(w["earlier"]), "--repo-id", "not a repo"],
        ["'not a repo'", "owner/name"],
        lambda w: hfgpu_push(w["earlier"], "not a repo"),
    ),
    (
        "push-unfinished-run",
        "hfgpu",
        lambda w: ["push", str(w["root"]), "--repo-id", "me/x"],
        ["is not a finished hfgpu run", "output_dir"],
        lambda w: hfgpu_push(w["root"], "me/x"),
    ),
    (
        "push-without-token",
        "hfgpu",
        lambda w: ["push", str(w["earlier"]), "--repo-id", "me/x"],
        ["no Hugging Face token", "HF_TOKEN"],
        lambda w: hfgpu_push(w["earlier"], "me/x"),
    ),
    (
        "merge-into-non-empty",
        "hfgpu",
        lambda w: ["merge", str(w["earlier"]), "--out", str(w["root"] / "full-folder")],
        ["full-folder", "empty or new folder"],
        None,
    ),
    (
        "generate-zero-tokens",
        "hfgpu",
        lambda w: ["generate", str(w["earlier"]), "--prompt", "hi", "--max-new-tokens", "0"],
        ["--max-new-tokens 0", "at least 1"],
        None,
    ),
    # --- faults, drift, locks, malformed rows (issue 13) ---
    (
        "data-broken-json-line",
        "finetune",
        lambda w: [w["recipe"]("broken", data={"path": str(w["root"] / "broken.jsonl")})],
        ["broken.jsonl' line 3", "not valid JSON", "fix or remove that line"],
        None,
    ),
    (
        "eval-data-broken-json-line",
        "finetune",
        lambda w: [w["recipe"]("evalbroken", data={"eval_path": str(w["root"] / "broken.jsonl")})],
        ["broken.jsonl' line 3", "not valid JSON"],
        None,
    ),
    (
        "data-row-is-a-list",
        "finetune",
        lambda w: [w["recipe"]("listrow", data={"path": str(w["root"] / "list-row.jsonl")})],
        ["list-row.jsonl' line 33", "a row must be a JSON object", "got a list"],
        None,
    ),
    (
        "data-key-twice",
        "finetune",
        lambda w: [w["recipe"]("dupkey", data={"path": str(w["root"] / "dup-key.jsonl")})],
        ["dup-key.jsonl' line 1", 'key "output" appears twice'],
        None,
    ),
    (
        "data-csv-ragged-row",
        "finetune",
        lambda w: [w["recipe"]("ragged", data={"path": str(w["root"] / "ragged.csv")})],
        ["ragged.csv' line 5 has 3 fields, the header has 2", "quote a value"],
        None,
    ),
    (
        "data-not-utf8",
        "finetune",
        lambda w: [w["recipe"]("latin1", data={"path": str(w["root"] / "latin1.jsonl")})],
        ["latin1.jsonl' line 2", "not UTF-8", "save the file as UTF-8"],
        None,
    ),
    (
        "data-mostly-another-format",
        "finetune",
        lambda w: [w["recipe"]("pcrows", data={"path": str(w["root"] / "pc-rows.jsonl")})],
        ["4 of 5 rows do not match format 'alpaca'", "missing 'instruction'", "check data.format"],
        None,
    ),
    (
        "data-list-valued-completions",
        "finetune",
        lambda w: [
            w["recipe"]("lists", data={"path": str(w["root"] / "list-completions.jsonl"), "format": "prompt_completion", "eval_path": None})
        ],
        ["list-valued 'completion'", "rows 1, 2, 3"],
        None,
    ),
    (
        "data-image-content",
        "finetune",
        lambda w: [w["recipe"]("image", data={"path": str(w["root"] / "image-chat.jsonl"), "format": "chat", "eval_path": None})],
        ["non-text message content", "check data.format"],
        None,
    ),
    (
        "data-all-empty-completions",
        "finetune",
        lambda w: [
            w["recipe"](
                "emptyc", data={"path": str(w["root"] / "empty-completions.jsonl"), "format": "prompt_completion", "eval_path": None}
            )
        ],
        ["no example has tokens to learn", "check the data"],
        None,
    ),
    (
        "chat-template-not-incremental",
        "finetune",
        lambda w: [
            w["recipe"](
                "qwen3", data={"path": str(w["root"] / "chat.jsonl"), "format": "chat", "eval_path": None, "chat_template": QWEN3_LIKE}
            )
        ],
        ["does not render turns incrementally", "data.chat_template=hfgpu:chat_templates/chatml.jinja"],
        None,
    ),
    (
        "chat-template-file-missing",
        "finetune",
        lambda w: [
            w["recipe"](
                "tplfile",
                data={"path": str(w["root"] / "chat.jsonl"), "format": "chat", "eval_path": None, "chat_template": "nofile.jinja"},
            )
        ],
        ["'nofile.jinja'", "neither a Jinja template nor a file"],
        None,
    ),
    (
        "tokenizer-without-eos-or-pad",
        "finetune",
        lambda w: [w["recipe"]("noeos", model=str(w["root"] / "no-eos-model"))],
        ["neither an eos_token nor a pad_token", "tokenizer_config.json"],
        None,
    ),
    (
        "output-dir-parent-is-a-file",
        "finetune",
        lambda w: [w["recipe"]("parentfile"), f"output_dir={w['root'] / 'a-file' / 'run'}"],
        ["a-file", "which is a file"],
        None,
    ),
    (
        "output-dir-not-writable",
        "finetune",
        lambda w: [w["recipe"]("sys"), "output_dir=/sys/hfgpu-run"],
        ["/sys/hfgpu-run", "not writable"],
        None,
    ),
    (
        "output-dir-in-use",
        "finetune",
        lambda w: [w["recipe"]("locked"), f"output_dir={w['root'] / 'locked-run'}"],
        ["in use by another hfgpu run (pid", "choose another output_dir"],
        None,
    ),
    (
        "resume-changed-learning-rate",
        "finetune",
        lambda w: _resume_stopped(w, "lr", "train.learning_rate=0.01"),
        ["written with other settings", "train.learning_rate 0.003 → 0.01", "resume_force=true"],
        None,
    ),
    ("resume-changed-lora-rank", "finetune", lambda w: _resume_stopped(w, "rank", "lora.r=4"), ["lora.r 8 → 4", "resume_force=true"], None),
    (
        "resume-changed-data",
        "finetune",
        lambda w: _resume_stopped(w, "edited", f"data.path={w['root'] / 'edited.jsonl'}"),
        ["the tokenized training data changed"],
        None,
    ),
    ("resume-changed-seed", "finetune", lambda w: _resume_stopped(w, "seed", "train.seed=1"), ["train.seed 0 → 1"], None),
    (
        "resume-changed-global-batch",
        "finetune",
        lambda w: _resume_stopped(w, "gbs", "train.global_batch_size=4"),
        ["train.global_batch_size 8 → 4"],
        None,
    ),
    ("resume-changed-precision", "finetune", lambda w: _resume_stopped(w, "prec", "precision=bf16"), ['precision "fp32" → "bf16"'], None),
    (
        "resume-forced-other-rank",
        "finetune",
        lambda w: _resume_stopped(w, "forced", "lora.r=4", "resume_force=true"),
        ["parameters of another shape", "lora.r or the model changed"],
        None,
    ),
    (
        "resume-damaged-checkpoint-path",
        "finetune",
        lambda w: [w["recipe"]("dmg"), f"output_dir={w['damaged']}", f"resume={w['damaged'] / 'checkpoints' / 'step-0000002'}"],
        ["optimizer.pt is 100 bytes", "use resume=auto to fall back"],
        None,
    ),
    (
        "resume-path-not-a-checkpoint",
        "finetune",
        lambda w: [w["recipe"]("notckpt"), f"output_dir={w['stopped']}", f"resume={w['root']}"],
        ["is not a complete checkpoint folder", "resume=auto"],
        None,
    ),
    (
        "diverged-learning-rate",
        "finetune",
        lambda w: [w["recipe"]("nan", train={"learning_rate": 1e30, "max_grad_norm": None})],
        ["training diverged at step", "not finite", "train.learning_rate (now 1e+30)"],
        None,
    ),
    (
        "recipe-duplicate-section",
        "finetune",
        lambda w: [str(w["root"] / "dup.yaml")],
        ["key 'train' appears twice (lines 3 and 4)", "keep one"],
        lambda w: load_recipe(w["root"] / "dup.yaml"),
    ),
    (
        "recipe-alias-bomb",
        "finetune",
        lambda w: [str(w["root"] / "bomb.yaml")],
        ["expands to more than 100,000 values", "aliases"],
        lambda w: load_recipe(w["root"] / "bomb.yaml"),
    ),
    (
        "recipe-huge-value-is-quoted-short",
        "finetune",
        lambda w: [str(w["root"] / "huge-value.yaml")],
        ["micro_batch_size='xxxx", "...'"[:3]],
        lambda w: load_recipe(w["root"] / "huge-value.yaml"),
    ),
    (
        "recipe-not-utf8",
        "finetune",
        lambda w: [str(w["root"] / "recipe-latin1.yaml")],
        ["recipe-latin1.yaml", "not UTF-8"],
        lambda w: load_recipe(w["root"] / "recipe-latin1.yaml"),
    ),
    (
        "override-resume-force-typo",
        "finetune",
        lambda w: [w["recipe"]("rf"), "resume_forc=true"],
        ["resume_forc", "did you mean 'resume_force'"],
        None,
    ),
    (
        "recipe-seq-len-beyond-the-model",
        "finetune",
        lambda w: [w["recipe"]("longseq", data={"max_seq_len": 100000})],
        ["data.max_seq_len=100000", "use data.max_seq_len ≤"],
        None,
    ),
    ("recipe-lora-rank-zero", "finetune", lambda w: [w["recipe"]("rank0"), "lora.r=0"], ["lora.r=0", "greater than or equal to 1"], None),
    (
        "recipe-bf16-on-turing",
        "finetune",
        lambda w: [w["recipe"]("bf16t", gpu="2080 Ti", precision="bf16")],
        ["precision=bf16", "use precision=fp16"],
        None,
    ),
    (
        "merge-out-is-a-file",
        "hfgpu",
        lambda w: ["merge", str(w["earlier"]), "--out", str(w["root"] / "a-file")],
        ["a-file", "is a file"],
        None,
    ),
    (
        "generate-empty-prompt",
        "hfgpu",
        lambda w: ["generate", str(w["earlier"]), "--prompt", "  "],
        ["the prompt is empty"],
        lambda w: hfgpu_generate(w["earlier"], "  "),
    ),
    (
        "config-heads-not-divisible",
        "hfgpu",
        lambda w: ["plan", str(w["root"] / "bad-heads"), "--gpu", "4090"],
        ["not a multiple of the number of attention heads", "fix the config"],
        lambda w: hfgpu.plan(str(w["root"] / "bad-heads"), "4090"),
    ),
    (
        "pairs-all-identical",
        "finetune",
        lambda w: [
            w["recipe"](
                "pident",
                objective="dpo",
                data={"path": str(w["root"] / "pairs-identical.jsonl"), "format": "preference", "eval_path": None},
            )
        ],
        ["no example is left to train on", "4 chosen and rejected identical (rows 1, 2, 3, …)", "fix the rows"],
        None,
    ),
    (
        "pairs-empty-response",
        "finetune",
        lambda w: [
            w["recipe"](
                "pempty", objective="dpo", data={"path": str(w["root"] / "pairs-empty.jsonl"), "format": "preference", "eval_path": None}
            )
        ],
        ["no example is left to train on", "4 empty response"],
        None,
    ),
    (
        "pairs-missing-rejected",
        "finetune",
        lambda w: [
            w["recipe"](
                "pmiss",
                objective="dpo",
                data={"path": str(w["root"] / "pairs-no-rejected.jsonl"), "format": "preference", "eval_path": None},
            )
        ],
        ["no column 'rejected'", "set data.columns.rejected"],
        None,
    ),
    (
        "kto-label-not-boolean",
        "finetune",
        lambda w: [
            w["recipe"](
                "klabel", objective="kto", data={"path": str(w["root"] / "kto-labels.jsonl"), "format": "unpaired", "eval_path": None}
            )
        ],
        ["row 2: label 'yes' is not a boolean", "true", "false"],
        None,
    ),
    (
        "preference-beta-zero",
        "finetune",
        lambda w: [
            w["recipe"](
                "beta", objective="dpo", data={"path": str(DEMO / "style_pairs_train.jsonl"), "format": "preference", "eval_path": None}
            ),
            "preference.beta=0",
        ],
        ["preference.beta=0", "greater than 0", "use a positive preference.beta"],
        None,
    ),
    (
        "objective-with-sft-data",
        "finetune",
        lambda w: [w["recipe"]("objfmt", objective="dpo")],
        ["objective=dpo", "not data.format=alpaca", "set data.format=preference"],
        None,
    ),
    (
        "qlora-on-cpu-odd-shapes",
        "hfgpu",
        lambda w: ["plan", str(DEMO / "model"), "--gpu", "cpu", "--strategy", "qlora"],
        ["--strategy qlora on CPU", "divisible by 32", "gate_proj (344)", "use --strategy lora on CPU"],
        lambda w: hfgpu.plan(str(DEMO / "model"), "cpu", strategy="qlora"),
    ),
    (
        "objective-typo",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--objective", "dpoo"],
        ["--objective dpoo", "sft, dpo, ipo, simpo, orpo, kto"],
        lambda w: hfgpu.plan(M, "4090", objective="dpoo"),
    ),
    (
        "preference-with-packing",
        "hfgpu",
        lambda w: ["plan", M, "--gpu", "4090", "--objective", "dpo", "--packing", "true"],
        ["--packing on with --objective dpo", "never packed", "use --packing off"],
        lambda w: hfgpu.plan(M, "4090", objective="dpo", packing=True),
    ),
]


def hfgpu_generate(run, prompt):
    from hfgpu.hub import generate

    return generate(run, prompt)


def hfgpu_push(run, repo):
    from hfgpu.hub import push

    return push(run, repo)


PROGRESS = re.compile(r"\d+%\|")


def _sys_writable() -> bool:
    try:
        os.mkdir("/sys/hfgpu-probe")
    except OSError:
        return False
    os.rmdir("/sys/hfgpu-probe")
    return True


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, world, capsys, monkeypatch):
    name, command, argv, words, api = case
    if name in ("gpu-auto-without-cuda", "gpu-recipe-without-cuda"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(world["root"])
    if name == "output-dir-not-writable" and os.access("/sys", os.W_OK) and _sys_writable():
        pytest.skip("/sys is writable here")
    runs = ("earlier", "stopped", "damaged")
    before = {r: snapshot(world[r]) for r in runs}
    keep = (world["root"] / "full-folder" / "keep.txt").read_text()
    rc = (hfgpu_main if command == "hfgpu" else finetune_main)(argv(world))
    err = capsys.readouterr().err
    # progress bars (model loading, training) may come first; the error is the one hfgpu line, and the last
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert rc == 2, err
    assert lines and lines[-1].startswith("hfgpu:") and sum(x.startswith("hfgpu:") for x in lines) == 1, err
    assert all(PROGRESS.search(x) for x in lines[:-1]), err
    assert "Traceback" not in err and len(lines[-1]) < 600
    lines = lines[-1:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert {r: snapshot(world[r]) for r in runs} == before
    assert (world["root"] / "full-folder" / "keep.txt").read_text() == keep
    if api is not None:
        with pytest.raises(HfgpuError) as e:
            api(world)
        if name in IN_PYTHON:  # a knob is named as each surface spells it: --seq-len on the command line, seq_len= in Python
            for w in IN_PYTHON[name]:
                assert w in str(e.value), (w, str(e.value))
        else:
            assert lines[0] == f"hfgpu: error: {e.value}"


# the same knob errors as plan() raises them, named as keywords
IN_PYTHON = {
    "qlora-on-cpu-odd-shapes": ["strategy='qlora' on CPU", "use strategy='lora' on CPU"],
    "objective-typo": ["objective='dpoo'", "sft, dpo"],
    "preference-with-packing": ["packing=True with objective='dpo'", "packing=False"],
    "seq-len-zero": ["seq_len=0", "≥ 1"],
    "seq-len-too-long": ["seq_len=100000", "use seq_len ≤ 32768"],
    "micro-batch-zero": ["micro_batch_size=0", "≥ 1"],
    "strategy-typo": ["strategy='lorra'", "full, lora, qlora"],
    "bf16-on-turing": ["precision='bf16'", "use precision='fp16'"],
    "fa2-on-pascal": ["attention='flash_attention_2'", "use attention='sdpa'"],
    "qlora-full-precision": ["quantization='none'", "use quantization='nf4'"],
    "int8-on-pascal": ["quantization='int8'", "use strategy='qlora'"],
    "unknown-lora-target": ["lora_targets zz_proj", "choose from"],
    "lora-dropout-out-of-range": ["lora_dropout=1.5", "[0, 1)"],
    "sharding-on-one-card": ["distributed='fsdp'", "2x"],
    "offloading-on-cpu": ["activation_offloading=True", "use activation_offloading=False"],
    "offloading-without-checkpointing": ["activation_offloading=True", "set gradient_checkpointing=True"],
}


def test_does_not_fit_is_a_user_error():
    assert issubclass(hfgpu.DoesNotFit, HfgpuError)


def test_recipe_mistakes_are_refused_before_torch_loads(tmp_path):
    """A missing data file, a bad key, a plan that does not fit: one line, exit 2 or 3, before torch is
    imported (the slow part of starting on a small machine)."""
    import subprocess
    import sys

    cases = [
        ({"data": {"path": str(tmp_path / "nope.jsonl"), "format": "alpaca"}}, 2, "data file"),
        (
            {"data": {"path": str(DEMO / "capitals_train.jsonl"), "format": "alpaca", "eval_path": "missing/eval.jsonl"}},
            2,
            "check data.eval_path",
        ),
        ({"model": "meta-llama/Llama-3.1-8B", "gpu": "GTX 1050 Ti", "strategy": "full"}, 3, "does not fit"),
    ]
    for over, code, needle in cases:
        recipe = {
            "model": "hfgpu:demo/model",
            "gpu": "cpu",
            "output_dir": str(tmp_path / "out"),
            "data": {"path": str(DEMO / "capitals_train.jsonl")},
        }
        recipe.update({k: v for k, v in over.items() if k != "data"})
        recipe["data"] = {**recipe["data"], **over.get("data", {})}
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        probe = (
            "import sys; from hfgpu.finetune import main; rc = main([sys.argv[1]]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)"
        )
        r = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=limit(600))
        assert r.returncode == code and needle in r.stderr and "Traceback" not in r.stderr, (over, r.stderr)
        assert r.stdout.strip().splitlines()[-1] == "no torch", r.stdout
