"""The fastest plan that fits against the first one that fits (the planner's old rule), for every catalog model ×
consumer card, both judged by today's throughput model (an estimate: read the ratios, not the tokens/s).

The old rule took, at the chosen strategy and optimizer, the first saver combination in order of time cost
(the chunked loss charged 3 %, off first) and the largest micro-batch that fitted with room. The new one takes
the fastest of all that fit with room (issue 17). Also prints how long a warm plan() takes with the wider search.

    python benchmarks/plan_choice.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OLD_CHUNKED_LOSS_COST = 0.03


def old_choice(p):
    """The first roomy plan in the old search order, at the new plan's strategy, optimizer and dtypes."""
    from hfgpu import search, throughput
    from hfgpu.knobs import PYTHON, Knobs

    c = search.problem(p.spec, p.gpu, Knobs(), PYTHON, True)
    chosen = dict(
        precision=p.precision,
        frozen_dtype=p.knobs.frozen_dtype,
        strategy=p.strategy,
        quantization=p.quantization,
        optimizer=p.optimizer,
        lora_dropout=p.knobs.lora_dropout,
    )
    combos = search._savers(c, **chosen)

    def old_cost(combo):
        s = c.setup(**chosen, **combo, micro_batch_size=1)
        seconds = 1 / throughput.tokens_per_second(p.spec, p.gpu, s)
        seconds -= throughput.micro_batch_seconds(p.spec, p.gpu, s) / s.seq_len  # the old model had no such term
        return seconds + (OLD_CHUNKED_LOSS_COST / throughput.compute_tokens_per_second(p.spec, p.gpu, s) if combo["chunked_loss"] else 0)

    combos = sorted(sorted(combos, key=lambda k: k["chunked_loss"]), key=old_cost)  # the old order: chunked loss off first
    top = 1 << (max(1, p.global_batch_size // p.gpu.count).bit_length() - 1)
    for combo in combos:
        for mb in [top >> i for i in range(top.bit_length())]:
            s = c.setup(**chosen, **combo, micro_batch_size=mb)
            m = c.breakdown(s)
            if m.fits and not search.is_tight(s, m):
                return s
    return None


def describe(s) -> str:
    savers = [
        n
        for n, a in (
            ("ckpt", "gradient_checkpointing"),
            ("chunk", "chunked_loss"),
            ("offload", "activation_offloading"),
            ("tile", "tiled_mlp"),
        )
        if getattr(s, a)
    ]
    return f"mb {s.micro_batch_size} {'+'.join(savers) or 'no savers'}"


def main() -> int:
    import hfgpu
    from hfgpu.gpus import catalog
    from hfgpu.models import catalog_models
    from hfgpu.throughput import tokens_per_second

    cards = [g for g in catalog() if g.series.startswith("GeForce") and g.vram_gb >= 6]
    ratios, changed, faster = [], 0, 0
    print(f"{'model':34} {'card':26} {'strategy':8} {'old choice':28} {'new choice':28} {'new/old':>7}")
    for model in catalog_models():
        for card in cards:
            p = hfgpu.plan_or_closest(model, card)
            if not p.fits or p.tight:
                continue
            old = old_choice(p)
            if old is None:
                continue
            new_tps, old_tps = p.tokens_per_second_estimate, tokens_per_second(p.spec, p.gpu, old)
            ratio = new_tps / old_tps
            ratios.append(ratio)
            new = p.setup()
            if describe(new) != describe(old):
                changed += 1
                if ratio > 1.0005:  # the rest only turned the (free) chunked loss on: more room, same speed
                    faster += 1
                    print(f"{model:34} {card.name:26} {p.strategy:8} {describe(old):28} {describe(new):28} {ratio:7.3f}")
    print(
        f"\n{len(ratios)} roomy plans; {changed} chose differently, {faster} of them estimated faster (listed; the others "
        f"only turned the free chunked loss on). new/old estimated tokens/s: median {statistics.median(ratios):.3f}, "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}"
    )
    # the wider search's cost: warm plan() for an 8B catalog model and a 70B-class config
    for name, target in (("Llama-3.1-8B", "meta-llama/Llama-3.1-8B"), ("70B-class", _llama_70b())):
        hfgpu.plan_or_closest(target, "RTX 4090")
        t = time.perf_counter()
        for _ in range(5):
            hfgpu.plan_or_closest(target, "RTX 4090")
        print(f"plan() warm, {name}: {(time.perf_counter() - t) / 5:.3f} s   (targets: 8B < 0.5 s, 70B < 1 s)")
    return 0


def _llama_70b():
    from hfgpu.models import model_spec

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from plan_speed import LLAMA_70B_CLASS

    return model_spec(LLAMA_70B_CLASS)


if __name__ == "__main__":
    raise SystemExit(main())
