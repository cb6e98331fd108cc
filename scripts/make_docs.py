"""Regenerate the planner's numbers in docs/ (tables between GENERATED markers, and the figures).

    python scripts/make_docs.py          # rewrite the tables in docs/*.md and the images in docs/images/
    python scripts/make_docs.py --check  # exit 1 when a committed table differs from what the planner says

tests/test_docs.py runs the check, so a planner change that moves a number fails until the docs are
regenerated.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hfgpu.gpus import get_gpu  # noqa: E402
from hfgpu.planner import STRATEGIES, best_of, plan_or_closest  # noqa: E402
from hfgpu.units import GIB  # noqa: E402

MODELS = [
    "Qwen/Qwen2.5-0.5B",
    "meta-llama/Llama-3.2-1B",
    "Qwen/Qwen2.5-1.5B",
    "meta-llama/Llama-3.2-3B",
    "Qwen/Qwen2.5-7B",
    "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-2-13b-hf",
]
CARDS = [
    "GTX 1060 6GB",
    "GTX 1070",
    "GTX 1080",
    "GTX 1080 Ti",
    "RTX 2060",
    "RTX 2070",
    "RTX 2080 Ti",
    "RTX 3060 12GB",
    "RTX 3070",
    "RTX 3080 10GB",
    "RTX 3090",
    "RTX 4060 Ti 16GB",
    "RTX 4070",
    "RTX 4080",
    "RTX 4090",
    "RTX 5060 Ti 16GB",
    "RTX 5070",
    "RTX 5080",
    "RTX 5090",
]
SEQ = 1024
TOKENS = 10e6
PAIRS = [("RTX 4090", None), ("2x RTX 3090", "ddp"), ("2x RTX 4060 Ti 16GB", "zero3"), ("2x RTX 3060 12GB", "zero3"), ("RTX 5090", None)]
DOCS = {"en": ROOT / "docs" / "choosing-a-gpu.md", "zh": ROOT / "docs" / "choosing-a-gpu.zh-CN.md"}
HEADERS = {
    "en": {
        "card": "card",
        "model": "model",
        "best": "best strategy",
        "peak": "peak GiB",
        "spare": "to spare GiB",
        "budget": "budget GiB",
        "tps": "tokens/s",
        "hours": "hours / 10M tokens",
        "price": "launch $",
        "none": "does not fit",
        "setup": "setup",
        "fits": "fits",
        "yes": "yes",
        "no": "no",
        "total": "total launch $",
    },
    "zh": {
        "card": "显卡",
        "model": "模型",
        "best": "最佳策略",
        "peak": "峰值 GiB",
        "spare": "余量 GiB",
        "budget": "预算 GiB",
        "tps": "tokens/s",
        "hours": "每 1000 万 token 小时数",
        "price": "首发价 $",
        "none": "放不下",
        "setup": "配置",
        "fits": "能否放下",
        "yes": "能",
        "no": "否",
        "total": "首发总价 $",
    },
}


def best(model: str, card: str):
    """What `hfgpu fit` recommends: the first of full, LoRA, QLoRA that fits with room (a tight one if none has)."""
    plans = [plan_or_closest(model, card, strategy=s, seq_len=SEQ, calibrated=False) for s in STRATEGIES]
    return best_of([p for p in plans if p.fits])


def peak(p) -> str:
    """Peak GiB, with "~" when the plan fits only tightly (within the memory model's known error of the budget)."""
    return f"{p.memory.total / GIB:.1f}" + ("~" if p.tight else "")


def matrix(lang: str) -> str:
    h = HEADERS[lang]
    short = [m.split("/")[-1] for m in MODELS]
    lines = [f"| {h['card']} | GB | {h['budget']} | " + " | ".join(short) + " |", "|---|---|---|" + "---|" * len(MODELS)]
    for card in CARDS:
        g = get_gpu(card)
        cells = []
        for m in MODELS:
            p = best(m, card)
            cells.append(f"{p.strategy} {peak(p)}" if p else "–")
        budget = plan_or_closest(MODELS[0], card, seq_len=SEQ, calibrated=False).memory.budget
        lines.append(f"| {g.name.replace('GeForce ', '')} | {g.vram_gb:g} | {budget / GIB:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_model(lang: str, model: str) -> str:
    h = HEADERS[lang]
    lines = [
        f"| {h['card']} | {h['best']} | {h['peak']} | {h['spare']} | {h['tps']} | {h['hours']} | {h['price']} |",
        "|---|---|---|---|---|---|---|",
    ]
    for card in CARDS:
        g = get_gpu(card)
        p = best(model, card)
        price = f"{g.msrp_usd:,.0f}" if g.msrp_usd else "–"
        if p is None:
            lines.append(f"| {g.name.replace('GeForce ', '')} | {h['none']} | – | – | – | – | {price} |")
            continue
        tps = p.tokens_per_second_estimate
        lines.append(
            f"| {g.name.replace('GeForce ', '')} | {p.strategy} | {peak(p)} | {p.memory.margin / GIB:.1f} | {tps:,.0f} | "
            f"{TOKENS / tps / 3600:.1f} | {price} |"
        )
    return "\n".join(lines)


PAIR_MODEL = "meta-llama/Llama-3.1-8B"


def pair_plans() -> list:
    """One plan per multi-card setup: LoRA, or QLoRA when LoRA has no room (the closest one when neither fits)."""
    out = []
    for card, mode in PAIRS:
        tried = [
            plan_or_closest(PAIR_MODEL, card, strategy=s, seq_len=SEQ, calibrated=False, distributed=mode or "auto")
            for s in ("lora", "qlora")
        ]
        out.append(best_of([p for p in tried if p.fits]) or tried[0])
    return out


def pairs(lang: str) -> str:
    h = HEADERS[lang]
    lines = [
        f"| {h['setup']} | {h['best']} | {h['peak']} | {h['spare']} | {h['fits']} | {h['tps']} | {h['total']} |",
        "|---|---|---|---|---|---|---|",
    ]
    for (card, mode), chosen in zip(PAIRS, pair_plans()):
        g = get_gpu(card)
        label = f"{card}" + (f" ({mode})" if mode else "")
        tps = f"{chosen.tokens_per_second_estimate:,.0f}" if chosen.fits and chosen.tokens_per_second_estimate else "–"
        lines.append(
            f"| {label} | {chosen.strategy} | {peak(chosen)} | {chosen.memory.margin / GIB:.1f} | {h['yes'] if chosen.fits else h['no']} | "
            f"{tps} | {g.msrp_usd * g.count:,.0f} |"
        )
    return "\n".join(lines)


def sections(lang: str) -> dict[str, str]:
    out = {"matrix": matrix(lang), "pairs": pairs(lang)}
    for m in ("meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-1.5B"):
        out[f"model:{m}"] = per_model(lang, m)
    return out


MARK = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[^ ]+) -->\n)(?P<body>.*?)(\n<!-- END GENERATED -->)", re.S)


def render(text: str, generated: dict[str, str]) -> str:
    return MARK.sub(lambda m: m.group(1) + generated[m.group("name")] + m.group(4), text)


def images() -> None:
    import shutil

    from hfgpu.planner import fit_table, plan
    from hfgpu.plots import plot_fit, plot_plan

    out = ROOT / "docs" / "images"
    out.mkdir(parents=True, exist_ok=True)
    plot_plan(plan("meta-llama/Llama-3.1-8B", "RTX 4090", strategy="lora", seq_len=SEQ), out / "plan-llama-3.1-8b-4090.png")
    plot_fit("meta-llama/Llama-3.1-8B", fit_table("meta-llama/Llama-3.1-8B", SEQ, TOKENS), out / "fit-llama-3.1-8b.png", TOKENS)
    demo_loss = ROOT / "outputs" / "demo" / "loss.png"
    if demo_loss.is_file():
        shutil.copy2(demo_loss, out / "loss-demo.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for lang, path in DOCS.items():
        text = path.read_text()
        new = render(text, sections(lang))
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python scripts/make_docs.py")
        return 1 if stale else 0
    images()
    print("docs regenerated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
