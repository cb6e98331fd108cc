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


def setup_for(spec, strategy, precision, ckpt, attention, b, s, targets, chunked=False) -> memory.Setup:
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
        chunked_loss=chunked,
    )


class Peak(int):
    """A simulated tensor peak in bytes, with the phase of the step that set it (forward, backward, optimizer)."""

    phase: str

    @classmethod
    def of(cls, sim) -> "Peak":
        peak = cls(sim.peak)
        peak.phase = sim.peak_phase
        return peak


def measure(mode, case, chunked=False, deeper=False):
    """(spec, setup, simulated peak bytes) for one mode and one grid case; `deeper`: two more layers
    (the difference is exactly two layers' activations, whatever the loss and the constants do)."""
    from hfgpu.simulate import simulate

    strategy, precision, ckpt, attention = mode
    overrides, b, s, targets = case
    if deeper:
        overrides = {**overrides, "num_hidden_layers": overrides.get("num_hidden_layers", BASE["num_hidden_layers"]) + 2}
    cfg = config_for(overrides)
    spec = model_spec(cfg)
    setup = setup_for(spec, strategy, precision, ckpt, attention, b, s, targets, chunked)
    return spec, setup, Peak.of(simulate(cfg.to_dict(), setup, spec))


def measure_model(mode, entry, chunked=False):
    from hfgpu.simulate import simulate

    name, b, s = entry
    spec = model_spec(name)
    setup = setup_for(spec, *mode, b, s, None, chunked)
    return spec, setup, Peak.of(simulate(spec.config, setup, spec))


def static_bytes(spec, setup) -> int:
    """The exact part of the model, plus the per-step constants (dequantization workspace, embedding gradient)."""
    return (
        memory.weight_bytes(spec, setup)
        + memory.trainable_state_bytes(spec, setup)
        + memory.autocast_copy_bytes(spec, setup)
        + memory.dequant_workspace_bytes(spec, setup)
    )


LAYER = ["hidden", "inter", "qkv", "lora_in", "heads_seq"]


def _embedding_phase(row) -> bool:
    """Whether the step's peak is (or may be) the end of backward, where only the exact embedding gradient is alive."""
    spec, st, peak = row
    return memory.embedding_gradient_bytes(spec, st) > 0.5 * (peak - static_bytes(spec, st))


def nnls(A: np.ndarray, b: np.ndarray, iterations: int = 200) -> np.ndarray:
    """min ||A x - b|| subject to x >= 0 (Lawson and Hanson's active-set method, on unit-norm columns): every
    coefficient is a physical number of bytes, so none may be negative."""
    scale = np.linalg.norm(A, axis=0)
    scale[scale == 0] = 1.0
    A = A / scale
    n = A.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(iterations):
        w = A.T @ (b - A @ x)
        if passive.all() or np.where(passive, -np.inf, w).max() <= 1e-12:
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            bad = passive & (z <= 0)
            alpha = np.min(x[bad] / np.maximum(x[bad] - z[bad], 1e-300))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
    return x / scale


def _relative_fit(X: np.ndarray, y: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Non-negative least squares on errors relative to each step's whole peak: every shape counts alike."""
    return nnls(X / peak[:, None], y / peak)


def fit_mode(mode, pairs, plain_rows) -> dict:
    """Bytes-per-token coefficients, all ≥ 0, on physical features, in three steps that keep the decoder, the
    model-level terms and the loss apart:
    1. per layer: each shape at depth L and L + 2 with the chunked loss; the difference of the two peaks is
       exactly two layers' kept activations (weights and state are exact, the loss and constants cancel);
    2. model level (embedding output, final norm: per token × hidden) and the per-step vocab × hidden
       constant: what the shallower step holds beyond its layers and its exact chunked loss (memory.logits_bytes);
    3. the plain loss: bytes per token and vocab entry of the full logits, on the plain steps.
    Without checkpointing only; with it, see fit_ckpt."""
    strategy, _, _, attention = mode
    names = [n for n in LAYER if (n != "lora_in" or strategy != "full") and (n != "heads_seq" or attention == "eager")]

    def layer_row(spec, st) -> list[float]:
        f = memory.layer_features(spec, st)
        return [st.micro_batch_size * st.seq_len * f[n] for n in names]

    def extra(spec, st, peak) -> float:
        return peak - static_bytes(spec, st)

    X = np.array([layer_row(s2, t2) for (s2, t2, _), _ in pairs], dtype=float)
    y = np.array([(extra(*deep) - extra(*shallow)) / (deep[0].num_layers - shallow[0].num_layers) for shallow, deep in pairs], dtype=float)
    layer = nnls(X / y[:, None], np.ones_like(y))
    per_layer = lambda spec, st: spec.num_layers * float(np.dot(layer_row(spec, st), layer))

    rows = [shallow for shallow, _ in pairs]
    peak = np.array([p for *_, p in rows], dtype=float)
    y = np.array([extra(*r) - memory.logits_bytes(r[0], r[1]) - per_layer(r[0], r[1]) for r in rows], dtype=float)
    X = np.array([[st.micro_batch_size * st.seq_len * spec.hidden_size, spec.vocab_size * spec.hidden_size] for spec, st, _ in rows])
    model_hidden, vocab_hidden = nnls(X / peak[:, None], y / peak)

    peak = np.array([p for *_, p in plain_rows], dtype=float)
    y = np.array(
        [
            extra(spec, st, p) - per_layer(spec, st) - model_hidden * st.micro_batch_size * st.seq_len * spec.hidden_size
            for spec, st, p in plain_rows
        ]
    )
    X = np.array([[st.micro_batch_size * st.seq_len * spec.vocab_size] for spec, st, _ in plain_rows], dtype=float)
    (vocab,) = nnls(X / peak[:, None], y / peak)
    return {
        "vocab": round(float(vocab), 4),
        "model_hidden": round(float(model_hidden), 4),
        "layer": {n: round(float(c), 4) for n, c in zip(names, layer)},
        "vocab_hidden": round(float(vocab_hidden), 4),
    }


def fit_ckpt(pairs) -> dict:
    """With checkpointing: the bytes kept per layer input and token (≥ 0), from the difference of two depths
    (either phase, loss or one layer's recompute, adds the same per extra layer); the recompute and the loss
    reuse the same mode's coefficients without checkpointing."""
    X = np.array([[(d.num_layers - s.num_layers) * s.hidden_size * st.micro_batch_size * st.seq_len] for (s, st, _), (d, _, _) in pairs])
    y = np.array([(pd - static_bytes(d, dt)) - (ps - static_bytes(s, st)) for (s, st, ps), (d, dt, pd) in pairs], dtype=float)
    return {"ckpt_input": round(float(nnls(X / y[:, None], np.ones_like(y))[0]), 4)}


def worst(rows) -> tuple[float, str]:
    """The largest relative error of the planner's tensor peak (planned / simulated − 1) and where."""
    errors = [(predicted(spec, st) / peak - 1, spec, st) for spec, st, peak in rows]
    err, spec, st = max(errors, key=lambda e: abs(e[0]))
    loss = " chunked" if st.chunked_loss else ""
    where = f"L{spec.num_layers} h{spec.hidden_size} V{spec.vocab_size} {st.micro_batch_size}x{st.seq_len}{loss}"
    return err, where


def predicted(spec, setup) -> int:
    return memory.breakdown(spec, setup, 80 * 2**30).tensor_peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refit", action="store_true", help="fit the coefficients and write them into the package")
    parser.add_argument("--held-out-only", action="store_true", help="skip the grid (no refit): only the held-out models")
    parser.add_argument("--known-error", action="store_true", help="without --refit: record the measured errors in the package")
    parser.add_argument("--only", default="", help="only the modes whose key starts with this (e.g. full), keeping the others")
    args = parser.parse_args()
    if args.refit and args.held_out_only:
        parser.error("--refit needs the grid: drop --held-out-only")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as tf_logging

    tf_logging.disable_progress_bar()
    start = time.time()
    modes = dict(memory.activation_coefficients()["modes"]) if args.only else {}
    held_errors: dict[str, list[float]] = {}  # mode → planned / simulated − 1 on the held-out models
    for mode in MODES:
        key = memory.mode_key(setup_for(model_spec(config_for({})), *mode, 1, 1, None))
        if not key.startswith(args.only):
            continue
        rows = [] if args.held_out_only else [measure(mode, case, chunked) for case in GRID for chunked in (False, True)]
        deeper = [] if args.held_out_only else [measure(mode, case, True, deeper=True) for case in GRID]
        held = [measure_model(mode, entry, chunked) for entry in HELD_OUT_MODELS for chunked in (False, True)]
        if args.refit:
            # per-layer terms from pairs whose two peaks are set in the same phase: the loss (end of the
            # forward) without checkpointing; with it, either. A shallow model with a large vocabulary can
            # peak in backward (the embedding's dense gradient), where its layers are gone.
            # The end of backward (full fine-tuning: the embedding's dense gradient, exact in memory) is left out.
            pairs = [
                (a, b)
                for a, b in zip([r for r in rows if r[1].chunked_loss], deeper)
                if a[2].phase == b[2].phase and (mode[2] or a[2].phase == "forward") and not _embedding_phase(a) and not _embedding_phase(b)
            ]
            plain = [r for r in rows if not r[1].chunked_loss and not _embedding_phase(r)]
            modes[key] = fit_ckpt(pairs) if mode[2] else fit_mode(mode, pairs, plain)
            memory.activation_coefficients()["modes"][key] = modes[key]
            _write({"modes": modes}, partial=True)
        rows += deeper
        fit_err, fit_at = worst(rows) if rows else (float("nan"), "not run")
        held_err, held_at = worst(held)
        held_errors[key] = [predicted(spec, st) / peak - 1 for spec, st, peak in held]
        print(f"{key:28s} grid worst error {fit_err:+7.2%} ({fit_at})   held-out worst error {held_err:+7.2%} ({held_at})", flush=True)
    # the planner calls a plan "tight" when its margin is within its mode's under-estimate (hfgpu.planner)
    known = {k: v for k, v in memory.activation_coefficients().get("known_error", {}).items() if "|" in k}  # mode keys
    for key, errors in held_errors.items():
        known[key] = {"under": _round_up(max(0.0, -min(errors))), "over": _round_up(max(0.0, max(errors)))}
        print(f"known error on held-out models, {key}: up to {known[key]['under']:.1%} under, {known[key]['over']:.1%} over")
    if args.refit or args.known_error:
        if not args.refit:
            modes = dict(memory.activation_coefficients()["modes"])
        _write({"modes": modes, "known_error": dict(sorted(known.items()))}, partial=False)
        print(f"wrote {OUT}")
    print(f"{len(MODES)} modes × {3 * len(GRID) + 2 * len(HELD_OUT_MODELS)} steps in {time.time() - start:.0f} s")
    return 0


def _round_up(x: float) -> float:
    """To the next half percent above: a bound, not an estimate."""
    return float(np.ceil(x * 200 + 1e-9) / 200)


def _tested(versions: dict, modes: dict) -> dict:
    """The major.minor versions of transformers and peft under which a refit gave these very coefficients (the plan
    warns outside them, hfgpu.memory.version_drift): the committed range plus this one when the modes came out the
    same, else this one alone."""
    committed = memory.activation_coefficients()
    same = committed.get("modes") == modes
    tested = {}
    for name in ("transformers", "peft"):
        mine = ".".join(versions[name].split(".")[:2])
        earlier = committed.get("measured", {}).get("tested", {}).get(name, []) if same else []
        tested[name] = sorted(set(earlier) | {mine}, key=lambda v: tuple(int(x) for x in v.split(".")))
    return tested


def _write(table: dict, partial: bool) -> None:
    versions = {p: metadata.version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")}
    kept = {k: v for k, v in memory.activation_coefficients().get("measured", {}).items() if k.endswith("_note")}
    doc = {
        "about": "Bytes per token of activations and logits, fitted by benchmarks/memory_cpu.py --refit to tensor peaks "
        "of training steps simulated on fake tensors (hfgpu.simulate: real transformers + peft modules, equal to real CPU "
        "steps); features in hfgpu.memory.layer_features().",
        "measured": {
            "date": datetime.date.today().isoformat(),
            "device": "cpu (fake tensors)",
            "versions": versions,
            "tested": _tested(versions, table.get("modes", {})),
            **kept,  # notes written by hand (why known_error holds what it holds, where the tested range comes from)
            "grid": len(GRID),
            "shapes": "2-3 layers, hidden 1024-4096, vocab 32000-151936, seq 256-1024",
            "partial": partial,
        },
        **table,
    }
    # while fitting, progress goes beside the package's file (other processes keep planning with the old one)
    (OUT.with_suffix(".partial.json") if partial else OUT).write_text(json.dumps(doc, indent=1) + "\n")
    if not partial:
        OUT.with_suffix(".partial.json").unlink(missing_ok=True)
        memory.activation_coefficients.cache_clear()


if __name__ == "__main__":
    raise SystemExit(main())
