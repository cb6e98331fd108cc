"""The `hfgpu` command: gpus | plan | fit | recipe | doctor | calibrate | push | merge | export | generate.

Exit codes: 0 success (plan fits), 2 bad input (one line on stderr, no traceback), 3 the plan does
not fit (its breakdown is still printed, and `--json` still prints the plan).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from hfgpu.errors import HfgpuError, run_command
from hfgpu.knobs import CLI, KNOB_NAMES, Knobs, cli_flag, knob_field


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage + message)
        raise HfgpuError(f"{message} (see `{self.prog} --help`)")


def _on_off(value: str) -> bool | str:
    v = value.lower()
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    if v == "auto":
        return "auto"
    raise argparse.ArgumentTypeError(f"invalid value {value!r}: use on, off or auto")


def _int_or_auto(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: give a whole number or auto") from None


def _bool_only(value: str) -> bool:
    v = _on_off(value)
    if v == "auto":
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: use on or off")
    return v


def _add_knob(g: Any, name: str) -> None:
    """One flag of the knob record (hfgpu.knobs.Knobs): `seq_len` → `--seq-len`, its type, default and help."""
    f = knob_field(name)
    meta, flag = f.metadata, cli_flag(name)
    help_text = meta["help"].replace("%", "%%")
    kind = meta["kind"]
    if kind == "choice":
        g.add_argument(flag, default=f.default, metavar="|".join(meta["choices"]), help=help_text)
    elif kind == "bool":
        g.add_argument(
            flag,
            type=_on_off if meta["auto"] else _bool_only,
            nargs="?",
            const=True,
            default=f.default,
            metavar="on|off" + ("|auto" if meta["auto"] else ""),
            help=help_text,
        )
    elif kind == "int":
        g.add_argument(flag, type=_int_or_auto, default=f.default, metavar="N", help=help_text)
    elif kind == "float":
        g.add_argument(flag, type=float, default=f.default, metavar="P", help=help_text)
    else:
        g.add_argument(flag, default=f.default, metavar="a,b,c", help=help_text)


def _add_knobs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan knobs (each defaults to auto: the planner chooses)")
    for name in KNOB_NAMES:
        _add_knob(g, name)


def _knobs(args: argparse.Namespace) -> Knobs:
    return Knobs(**{k: getattr(args, k) for k in KNOB_NAMES if hasattr(args, k)})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hfgpu", description="Plan and run fine-tuning of Hugging Face models on the NVIDIA card you own.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("gpus", help="the GPU catalog, as a table")
    g.add_argument("--json", action="store_true", help="print the catalog as JSON")

    p = sub.add_parser("plan", help="what fits on a card, and why")
    p.add_argument("model", help="Hub repo id, local folder or config.json (offline catalog: see `hfgpu fit --help`)")
    p.add_argument("--gpu", default="auto", help='card name ("RTX 3060", "4090", "1080ti"), memory ("12GB"), "2x RTX 3090", or auto')
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--plot", metavar="PNG", help="also draw the memory breakdown against the card (e.g. plan.png)")
    p.add_argument("--verify", action="store_true", help="also simulate one real training step on fake tensors (~10 s for 8B) and compare")
    _add_knobs(p)

    from hfgpu.models import catalog_models

    f = sub.add_parser(
        "fit",
        help="for each consumer card: the best strategy that fits, its speed and price",
        epilog="offline catalog (no network needed): " + ", ".join(catalog_models()),
    )
    f.add_argument("model")
    _add_knob(f, "seq_len")
    f.add_argument("--tokens", type=float, default=10e6, metavar="N", help="tokens to train, for the hours column (default 10M)")
    f.add_argument("--budget", type=float, default=None, metavar="USD", help="mark the fastest card at or under this launch price")
    f.add_argument("--json", action="store_true")
    f.add_argument("--plot", metavar="PNG", help="also draw each card's best peak against its memory (e.g. fit.png)")
    r = sub.add_parser("recipe", help="write a recipe for MODEL on CARD from its plan (to stdout)")
    r.add_argument("model")
    r.add_argument("--gpu", required=True, help="the card to plan for")
    _add_knob(r, "strategy")
    _add_knob(r, "seq_len")
    r.add_argument(
        "--data", default="alpaca", choices=["alpaca", "chat"], help="alpaca: yahma/alpaca-cleaned; chat: HuggingFaceH4/ultrachat_200k"
    )
    r.add_argument("--path", default="my_recipe.yaml", help="the file name the header's commands use")
    pu = sub.add_parser("push", help="upload a finished run (adapter + tokenizer + model card) to the Hub")
    pu.add_argument("run", help="the run's output_dir")
    pu.add_argument("--repo-id", required=True, help="owner/name")
    pu.add_argument("--private", action="store_true")
    pu.add_argument("--merged", action="store_true", help="push the adapter merged into the base weights")
    pu.add_argument("--gguf", metavar="QUANT", help="also upload the merged model as a GGUF file: f16, bf16, q8_0, q4_0")
    pu.add_argument(
        "--base-model-id",
        metavar="OWNER/NAME",
        help="the base's Hub id, for a run trained from a local folder or GGUF file (the pushed adapter loads it from there)",
    )

    me = sub.add_parser("merge", help="fold a run's LoRA adapter into its base weights")
    me.add_argument("run")
    me.add_argument("--out", required=True, help="an empty or new folder for the merged model")

    ex = sub.add_parser("export", help="write a finished run as a GGUF file (llama.cpp, Ollama, LM Studio)")
    ex.add_argument("run", help="the run's output_dir (a LoRA/QLoRA run is merged into its base first)")
    ex.add_argument(
        "--format",
        default="gguf",
        help="gguf: the merged or full model | gguf-lora: the adapter, for llama.cpp's --lora | gguf-base: the base it applies to",
    )
    ex.add_argument("--quant", help="f32 | f16 | bf16 | q8_0 | q4_0 (default q8_0; gguf-lora: f32 | f16 | bf16 | q8_0, default f16)")
    ex.add_argument(
        "--out",
        help="the .gguf file (default: RUN/model-QUANT.gguf, RUN/adapter-QUANT.gguf, RUN/base-QUANT.gguf, or in the --ollama folder)",
    )
    ex.add_argument("--ollama", help="a folder to write the GGUF file and an Ollama Modelfile into")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    do = sub.add_parser("doctor", help="can this machine fine-tune? GPUs, torch kernels, bitsandbytes, flash-attn, bf16")
    do.add_argument("--json", action="store_true")

    ca = sub.add_parser("calibrate", help="measure real steps of MODEL on this machine's GPU and correct later plans for it")
    ca.add_argument("model")
    ca.add_argument("--gpu", default="auto", help="the card's catalog name (default: detected)")

    ge = sub.add_parser("generate", help="complete a prompt with a fine-tuned run")
    ge.add_argument("run")
    ge.add_argument("--prompt", required=True)
    ge.add_argument("--max-new-tokens", type=int, default=128)
    ge.add_argument("--template", default="auto", choices=["auto", "chat", "alpaca", "raw"], help="auto: the format the run trained on")
    return parser


# --- commands ------------------------------------------------------------------------------------


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=160 if not sys.stdout.isatty() else None)


def cmd_gpus(args: argparse.Namespace) -> int:
    from hfgpu.gpus import catalog

    cards = catalog()
    if args.json:
        print(
            json.dumps(
                [g.to_dict() | {"series": g.series, "bandwidth_gbps": g.bandwidth_gbps, "source": g.source} for g in cards], indent=2
            )
        )
        return 0
    from rich.table import Table

    t = Table(title="GPU catalog (hfgpu/resources/gpus.csv; sources in its last column)")
    for col in ("card", "arch", "cc", "VRAM GB", "GB/s", "FP32 TF", "tensor TF", "bf16", "launch $"):
        t.add_column(col, justify="left" if col in ("card", "arch") else "right")
    for g in cards:
        cc = g.compute_capability
        t.add_row(
            g.name,
            g.architecture,
            f"{cc[0]}.{cc[1]}",
            f"{g.vram_gb:g}",
            f"{g.bandwidth_gbps or '-'}",
            f"{g.fp32_tflops or '-'}",
            f"{g.tensor_tflops or '-'}",
            "yes" if g.bf16_supported else "no",
            f"{g.msrp_usd:,.0f}" if g.msrp_usd else "-",
        )
    _console().print(t)
    return 0


def _png(path: str) -> str:
    from pathlib import Path

    p = Path(path)
    if p.suffix.lower() != ".png":
        raise HfgpuError(f"--plot {path!r} must end in .png, e.g. --plot plan.png")
    if not p.parent.is_dir():
        raise HfgpuError(f"--plot {path!r}: folder {str(p.parent)!r} does not exist")
    return path


def _wrote(path: str, json_out: bool) -> None:
    """Where --plot wrote its picture (on stderr under --json, whose stdout is the JSON alone)."""
    print(f"wrote {path}", file=sys.stderr if json_out else sys.stdout)


def cmd_plan(args: argparse.Namespace) -> int:
    from hfgpu.planner import DoesNotFit, plan_knobs

    try:
        result = plan_knobs(args.model, args.gpu, _knobs(args), surface=CLI, verify=args.verify)
        alternatives: list[str] = []
    except DoesNotFit as e:
        result, alternatives = e.closest, e.alternatives
    if args.plot:
        from hfgpu.plots import plot_plan

        plot_plan(result, _png(args.plot))
    if args.json:
        d = result.to_dict()
        if not result.fits:
            d["alternatives"] = alternatives
        print(json.dumps(d, indent=2))
    else:
        _print_plan(result, alternatives)
    if args.plot:
        _wrote(args.plot, args.json)
    return 0 if result.fits else 3


def _print_plan(p, alternatives: list[str]) -> None:
    from rich.table import Table

    from hfgpu import report

    c = _console()
    colour = {"fits": "[green]", "verified": "[green]", "tight": "[yellow]"}.get(p.fit, "[red]")
    c.print(colour + report.plan_header(p).replace("[", r"\["))
    t = Table(show_header=True, box=None, pad_edge=False)
    t.add_column("knob", style="bold")
    t.add_column("value", max_width=32, overflow="fold")
    t.add_column("why", overflow="fold")
    for row in report.plan_rows(p):
        t.add_row(*row)
    c.print(t)
    m = Table(show_header=True, box=None, pad_edge=False)
    m.add_column("memory")
    m.add_column("", justify="right")
    for row in report.memory_rows(p):
        m.add_row(*row)
    c.print(m)
    if p.simulation:
        v = Table(show_header=True, box=None, pad_edge=False, title="verified: one training step simulated on fake tensors")
        for col in ("component", "planner", "simulated"):
            v.add_column(col, justify="left" if col == "component" else "right")
        for row in report.verify_rows(p):
            v.add_row(*row)
        c.print(v)
    c.print(report.speed_line(p))
    for w in p.warnings:
        c.print(f"[yellow]warning:[/] {w}")
    if not p.fits:
        c.print(
            "[red]does not fit.[/] "
            + ("What fits instead: " + "; ".join(alternatives) if alternatives else "Nothing smaller fits: choose a smaller model.")
        )


def cmd_fit(args: argparse.Namespace) -> int:
    from hfgpu.models import model_spec

    if args.tokens <= 0:
        raise HfgpuError(f"--tokens {args.tokens:g} must be positive, e.g. --tokens 10e6")
    if args.budget is not None and args.budget <= 0:
        raise HfgpuError(f"--budget {args.budget:g} must be a positive price in USD, e.g. --budget 600")
    spec = model_spec(args.model)
    from hfgpu.planner import fit_table

    rows = fit_table(args.model, args.seq_len, args.tokens, args.budget, surface=CLI)
    if args.plot:
        from hfgpu.plots import plot_fit

        plot_fit(spec.name, rows, _png(args.plot), args.tokens)
    if args.json:
        print(json.dumps({"model": spec.name, "tokens": args.tokens, "budget_usd": args.budget, "gpus": rows}, indent=2))
        if args.plot:
            _wrote(args.plot, True)
        return 0
    from rich.table import Table

    t = Table(
        title=f"{spec.name}: which cards fit (peak GiB per strategy; ✓ fits, ~ fits tightly: within the memory model's "
        f"known error of the budget); hours for {args.tokens:,.0f} tokens are estimates"
    )
    for col in ("card", "GB", "budget", "launch $", "full", "lora", "qlora", "best", "to spare", "tokens/s", "hours", "note"):
        t.add_column(col, justify="left" if col in ("card", "best", "note") else "right")
    for r in rows:
        marks = [f"cheapest {s}" for s in r["cheapest_for"]] + (["fastest within budget"] if r["fastest_within_budget"] else [])
        marks += [r["fit_note"]] if r["fit_note"] else []
        cells = [f"{r['peak_gib'][s]:.1f}{(' ~' if r['tight'][s] else ' ✓') if r['fits'][s] else ''}" for s in ("full", "lora", "qlora")]
        best = r["best_strategy"]
        t.add_row(
            r["gpu"],
            f"{r['vram_gb']:g}",
            f"{r['budget_gib']:.1f}",
            f"{r['launch_price_usd']:,.0f}" if r["launch_price_usd"] else "-",
            *cells,
            best or "does not fit",
            f"{r['margin_gib'][best]:.1f}" if best else "-",
            f"{r['tokens_per_second_estimate']:,.0f}" if r["tokens_per_second_estimate"] else "-",
            f"{r['hours_estimate']:.1f}" if r["hours_estimate"] else "-",
            ", ".join(marks),
        )
    _console().print(t)
    if args.plot:
        _wrote(args.plot, False)
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    from hfgpu.planner import plan_knobs
    from hfgpu.recipe_writer import ALPACA, ULTRACHAT, recipe_yaml

    p = plan_knobs(args.model, args.gpu, _knobs(args), surface=CLI)  # DoesNotFit: exit 3, no recipe
    sys.stdout.write(recipe_yaml(p, ULTRACHAT if args.data == "chat" else ALPACA, path=args.path))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from hfgpu.hub import push

    push(args.run, args.repo_id, private=args.private, merged=args.merged, gguf=args.gguf, base_model_id=args.base_model_id)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hfgpu.export import export_to

    out = Path(args.out) if args.out else None
    export_to(args.run, quant=args.quant, out=out, ollama=args.ollama, overwrite=args.overwrite, format=args.format)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from hfgpu.hub import merge

    merge(args.run, args.out)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from hfgpu.hub import generate

    if args.max_new_tokens < 1:
        raise HfgpuError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    print(generate(args.run, args.prompt, args.max_new_tokens, args.template))
    return 0


def cmd_doctor(args: argparse.Namespace, probe=None) -> int:
    from hfgpu.doctor import diagnose, probe_system

    report = diagnose(probe or probe_system())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.ok else 1
    from rich.table import Table

    t = Table(title="hfgpu doctor")
    for col in ("check", "status", "detail", "fix"):
        t.add_column(col, overflow="fold")
    colour = {"ok": "green", "warn": "yellow", "fail": "red"}
    for c in report.checks:
        t.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail, c.fix)
    _console().print(t)
    print("this machine can fine-tune" if report.ok else "fix the failed checks above before fine-tuning on the GPU")
    return 0 if report.ok else 1


def cmd_calibrate(args: argparse.Namespace) -> int:
    from hfgpu.calibrate import calibrate

    calibrate(args.model, args.gpu)
    return 0


COMMANDS = {
    "calibrate": cmd_calibrate,
    "doctor": cmd_doctor,
    "gpus": cmd_gpus,
    "plan": cmd_plan,
    "fit": cmd_fit,
    "recipe": cmd_recipe,
    "push": cmd_push,
    "merge": cmd_merge,
    "export": cmd_export,
    "generate": cmd_generate,
}


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
