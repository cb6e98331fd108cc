"""Training speed, measured side by side in one run (read the ratios; these machines are noisy).

1. hfgpu's loop vs a plain `transformers.Trainer` + peft on the same model, data and settings
   (LoRA r16 on every linear layer, fp32 on CPU, micro-batch 8 × accumulation 2, same steps):
   tokens/s ratio, target ≥ 1.0.
2. Packing vs padding on variable-length data: effective (non-pad) tokens/s ratio.

    python benchmarks/training_speed.py [--steps 30]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quiet() -> None:
    """Results only: no warnings, no library logging or progress bars; torch seeded."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import datasets
    import torch
    from transformers.utils import logging as tf_logging

    tf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.manual_seed(0)


def build_model_dir(tmp: Path) -> Path:
    """A 4-layer, hidden-256 Llama with the demo tokenizer: big enough that compute dominates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(ROOT / "hfgpu/resources/demo/model")
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=len(tok),
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


WORDS = "the capital of france is paris and the capital of peru is lima while kenya has nairobi".split()


def write_data(tmp: Path, name: str, lengths: list[int]) -> Path:
    import json

    random.seed(0)
    rows = [{"text": " ".join(random.choice(WORDS) for _ in range(n))} for n in lengths]
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hfgpu_loop(model_dir: Path, data_path: Path, steps: int, packing: bool, out: Path) -> tuple[float, int]:
    """(seconds, non-pad tokens) of hfgpu's training loop alone."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from hfgpu.data import prepare_data
    from hfgpu.modeling import ModelSettings, load_tokenizer, prepare_model
    from hfgpu.recipe import DataConfig
    from hfgpu.train import LoopConfig, train_loop

    tok = load_tokenizer(str(model_dir))
    data = prepare_data(DataConfig(path=str(data_path), format="text", packing=packing), tok, 256, 8)
    model = prepare_model(str(model_dir), ModelSettings(strategy="lora", precision="fp32", lora_dropout=0.0))
    acc = Accelerator(cpu=True, mixed_precision="no", dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    cfg = LoopConfig.bare(8, 2, steps, learning_rate=2e-4, max_grad_norm=1.0)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = train_loop(acc, model, tok, data, cfg, out, say=lambda *a, **k: None)
    return time.perf_counter() - start, result.metrics["tokens"]


def trainer_baseline(model_dir: Path, data_path: Path, steps: int, out: Path) -> tuple[float, int]:
    """(seconds, non-pad tokens) of transformers.Trainer on the same prepared data and model."""

    from transformers import Trainer, TrainingArguments

    from hfgpu.data import collate, prepare_data
    from hfgpu.modeling import ModelSettings, load_tokenizer, prepare_model
    from hfgpu.recipe import DataConfig

    tok = load_tokenizer(str(model_dir))
    data = prepare_data(DataConfig(path=str(data_path), format="text"), tok, 256, 8)
    model = prepare_model(str(model_dir), ModelSettings(strategy="lora", precision="fp32", lora_dropout=0.0))
    tokens = 0

    def counting_collate(features):
        nonlocal tokens
        batch = collate(features, pad_id=tok.pad_token_id)
        tokens += int(batch["attention_mask"].sum())
        return batch

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        optim="adamw_torch_fused",
        max_grad_norm=1.0,
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data.train.remove_columns(["length"]), data_collator=counting_collate)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    quiet()
    tmp = Path(tempfile.mkdtemp(prefix="hfgpu-speed-"))
    model_dir = build_model_dir(tmp)
    # equal lengths for the loop comparison (the two samplers order data differently; no padding
    # means both see the same work per step), variable lengths for packing
    fixed = write_data(tmp, "fixed.jsonl", [150] * 600)
    variable = write_data(tmp, "variable.jsonl", [random.Random(i).randint(8, 200) for i in range(600)])
    hfgpu_loop(model_dir, fixed, 2, False, tmp / "warmup")  # first-call costs (imports, kernels) out of the comparison

    rows = []
    for rep in range(2):  # interleaved, so drift hits every side
        t_h, n_h = hfgpu_loop(model_dir, fixed, args.steps, False, tmp / f"h{rep}")
        t_t, n_t = trainer_baseline(model_dir, fixed, args.steps, tmp / f"t{rep}")
        t_v, n_v = hfgpu_loop(model_dir, variable, args.steps, False, tmp / f"v{rep}")
        t_p, n_p = hfgpu_loop(model_dir, variable, args.steps, True, tmp / f"p{rep}")
        rows.append((n_h / t_h, n_t / t_t, n_v / t_v, n_p / t_p))
    hf, tr, var, pk = (max(r[i] for r in rows) for i in range(4))
    print(f"{args.steps} optimizer steps of micro-batch 8 × 2, LoRA r16, fp32 on CPU (best of 2, interleaved)")
    print(f"equal-length data:    hfgpu loop {hf:8,.0f} tokens/s   transformers.Trainer {tr:8,.0f} tokens/s")
    print(f"variable-length data: padded     {var:8,.0f} non-pad tokens/s   packed {pk:8,.0f} non-pad tokens/s")
    print(f"hfgpu / Trainer:      {hf / tr:5.2f}   (target ≥ 1.0)")
    print(f"packing / padding:    {pk / var:5.2f}   (effective tokens/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
