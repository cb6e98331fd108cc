"""What hfgpu's memory savers buy, side by side with the plain transformers + peft path (issue 9).

1. Llama-3.1-8B, micro-batch 2 × 2048 tokens, gradient checkpointing on, with torchtune's published
   LoRA setup (r=8, alpha=16, q/v/o + MLP projections): one training step simulated on fake tensors
   (hfgpu.simulate: the real transformers + peft modules; QLoRA's NF4 weights added exactly), plain
   path beside hfgpu's, against torchtune's published peaks on an RTX 4090 (16.2 GiB LoRA, 7.4 GiB QLoRA).
2. The longest sequence Llama-3.1-8B QLoRA fits at micro-batch 1 on an 8 GB card (RTX 4060): as
   hfgpu plans it, checked by simulation, and for the plain path by simulation + the same allowances
   (unsloth publishes 2,972 tokens for its own stack on 8 GB).
3. Time of a training step with the chunked loss vs the plain loss on CPU (SmolLM2-135M shape),
   interleaved, best of N: the ratio the planner's CHUNKED_LOSS_COST stands for.

    python benchmarks/memory_savings.py           # ~2 minutes on 2 cores
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3
MODEL = "meta-llama/Llama-3.1-8B"
TORCHTUNE_LORA = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # lora_attn_modules + apply_lora_to_mlp
PUBLISHED = {"lora": 16.2, "qlora": 7.4}  # torchtune README, Llama-3.1-8B on 1 × RTX 4090, batch 2 × 2048 packed
UNSLOTH_8GB = 2972


def peaks() -> None:
    import hfgpu
    from hfgpu.simulate import simulate

    print(f"1. {MODEL}, micro-batch 2 × 2048, checkpointing on, LoRA r=8 on q/v/o + MLP (torchtune's setup); simulated tensor peak")
    for strategy in ("lora", "qlora"):
        p = hfgpu.plan_or_closest(MODEL, "RTX 4090", strategy=strategy, micro_batch_size=2, seq_len=2048, gradient_checkpointing=True,
                                  lora_r=8, lora_targets=list(TORCHTUNE_LORA), chunked_loss=False, activation_offloading=False)
        s = p.setup()
        rows = [
            ("plain transformers + peft", simulate(p.spec.config, s, p.spec, plain_path=True).peak),
            ("hfgpu, no savers", simulate(p.spec.config, s, p.spec).peak),
            ("hfgpu + chunked loss", simulate(p.spec.config, dataclasses.replace(s, chunked_loss=True), p.spec).peak),
            ("hfgpu + chunked loss + offloading", simulate(p.spec.config, dataclasses.replace(s, chunked_loss=True, offload=True), p.spec).peak),
        ]
        plain = rows[0][1]
        print(f"   {strategy}:")
        for name, peak in rows:
            print(f"     {name:36s} {peak / GIB:6.2f} GiB   ({peak / plain:.2f} of plain)")
        best = rows[-1][1] / GIB
        print(f"     torchtune published                  {PUBLISHED[strategy]:6.2f} GiB   hfgpu / torchtune {best / PUBLISHED[strategy]:.3f}"
              f"   {'≤' if best <= PUBLISHED[strategy] else '>'} target")
    p = hfgpu.plan(MODEL, "RTX 4090", strategy="lora", micro_batch_size=2, seq_len=2048, gradient_checkpointing=True,
                   chunked_loss=True, activation_offloading=True)
    print(f"   with hfgpu's own default LoRA (r=16 on every linear layer): {simulate(p.spec.config, p.setup(), p.spec).peak / GIB:.2f} GiB simulated")


def longest() -> None:
    import hfgpu
    from hfgpu import memory
    from hfgpu.simulate import simulate

    card = "RTX 4060"

    def planned(seq: int):
        p = hfgpu.plan_or_closest(MODEL, card, strategy="qlora", micro_batch_size=1, seq_len=seq)
        return p.fits, p

    def plain_fits(seq: int):
        p = hfgpu.plan_or_closest(MODEL, card, strategy="qlora", micro_batch_size=1, seq_len=seq, gradient_checkpointing=True,
                                  chunked_loss=False, activation_offloading=False, optimizer="adamw_torch")
        sim = simulate(p.spec.config, p.setup(), p.spec, plain_path=True)
        total = sim.peak + memory.overhead_bytes(sim.transient, 0)
        return total <= p.memory.budget, (p, total)

    def search(fits, lo: int, hi: int) -> int:
        while hi - lo > 64:  # multiples of 64 tokens
            mid = (lo + hi) // 2 // 64 * 64
            lo, hi = (mid, hi) if fits(mid)[0] else (lo, mid)
        return lo

    print(f"\n2. {MODEL} QLoRA, micro-batch 1, on a {card} (8 GB): the longest sequence that fits (multiples of 64)")
    ours = search(planned, 256, 8192)
    p = planned(ours)[1]
    sim = simulate(p.spec.config, p.setup(), p.spec)
    sim_total = sim.peak + p.memory.overhead
    print(f"   hfgpu as planned:   {ours:5d} tokens  (optimizer {p.optimizer}, chunked loss {p.chunked_loss}, offloading {p.activation_offloading}; "
          f"planned {p.memory.total / GIB:.2f}, simulated {sim_total / GIB:.2f} of {p.memory.budget / GIB:.2f} GiB)")
    fits64, (plain_plan, plain_total) = plain_fits(64)
    if fits64:
        plain = search(plain_fits, 64, 4096)
        print(f"   plain path (simulated + the same allowances): {plain:5d} tokens")
    else:
        print(f"   plain path (simulated + the same allowances): does not fit at any length — {plain_total / GIB:.2f} GiB "
              f"of {plain_plan.memory.budget / GIB:.2f} at 64 tokens (peft upcasts embeddings and lm_head to fp32)")
    print(f"   unsloth published on 8 GB: {UNSLOTH_8GB} tokens   hfgpu / unsloth {ours / UNSLOTH_8GB:.2f}")


def loss_time(reps: int = 5) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hfgpu.loss import model_loss
    from hfgpu.memory import loss_chunk_tokens
    from hfgpu.models import model_spec

    cfg = LlamaConfig(**{k: v for k, v in model_spec("HuggingFaceTB/SmolLM2-135M").config.items() if k in LlamaConfig().to_dict()})
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"\n3. time per training step on CPU, SmolLM2-135M shape (vocab {cfg.vocab_size}), micro-batch 2 × 512, fp32, best of {reps}, interleaved")
    chunk = loss_chunk_tokens(cfg.vocab_size)
    for strategy in ("lora", "full"):
        model = AutoModelForCausalLM.from_config(cfg)
        if strategy == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        model.train()
        ids = torch.randint(0, cfg.vocab_size, (2, 512), generator=torch.Generator().manual_seed(0))
        times = {None: [], chunk: []}
        for i in range(reps + 1):
            for c in times:
                t = time.perf_counter()
                model_loss(model, {"input_ids": ids, "labels": ids}, c).backward()
                model.zero_grad(set_to_none=True)
                if i:  # the first round warms up
                    times[c].append(time.perf_counter() - t)
        plain, chunked = min(times[None]), min(times[chunk])
        print(f"   {strategy:5s} plain loss {plain:6.3f} s   chunked loss ({chunk}-token slices) {chunked:6.3f} s   chunked / plain {chunked / plain:.3f}  (target ≤ 1.10)")


def main() -> int:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()
    peaks()
    longest()
    loss_time()
    print(f"\n({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
