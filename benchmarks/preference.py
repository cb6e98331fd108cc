"""Preference tuning, measured side by side in one run (read the ratios; these machines are noisy).

1. Speed: hfgpu's loop with objective dpo vs TRL's DPOTrainer + peft on the same model, pairs and settings
   (LoRA r16 on every linear layer, dropout 0, fp32 on CPU, 8 pairs × accumulation 2, β 0.1, the reference =
   the base with the adapters disabled in both, same steps): tokens/s ratio, target ≥ 1.0.
2. Memory: the planner's DPO peak vs a simulated DPO step (hfgpu.simulate: the real modules on fake tensors)
   on catalog models at full depth, target within 5 %.
3. The reference: hfgpu's (adapters disabled; precomputed for full fine-tuning) vs a separate frozen copy of the
   model, TRL's default when it is given no peft config or a model that already carries an adapter: the
   simulated peak plus that copy's exact bytes, as a ratio.

    python benchmarks/preference.py [--steps 20] [--skip-speed] [--skip-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from training_speed import build_model_dir, quiet  # noqa: E402  (the same 4-layer, hidden-256 Llama)

GIB = 2**30
MEMORY_GRID = [  # (model, card, strategy, seq_len)
    ("HuggingFaceTB/SmolLM2-360M", "RTX 3060 12GB", "full", 1024),
    ("Qwen/Qwen2.5-0.5B", "RTX 4090", "full", 1024),
    ("Qwen/Qwen2.5-0.5B", "RTX 3060 12GB", "lora", 1024),
    ("meta-llama/Llama-3.2-1B", "RTX 3060 12GB", "lora", 1024),
    ("meta-llama/Llama-3.2-1B", "RTX 3060 12GB", "qlora", 2048),
    ("Qwen/Qwen2.5-1.5B", "RTX 4090", "lora", 1024),
    ("Qwen/Qwen2.5-1.5B", "RTX 3060 12GB", "qlora", 1024),
]


def write_pairs(tmp: Path) -> Path:
    """The demo's style pairs as plain strings (both tools tokenize plain pairs the same way: checked in
    tests/test_preference.py), repeated so that the steps never run out."""
    rows = []
    for line in (ROOT / "hfgpu/resources/demo/style_pairs_train.jsonl").read_text().splitlines():
        r = json.loads(line)
        q = r["prompt"][0]["content"]
        rows.append(
            {"prompt": f"Question: {q}\nAnswer:", "chosen": " " + r["chosen"][0]["content"], "rejected": " " + r["rejected"][0]["content"]}
        )
    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    return path


def hfgpu_dpo(model_dir: Path, pairs: Path, steps: int, out: Path) -> tuple[float, int]:
    """(seconds, non-pad tokens of both responses' sequences) of hfgpu's training loop alone."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from hfgpu.data import prepare_data
    from hfgpu.memory import loss_chunk_tokens
    from hfgpu.modeling import ModelSettings, load_tokenizer, prepare_model
    from hfgpu.preference import Objective
    from hfgpu.recipe import DataConfig
    from hfgpu.train import LoopConfig, train_loop

    tok = load_tokenizer(str(model_dir))
    data = prepare_data(DataConfig(path=str(pairs), format="preference", max_seq_len=64), tok, 64, 8)
    model = prepare_model(str(model_dir), ModelSettings(strategy="lora", precision="fp32", lora_dropout=0.0))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # TRL's Trainer set up its own in this process
    acc = Accelerator(cpu=True, mixed_precision="no", dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    cfg = LoopConfig.bare(
        8, 2, steps, learning_rate=5e-5, max_grad_norm=1.0, loss_chunk=loss_chunk_tokens(len(tok)), objective=Objective("dpo", beta=0.1)
    )
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar: the lines printed at the end are the result
        result = train_loop(acc, model, tok, data, cfg, out, say=lambda *a, **k: None)
    return time.perf_counter() - start, result.metrics["tokens"]


def trl_dpo(model_dir: Path, pairs: Path, steps: int, out: Path) -> tuple[float, int]:
    """(seconds, non-pad tokens) of TRL's DPOTrainer.train() on the same pairs, model and settings."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(
        output_dir=str(out),
        beta=0.1,
        loss_type=["sigmoid"],
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=steps,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        max_length=64,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        optim="adamw_torch_fused",
        max_grad_norm=1.0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=load_dataset("json", data_files=str(pairs), split="train"),
        processing_class=tok,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
    )
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its final metrics, printed
        trainer.train()
    seconds = time.perf_counter() - start
    return seconds, int(float(trainer.state.log_history[-1]["num_tokens"]))  # TRL's own count of the tokens it read


def speed(steps: int) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix="hfgpu-pref-"))
    model_dir = build_model_dir(tmp)
    pairs = write_pairs(tmp)
    hfgpu_dpo(model_dir, pairs, 2, tmp / "warmup")  # first-call costs out of the comparison
    rows = []
    for rep in range(2):  # interleaved, so drift hits both
        t_h, n_h = hfgpu_dpo(model_dir, pairs, steps, tmp / f"h{rep}")
        t_t, n_t = trl_dpo(model_dir, pairs, steps, tmp / f"t{rep}")
        rows.append((n_h / t_h, n_t / t_t, n_h, n_t))
    hf, tr = max(r[0] for r in rows), max(r[1] for r in rows)
    return [
        f"{steps} optimizer steps of 8 pairs × 2, LoRA r16, DPO β 0.1, fp32 on CPU (best of 2, interleaved)",
        f"hfgpu loop {hf:8,.0f} tokens/s   TRL DPOTrainer {tr:8,.0f} tokens/s   (tokens counted: {rows[0][2]:,} / {rows[0][3]:,})",
        f"hfgpu / TRL:          {hf / tr:5.2f}   (target ≥ 1.0)",
    ]


def memory() -> list[str]:
    from hfgpu.planner import plan

    lines = [
        "planned vs simulated DPO peak (full depth, one real step on fake tensors) and the reference's cost",
        f"{'model':28s} {'card':14s} {'strategy':8s} {'seq':>5s} {'mb':>3s} {'planned':>9s} {'simulated':>9s} {'sim/plan':>8s}"
        f" {'separate ref':>12s} {'ratio':>6s}",
    ]
    worst = 0.0
    for model, card, strategy, seq in MEMORY_GRID:
        p = plan(model, card, strategy=strategy, seq_len=seq, objective="dpo", verify=True)
        planned, simulated = p.memory.total, p.simulation["total"]
        # a separate frozen reference: another copy of the model's weights as the plan stores them (QLoRA: its
        # 4-bit base; LoRA: the 16-bit base; full: the trained weights), its no-grad forward freed before the step
        separate = simulated + p.memory.weights
        worst = max(worst, abs(simulated / planned - 1))
        lines.append(
            f"{model:28s} {card.replace('RTX ', ''):14s} {strategy:8s} {seq:5d} {p.micro_batch_size:3d} {planned / GIB:8.2f}G"
            f" {simulated / GIB:8.2f}G {simulated / planned:8.3f} {separate / GIB:11.2f}G {separate / simulated:6.2f}"
        )
    lines.append(f"worst |simulated / planned − 1|: {worst:.1%}   (target within 5 %)")
    lines.append("separate ref / hfgpu: the peak with a frozen copy of the model beside it, over hfgpu's (no copy)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    quiet()
    out = []
    if not args.skip_speed:
        out += speed(args.steps)
    if not args.skip_memory:
        out += ([""] if out else []) + memory()
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
