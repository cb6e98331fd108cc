"""Pictures where people would rather look than read (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from hfgpu.units import GIB, gib

COMPONENTS = [
    ("weights", "#4c72b0"),
    ("trainable_state", "#55a868"),
    ("activations", "#c44e52"),
    ("logits", "#dd8452"),
    ("transient", "#937860"),
    ("overhead", "#8172b3"),
]
STRATEGY_COLOURS = {"full": "#4c72b0", "lora": "#55a868", "qlora": "#dd8452", None: "#bbbbbb"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_plan(p, path: str | Path) -> Path:
    """A stacked bar of the plan's memory against the card's memory, the budget (headroom) marked."""
    plt = _plt()
    m = p.memory.to_dict()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bottom = 0.0
    for name, colour in COMPONENTS:
        value = m[name] / GIB
        ax.bar([0], [value], bottom=bottom, color=colour, width=0.5, label=f"{name.replace('_', ' ')}  {value:.1f} GiB")
        bottom += value
    card = p.gpu.vram_gb * GIB / GIB
    ax.axhline(card, color="black", linewidth=1.5, label=f"{p.gpu.name}: {p.gpu.vram_gb:g} GB")
    ax.axhline(m["budget"] / GIB, color="black", linestyle="--", linewidth=1, label=f"budget (headroom kept) {gib(m['budget'])}")
    ax.set_xlim(-0.6, 1.9)
    ax.set_xticks([])
    ax.set_ylabel("GiB")
    ax.set_ylim(0, max(bottom, card) * 1.12)
    from hfgpu.report import VERDICT_COLOURS, VERDICTS

    room = f", {gib(p.memory.margin, 2)} to spare" if p.fits else ""
    ax.set_title(
        f"{p.model}: {p.strategy}, micro-batch {p.micro_batch_size} × {p.grad_accum_steps}, seq {p.seq_len}\n"
        f"{VERDICTS[p.fit]} — {gib(m['total'], 2)} of {gib(m['budget'], 2)}{room}",
        fontsize=9,
        color=VERDICT_COLOURS[p.fit],
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_fit(model: str, rows: list[dict], path: str | Path, tokens: float) -> Path:
    """Per consumer card: the best strategy's peak against the card's memory, with price and hours."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.5))
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        ax.barh(y, r["vram_gb"], color="#eeeeee", edgecolor="#999999", height=0.8)
        tight = bool(r["best_strategy"]) and r["tight"][r["best_strategy"]]
        if r["best_strategy"]:  # a tight fit is hatched and says so: within the model's error of the budget
            colour = STRATEGY_COLOURS[r["best_strategy"]]
            edge = "#333333" if tight else colour
            ax.barh(y, r["best_peak_gib"], color=colour, height=0.5, hatch="////" if tight else None, edgecolor=edge)
        price = f"${r['launch_price_usd']:,.0f}" if r["launch_price_usd"] else "–"
        hours = f"{r['hours_estimate']:.1f} h" if r["hours_estimate"] else "–"
        label = f"{price} · {hours}" + (" · TIGHT" if tight else "") if r["best_strategy"] else f"{price} · does not fit"
        ax.text(r["vram_gb"] + 0.3, y, label, va="center", fontsize=7, color="#b26a00" if tight else "black")
    ax.set_yticks(range(len(rows)), [r["gpu"].replace("GeForce ", "") for r in reversed(rows)], fontsize=7)
    ax.set_xlabel("GB (grey: the card; colour: peak of the best strategy that fits)")
    ax.set_title(f"{model}: which card fits, at what price, in how many hours for {tokens:,.0f} tokens (estimates)", fontsize=9)
    from matplotlib.patches import Patch

    # explicit swatches: empty bars make legend entries in the default colour, whatever colour they were given
    swatches = [Patch(color=STRATEGY_COLOURS[s], label=s) for s in ("full", "lora", "qlora")]
    swatches.append(Patch(facecolor="white", edgecolor="#333333", hatch="////", label="tight (check with --verify)"))
    ax.legend(handles=swatches, loc="upper right", fontsize=8)
    ax.set_xlim(0, max(r["vram_gb"] for r in rows) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_losses(metrics_path: Path, png: Path) -> None:
    """loss.png: the training loss per step and the eval loss per evaluation, from metrics.jsonl; a preference run's
    reward accuracy and margin (train and eval) beside them. Without matplotlib (a bare GPU image running
    scripts/gpu_check.sh; a normal install has it) the picture is skipped: metrics.jsonl holds the numbers."""
    try:
        plt = _plt()
    except ImportError:
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    rewards = any("rewards/accuracy" in r or "eval_rewards/accuracy" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(12 if rewards else 7, 4))
    ax = axes[0] if rewards else axes
    if rewards:
        _plot_rewards(axes[1], rows)
    if train:  # a short run logs a few points: draw them, a line through one point is invisible
        ax.plot(*zip(*train), "." if len(train) < 30 else "", linestyle="-", label="train loss")
    if len(evals) > 2:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    elif evals:  # before and after training only: two measurements, not a curve between them
        ax.plot(*zip(*evals), "o", linestyle="none", label="eval loss (before / after training)" if len(evals) == 2 else "eval loss")
    if not train:
        ax.text(
            0.5,
            0.5,
            "no training loss logged yet: the run was shorter than train.log_every",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=9,
            color="#666666",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _plot_rewards(ax, rows: list[dict]) -> None:
    """Reward accuracy (left axis, 0–1) and margin (right axis) per logged step and per evaluation."""
    series = lambda key: [(r["step"], r[key]) for r in rows if key in r]  # noqa: E731
    for key, style, colour, label in (
        ("rewards/accuracy", ".-", "#4c72b0", "train reward accuracy"),
        ("eval_rewards/accuracy", "o-", "#1f3d7a", "eval reward accuracy"),
    ):
        if points := series(key):
            ax.plot(*zip(*points), style, color=colour, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward accuracy")
    ax.grid(alpha=0.3)
    margin = ax.twinx()
    for key, style, colour, label in (
        ("rewards/margin", ".--", "#dd8452", "train reward margin"),
        ("eval_rewards/margin", "s--", "#a0522d", "eval reward margin"),
    ):
        if points := series(key):
            margin.plot(*zip(*points), style, color=colour, label=label)
    margin.set_ylabel("reward margin (chosen − rejected)")
    lines = ax.get_legend_handles_labels()
    more = margin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")
