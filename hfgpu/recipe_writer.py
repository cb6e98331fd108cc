"""Write a recipe from a plan: a header that says how to run it and what it resolves to, and a short
comment on every key. `hfgpu recipe MODEL --gpu CARD` prints one; scripts/make_recipes.py writes
recipes/ with it (and tests/test_recipes_fit.py checks the committed files still match the planner).
"""

from __future__ import annotations

from dataclasses import dataclass

from hfgpu import objectives
from hfgpu.gpus import GPU, catalog
from hfgpu.knobs import KNOB_NAMES, RECIPE, batch_unit, knob_field, recipe_key
from hfgpu.planner import Plan, plan_or_closest
from hfgpu.throughput import checkpointing_cost
from hfgpu.units import GIB, gib


@dataclass(frozen=True)
class DataChoice:
    path: str
    format: str
    split: str = "train"
    eval_split: str | None = None
    note: str = ""


ALPACA = DataChoice(
    "yahma/alpaca-cleaned", "alpaca", "train[:98%]", "train[98%:]", "52k cleaned Alpaca instructions (instruction / input / output)"
)
ULTRAFEEDBACK = DataChoice(
    "trl-lib/ultrafeedback_binarized",
    "preference",
    "train",
    "test",
    "62k UltraFeedback prompts, each with a chosen and a rejected answer (chat messages)",
)
ULTRACHAT = DataChoice(
    "HuggingFaceH4/ultrachat_200k",
    "chat",
    "train_sft",
    "test_sft",
    "200k multi-turn chats (messages), rendered with the model's chat template",
)


def _neighbours(p: Plan) -> list[GPU]:
    """The consumer cards just below and just above this one in memory."""
    cards = sorted((g for g in catalog() if g.is_consumer), key=lambda g: (g.vram_gb, g.msrp_usd or 0))
    below = [g for g in cards if g.vram_gb < p.gpu.vram_gb]
    above = [g for g in cards if g.vram_gb > p.gpu.vram_gb]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


# The knobs a written recipe pins to the plan's values: the top-level ones (but distributed, which the
# launch decides) and the sequence length. The rest stay auto (accumulation follows the global batch).
PINNED = tuple(n for n in KNOB_NAMES if "." not in recipe_key(n) and n != "distributed") + ("seq_len",)


def _overrides(p: Plan, q: Plan) -> str:
    """The command-line overrides that turn this recipe into plan `q` (the recipe pins p's knobs)."""
    parts = [f"gpu='{q.gpu.name}'"]
    parts += [RECIPE.setting(n, getattr(q, n)) for n in PINNED if getattr(p, n) != getattr(q, n)]
    return " ".join(parts)


def neighbour_lines(p: Plan) -> list[str]:
    """For the next smaller and larger consumer card: the overrides that fit there, or why none do."""
    lines = []
    for g in _neighbours(p):
        objective = p.knobs.objective
        q = plan_or_closest(p.model, g, strategy=p.strategy, seq_len=p.seq_len, objective=objective)
        seq = p.seq_len
        while not q.fits and seq > 128:
            seq //= 2
            q = plan_or_closest(p.model, g, strategy=p.strategy, seq_len=seq, objective=objective)
        head = f"{g.name} ({g.vram_gb:g} GB): "
        if q.fits:
            lines.append(head + _overrides(p, q) + f" (peak {q.memory.total / GIB:.1f} of {gib(q.memory.budget)})")
        else:
            best = plan_or_closest(p.model, g, seq_len=p.seq_len, objective=objective)
            lines.append(
                head + f"{p.strategy} does not fit" + (f"; {_overrides(p, best)} does" if best.fits else "; choose a smaller model")
            )
    return lines


def _help(name: str, p: Plan) -> str:
    """The record's help for a knob; checkpointing's with the throughput model's cost for this strategy."""
    text = knob_field(name).metadata["help"]
    return text + f" (≈ +{checkpointing_cost(p.strategy):.0%} step time)" if name == "gradient_checkpointing" else text


def _kv(key: str, value, comment: str, width: int = 34) -> str:
    """`key: value  # comment`, comments aligned, always at least two spaces before the `#`."""
    text = f"{key}: {value}"
    return f"{text}{' ' * max(2, width - len(text))}# {comment}"


def preference_lines(objective: str) -> list[str]:
    """The recipe's `preference` section for an objective: the papers' values, a comment on each (hfgpu.objectives)."""
    return [_kv(f"  {h.name}", h.default, h.comment) for h in objectives.objective(objective).hyper]


def recipe_yaml(p: Plan, data: DataChoice, path: str = "my_recipe.yaml", output_dir: str | None = None, title: str | None = None) -> str:
    """A complete recipe pinning the plan's knobs, with a header and a comment on each key."""
    g = p.gpu
    cc = g.compute_capability
    card = f"{g.display_name} ({g.vram_gb:g} GB, {g.architecture}" + (f", cc {cc[0]}.{cc[1]})" if cc else ")")
    short = p.model.split("/")[-1]
    objective = p.knobs.objective
    tuned = objectives.objective(objective).preference
    out = output_dir or f"outputs/{short.lower()}-{p.strategy}" + (f"-{objective}" if tuned else "")
    # preference tuning moves a tuned model a little: rates ~40× below SFT's (alignment-handbook's DPO recipes)
    lr = (5e-7 if p.strategy == "full" else 5e-6) if tuned else (2e-5 if p.strategy == "full" else 2e-4)
    eval_split = f'"{data.eval_split}"' if data.eval_split else "null"
    unit = batch_unit(objective)
    plan_flags = f"--strategy {p.strategy} --seq-len {p.seq_len}" + (f" --objective {objective}" if tuned else "")
    lines = [
        f"# {title or f'{p.strategy} fine-tune of {short} on a {g.name}'}",
        "#",
        f"#   accelerate launch -m hfgpu.finetune {path}",
        f"#   accelerate launch -m hfgpu.finetune {path} data.path=./my.jsonl data.eval_split=null   # your own file",
        "#",
        f"# Model: {p.model} ({p.params_total / 1e9:.2f} B parameters, {p.params_trainable / 1e6:.1f} M trained).",
        f"# Card: {card}.",
        f"# Data: {data.path} — {data.note}.",
        *(
            [
                f"# Objective: {objective} — start from a model already tuned to follow instructions (an -Instruct model of the",
                "#   same shapes plans the same), the reference is that model as it was before this run.",
            ]
            if tuned
            else []
        ),
        f'# Plan (hfgpu plan {p.model} --gpu "{g.name}" {plan_flags}):',
        f"#   strategy {p.strategy}, precision {p.precision}, quantization {p.quantization}, gradient checkpointing "
        f"{'on' if p.gradient_checkpointing else 'off'},",
        f"#   micro-batch {p.micro_batch_size} × {p.grad_accum_steps} accumulation = {p.global_batch_size} {unit} of "
        f"{p.seq_len} tokens per step,",
        f"#   optimizer {p.optimizer}, attention {p.attention}, chunked loss {'on' if p.chunked_loss else 'off'}, "
        f"activation offloading {'on' if p.activation_offloading else 'off'}, tiled MLP {'on' if p.tiled_mlp else 'off'};",
        f"#   expected peak {gib(p.memory.total)} of the card's {g.vram_gb:g} GB (budget {gib(p.memory.budget)}).",
        "# Neighbouring cards:",
        *[f"#   {line}" for line in neighbour_lines(p)],
        "",
        f"model: {p.model}",
        _kv("gpu", f'"{g.name}"', "the card to plan for; auto: the one this machine has"),
        *[_kv(n, RECIPE.value(getattr(p, n)), _help(n, p)) for n in PINNED if n != "seq_len"],
        _kv("distributed", "auto", "what `accelerate launch` sets up (ddp, fsdp, deepspeed), else none"),
        "",
        "data:",
        _kv("  path", data.path, "a Hub dataset, or a local .jsonl/.json/.csv/.parquet/.txt"),
        _kv("  format", data.format, "text | alpaca | prompt_completion | chat | preference (pairs) | unpaired (kto)"),
        _kv("  split", f'"{data.split}"', "the split to train on"),
        _kv("  eval_split", eval_split, "held-out rows for eval loss; or eval_path: ./eval.jsonl"),
        _kv("  max_seq_len", p.seq_len, "longer: more context, more activation and logits memory"),
        _kv("  packing", "false", "true: several short examples per sequence (less padding, faster)"),
        "",
        "train:",
        _kv("  epochs", 1, "passes over the data; or max_steps: N"),
        _kv(
            "  learning_rate",
            f"{lr:.1e}",
            "preference tuning moves a tuned model a little: a small rate"
            if tuned
            else "full fine-tuning wants a small rate"
            if p.strategy == "full"
            else "LoRA tolerates larger rates than full fine-tuning",
        ),
        _kv("  schedule", "cosine", "cosine | linear | constant"),
        _kv("  warmup", 0.03, "fraction of the steps (or a number of steps)"),
        _kv("  weight_decay", 0.0, "decoupled weight decay (AdamW)"),
        _kv("  max_grad_norm", 1.0, "clip gradients; null to disable"),
        _kv("  global_batch_size", p.global_batch_size, f"{unit} per optimizer step = micro-batch × accumulation × cards"),
        _kv("  eval_every", 200, "steps between evaluations"),
        _kv("  save_every", 200, "steps between checkpoints (resume=auto continues from the newest)"),
        _kv("  keep_last", 2, "checkpoints kept on disk"),
        _kv("  seed", 0, "data order, LoRA init and dropout"),
        "",
    ]
    if tuned:
        lines += ["preference:", *preference_lines(objective), ""]
    if p.lora:
        lines += [
            "lora:",
            _kv("  r", p.lora.r, "rank: higher learns more, costs more memory"),
            _kv("  alpha", p.lora.alpha, "scaling; 2 × r is the usual choice"),
            _kv("  dropout", p.lora.dropout, "regularises; 0 for short runs"),
            _kv("  target_modules", "auto", "every linear layer (the QLoRA paper's advice); or [q_proj, v_proj]"),
            "",
        ]
    lines += [
        _kv("output_dir", out, "adapter or model, plan.json, metrics.jsonl, loss.png, checkpoints"),
        _kv("report_to", "none", "tensorboard | wandb (install the tracker)"),
        "",
    ]
    return "\n".join(lines)
