"""The Hub: model cards, push (adapter or merged model), merge, generate.

    hfgpu push outputs/my-run --repo-id me/qwen2.5-7b-alpaca-lora [--private] [--merged]
    hfgpu merge outputs/my-run --out merged/
    hfgpu generate outputs/my-run --prompt "…"

The token comes from huggingface_hub's usual places (HF_TOKEN, the login cache) and is never
printed, written or put in an error message.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from hfgpu import objectives
from hfgpu.errors import HfgpuError, write_failure
from hfgpu.knobs import batch_unit
from hfgpu.run import (  # noqa: F401  (the run folder's definitions, re-exported for older imports)
    ADAPTER_FILES,
    MODEL_FILES,
    REPO_ID,
    TOKENIZER_FILES,
    Run,
    RunPlan,
    hub_base_of,
    hub_id_of,
    recorded_base,
)
from hfgpu.units import gib

# --- model card ---------------------------------------------------------------------------------------


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _data_line(data) -> str:
    """The model card's data row: the file or id and its format, or each dataset of a mixture with its share."""
    if not data.mix:
        return f"{data.path} ({data.format})"
    shares = [
        f"{m.path} ({m.format or data.format}"
        + (f", weight {m.weight:g}" if m.weight else f", {m.samples} samples" if m.samples else "")
        + ")"
        for m in data.mix
    ]
    return "mixture: " + "; ".join(shares)


def model_card(run: Run, repo_id: str | None = None, merged: bool = False, gguf: str | None = None, base_id: str | None = None):
    """A huggingface_hub ModelCard describing the run: base model, plan, hyperparameters, metrics, usage. With a
    `repo_id`, the card of that Hub repo (its base named by `base_id`, a Hub id); without, the run folder's own
    README.md, which loads the run from where it lies and names the base as the run recorded it."""
    from huggingface_hub import ModelCard, ModelCardData

    plan, recipe, k = run.plan, run.recipe, run.plan.knobs
    found = hub_id_of(recipe.model)
    base_id = base_id or found
    base = base_id or run.base_model
    where = repo_id or str(run.path.resolve())
    gguf_file = run.gguf_file if base_id in (None, found) else None  # a GGUF base named by another repo needs none
    tuned = objectives.objective(k.objective).preference
    strategy = k.strategy
    family = base_id.split("/")[-1].split("-")[0].lower() if base_id else None  # a local folder's name says nothing
    paths = [recipe.data.path] if recipe.data.path else [m.path for m in recipe.data.mix or []]
    datasets = [x for x in paths if re.match(r"^[\w.-]+/[\w.-]+$", x) and not Path(x).exists()] or None
    adapter = run.is_adapter and not merged
    data = ModelCardData(
        base_model=base_id,
        library_name="peft" if adapter else "transformers",
        tags=["hfgpu", strategy]
        + ([family] if family else [])
        + (["merged"] if merged else [])
        + ([k.objective] if tuned else [])
        + (["gguf"] if gguf else []),
        datasets=datasets,
        pipeline_tag="text-generation",
    )
    after = run.metrics.get("after", {})
    before = run.metrics.get("before", {})
    metric_rows = "\n".join(
        f"| {k} | {_fmt(before[k]) if k in before else '–'} | {_fmt(v)} |"
        for k, v in after.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    t = recipe.train
    gguf_arg = f', gguf_file="{gguf_file}"' if gguf_file else ""
    usage = (
        f"from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{where}"{gguf_arg})  # loads the base ({base}) and applies the adapter\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")'
        if adapter
        else f'from transformers import AutoModelForCausalLM, AutoTokenizer\n\nmodel = AutoModelForCausalLM.from_pretrained("{where}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")'
    )
    shown_base = f"[{base}](https://huggingface.co/{base})" if base_id else f"`{base}`" + (f" (`{gguf_file}`)" if gguf_file else "")
    what = (
        f"A {strategy.upper() if strategy != 'full' else 'full'} fine-tune of {shown_base} made with hfgpu."
        if not merged
        else f"The LoRA adapter of a {strategy} fine-tune of {shown_base}, merged into the base weights (saved as safetensors)."
    )
    if tuned:
        what += f" {_objective_line(k.objective)}"
    text = (
        f"""---
{data.to_yaml()}
---

# {where.split("/")[-1]}

{what}

## Plan

| | |
|---|---|
| card | {plan.card} ({plan.vram_gb:g} GB) × {plan.cards} |
| objective | {k.objective} |
| strategy | {strategy} |
| precision | {k.precision} |
| quantization | {k.quantization} |
| gradient checkpointing | {k.gradient_checkpointing} |
| micro-batch × accumulation | {k.micro_batch_size} × {k.grad_accum_steps} |
| sequence length | {k.seq_len} |
| optimizer | {k.optimizer} |
| planned peak memory | {gib(plan.peak_bytes, 2)} of {gib(plan.budget_bytes, 2)} |
| trainable parameters | {plan.params_trainable:,} of {plan.params_total:,} |

## Training

| hyperparameter | value |
|---|---|
| learning rate | {t.learning_rate} ({t.schedule}, warm-up {t.warmup}) |
| epochs / max steps | {t.epochs} / {t.max_steps} |
| global batch | {t.global_batch_size} {batch_unit(k.objective)} |
| weight decay | {t.weight_decay} |
| data | {_data_line(recipe.data)} |
"""
        + (
            f"| LoRA | r={k.lora_r}, alpha={k.lora_alpha}, dropout={k.lora_dropout}, targets={list(k.lora_targets)} |\n"
            if adapter or merged
            else ""
        )
        + (f"| preference | {_preference_line(k.objective, recipe.preference)} |\n" if tuned else "")
        + f"""
## Results

| metric | before | after |
|---|---|---|
{metric_rows}

![loss](loss.png)

## Usage

```python
{usage}
```
"""
        + (_gguf_usage(where, gguf_name(run, gguf), gguf) if gguf else "")
    )
    return ModelCard(text)


def _gguf_usage(repo_id: str, name: str, quant: str) -> str:
    return f"""
## Run it locally (GGUF)

`{name}` is this model merged and stored as {quant} (written by `hfgpu export`), for llama.cpp, Ollama and LM Studio:

```bash
llama-cli -hf {repo_id} --hf-file {name}
ollama run hf.co/{repo_id}:{quant.upper()}
```
"""


def _objective_line(name: str) -> str:
    o = objectives.objective(name)
    reference = "against the base as the reference" if o.reference else "with no reference model"
    return (
        f"Trained with {o.paper} on {o.trained_on}, {reference}. Its metrics: eval_rewards/accuracy is how "
        "often the model prefers the chosen (desirable) response more than the reference does, eval_rewards/margin the "
        "mean reward gap."
    )


def _preference_line(name: str, pref) -> str:
    """ "dpo, β=0.1": the objective's hyper-parameters as the run used them (β null in a recipe: the paper's)."""
    values = []
    for h in objectives.objective(name).hyper:
        value = getattr(pref, h.name)
        values.append(f"{h.symbol}={h.default if value is None else value}")
    return ", ".join([name, *values])


# --- push ---------------------------------------------------------------------------------------------


def require_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HfgpuError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    return token


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def gguf_name(run: Run, quant: str) -> str:
    return f"{run.path.name}-{quant}.gguf"


def _stage(run: Run, folder: Path, repo_id: str, merged: bool, gguf: str | None = None, base_id: str | None = None) -> None:
    """The files to upload: what peft/transformers load directly, the card, the loss plot, the plan; with `gguf`,
    the merged model as a GGUF file of that type (hfgpu.export). The uploaded adapter_config.json names the base by
    its Hub id (`base_id`); the run folder's own copy keeps the local base it loads from."""
    if merged:
        merge(run.path, folder, overwrite=True, say=lambda *a, **k: None)
    else:
        names = ADAPTER_FILES if run.is_adapter else MODEL_FILES
        for name in names + TOKENIZER_FILES:
            if (run.path / name).is_file():
                shutil.copy2(run.path / name, folder / name)
    for name in ("loss.png", "plan.json", "resolved_recipe.yaml", "final_metrics.json"):
        if (run.path / name).is_file():
            shutil.copy2(run.path / name, folder / name)
    if gguf:
        from hfgpu.export import export_run

        export_run(run.path, folder / gguf_name(run, gguf), gguf, say=lambda *a, **k: None)
    if base_id and (folder / "adapter_config.json").is_file():
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_id
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model_card(run, repo_id, merged, gguf, base_id=base_id).save(folder / "README.md")


def push(
    run_dir: str | Path,
    repo_id: str,
    private: bool = False,
    merged: bool = False,
    endpoint: str | None = None,
    say=print,
    gguf: str | None = None,
    base_model_id: str | None = None,
) -> str:
    """Upload a finished run to the Hub; returns the repo URL. Re-pushing an unchanged run makes no commit. `gguf`:
    also upload the merged model as a GGUF file of that type (f16, q8_0, …), and say in the card how to run it.
    `base_model_id`: the base's Hub id, for a run trained from a local folder or file (an adapter is refused
    without it, since a downloaded adapter could not find such a base)."""
    if gguf:
        from hfgpu.export import check_quant

        check_quant(gguf)
    if not REPO_ID.match(repo_id or ""):
        raise HfgpuError(f"repo id {repo_id!r} is not owner/name (letters, digits, '-', '_', '.'), e.g. --repo-id me/qwen-lora")
    run = Run(run_dir)
    if merged and not run.is_adapter:
        raise HfgpuError(f"{str(run_dir)!r} is a full fine-tune: it has no adapter to merge; push it without --merged")
    token = require_token()
    from hfgpu import online

    if endpoint is None and not online.hub_reachable():
        host = online.endpoint().split("://")[-1]
        why = "HF_HUB_OFFLINE is set: unset it" if online.offline_asked() else f"the Hub ({host}) cannot be reached: connect"
        raise HfgpuError(f"push to {repo_id}: {why}, then run the same command again; {run.path} is unchanged")
    if run.is_adapter and not merged:
        base_id = run.hub_base(base_model_id)
    else:  # a whole model needs no base to load; the card names it where known
        base_id = run.hub_base(base_model_id) if base_model_id else hub_id_of(run.recipe.model)
    import sys

    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    if not sys.stderr.isatty():
        disable_progress_bars()  # progress bars are for terminals; logs and pipes get one line per event
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="hfgpu-push-") as tmp:
        _stage(run, Path(tmp), repo_id, merged, gguf, base_id)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            before = api.repo_info(repo_id, repo_type="model").sha
            info = api.upload_folder(
                folder_path=tmp,
                repo_id=repo_id,
                repo_type="model",
                commit_message=f"hfgpu: {'merged model' if merged else run.plan.knobs.strategy + ' run'} from {run.path.name}",
            )
        except Exception as e:  # network, auth, server: one line, token scrubbed, local files untouched
            status = getattr(getattr(e, "response", None), "status_code", None)
            reason = {401: "the token was rejected (run `hf auth login` again)", 403: "the token may not write to this repo"}.get(status)
            detail = reason or f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
            raise HfgpuError(
                _scrub(f"push to {repo_id} failed ({detail}); {run.path} is unchanged: run the same command again to retry", token)
            ) from None
    say(f"pushed {run.path} to {url}" + (" (nothing changed: no new commit)" if getattr(info, "oid", None) == before else ""))
    return str(url)


# --- merge and generate -------------------------------------------------------------------------------


def merge(run_dir: str | Path, out: str | Path, overwrite: bool = False, say=print) -> Path:
    """Fold the LoRA adapter into the base weights (a QLoRA base is reloaded in 16-bit first)."""
    run = Run(run_dir)
    if not run.is_adapter:
        raise HfgpuError(f"{str(run_dir)!r} is a full fine-tune: its folder already holds the whole model")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HfgpuError(f"--out {str(out)!r} is a file: name a new or empty folder for the merged model")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HfgpuError(f"{str(out)!r} is not empty: choose an empty or new folder for the merged model")
    from hfgpu.modeling import DTYPES

    dtype = DTYPES[run.plan.knobs.precision]
    model, tokenizer = run.load(dtype=dtype)  # the base loads unquantized: QLoRA merges into 16-bit weights
    merged = model.merge_and_unload()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    before = {f.name for f in out.iterdir()}
    try:
        merged.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    except Exception as e:  # a full disk: what this merge wrote goes, the run is untouched
        for f in out.iterdir():
            if f.name not in before and f.is_file():
                f.unlink()
        if created and not any(out.iterdir()):
            out.rmdir()
        needed = sum(p.numel() * p.element_size() for p in merged.parameters())
        error = write_failure(e, out, "the merged model", needed, f"the run {run.path} is untouched")
        if error is None:
            raise
        raise error from None
    say(f"merged {run.path} into {run.base_model} → {out}/ ({dtype})")
    return out


def prompt_for(run: Run, tokenizer, prompt: str, template: str = "auto") -> str:
    """The prompt as training rendered it: the chat template, the Alpaca template, or raw text."""
    from hfgpu.render import ALPACA

    fmt = run.recipe.data.format if template == "auto" else template
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise HfgpuError("this tokenizer has no chat template: use --template alpaca or --template raw")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    if fmt == "alpaca":
        return ALPACA.format(instruction=prompt)
    return prompt


def generate(run_dir: str | Path, prompt: str, max_new_tokens: int = 128, template: str = "auto") -> str:
    """Greedy completion of `prompt` by the fine-tuned model."""

    if not prompt.strip():
        raise HfgpuError('the prompt is empty: pass the text to complete (--prompt "…")')
    run = Run(run_dir)
    model, tokenizer = run.load()
    text = prompt_for(run, tokenizer, prompt, template)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=run.recipe.data.format != "chat")["input_ids"]
    from hfgpu.evaluation import generate_answers  # the greedy decoding the eval metrics use

    return generate_answers(model, tokenizer, [ids[0].tolist()], max_new_tokens, model.device)[0]
