"""The training loop: one accelerate loop for every strategy, readable top to bottom.

Full, LoRA and QLoRA differ in how the model was prepared (hfgpu.modeling), never here. Gradient
accumulation is explicit: each optimizer step consumes a window of `grad_accum_steps` micro-batches
per process, and every micro-batch's summed token loss is divided by the label tokens of the whole
window on every process (one all-reduce), times the process count because DDP averages gradients:
the gradient equals one big batch's, however unevenly the label tokens fall across micro-batches
and processes. On a CUDA out-of-memory error the window is re-run with every micro-batch split in
two (half the micro-batch, twice the accumulation, same global batch). A non-finite loss or
gradient norm stops the run before the optimizer step, so the last checkpoint stays good.
SIGINT (Ctrl-C), SIGTERM (docker stop, Kubernetes, Slurm) and SIGUSR1 (Slurm's --signal) finish the
step, save a checkpoint and stop with the resume command.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from hfgpu import checkpoint
from hfgpu.data import IGNORE, Prepared, collate
from hfgpu.errors import HfgpuError
from hfgpu.evaluation import eval_loss, task_metrics
from hfgpu.modeling import DTYPES
from hfgpu.optim import make_optimizer
from hfgpu.preference import SUMS, Objective, describe_sums, eval_pairs, kto_window_kl
from hfgpu.preference_data import collate_pairs
from hfgpu.step import PAIR_CHUNK, forward_backward
from hfgpu.units import GIB, gib

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


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
    activation_offloading: bool = False  # checkpointed layer inputs wait in CPU memory (hfgpu.offload)
    eval_chunk: int | None = None  # evaluation computes logits over slices of this many tokens
    autocast: bool = False  # 16-bit mixed precision: adapters take 16-bit inputs (hfgpu.modeling.adapters_in_compute_dtype)
    precision: str = "fp32"  # the compute dtype (the chunked loss runs its matmuls in it under mixed precision)
    fingerprint: dict = field(default_factory=dict)  # what a checkpoint must match to be resumed (hfgpu.checkpoint.check_fingerprint)
    resume_force: bool = False  # resume although the fingerprint differs
    generation_max_len: int | None = None  # prompt + answer tokens generation may reach (the planned seq_len)
    max_generation_seconds: float | None = None  # eval generation starts no new answer after this long
    objective: Objective = field(default_factory=Objective)  # sft, or a preference objective on pairs (hfgpu.preference)

    @property
    def loss_dtype(self):
        """The chunked loss's and the preference log-probs' matmul dtype: the compute dtype in mixed precision (they
        run outside the forward's autocast), else None (the hidden states' own)."""
        return DTYPES[self.precision] if self.autocast else None

    @classmethod
    def bare(cls, micro_batch_size: int, grad_accum_steps: int, max_steps: int, **fields) -> "LoopConfig":
        """A loop that only trains (no eval, checkpoints or logging until the end; AdamW, constant rate 1e-3, no
        clipping, seed 0), for benchmarks and tests; `fields` override any of it."""
        base = dict(
            optimizer="adamw_torch",
            learning_rate=1e-3,
            schedule="constant",
            warmup=0,
            weight_decay=0.0,
            max_grad_norm=None,
            epochs=None,
            seed=0,
            eval_every=None,
            save_every=None,
            keep_last=1,
            log_every=10**9,
            early_stopping_patience=None,
            early_stopping_min_delta=0.0,
            metrics=[],
            max_new_tokens=1,
            max_eval_examples=None,
            resume="never",
        )
        return cls(micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, max_steps=max_steps, **{**base, **fields})

    @classmethod
    def from_plan(cls, p, recipe, fingerprint: dict | None = None) -> "LoopConfig":
        """The plan's step shape, optimizer and savers; the recipe's schedule, logging, eval and resume."""
        from hfgpu.knobs import plain_logits
        from hfgpu.memory import loss_chunk_tokens

        t, chunk = recipe.train, loss_chunk_tokens(p.spec.vocab_size)
        pref = recipe.preference
        return cls(
            objective=Objective(
                p.objective,
                beta=pref.beta,
                gamma_ratio=pref.gamma_ratio,
                desirable_weight=pref.desirable_weight,
                undesirable_weight=pref.undesirable_weight,
            ),
            micro_batch_size=p.micro_batch_size,
            grad_accum_steps=p.grad_accum_steps,
            optimizer=p.optimizer,
            learning_rate=t.learning_rate,
            schedule=t.schedule,
            warmup=t.warmup,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            epochs=t.epochs,
            max_steps=t.max_steps,
            seed=t.seed,
            eval_every=t.eval_every,
            save_every=t.save_every,
            keep_last=t.keep_last,
            log_every=t.log_every,
            early_stopping_patience=t.early_stopping.patience if t.early_stopping else None,
            early_stopping_min_delta=t.early_stopping.min_delta if t.early_stopping else 0.0,
            metrics=list(recipe.eval.metrics),
            max_new_tokens=recipe.eval.max_new_tokens,
            max_eval_examples=recipe.eval.max_examples,
            max_generation_seconds=recipe.eval.max_generation_seconds,
            resume=recipe.resume,
            resume_force=recipe.resume_force,
            loss_chunk=chunk if p.chunked_loss else None,
            activation_offloading=p.activation_offloading,
            autocast=p.precision != "fp32",
            precision=p.precision,
            eval_chunk=chunk if plain_logits(p.spec.config) else None,
            fingerprint=fingerprint or {},
            generation_max_len=p.seq_len,
            plan_note=(
                f"the plan estimated {gib(p.memory.total)} of {gib(p.memory.budget)} at micro-batch {p.micro_batch_size}, "
                f"seq_len {p.seq_len}"
            ),
        )


@dataclass
class TrainState:
    """The loop's counters: saved in every checkpoint, restored on resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (per process)
    tokens: int = 0
    best_eval_loss: float | None = None
    bad_evals: int = 0
    split: int = 1  # OOM back-off: each micro-batch runs in this many pieces


class Interrupted(HfgpuError):
    """A stop signal: a checkpoint was saved; the message says how to resume. Exit code 128 + signal."""

    exit_code = 130


class MetricsLog:
    """metrics.jsonl, one JSON object per logged step or evaluation; main process only. On resume the
    records past the resumed step (written after that checkpoint, before a crash) are dropped."""

    def __init__(self, path: Path, enabled: bool, resumed_step: int | None, tracker: Callable[[dict, int], None] | None = None):
        self.path, self.enabled, self.tracker = path, enabled, tracker
        if not enabled:
            return
        kept = ""
        if resumed_step is not None and path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = "".join(ln + "\n" for ln in lines if _step_of(ln) <= resumed_step)
        path.write_text(kept)

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if self.tracker is not None and numbers:
                self.tracker(numbers, int(record.get("step", 0)))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line: dropped


def _split(batch: dict, parts: int) -> list[dict]:
    if parts == 1:
        return [batch]
    n = batch["input_ids"].shape[0]
    size = max(1, math.ceil(n / parts))
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def label_tokens(batch: dict) -> torch.Tensor:
    """Tokens the loss sees (labels shift by one)."""
    return (batch["labels"][:, 1:] != IGNORE).sum()


def loss_units(batch: dict, pairs: bool) -> torch.Tensor:
    """What the loss is a mean over: label tokens, or a preference objective's pairs."""
    return torch.tensor(batch["input_ids"].shape[0], device=batch["input_ids"].device) if pairs else label_tokens(batch)


def seen_tokens(batch: dict, pad_id: int) -> torch.Tensor:
    """Tokens the step read (not padding): both sequences of a pair count."""
    return batch["attention_mask"].sum() if "completion_mask" in batch else (batch["input_ids"] != pad_id).sum()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def window_backward(
    accelerator, model, window: list[dict], split: int, cfg: LoopConfig, lm_head=None, pair_sums: torch.Tensor | None = None
) -> torch.Tensor:
    """Forward and backward over one optimizer step's micro-batches (each run in `split` pieces).

    The gradient equals that of the mean token loss over the window of *every* process: each piece's
    summed loss is divided by the global label-token count, and multiplied by the process count
    because DDP (and FSDP, DeepSpeed) average gradients. A preference objective's loss is a mean over
    pairs, so pairs take the place of tokens. Returns the window's global mean loss (identical on every
    process); `pair_sums` gets this process's rewards sums (hfgpu.preference.pair_loss)."""
    world = accelerator.num_processes
    pairs = cfg.objective.preference
    tokens = sum(loss_units(b, pairs) for b in window).to(accelerator.device)
    if world > 1:
        tokens = accelerator.reduce(tokens, reduction="sum")
    tokens = torch.clamp(tokens, min=1).float()
    if cfg.objective.record.loss == "unpaired":  # the KL baseline of the whole step, as one full batch computes it
        reduce = (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None
        window = kto_window_kl(model, window, cfg.loss_chunk or PAIR_CHUNK, cfg.loss_dtype, lm_head, reduce)
    pieces = [p for b in window for p in _split(b, split)]
    total = torch.zeros((), device=accelerator.device)
    for i, piece in enumerate(pieces):
        sync = contextlib.nullcontext() if i == len(pieces) - 1 else accelerator.no_sync(model)
        # the step measure/simulate check the planner against (hfgpu.step); accelerate's wrapper autocasts
        with sync:
            summed = forward_backward(
                model,
                piece,
                chunk=cfg.loss_chunk,
                adapters_16bit=cfg.autocast,
                offload=cfg.activation_offloading,
                lm_head=lm_head,
                loss_dtype=cfg.loss_dtype,
                weight=loss_units(piece, pairs),
                scale=world / tokens,
                backward=accelerator.backward,
                objective=cfg.objective,
                pair_sums=pair_sums,
            )
        total += summed.float() / tokens
    return accelerator.reduce(total, reduction="sum") if world > 1 else total


class StopSignals:
    """SIGINT/SIGTERM/SIGUSR1 ask the loop to stop after the current step (a second SIGINT stops at once).
    Handlers are restored on exit, whatever happened in the loop."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _on_signal(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _build(accelerator, model, tokenizer, data: Prepared, cfg: LoopConfig):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader_gen = torch.Generator().manual_seed(cfg.seed)  # keeps DataLoader seeding off the global RNG: exact resume
    collate_fn = partial(collate_pairs if cfg.objective.preference else collate, pad_id=pad_id)
    train_dl = DataLoader(data.train, batch_size=cfg.micro_batch_size, shuffle=True, collate_fn=collate_fn, generator=loader_gen)
    eval_dl = None
    if data.eval is not None:
        eval_dl = DataLoader(data.eval, batch_size=cfg.micro_batch_size, shuffle=False, collate_fn=collate_fn)
    steps_per_epoch = math.ceil(math.ceil(len(data.train) / cfg.micro_batch_size / accelerator.num_processes) / cfg.grad_accum_steps)
    total_steps = cfg.max_steps or max(1, math.ceil((cfg.epochs or 1) * steps_per_epoch))
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)

    from transformers import get_scheduler

    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    schedule = {"constant": "constant_with_warmup"}.get(cfg.schedule, cfg.schedule)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)
    return model, optimizer, scheduler, train_dl, eval_dl, total_steps, pad_id


def _resume(accelerator, model, optimizer, scheduler, cfg: LoopConfig, ckpt_dir: Path, say) -> tuple[TrainState, int | None]:
    """Load the checkpoint `cfg.resume` names (auto: the newest good one); (state, resumed step or None)."""
    state = TrainState()
    if accelerator.is_main_process:
        for gone in checkpoint.clean_incomplete(ckpt_dir):
            say(f"removed incomplete checkpoint {gone.name}")
    accelerator.wait_for_everyone()
    if cfg.resume == "never":
        return state, None
    if cfg.resume == "auto":
        path = checkpoint.newest_good(ckpt_dir, say)
        if path is None:
            say(f"resume=auto: no checkpoint in {ckpt_dir} yet; starting from step 0")
            return state, None
    else:
        path = Path(cfg.resume)
        if not (path / "state.json").is_file():
            raise HfgpuError(
                f"resume={cfg.resume!r} is not a complete checkpoint folder (no state.json): use resume=auto or a folder under {ckpt_dir}"
            )
        problem = checkpoint.verify(path)
        if problem:
            raise HfgpuError(f"resume={cfg.resume!r}: {problem}: use resume=auto to fall back to an earlier good checkpoint")
    saved = checkpoint.read_state(path)
    checkpoint.check_fingerprint(saved.get("fingerprint", {}), cfg.fingerprint, path, cfg.resume_force, say)
    checkpoint.load(path, saved, accelerator, model, optimizer, scheduler)
    state = TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})
    if cfg.resume_force:  # the recipe's learning rate applies from here, on the checkpoint's schedule position
        inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the LambdaLR
        inner.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
        for group, fn in zip(optimizer.param_groups, inner.lr_lambdas):
            group["initial_lr"] = cfg.learning_rate
            group["lr"] = cfg.learning_rate * fn(state.step)
    say(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    return state, state.step


def _check_finite(loss: float, grad_norm: float | None, step: int, cfg: LoopConfig, scaled: bool) -> None:
    """A non-finite loss or gradient norm stops the run, with one command that starts it again at a sane rate. Not a
    resume: the scheduler's state restores the old rate, and the last checkpoints' weights and Adam moments may
    already hold the blow-up (resumed at 2e-4 from a step whose loss was still fine, the demo diverged again)."""
    bad = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm) and not scaled)
    if bad:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        from hfgpu.recipe import TrainConfig

        usual = TrainConfig.model_fields["learning_rate"].default  # hfgpu's default: a rate far above it is the likely cause
        now = f"train.learning_rate (now {cfg.learning_rate:g})"
        rate, why = (cfg.learning_rate / 10, f"a tenth of {now}") if cfg.learning_rate / 10 <= usual else (usual, f"{now} is far above it")
        lower = f"train.learning_rate={rate:g}"
        advice = (
            f"start again with a lower rate: run the same command with overwrite=true {lower} ({why}), or set train.max_grad_norm "
            f"(now {cfg.max_grad_norm})"
        )
        raise HfgpuError(
            f"training diverged at step {step}: {what} is not finite; no step was taken with it and no final model was written: {advice}"
        )


def _no_improvement(state: TrainState, eval_loss_value: float, cfg: LoopConfig) -> bool:
    """Early stopping's bookkeeping; True when patience has run out."""
    if state.best_eval_loss is None or eval_loss_value < state.best_eval_loss - cfg.early_stopping_min_delta:
        state.best_eval_loss, state.bad_evals = eval_loss_value, 0
        return False
    state.bad_evals += 1
    return state.bad_evals >= cfg.early_stopping_patience


def _interrupted(saved: Path, signum: int | None, step: int, total: int) -> Interrupted:
    name = signal.Signals(signum).name if signum else "a stop signal to another process"
    err = Interrupted(
        f"interrupted at step {step} of {total} ({name}): checkpoint saved to {saved}; run the same command with resume=auto to continue"
    )
    err.exit_code = 128 + int(signum or signal.SIGTERM)
    return err


def _backward_with_backoff(accelerator, model, optimizer, window, state: TrainState, cfg: LoopConfig, lm_head, log, say, pair_sums):
    """window_backward, re-run with every micro-batch split in two on out-of-memory; then clipping.
    Returns (loss, gradient norm or None) as tensors: nothing here waits for the device."""
    while True:
        try:
            pair_sums.zero_()
            loss = window_backward(accelerator, model, window, state.split, cfg, lm_head, pair_sums)
            break
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            optimizer.zero_grad(set_to_none=True)
            if max(p["input_ids"].shape[0] for b in window for p in _split(b, state.split)) == 1:
                raise HfgpuError(
                    f"CUDA out of memory at micro-batch 1 ({cfg.plan_note or 'no plan estimate'}): "
                    "set gradient_checkpointing=true, lower data.max_seq_len, or use strategy=qlora"
                ) from None
            state.split *= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            mb = math.ceil(cfg.micro_batch_size / state.split)
            say(f"CUDA out of memory: micro-batch {mb}, accumulation ×{state.split} (same global batch); going on")
            log.write({"step": state.step, "event": "oom_backoff", "micro_batch_size": mb})
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
    return loss, grad_norm


@dataclass
class LoopResult:
    model: torch.nn.Module
    metrics: dict  # final eval metrics + steps, tokens, stopped_early
    initial_metrics: dict  # eval metrics before the first step (empty when resumed or without eval data)
    answers: dict = field(default_factory=dict)  # eval.metrics' generated answers: {"before": [...], "after": [...]}


def _evaluate(accelerator, model, tokenizer, data: Prepared, eval_dl, cfg: LoopConfig, answers: dict, when: str | None = None) -> dict:
    """The eval scores: eval loss (or the pairs' rewards), and the task metrics on the eval prompts, whose answers go
    into `answers[when]`. Every process takes part in the loss; generation runs on the main one."""
    if eval_dl is not None and cfg.objective.preference:
        scores = eval_pairs(model, eval_dl, accelerator, cfg.objective, cfg.loss_chunk or PAIR_CHUNK, cfg.loss_dtype)
    elif eval_dl is not None:
        scores = eval_loss(model, eval_dl, accelerator, cfg.eval_chunk, data.stats.get("eval_sources"))
    else:
        scores = {}
    if cfg.metrics and accelerator.is_main_process:
        task, made = task_metrics(
            accelerator.unwrap_model(model),
            tokenizer,
            data.eval_prompts[: cfg.max_eval_examples],
            cfg.metrics,
            cfg.max_new_tokens,
            accelerator.device,
            max_len=cfg.generation_max_len,
            max_seconds=cfg.max_generation_seconds,
        )
        scores.update(task)
        if when:
            answers[when] = made
    accelerator.wait_for_everyone()
    return scores


def _synced(accelerator, window: list[dict], pad_id: int, signum, pair_sums, loss, grad_norm):
    """The step's one host sync: (tokens seen, whether any process was asked to stop, the rewards sums, loss, grad
    norm or None), summed over processes where they add."""
    seen = sum(seen_tokens(b, pad_id) for b in window).float()
    summed = torch.cat([torch.stack([seen, torch.tensor(float(signum or 0), device=seen.device)]), pair_sums])
    if accelerator.num_processes > 1:
        summed = accelerator.reduce(summed, reduction="sum")
    norm = grad_norm.detach().float().reshape(1) if grad_norm is not None else torch.zeros(1)
    seen_n, stop_n, *rewards, loss_v, norm_v = torch.cat(
        [summed, loss.detach().float().reshape(1).to(summed.device), norm.to(summed.device)]
    ).tolist()
    return seen_n, stop_n, rewards, loss_v, norm_v if grad_norm is not None else None


def _log_step(log, bar, state: TrainState, loss: float, norm: float | None, lr: float, speed: float | None, rewards: dict) -> None:
    """A step's record in metrics.jsonl (and the tracker) and the progress bar's figures."""
    record = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr, "tokens_per_second": speed, "tokens": state.tokens}
    if norm is not None:
        record["grad_norm"] = norm
    record.update(rewards)
    if torch.cuda.is_available():
        record["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    log.write(record)
    peak = {"peak_GiB": f"{record['peak_memory_bytes'] / GIB:.1f}"} if "peak_memory_bytes" in record else {}
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed or 0:,.0f}", **peak)


def train_loop(
    accelerator, model, tokenizer, data: Prepared, cfg: LoopConfig, out: Path, say=print, on_ready: Callable[[], None] = lambda: None
) -> LoopResult:
    """Train `model` on `data`. Writes checkpoints and metrics.jsonl under `out`; `on_ready` runs once a
    checkpoint to resume (if any) has loaded and before the first step (the caller writes its records then)."""
    model, optimizer, scheduler, train_dl, eval_dl, total_steps, pad_id = _build(accelerator, model, tokenizer, data, cfg)
    ckpt_dir = out / "checkpoints"
    state, resumed = _resume(accelerator, model, optimizer, scheduler, cfg, ckpt_dir, say)
    # the tracker (report_to) gets every numeric record too; its trackers exist once on_ready has run
    to_tracker = lambda values, step: accelerator.log(values, step=step) if accelerator.trackers else None
    log = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process, resumed, tracker=to_tracker)
    on_ready()
    lm_head = accelerator.unwrap_model(model).get_output_embeddings().weight if cfg.loss_chunk else None
    scaled = getattr(accelerator, "scaler", None) is not None  # fp16: inf gradients make the scaler skip a step
    pairs = cfg.objective.preference
    pair_sums = torch.zeros(SUMS if pairs else 0, device=accelerator.device)  # a step's rewards sums (hfgpu.preference)

    answers: dict[str, list] = {}  # the eval prompts' answers "before" and "after" training
    evaluate = partial(_evaluate, accelerator, model, tokenizer, data, eval_dl, cfg, answers)

    def save() -> Path:
        return checkpoint.save(
            ckpt_dir, state.step, accelerator, model, optimizer, scheduler, {**asdict(state), "fingerprint": cfg.fingerprint}, cfg.keep_last
        )

    from tqdm.auto import tqdm

    initial = {}
    if state.step == 0 and (eval_dl is not None or cfg.metrics):
        initial = evaluate("before")  # the baseline the run is judged against
        log.write({"step": 0, **initial})
    stopped_early = False
    model.train()
    tick, tokens_since = time.perf_counter(), 0
    with (
        StopSignals() as stop,
        tqdm(
            total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="training", dynamic_ncols=True
        ) as bar,
    ):
        while state.step < total_steps and not stopped_early:
            train_dl.set_epoch(state.epoch)
            batches = iter(accelerator.skip_first_batches(train_dl, state.batch_in_epoch) if state.batch_in_epoch else train_dl)
            epoch_done = False
            while state.step < total_steps:
                window = list(islice(batches, cfg.grad_accum_steps))
                if not window:
                    epoch_done = True
                    break
                loss, grad_norm = _backward_with_backoff(accelerator, model, optimizer, window, state, cfg, lm_head, log, say, pair_sums)
                seen_n, stop_n, rewards, loss_v, norm_v = _synced(accelerator, window, pad_id, stop.signum, pair_sums, loss, grad_norm)
                _check_finite(loss_v, norm_v, state.step + 1, cfg, scaled)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch_in_epoch += len(window)
                state.tokens += int(seen_n)
                tokens_since += int(seen_n)
                bar.update(1)

                if state.step % cfg.log_every == 0 or state.step == total_steps:
                    elapsed = time.perf_counter() - tick
                    speed = tokens_since / elapsed if elapsed > 0 else None
                    _log_step(log, bar, state, loss_v, norm_v, scheduler.get_last_lr()[0], speed, describe_sums(rewards) if pairs else {})
                    tick, tokens_since = time.perf_counter(), 0

                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps:
                    scores = evaluate()
                    log.write({"step": state.step, **scores})
                    if cfg.early_stopping_patience and "eval_loss" in scores and _no_improvement(state, scores["eval_loss"], cfg):
                        say(f"early stopping at step {state.step}: eval loss has not improved for {state.bad_evals} evaluations")
                        stopped_early = True
                        break

                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                    save()
                if stop_n:
                    raise _interrupted(save(), stop.signum, state.step, total_steps)
            if epoch_done:
                state.epoch += 1
                state.batch_in_epoch = 0
    final = evaluate("after") if (eval_dl is not None or cfg.metrics) else {}
    if final:
        log.write({"step": state.step, **final})
    final.update({"steps": state.step, "tokens": state.tokens, "stopped_early": stopped_early})
    return LoopResult(model=model, metrics=final, initial_metrics=initial, answers=answers)
