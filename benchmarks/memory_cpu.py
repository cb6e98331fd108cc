"""Fit and check the planner's activation and logits coefficients against simulated training steps.

For every mode (strategy × 16-bit/fp32 compute × checkpointing × attention) this runs one training
step of the real transformers + peft modules on fake tensors (hfgpu.simulate, which equals a real
CPU step byte for byte: tests/test_simulate.py) over a grid of Llama shapes with realistic widths
and vocabularies (2–3 layers: the per-layer terms are linear in depth), subtracts the exact
components (weights, gradients, optimizer state), and fits bytes-per-token coefficients by least
squares. It prints the worst relative error of the planner's peak against the simulation on the
grid and on held-out real models at full depth.

    python benchmarks/memory_cpu.py            # check the committed coefficients
    python benchmarks/memory_cpu.py --refit    # refit and write hfgpu/resources/activation_coefficients.json

CUDA context and allocator slack are outside tensor peaks and are budgeted separately
(hfgpu.memory.COEFFICIENTS) until a GPU calibration (benchmarks/memory_calibration.py) replaces them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hfgpu import memory  # noqa: E402
from hfgpu.models import model_spec  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "hfgpu" / "resources" / "activation_coefficients.json"

BASE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
# (config overrides, micro_batch, seq_len, lora targets or None for all linear layers)
GRID = [
    ({}, 1, 512, None),
    ({"num_hidden_layers": 3}, 1, 512, None),
    ({"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8}, 1, 512, None),
    ({"intermediate_size": 11008}, 1, 512, None),
    ({"vocab_size": 128256}, 1, 512, None),
    ({"num_key_value_heads": 16}, 1, 512, None),
    ({}, 1, 1024, None),
    ({}, 2, 256, None),
    ({}, 1, 512, ("q_proj", "v_proj")),
    (
        {"hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 2816, "vocab_size": 151936},
        2,
        512,
        None,
    ),
    ({"vocab_size": 128256, "tie_word_embeddings": True}, 1, 1024, None),
    ({"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4, "intermediate_size": 4096}, 4, 256, None),
    (
        {
            "hidden_size": 1024,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "intermediate_size": 2816,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
        },
        1,
        2048,
        None,
    ),
]
# held-out: real models at full depth (from the offline catalog), (model, micro_batch, seq_len)
HELD_OUT_MODELS = [("Qwen/Qwen2.5-0.5B", 2, 512), ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1, 1024)]
MODES = [
    (strategy, precision, ckpt, attention)
    for strategy in ("full", "lora", "qlora")
    for precision in ("bf16", "fp32")
    for ckpt in (False, True)
    for attention in ("sdpa", "eager")
]


def config_for(overrides: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**{"tie_word_embeddings": False, **BASE, **overrides}, max_position_embeddings=4096)


def setup_for(spec, strategy, precision, ckpt, attention, b, s, targets) -> memory.Setup:
    return memory.Setup(
        strategy=strategy,
        precision=precision,
        quantization="nf4" if strategy == "qlora" else "none",
        double_quant=True,
        gradient_checkpointing=ckpt,
        micro_batch_size=b,
        seq_len=s,
        optimizer="adamw_torch",
        attention=attention,
        lora_r=16,
        lora_targets=tuple(targets or spec.linear_names),
    )


def measure(mode, case):
    """(spec, setup, simulated peak bytes) for one mode and one grid case."""
    from hfgpu.simulate import simulate

    strategy, precision, ckpt, attention = mode
    overrides, b, s, targets = case
    cfg = config_for(overrides)
    spec = model_spec(cfg)
    setup = setup_for(spec, strategy, precision, ckpt, attention, b, s, targets)
    return spec, setup, simulate(cfg.to_dict(), setup, spec).peak


def measure_model(mode, entry):
    from hfgpu.simulate import simulate

    name, b, s = entry
    spec = model_spec(name)
    setup = setup_for(spec, *mode, b, s, None)
    return spec, setup, simulate(spec.config, setup, spec).peak


def static_bytes(spec, setup) -> int:
    """The exact part of the model, plus the per-step constants (dequantization workspace, embedding gradient)."""
    return (
        memory.weight_bytes(spec, setup)
        + memory.trainable_state_bytes(spec, setup)
        + memory.autocast_copy_bytes(spec, setup)
        + memory.dequant_workspace_bytes(spec, setup)
    )


LAYER = ["hidden", "inter", "qkv", "lora_in", "heads_seq"]


def fit_mode(mode, rows, table: dict) -> dict:
    """Least squares on bytes per token: a full linear fit without checkpointing; with it, only the
    bytes kept per layer input (the rest reuses the same mode's no-checkpointing coefficients)."""
    strategy, _, ckpt, attention = mode
    tokens = np.array([st.micro_batch_size * st.seq_len for _, st, _ in rows], dtype=float)
    y = np.array([peak - static_bytes(spec, st) for spec, st, peak in rows], dtype=float)  # bytes
    if not ckpt:
        names = [n for n in LAYER if (n != "lora_in" or strategy != "full") and (n != "heads_seq" or attention == "eager")]
        per_token = np.array(
            [
                [spec.vocab_size, spec.hidden_size] + [spec.num_layers * memory.layer_features(spec, st)[n] for n in names]
                for spec, st, _ in rows
            ],
            dtype=float,
        )
        X = per_token * tokens[:, None]
        if strategy in ("full", "qlora"):  # per-step constants (see memory.vocab_transient_bytes)
            X = np.hstack([X, np.array([[spec.vocab_size * spec.hidden_size] for spec, _, _ in rows], dtype=float)])
        # relative least squares: every shape counts alike, whatever its size
        coef, *_ = np.linalg.lstsq(X / y[:, None], np.ones_like(y), rcond=None)
        row = {
            "vocab": round(float(coef[0]), 4),
            "model_hidden": round(float(coef[1]), 4),
            "layer": {n: round(float(c), 4) for n, c in zip(names, coef[2 : 2 + len(names)])},
        }
        if strategy in ("full", "qlora"):
            row["vocab_hidden"] = round(float(coef[-1]), 4)
        return row
    key = memory.mode_key(rows[0][1])
    table[key] = {"ckpt_input": 0.0}
    _write({"modes": table}, partial=True)
    rest = np.array(
        [
            memory.activation_bytes(spec, st) + memory.logits_bytes(spec, st) + memory.vocab_transient_bytes(spec, st)
            for spec, st, _ in rows
        ],
        dtype=float,
    )
    lh = np.array([spec.num_layers * spec.hidden_size for spec, _, _ in rows], dtype=float) * tokens
    return {"ckpt_input": round(float(np.dot((y - rest) / y, lh / y) / np.dot(lh / y, lh / y)), 4)}


def predicted(spec, setup) -> int:
    return memory.breakdown(spec, setup, 80 * 2**30).tensor_peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refit", action="store_true", help="fit the coefficients and write them into the package")
    parser.add_argument("--only", default="", help="only the modes whose key starts with this (e.g. full), keeping the others")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as tf_logging

    tf_logging.disable_progress_bar()
    start = time.time()
    modes = dict(memory.activation_coefficients()["modes"]) if args.only else {}
    for mode in MODES:
        key = memory.mode_key(setup_for(model_spec(config_for({})), *mode, 1, 1, None))
        if not key.startswith(args.only):
            continue
        rows = [measure(mode, case) for case in GRID]
        held = [measure_model(mode, entry) for entry in HELD_OUT_MODELS]
        if args.refit:
            modes[key] = fit_mode(mode, rows, modes)
            _write({"modes": modes}, partial=True)
        fit_err = max(abs(predicted(spec, st) / peak - 1) for spec, st, peak in rows)
        held_err = max(abs(predicted(spec, st) / peak - 1) for spec, st, peak in held)
        print(f"{key:28s} grid worst error {fit_err:6.2%}   held-out worst error {held_err:6.2%}", flush=True)
    if args.refit:
        _write({"modes": modes}, partial=False)
        print(f"wrote {OUT}")
    print(f"{len(MODES)} modes × {len(GRID) + len(HELD_OUT_MODELS)} shapes in {time.time() - start:.0f} s")
    return 0


def _write(table: dict, partial: bool) -> None:
    versions = {p: metadata.version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")}
    doc = {
        "about": "Bytes per token of activations and logits, fitted by benchmarks/memory_cpu.py --refit to tensor peaks "
        "of training steps simulated on fake tensors (hfgpu.simulate: real transformers + peft modules, equal to real CPU "
        "steps); features in hfgpu.memory.layer_features().",
        "measured": {
            "date": datetime.date.today().isoformat(),
            "device": "cpu (fake tensors)",
            "versions": versions,
            "grid": len(GRID),
            "shapes": "2-3 layers, hidden 1024-4096, vocab 32000-151936, seq 256-1024",
            "partial": partial,
        },
        **table,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    memory.activation_coefficients.cache_clear()


if __name__ == "__main__":
    raise SystemExit(main())
