"""Fine-tune end to end: recipe → plan → data → model → train → outputs.

    accelerate launch -m hfgpu.finetune recipes/demo_cpu.yaml train.epochs=2
    python -m hfgpu.finetune recipes/demo_cpu.yaml            # one process, no launcher needed

Python: `hfgpu.finetune(hfgpu.load_recipe("recipes/demo_cpu.yaml"))` returns a `RunResult`.
Outputs in `output_dir`: the adapter (adapter_model.safetensors + adapter_config.json, loadable by
plain `peft.PeftModel.from_pretrained`) or the full model, the tokenizer, resolved_recipe.yaml,
plan.json, metrics.jsonl, loss.png.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

from hfgpu import objectives
from hfgpu.errors import HfgpuError, run_command
from hfgpu.knobs import KNOB_NAMES, RECIPE, Knobs, batch_unit, recipe_key
from hfgpu.recipe import Recipe, get_key, load_recipe, resolve_path, set_key
from hfgpu.run import RUN_FILES, RunLock, check_output_dir, clear_run, is_run_folder  # noqa: F401  (re-exported)


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict
    plan: "object"  # hfgpu.planner.Plan
    seconds: float
    initial_metrics: dict  # eval metrics before the first step (empty when resumed or without eval data)
    model: "object" = None  # the trained model (a PeftModel for LoRA/QLoRA), unwrapped


def launch_env() -> tuple[int, str]:
    """(processes, distributed mode) as `accelerate launch` / torchrun set them in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    on = lambda name: os.environ.get(name, "").lower() in ("1", "true", "yes")
    if on("ACCELERATE_USE_FSDP"):
        return world, "fsdp"
    if on("ACCELERATE_USE_DEEPSPEED"):
        return world, "zero3" if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else "zero2"
    return world, "ddp" if world > 1 else "none"


def plan_for(recipe: Recipe):
    """The Plan for a recipe: its fixed knobs kept, "auto" ones chosen for its GPU and launch."""
    from dataclasses import replace

    from hfgpu.gpus import cpu_device, get_gpu
    from hfgpu.planner import plan_knobs

    gpu = recipe.gpu
    if gpu.strip().lower() == "auto":
        try:
            card = get_gpu("auto")
        except HfgpuError:
            card = cpu_device()  # no CUDA here: a CPU run
    else:
        card = get_gpu(gpu)
    world, mode = launch_env()
    if world > 1 and card.count == 1:
        card = replace(card, count=world)
    given = {name: get_key(recipe, recipe_key(name)) for name in KNOB_NAMES}
    if given["distributed"] == "auto":
        given["distributed"] = mode  # what `accelerate launch` set up
    return plan_knobs(resolve_path(recipe.model), card, Knobs(**given), surface=RECIPE)


def resolved(recipe: Recipe, p) -> Recipe:
    """The recipe with every "auto" replaced by the plan's value: what actually ran."""
    r = recipe.model_copy(deep=True)
    r.gpu = p.gpu.display_name
    local = Path(resolve_path(recipe.model)).expanduser()
    if local.is_dir() or local.is_file():  # a folder, or a .gguf file
        r.model = str(local.resolve())  # what ran, wherever the command was started from
    for name in KNOB_NAMES:
        if name.startswith("lora_") and p.lora is None:
            continue  # a full fine-tune has no adapters: its lora section stays as written
        v = getattr(p.knobs, name)
        set_key(r, recipe_key(name), list(v) if isinstance(v, tuple) else v)
    return r


# what a checkpoint must match to be resumed: the values that change what is computed. Not the
# length of the run (max_steps/epochs may grow), evaluation, logging or the memory savers.
FINGERPRINT_KEYS = (
    "model",
    "strategy",
    "precision",
    "quantization",
    "micro_batch_size",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "train.learning_rate",
    "train.schedule",
    "train.warmup",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.global_batch_size",
    "train.seed",
)


def run_fingerprint(ran: Recipe, p, data_hash: str) -> dict:
    flat = ran.model_dump(mode="json")
    get = lambda key: flat[key] if "." not in key else flat[key.split(".")[0]][key.split(".")[1]]
    record = {key: get(key) for key in FINGERPRINT_KEYS}
    record["grad_accum_steps"] = p.grad_accum_steps
    if p.knobs.strategy != "full" and p.knobs.frozen_dtype != p.knobs.precision:  # a 16-bit base under fp32 compute
        record["frozen_dtype"] = p.knobs.frozen_dtype  # (absent otherwise: checkpoints written before it stay resumable)
    if objectives.objective(p.knobs.objective).preference:  # (absent for sft: older checkpoints stay resumable)
        record["objective"] = p.knobs.objective
        record["preference"] = flat["preference"]
    record["data"] = data_hash
    return record


def kto_balance(desirable: int, undesirable: int, pref) -> str:
    """The KTO paper's advice: λ_D·n_D / λ_U·n_U in [1, 4/3]; said with the weight that would bring it there."""
    line = f"kto: {desirable} desirable, {undesirable} undesirable completions"
    if not desirable or not undesirable:
        return line + "; warning: with one kind only, KTO learns from its KL baseline alone: add completions of the other kind"
    ratio = pref.desirable_weight * desirable / (pref.undesirable_weight * undesirable)
    if 1 <= ratio <= 4 / 3:
        return line + f"; weighted ratio {ratio:.2f}, in the paper's [1, 4/3]"
    low, high = pref.undesirable_weight * undesirable / desirable, pref.undesirable_weight * undesirable * 4 / 3 / desirable
    return (
        line + f"; warning: λ_D·n_D / λ_U·n_U = {ratio:.2f}, outside the KTO paper's [1, 4/3]: set preference.desirable_weight "
        f"in [{low:.2f}, {high:.2f}]"
    )


REFERENCE_FILE = "reference_logps.json"


def reference_columns(accelerator, model, data, p, recipe: Recipe, pad_id: int, data_hash: str, out: Path, say) -> None:
    """Full fine-tuning with DPO/IPO: the reference's log-probs of every training and eval pair, computed once by the
    model before its first step (no frozen copy is ever held) and added to the pairs as `ref_logps`. Cached in the run
    folder under the data's and model's fingerprint, so a resumed run reads them instead of recomputing them."""
    import torch

    from hfgpu.memory import loss_chunk_tokens
    from hfgpu.modeling import DTYPES
    from hfgpu.preference import precompute_reference
    from hfgpu.train import is_oom

    key = {"model": str(recipe.model), "precision": p.precision, "data": data_hash, "eval": data.eval is not None}
    path = out / REFERENCE_FILE
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("key") != key:
        if accelerator.is_main_process:
            device = accelerator.device
            model.to(device)
            dtype = DTYPES[p.precision] if p.precision != "fp32" else None
            chunk = loss_chunk_tokens(p.spec.vocab_size)
            logps, batch = {}, p.micro_batch_size
            for split, pairs in (("train", data.train), ("eval", data.eval)):
                if pairs is None:
                    continue
                while True:
                    try:
                        logps[split] = precompute_reference(model, pairs, pad_id, batch, chunk, device, dtype)
                        break
                    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                        if not is_oom(e):
                            raise
                        if batch == 1:
                            raise HfgpuError(
                                f"the reference log-probs of objective {p.objective} do not fit on {p.gpu.name} even one pair at "
                                f"a time (seq_len {p.seq_len}): lower data.max_seq_len, or use strategy=lora (its reference is "
                                "the base with the adapters disabled, computed per step)"
                            ) from None
                        batch = max(1, batch // 2)
                        torch.cuda.empty_cache()
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, **logps}))
            tmp.replace(path)
            say(f"reference: log-probs of {len(data.train)} pairs precomputed before training (cached in {path.name})")
        accelerator.wait_for_everyone()
        cached = json.loads(path.read_text())
    else:
        say(f"reference: log-probs read from {path.name}")
    data.train = data.train.add_column("ref_logps", cached["train"])
    if data.eval is not None:
        data.eval = data.eval.add_column("ref_logps", cached["eval"])


def record_base(out: Path, model: str) -> None:
    path = out / "adapter_config.json"
    config = json.loads(path.read_text())
    from hfgpu.run import recorded_base

    config["base_model_name_or_path"] = recorded_base(model)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_final(out: Path, write_outputs, trained, adapter: bool) -> None:
    """The trained adapter (or model), the tokenizer and the run's records into the run folder. A failed write (a full
    disk) removes the weights and final_metrics.json it wrote, so the folder is not taken for a finished run, and
    says how to go on: the checkpoints stay."""
    from hfgpu.checkpoint import complete_checkpoints
    from hfgpu.errors import write_failure

    try:
        write_outputs()
    except Exception as e:
        weights = ("adapter_model.safetensors", "adapter_config.json") if adapter else ("model.safetensors", "config.json")
        for name in (*weights, "final_metrics.json", "README.md"):  # README.md: peft's template, written first
            (out / name).unlink(missing_ok=True)
        ckpts = complete_checkpoints(out / "checkpoints")
        after = (
            f"checkpoint {ckpts[-1].name} is intact: free space, then run the same command with resume=auto"
            if ckpts
            else "no checkpoint was kept (train.save_every): free space, then run again"
        )
        needed = sum(p.numel() * p.element_size() for p in trained.parameters() if p.requires_grad or not adapter)
        error = write_failure(e, out, f"the trained {'adapter' if adapter else 'model'}", needed, after)
        if error is None:
            raise
        raise error from None


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # report_to → importable packages


SHOWN_ANSWERS = 3  # eval answers printed before → after at the end of a run (all of them go to eval_answers.jsonl)


def write_answers(path: Path, data, answers: dict, say) -> None:
    """eval_answers.jsonl: each eval question, its reference, and the model's greedy answer before and after training
    (null where none was generated); the first few are printed, so a run shows what the fine-tune changed."""
    after = answers.get("after", [])
    before = answers.get("before", [None] * len(after))
    rows = [
        {"question": q, "reference": ref, "before": b, "after": a}
        for q, (_, ref), b, a in zip(data.eval_questions, data.eval_prompts, before, after)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    clip = lambda text: "—" if text is None else (text if len(text) <= 90 else text[:89] + "…").replace("\n", " ")
    shown = [r for r in rows if r["after"] is not None][:SHOWN_ANSWERS]
    if shown:
        say(f"eval answers, before → after training ({len(shown)} of {len(rows)}; all in {path.name}):")
    for r in shown:
        say(f"  {clip(r['question'])}\n    before: {clip(r['before'])}")
        say(f"    after:  {clip(r['after'])}   (reference: {clip(r['reference'])})")


def check_tracker(report_to: str) -> None:
    """A tracker whose package is missing is refused before anything loads (accelerate would warn once and log nothing)."""
    import importlib.util

    packages = TRACKER_PACKAGES.get(report_to, ())
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        raise HfgpuError(
            f"report_to: {report_to} needs the {packages[0]} package, which is not installed: "
            f"pip install {packages[0]}, or set report_to: none"
        )


def tracker_hparams(d: dict, prefix: str = "") -> dict:
    """plan.json flattened to the scalar hyper-parameters trackers accept (TensorBoard takes int, float, str, bool):
    nested keys joined with "/", lists joined with ",", None as "none"."""
    flat: dict = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(tracker_hparams(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value)
        elif value is None:
            flat[name] = "none"
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def finetune(recipe: Recipe, say=print) -> RunResult:
    """Run the recipe; returns the output folder, final metrics and the plan."""
    start = time.time()
    check_tracker(recipe.report_to)
    out = check_output_dir(recipe)
    lock = RunLock(out)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        lock.acquire()
    failed = True
    try:
        from hfgpu.errors import library_notices_hidden

        with library_notices_hidden():  # the command line's rules in Python too
            result = _finetune(recipe, out, start, say)
        failed = False
        return result
    finally:
        lock.release(failed)


def check_data_paths(recipe: Recipe) -> None:
    """A data file the recipe names that is not there, refused in one line before torch and datasets load
    (a name with one '/' and no file behind it is a Hub dataset id, checked when it loads)."""
    from hfgpu.sources import EXTENSIONS, looks_like_hub_id

    named = [("data.path", recipe.data.path), ("data.eval_path", recipe.data.eval_path)]
    for i, src in enumerate(recipe.data.mix or []):
        named += [(f"data.mix[{i}].path", src.path), (f"data.mix[{i}].eval_path", src.eval_path)]
    for key, path in named:
        if path is None:
            continue
        local = Path(resolve_path(path)).expanduser()
        if not local.exists() and not (looks_like_hub_id(path) and local.suffix.lower() not in EXTENSIONS):
            raise HfgpuError(f"data file {path!r} not found: check {key} (a local file, folder, or a Hub dataset id owner/name)")


def _finetune(recipe: Recipe, out: Path, start: float, say) -> RunResult:
    # what a user can get wrong is checked before torch loads (seconds on a small machine): the Hub target,
    # the data files, the plan (the planner is torch-free)
    if recipe.hub.repo_id:  # fail before training, not after it
        from hfgpu.hub import REPO_ID, require_token

        if not REPO_ID.match(recipe.hub.repo_id):
            raise HfgpuError(f"hub.repo_id {recipe.hub.repo_id!r} is not owner/name (letters, digits, '-', '_', '.')")
        require_token()
    check_data_paths(recipe)
    p = plan_for(recipe)
    if recipe.hub.repo_id and p.lora:  # the pushed adapter must name a base a download can find
        from hfgpu.run import hub_base_of

        hub_base_of(recipe.model, recipe.hub.base_model_id, where="the recipe's model")

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from hfgpu.data import prepare_data, tokenized_fingerprint
    from hfgpu.modeling import ModelSettings, load_tokenizer, prepare_model
    from hfgpu.train import LoopConfig, train_loop

    if not p.gpu.is_cpu and not torch.cuda.is_available():
        raise HfgpuError(f"the recipe plans for {p.gpu.name} but torch sees no CUDA GPU here: run it on that card, or set gpu=cpu")
    mixed = "no" if p.precision == "fp32" else p.precision
    from accelerate.state import AcceleratorState

    # each run sets its own mixed precision: a second run in one process (the Python API) would otherwise
    # hit "AcceleratorState has already been initialized"; the process group (PartialState) is kept
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mixed,
        cpu=p.gpu.is_cpu,
        log_with=None if recipe.report_to == "none" else recipe.report_to,
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.distributed_type.name == "DEEPSPEED" and p.grad_accum_steps > 1:
        raise HfgpuError(
            f"DeepSpeed steps inside backward, so hfgpu's accumulation ({p.grad_accum_steps} micro-batches) would step every micro-batch: "
            "use accelerate_configs/fsdp.yaml, or set micro_batch_size so that grad_accum_steps is 1"
        )
    main = accelerator.is_main_process
    speak = say if main else (lambda *a, **k: None)
    speak(str(p))
    set_seed(recipe.train.seed)

    model_path = resolve_path(recipe.model)
    if recipe.trust_remote_code:
        speak(f"warning: trust_remote_code is on: running Python code from {recipe.model}; read it before you trust it")
    tokenizer = load_tokenizer(model_path, trust_remote_code=recipe.trust_remote_code)
    with accelerator.main_process_first():
        data = prepare_data(recipe.data, tokenizer, p.seq_len, p.micro_batch_size)
    s = data.stats
    from hfgpu.data import describe_drops

    noun = batch_unit(p.knobs.objective) if objectives.objective(p.knobs.objective).preference else "examples"
    speak(
        f"data: {s['examples']} {noun}, {s['too_long']} longer than {p.seq_len} tokens ({recipe.data.too_long}), {s['dropped']} dropped"
        + (f" ({describe_drops(s['drop_reasons'])})" if s["dropped"] else "")
        + (
            f"; packed into {s['sequences']} sequences, padding {s['padding_before']:.0%} → {s['padding_after']:.0%}"
            if "sequences" in s
            else f"; padding {s['padding_before']:.0%}"
        )
        + (f"; {s['eval_examples']} eval {noun}" if "eval_examples" in s else "")
        + (f" (data.eval_fraction {s['eval_held_out']:g} of the training rows, held out)" if "eval_held_out" in s else "")
    )
    if "desirable" in s:
        speak(kto_balance(s["desirable"], s["examples"] - s["dropped"] - s["desirable"], recipe.preference))
    for src in s.get("sources", []):
        speak(
            f"  {src['name']}: {src['used']} of its {src['examples']} examples"
            + (f" (repeated ×{src['used'] / src['examples']:.2f})" if src["used"] > src["examples"] else "")
            + (f", {src['eval_examples']} eval examples" if src["eval_examples"] else "")
        )
    if s.get("eval_overlap"):
        speak(
            f"warning: {s['eval_overlap']} of the {s['eval_overlap_of']} eval rows are training rows ({s['eval_overlap_keys']}): "
            "the eval loss will not show overfitting; slice the two apart (data.split=train[:90%], data.eval_split=train[90%:]) "
            "or use data.eval_fraction"
        )

    settings = ModelSettings.from_plan(p)
    model = prepare_model(model_path, settings, seed=recipe.train.seed, trust_remote_code=recipe.trust_remote_code)
    # data and model are ready: only now is an earlier run replaced
    if main and recipe.overwrite and recipe.resume == "never":
        clear_run(out)
    accelerator.wait_for_everyone()
    ran = resolved(recipe, p)

    def write_records() -> None:  # after a checkpoint to resume has loaded: a refused resume rewrites nothing
        if main:
            (out / "plan.json").write_text(json.dumps(p.to_dict(), indent=2))
            (out / "resolved_recipe.yaml").write_text(ran.to_yaml())
        if recipe.report_to != "none":
            accelerator.init_trackers(out.name, config=tracker_hparams(json.loads(json.dumps(p.to_dict()))))

    data_hash = tokenized_fingerprint(data.train)
    if objectives.objective(p.knobs.objective).reference and not p.lora:
        reference_columns(accelerator, model, data, p, recipe, tokenizer.pad_token_id, data_hash, out, speak)  # load_tokenizer set it
    loop = LoopConfig.from_plan(p, recipe, fingerprint=run_fingerprint(ran, p, data_hash))
    result = train_loop(accelerator, model, tokenizer, data, loop, out, say=speak, on_ready=write_records)
    accelerator.wait_for_everyone()
    metrics = result.metrics
    if main:
        trained = accelerator.unwrap_model(result.model)

        def write_outputs() -> None:
            trained.save_pretrained(out)
            if p.lora:
                record_base(out, recipe.model)
            tokenizer.save_pretrained(out)
            from hfgpu.plots import plot_losses

            plot_losses(out / "metrics.jsonl", out / "loss.png")
            if result.answers:
                write_answers(out / "eval_answers.jsonl", data, result.answers, speak)
            (out / "final_metrics.json").write_text(json.dumps({"before": result.initial_metrics, "after": metrics}, indent=2))
            from hfgpu.hub import Run, model_card

            model_card(Run(out)).save(out / "README.md")  # hfgpu's card in place of peft's empty template

        save_final(out, write_outputs, trained, p.lora is not None)
    if recipe.hub.repo_id and main:
        from hfgpu.hub import push

        push(out, recipe.hub.repo_id, private=recipe.hub.private, say=speak, base_model_id=recipe.hub.base_model_id)
    if recipe.report_to != "none":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    seconds = time.time() - start
    what = "adapter (adapter_model.safetensors + adapter_config.json)" if p.lora else "model (model.safetensors + config.json)"
    before = result.initial_metrics
    shown = ", ".join(
        f"{k} {before[k]:.4g} → {v:.4g}" if k in before else f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)
    )
    speak(
        f"done in {seconds:.0f} s, {metrics.get('steps')} steps"
        + (f"; before → after training: {shown}" if shown else " (no eval data: set data.eval_path to measure)")
    )
    speak(f"{what}, tokenizer, plan.json, resolved_recipe.yaml, metrics.jsonl and loss.png are in {out}/")
    return RunResult(
        output_dir=out, metrics=metrics, plan=p, seconds=seconds, initial_metrics=before, model=accelerator.unwrap_model(result.model)
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        from hfgpu.recipe import recipe_help

        print(__doc__.strip() + "\n\nRecipe keys (override any as key=value after the path):\n\n" + recipe_help())
        return 0 if args else 2

    def body() -> int:
        finetune(load_recipe(args[0], args[1:]))
        return 0

    return run_command(body, interrupted="hfgpu: interrupted; run again with resume=auto to continue from the last checkpoint")


class _CallableModule(types.ModuleType):
    """`import hfgpu.finetune` binds the package attribute to this module; keep `hfgpu.finetune(recipe)` working."""

    def __call__(self, recipe: Recipe, say=print) -> RunResult:
        return finetune(recipe, say=say)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
