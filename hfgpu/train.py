"""The training loop: one accelerate loop for every strategy, readable top to bottom.

Full, LoRA and QLoRA differ in how the model was prepared (hfgpu.modeling), never here. Gradient
accumulation is explicit: each optimizer step consumes a window of `grad_accum_steps` micro-batches
whose loss is normalised by the window's label tokens (the same gradient as one big batch). On a
CUDA out-of-memory error the window is re-run with every micro-batch split in two (half the
micro-batch, twice the accumulation, same global batch).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hfgpu import checkpoint
from hfgpu.data import IGNORE, Prepared, collate
from hfgpu.errors import HfgpuError
from hfgpu.evaluation import eval_loss, task_metrics
from hfgpu.loss import model_loss
from hfgpu.modeling import adapters_in_compute_dtype
from hfgpu.offload import offload_activations


def make_optimizer(params, name: str, lr: float = 1e-4, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The plan's optimizer. Fused AdamW: no foreach temporaries (the memory model assumes none)."""
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


@dataclass
class LoopConfig:
    """What the loop needs from the plan and the recipe, resolved."""

    micro_batch_size: int
    grad_accum_steps: int
    optimizer: str
    learning_rate: float
    schedule: str
    warmup: float
    weight_decay: float
    max_grad_norm: float | None
    epochs: float | None
    max_steps: int | None
    seed: int
    eval_every: int | None
    save_every: int | None
    keep_last: int
    log_every: int
    early_stopping_patience: int | None
    early_stopping_min_delta: float
    metrics: list[str]
    max_new_tokens: int
    max_eval_examples: int | None
    resume: str  # never | auto | a checkpoint path
    plan_note: str = ""  # the plan's memory estimate, quoted when even micro-batch 1 runs out of memory
    loss_chunk: int | None = None  # chunked cross-entropy (hfgpu.loss) when set
    offload_activations: bool = False  # checkpointed layer inputs wait in CPU memory (hfgpu.offload)
    eval_chunk: int | None = None  # evaluation computes logits over slices of this many tokens
    autocast: bool = False  # 16-bit mixed precision: adapters take 16-bit inputs (hfgpu.modeling.adapters_in_compute_dtype)


class Interrupted(HfgpuError):
    """Ctrl-C: a checkpoint was saved; the message says how to resume."""

    exit_code = 130


class MetricsLog:
    """metrics.jsonl, one JSON object per logged step or evaluation; main process only."""

    def __init__(self, path: Path, enabled: bool, append: bool):
        self.path, self.enabled = path, enabled
        if enabled and not append:
            path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _split(batch: dict, parts: int) -> list[dict]:
    if parts == 1:
        return [batch]
    n = batch["input_ids"].shape[0]
    size = max(1, math.ceil(n / parts))
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _label_tokens(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE).sum()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run(accelerator, model, tokenizer, data: Prepared, cfg: LoopConfig, out: Path, say=print) -> dict:
    """Train `model` on `data`; returns the final metrics. Writes checkpoints and metrics.jsonl under `out`."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader_gen = torch.Generator().manual_seed(cfg.seed)  # keeps DataLoader seeding off the global RNG: exact resume
    train_dl = DataLoader(data.train, batch_size=cfg.micro_batch_size, shuffle=True, collate_fn=partial(collate, pad_id=pad_id), generator=loader_gen)
    eval_dl = None
    if data.eval is not None:
        eval_dl = DataLoader(data.eval, batch_size=cfg.micro_batch_size, shuffle=False, collate_fn=partial(collate, pad_id=pad_id))
    steps_per_epoch = math.ceil(math.ceil(len(data.train) / cfg.micro_batch_size / accelerator.num_processes) / cfg.grad_accum_steps)
    total_steps = cfg.max_steps or max(1, math.ceil((cfg.epochs or 1) * steps_per_epoch))
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)

    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    schedule = {"constant": "constant_with_warmup"}.get(cfg.schedule, cfg.schedule)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)

    # --- resume --------------------------------------------------------------------------------
    ckpt_dir = out / "checkpoints"
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "best_eval_loss": None, "bad_evals": 0, "split": 1}
    if accelerator.is_main_process:
        for gone in checkpoint.clean_incomplete(ckpt_dir):
            say(f"removed incomplete checkpoint {gone.name}")
    accelerator.wait_for_everyone()
    resume_from = None
    if cfg.resume == "auto":
        found = checkpoint.complete_checkpoints(ckpt_dir)
        resume_from = found[-1] if found else None
    elif cfg.resume != "never":
        resume_from = Path(cfg.resume)
        if not (resume_from / "state.json").is_file():
            raise HfgpuError(f"resume={cfg.resume!r} is not a complete checkpoint folder (no state.json): use resume=auto or a folder under {ckpt_dir}")
    if resume_from is not None:
        state.update(checkpoint.load(resume_from, accelerator, model, optimizer, scheduler))
        say(f"resumed from {resume_from} at step {state['step']} (epoch {state['epoch']}, batch {state['batch_in_epoch']})")
    log = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process, append=resume_from is not None)

    def evaluate_now() -> dict:
        scores = eval_loss(model, eval_dl, accelerator, cfg.eval_chunk) if eval_dl is not None else {}
        if cfg.metrics and accelerator.is_main_process:
            examples = data.eval_prompts[: cfg.max_eval_examples]
            scores.update(task_metrics(accelerator.unwrap_model(model), tokenizer, examples, cfg.metrics, cfg.max_new_tokens, accelerator.device))
        accelerator.wait_for_everyone()
        return scores

    lm_head = accelerator.unwrap_model(model).get_output_embeddings().weight if cfg.loss_chunk else None

    def micro_step(batch: dict, window_tokens: torch.Tensor, sync: bool) -> torch.Tensor:
        ctx = contextlib.nullcontext() if sync else accelerator.no_sync(model)
        # 16-bit adapter inputs over forward and backward (a checkpointed layer recomputes in backward);
        # not around generation, which runs without accelerate's autocast wrapper
        with ctx, adapters_in_compute_dtype(model, cfg.autocast):
            with offload_activations(cfg.offload_activations):
                loss = model_loss(model, batch, cfg.loss_chunk, lm_head) * _label_tokens(batch) / window_tokens
            accelerator.backward(loss)
        return loss.detach()

    def optimizer_step(window: list[dict]) -> float:
        """One optimizer step over a window of micro-batches, splitting them further on OOM."""
        window_tokens = torch.clamp(sum(_label_tokens(b) for b in window), min=1)
        while True:
            pieces = [p for b in window for p in _split(b, state["split"])]
            try:
                loss = sum(micro_step(p, window_tokens, sync=i == len(pieces) - 1) for i, p in enumerate(pieces))
                break
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if not _is_oom(e):
                    raise
                optimizer.zero_grad(set_to_none=True)
                if max(p["input_ids"].shape[0] for p in pieces) == 1:
                    raise HfgpuError(f"CUDA out of memory at micro-batch 1 ({cfg.plan_note or 'no plan estimate'}): "
                                     "set gradient_checkpointing=true, lower data.max_seq_len, or use strategy=qlora") from None
                state["split"] *= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                mb = math.ceil(cfg.micro_batch_size / state["split"])
                say(f"CUDA out of memory: micro-batch {mb}, accumulation ×{state['split']} (same global batch); going on")
                log.write({"step": state["step"], "event": "oom_backoff", "micro_batch_size": mb})
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return accelerator.reduce(loss.float(), reduction="mean").item()

    # --- Ctrl-C: finish the step, save a checkpoint, then stop (a second Ctrl-C stops at once) ----
    interrupt = {"asked": False}
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            if interrupt["asked"]:
                raise KeyboardInterrupt
            interrupt["asked"] = True
        previous_handler = signal.signal(signal.SIGINT, on_sigint)

    from tqdm.auto import tqdm

    initial: dict = {}
    if state["step"] == 0 and (eval_dl is not None or cfg.metrics):
        initial = evaluate_now()  # the baseline the run is judged against
        log.write({"step": 0, **initial})

    bar = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_local_main_process, desc="training", dynamic_ncols=True)
    final: dict = {}
    stopped_early = False
    model.train()
    tick, tokens_since = time.perf_counter(), 0
    while state["step"] < total_steps and not stopped_early:
        train_dl.set_epoch(state["epoch"])
        batches = accelerator.skip_first_batches(train_dl, state["batch_in_epoch"]) if state["batch_in_epoch"] else train_dl
        it = iter(batches)
        epoch_done = False
        while state["step"] < total_steps:
            window = list(islice(it, cfg.grad_accum_steps))
            if not window:
                epoch_done = True
                break
            loss = optimizer_step(window)
            state["step"] += 1
            state["batch_in_epoch"] += len(window)
            seen = int(accelerator.reduce(sum((b["input_ids"] != pad_id).sum() for b in window), reduction="sum"))
            state["tokens"] += seen
            tokens_since += seen
            bar.update(1)

            # --- log ------------------------------------------------------------------------------
            if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
                elapsed = time.perf_counter() - tick
                record = {"step": state["step"], "epoch": state["epoch"], "loss": loss, "lr": scheduler.get_last_lr()[0],
                          "tokens_per_second": tokens_since / elapsed if elapsed > 0 else None, "tokens": state["tokens"]}
                if torch.cuda.is_available():
                    record["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
                log.write(record)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_second'] or 0:,.0f}",
                                **({"peak_GiB": f"{record['peak_memory_bytes'] / 2**30:.1f}"} if "peak_memory_bytes" in record else {}))
                tick, tokens_since = time.perf_counter(), 0

            # --- evaluate, stop early ---------------------------------------------------------
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < total_steps:
                final = evaluate_now()
                log.write({"step": state["step"], **final})
                if cfg.early_stopping_patience and "eval_loss" in final:
                    best = state["best_eval_loss"]
                    if best is None or final["eval_loss"] < best - cfg.early_stopping_min_delta:
                        state["best_eval_loss"], state["bad_evals"] = final["eval_loss"], 0
                    else:
                        state["bad_evals"] += 1
                        if state["bad_evals"] >= cfg.early_stopping_patience:
                            say(f"early stopping at step {state['step']}: eval loss has not improved for {state['bad_evals']} evaluations")
                            stopped_early = True
                            break

            # --- checkpoint ----------------------------------------------------------------------
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total_steps:
                checkpoint.save(ckpt_dir, state["step"], accelerator, model, optimizer, scheduler, state, cfg.keep_last)
            if interrupt["asked"]:
                saved = checkpoint.save(ckpt_dir, state["step"], accelerator, model, optimizer, scheduler, state, cfg.keep_last)
                bar.close()
                if previous_handler is not None:
                    signal.signal(signal.SIGINT, previous_handler)
                raise Interrupted(f"interrupted at step {state['step']} of {total_steps}: checkpoint saved to {saved}; run the same command with resume=auto to continue")
        if epoch_done:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    if previous_handler is not None:
        signal.signal(signal.SIGINT, previous_handler)
    final = evaluate_now() if (eval_dl is not None or cfg.metrics) else {}
    if final:
        log.write({"step": state["step"], **final})
    final.update({"steps": state["step"], "tokens": state["tokens"], "stopped_early": stopped_early})
    return {"model": model, "metrics": final, "initial_metrics": initial}
