"""Plain-text renderings of plans and tables (the CLI adds colour with rich where it is installed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hfgpu.planner import Plan

GIB = 1024**3


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


def millions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def plan_rows(p: "Plan") -> list[tuple[str, str, str]]:
    """(knob, value, reason) rows, in the order a reader needs them."""
    r = p.reasons
    lora = p.lora
    rows = [
        ("strategy", p.strategy, r.get("strategy", "")),
        ("precision", p.precision, r.get("precision", "")),
        ("quantization", p.quantization, r.get("quantization", "")),
        ("gradient_checkpointing", "on" if p.gradient_checkpointing else "off", r.get("gradient_checkpointing", "")),
        ("micro_batch_size", str(p.micro_batch_size), r.get("micro_batch_size", "")),
        ("grad_accum_steps", str(p.grad_accum_steps), r.get("grad_accum_steps", "")),
        ("seq_len", str(p.seq_len), r.get("seq_len", "")),
        ("optimizer", p.optimizer, r.get("optimizer", "")),
        ("attention", p.attention, r.get("attention", "")),
        ("chunked_loss", "on" if p.chunked_loss else "off", r.get("chunked_loss", "")),
        ("activation_offloading", "on" if p.activation_offloading else "off", r.get("activation_offloading", "")),
        ("tiled_mlp", "on" if p.tiled_mlp else "off", r.get("tiled_mlp", "")),
    ]
    if p.gpu.count > 1:
        rows.append(("distributed", f"{p.distributed} × {p.gpu.count}", r.get("distributed", "")))
    if lora:
        rows.append(("lora", f"r={lora.r} alpha={lora.alpha} dropout={lora.dropout} targets={','.join(lora.target_modules)}", r.get("lora", "")))
    return rows


def memory_rows(p: "Plan") -> list[tuple[str, str]]:
    m = p.memory
    return [
        ("weights", gib(m.weights)),
        ("trainable state (grads + optimizer)", gib(m.trainable_state)),
        ("activations", gib(m.activations)),
        ("logits + loss", gib(m.logits)),
        ("overhead (CUDA context, workspace, fragmentation)", gib(m.overhead)),
        ("total (peak)", gib(m.total)),
        (f"budget ({p.gpu.vram_gb:g} GB less headroom)" + (", per card" if p.gpu.count > 1 else ""), gib(m.budget)),
    ]


def verify_rows(p: "Plan") -> list[tuple[str, str, str]]:
    """Planner vs simulation, component by component (the planner counts autocast weight copies as weights)."""
    m, sim = p.memory, p.simulation
    tensor_peak = m.weights + m.trainable_state + m.activations + m.logits
    return [
        ("weights", gib(m.weights), gib(sim["weights"])),
        ("trainable state", gib(m.trainable_state), gib(sim["trainable_state"])),
        ("activations + logits", gib(m.activations + m.logits), gib(sim["transient"])),
        ("tensor peak", gib(tensor_peak), gib(sim["peak"])),
        ("+ overhead = total", gib(m.total), gib(sim["peak"] + m.overhead)),
        ("simulated / planned tensor peak", "", f"{sim['peak'] / tensor_peak:.2f}"),
    ]


def plan_header(p: "Plan") -> str:
    cc = p.gpu.compute_capability
    ccs = "cc unknown" if cc is None else f"cc {cc[0]}.{cc[1]}"
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    return (
        f"{p.model} on {p.gpu.display_name} ({p.gpu.vram_gb:g} GB, {ccs}): {verdict} — "
        f"{gib(p.memory.total)} of {gib(p.memory.budget)}; "
        f"{millions(p.params_trainable)} of {millions(p.params_total)} parameters train"
    )


def speed_line(p: "Plan") -> str:
    if p.tokens_per_second_estimate is None:
        return "speed: no estimate (the catalog has no TFLOPS for this card)"
    return f"speed (estimate from peak TFLOPS × utilization): ~{p.tokens_per_second_estimate:,.0f} tokens/s, ~{p.hours_per_million_tokens:.2f} h per 1M tokens"


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
