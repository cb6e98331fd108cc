"""Plain-text renderings of plans and tables (the CLI adds colour with rich where it is installed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hfgpu.units import gib

if TYPE_CHECKING:
    from hfgpu.planner import Plan


def millions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def plan_rows(p: "Plan") -> list[tuple[str, str, str]]:
    """(knob, value, reason) rows in the record's order: each knob the planner gave a reason for; the
    LoRA knobs as one row; distributed only with several cards."""
    from hfgpu.knobs import KNOB_NAMES

    r = p.reasons
    rows = []
    for name in KNOB_NAMES:
        if name not in r or name.startswith("lora_") or (name == "distributed" and p.gpu.count == 1):
            continue
        v = getattr(p, name)
        shown = ("on" if v else "off") if isinstance(v, bool) else f"{v} × {p.gpu.count}" if name == "distributed" else str(v)
        rows.append((name, shown, r[name]))
    if lora := p.lora:
        rows.append(
            ("lora", f"r={lora.r} alpha={lora.alpha} dropout={lora.dropout} targets={','.join(lora.target_modules)}", r.get("lora", ""))
        )
    if "rmsnorm" in r:
        rows.append(("rmsnorm", *r["rmsnorm"].split(": ", 1)))
    return rows


PHASES = {
    "loss": "the loss (end of the forward)",
    "recompute": "recomputing one checkpointed layer in backward",
    "embedding gradient": "the embedding's dense gradient (end of backward)",
}


def memory_rows(p: "Plan") -> list[tuple[str, str]]:
    m = p.memory
    return [
        ("weights", gib(m.weights, 2)),
        ("trainable state (grads + optimizer)", gib(m.trainable_state, 2)),
        ("activations", gib(m.activations, 2)),
        ("logits + loss", gib(m.logits, 2)),
        ("transient (per step: autocast copies, dequantization, embedding gradient)", gib(m.transient, 2)),
        ("overhead (CUDA context, workspace, fragmentation)", gib(m.overhead, 2)),
        ("total (peak)", gib(m.total, 2)),
        ("peak set by", PHASES[m.peak_phase]),
        (f"budget ({p.gpu.vram_gb:g} GB less headroom)" + (", per card" if p.gpu.count > 1 else ""), gib(m.budget, 2)),
    ]


def verify_rows(p: "Plan") -> list[tuple[str, str, str]]:
    """Planner vs simulation, component by component."""
    m, sim = p.memory, p.simulation
    tensor_peak = m.tensor_peak
    return [
        ("weights", gib(m.weights, 2), gib(sim["weights"], 2)),
        ("trainable state", gib(m.trainable_state, 2), gib(sim["trainable_state"], 2)),
        ("activations + logits + transient", gib(m.activations + m.logits + m.transient, 2), gib(sim["transient"], 2)),
        ("tensor peak", gib(tensor_peak, 2), gib(sim["peak"], 2)),
        ("+ overhead = total", gib(m.total, 2), gib(sim["total"], 2)),
        ("simulated / planned tensor peak", "", f"{sim['peak'] / tensor_peak:.2f}"),
    ]


VERDICTS = {  # Plan.fit → the words the header, the JSON's readers and the pictures show
    "fits": "FITS",
    "tight": "FITS (TIGHT)",
    "verified": "FITS (VERIFIED)",
    "rejected": "FITS ON PAPER, THE SIMULATED STEP DOES NOT",
    "does not fit": "DOES NOT FIT",
}
VERDICT_COLOURS = {"fits": "#2e7d32", "verified": "#2e7d32", "tight": "#b26a00", "rejected": "#c62828", "does not fit": "#c62828"}


def plan_header(p: "Plan") -> str:
    cc = p.gpu.compute_capability
    ccs = "cc unknown" if cc is None else f"cc {cc[0]}.{cc[1]}"
    verdict = VERDICTS[p.fit]
    room = f", {gib(p.memory.margin, 2)} to spare" if p.fits else ""
    return (
        f"{p.model} on {p.gpu.display_name} ({p.gpu.vram_gb:g} GB, {ccs}): {verdict} — "
        f"{gib(p.memory.total, 2)} of {gib(p.memory.budget, 2)}{room}; "
        f"{millions(p.params_trainable)} of {millions(p.params_total)} parameters train"
    )


def speed_line(p: "Plan") -> str:
    if p.tokens_per_second_estimate is None:
        return "speed: no estimate (the catalog has no TFLOPS for this card)"
    tps, hours = p.tokens_per_second_estimate, p.hours_per_million_tokens
    n = p.gpu.count
    rate = f"~{tps:,.0f} tokens/s" if n == 1 else f"~{tps:,.0f} tokens/s in total over {n} cards (~{tps / n:,.0f} per card)"
    return f"speed (estimate from peak TFLOPS × utilization): {rate}, ~{hours:.2f} h per 1M tokens"


def plan_text(p: "Plan") -> str:
    lines = [plan_header(p), ""]
    w = max(len(k) for k, _, _ in plan_rows(p))
    for knob, value, reason in plan_rows(p):
        lines.append(f"  {knob:<{w}}  {value:<14}  {reason}")
    lines.append("")
    mw = max(len(k) for k, _ in memory_rows(p))
    for name, value in memory_rows(p):
        lines.append(f"  {name:<{mw}}  {value:>10}")
    lines += ["", speed_line(p)]
    lines += [f"warning: {w}" for w in p.warnings]
    return "\n".join(lines)
