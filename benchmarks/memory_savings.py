"""What hfgpu's memory savers buy, side by side with the plain transformers + peft path (issue 9).

1. Llama-3.1-8B, micro-batch 2 × 2048 tokens, gradient checkpointing on, with torchtune's published
   LoRA setup (r=8, alpha=16, q/v/o + MLP projections): one training step simulated on fake tensors
   (hfgpu.simulate: the real transformers + peft modules; QLoRA's NF4 weights added exactly), plain
   path beside hfgpu's, against torchtune's published peaks on an RTX 4090 (16.2 GiB LoRA, 7.4 GiB QLoRA).
2. The longest sequence Llama-3.1-8B QLoRA fits at micro-batch 1 on 8, 12, 16 and 24 GB cards: as
   hfgpu plans it, checked by simulation, and on 8 GB for the plain path by simulation + the same
   allowances (unsloth publishes 2,972 tokens for its own stack on 8 GB).
3. Time of a training step with the chunked loss vs the plain loss, and with the tiled MLP vs the
   plain MLP (checkpointing on), on CPU (SmolLM2-135M shape), interleaved, best of N: the ratios the
   planner's CHUNKED_LOSS_COST and TILED_MLP_COST (hfgpu.throughput) stand for.

    python benchmarks/memory_savings.py           # ~13 minutes on 2 cores
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from hfgpu.units import GIB, gib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "meta-llama/Llama-3.1-8B"
TORCHTUNE_LORA = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # lora_attn_modules + apply_lora_to_mlp
PUBLISHED = {"lora": 16.2, "qlora": 7.4}  # torchtune README, Llama-3.1-8B on 1 × RTX 4090, batch 2 × 2048 packed
UNSLOTH_8GB = 2972


def peaks() -> None:
    import hfgpu
    from hfgpu.simulate import simulate

    print(f"1. {MODEL}, micro-batch 2 × 2048, checkpointing on, LoRA r=8 on q/v/o + MLP (torchtune's setup); simulated tensor peak")
    for strategy in ("lora", "qlora"):
        p = hfgpu.plan_or_closest(
            MODEL,
            "RTX 4090",
            strategy=strategy,
            micro_batch_size=2,
            seq_len=2048,
            gradient_checkpointing=True,
            lora_r=8,
            lora_targets=list(TORCHTUNE_LORA),
            chunked_loss=False,
            activation_offloading=False,
            tiled_mlp=False,
        )
        s = p.setup()
        rows = [
            ("plain transformers + peft", simulate(p.spec.config, s, p.spec, plain_path=True).peak),
            ("hfgpu, no savers", simulate(p.spec.config, s, p.spec).peak),
            ("hfgpu + chunked loss", simulate(p.spec.config, dataclasses.replace(s, chunked_loss=True), p.spec).peak),
            (
                "hfgpu + chunked loss + offloading",
                simulate(p.spec.config, dataclasses.replace(s, chunked_loss=True, activation_offloading=True), p.spec).peak,
            ),
        ]
        plain = rows[0][1]
        print(f"   {strategy}:")
        for name, peak in rows:
            print(f"     {name:36s} {peak / GIB:6.2f} GiB   ({peak / plain:.2f} of plain)")
        best = rows[-1][1] / GIB
        print(
            f"     torchtune published                  {PUBLISHED[strategy]:6.2f} GiB   hfgpu / torchtune {best / PUBLISHED[strategy]:.3f}"
            f"   {'≤' if best <= PUBLISHED[strategy] else '>'} target"
        )
    p = hfgpu.plan(
        MODEL,
        "RTX 4090",
        strategy="lora",
        micro_batch_size=2,
        seq_len=2048,
        gradient_checkpointing=True,
        chunked_loss=True,
        activation_offloading=True,
    )
    print(
        f"   with hfgpu's own default LoRA (r=16 on every linear layer): "
        f"{gib(simulate(p.spec.config, p.setup(), p.spec).peak, 2)} simulated"
    )


def longest() -> None:
    import hfgpu
    from hfgpu import memory
    from hfgpu.simulate import simulate

    def planned(card: str, seq: int):
        p = hfgpu.plan_or_closest(MODEL, card, strategy="qlora", micro_batch_size=1, seq_len=seq)
        return p.fits, p

    def plain_fits(card: str, seq: int):
        p = hfgpu.plan_or_closest(
            MODEL,
            card,
            strategy="qlora",
            micro_batch_size=1,
            seq_len=seq,
            gradient_checkpointing=True,
            chunked_loss=False,
            activation_offloading=False,
            tiled_mlp=False,
            optimizer="adamw_torch",
        )
        sim = simulate(p.spec.config, p.setup(), p.spec, plain_path=True)
        total = sim.peak + memory.overhead_bytes(sim.transient, 0)
        return total <= p.memory.budget, (p, total)

    def search(fits, card: str, lo: int, hi: int) -> int:
        while hi - lo > 64:  # multiples of 64 tokens
            mid = (lo + hi) // 2 // 64 * 64
            lo, hi = (mid, hi) if fits(card, mid)[0] else (lo, mid)
        return lo

    print(f"\n2. {MODEL} QLoRA, micro-batch 1: the longest sequence that fits (multiples of 64), as hfgpu plans it")
    for card in ("RTX 4060", "RTX 3060 12GB", "RTX 4060 Ti 16GB", "RTX 4090"):
        p = planned(card, 256)[1]
        ours = search(planned, card, 256, p.spec.max_seq_len + 64)
        p = planned(card, ours)[1]
        sim = simulate(p.spec.config, p.setup(), p.spec)
        print(
            f"   {p.gpu.name:24s} {ours:7,d} tokens  (optimizer {p.optimizer}, chunked loss {p.chunked_loss}, offloading "
            f"{p.activation_offloading}, "
            f"tiled MLP {p.tiled_mlp}; planned {p.memory.total / GIB:.2f}, simulated "
            f"{(sim.peak + p.memory.overhead) / GIB:.2f} of {gib(p.memory.budget, 2)})"
        )
    fits64, (plain_plan, plain_total) = plain_fits("RTX 4060", 64)
    if fits64:
        print(f"   plain path on the RTX 4060 (simulated + the same allowances): {search(plain_fits, 'RTX 4060', 64, 4096):5d} tokens")
    else:
        print(
            f"   plain path on the RTX 4060 (simulated + the same allowances): does not fit at any length — {gib(plain_total, 2)} "
            f"of {plain_plan.memory.budget / GIB:.2f} at 64 tokens (peft upcasts embeddings and lm_head to fp32)"
        )
    print(f"   unsloth published on 8 GB: {UNSLOTH_8GB:,d} tokens")


def _interleaved(steps: dict, reps: int) -> dict:
    """Best time of each step function, run in turns (the first round warms up)."""
    times = {name: [] for name in steps}
    for i in range(reps + 1):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def step_times(reps: int = 3) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hfgpu.loss import model_loss
    from hfgpu.memory import MLP_TILE, loss_chunk_tokens
    from hfgpu.models import model_spec
    from hfgpu.patches import tile_mlps

    cfg = LlamaConfig(**{k: v for k, v in model_spec("HuggingFaceTB/SmolLM2-135M").config.items() if k in LlamaConfig().to_dict()})
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    chunk = loss_chunk_tokens(cfg.vocab_size)

    def lora_model(ckpt: bool, tiled: bool = False):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        if tiled:
            tile_mlps(model)
        return model.train()

    def step(model, ids, c):
        def run():
            model_loss(model, {"input_ids": ids, "labels": ids}, c).backward()
            model.zero_grad(set_to_none=True)

        return run

    print(f"\n3. time per training step on CPU, SmolLM2-135M shape (vocab {cfg.vocab_size}), fp32, best of {reps}, interleaved")
    ids = torch.randint(0, cfg.vocab_size, (2, 512), generator=torch.Generator().manual_seed(0))
    full = AutoModelForCausalLM.from_config(cfg).train()
    lora = lora_model(ckpt=False)
    t = _interleaved(
        {
            "lora plain": step(lora, ids, None),
            "lora chunked": step(lora, ids, chunk),
            "full plain": step(full, ids, None),
            "full chunked": step(full, ids, chunk),
        },
        reps,
    )
    for kind in ("lora", "full"):
        print(
            f"   micro-batch 2 × 512, {kind:4s}: plain loss {t[kind + ' plain']:6.3f} s   chunked loss ({chunk}-token slices) "
            f"{t[kind + ' chunked']:6.3f} s"
            f"   chunked / plain {t[kind + ' chunked'] / t[kind + ' plain']:.3f}  (target ≤ 1.10)"
        )
    ids = torch.randint(0, cfg.vocab_size, (1, 4 * MLP_TILE), generator=torch.Generator().manual_seed(0))
    t = _interleaved({"plain": step(lora_model(ckpt=True), ids, chunk), "tiled": step(lora_model(ckpt=True, tiled=True), ids, chunk)}, reps)
    print(
        f"   micro-batch 1 × {4 * MLP_TILE}, LoRA, checkpointing, chunked loss: plain MLP {t['plain']:6.3f} s   tiled MLP "
        f"({MLP_TILE}-token tiles) "
        f"{t['tiled']:6.3f} s   tiled / plain {t['tiled'] / t['plain']:.3f}"
    )


def main() -> int:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()
    peaks()
    longest()
    step_times()
    print(f"\n({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
