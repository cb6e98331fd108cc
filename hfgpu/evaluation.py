"""Evaluation: eval loss, perplexity and token accuracy over the eval split; task metrics on answers
generated greedily, through local `evaluate` modules (hfgpu/metrics/, loaded by path: offline-safe)."""

from __future__ import annotations

import math
import time

import torch

from hfgpu._package import PACKAGE
from hfgpu.data import IGNORE
from hfgpu.loss import chunked_token_stats, final_hidden_states


@torch.no_grad()
def eval_loss(model, loader, accelerator, chunk_size: int | None = None, sources: list[str] | None = None) -> dict[str, float]:
    """Token-weighted loss over the whole eval set (all processes), its perplexity and top-1 token accuracy.

    Statistics are kept per row and gathered with `gather_for_metrics`, which drops the rows that
    accelerate repeats to give every process the same number of batches: 30 eval rows count as 30
    under any process count. `chunk_size`: logits over slices of that many tokens
    (hfgpu.loss.chunked_token_stats), so that evaluating needs no more memory than a training step.
    `sources`: the names of data.mix's datasets, whose rows carry a `source` index: each also gets
    eval_loss/NAME and eval_token_accuracy/NAME."""
    model.eval()
    n = len(sources or [])
    totals = torch.zeros(1 + n, 3, device=accelerator.device, dtype=torch.float64)  # loss sum, tokens, correct: all, per source
    weight = accelerator.unwrap_model(model).get_output_embeddings().weight if chunk_size else None
    for batch in loader:
        labels = batch.pop("labels")
        source = batch.pop("source", None)
        if chunk_size:
            rows = chunked_token_stats(final_hidden_states(model, batch), weight, labels, chunk_size)
        else:
            logits = model(**batch).logits.float()
            shifted, target = logits[:, :-1], labels[:, 1:]
            mask = target != IGNORE
            loss = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
            correct = (shifted.argmax(-1) == target) & mask
            rows = torch.stack([loss.double().sum(1), mask.double().sum(1), correct.double().sum(1)], dim=1)
        if source is not None and n:
            rows = torch.cat([rows, source.to(rows.device, torch.float64).unsqueeze(1)], dim=1)
        rows = accelerator.gather_for_metrics(rows.to(totals.device))
        totals[0] += rows[:, :3].sum(0)
        if rows.shape[1] > 3:
            totals[1:].index_add_(0, rows[:, 3].long(), rows[:, :3])
    model.train()
    loss_sum, tokens, correct = totals[0].tolist()
    mean = loss_sum / max(tokens, 1)
    out = {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50)), "eval_token_accuracy": correct / max(tokens, 1)}
    for i, name in enumerate(sources or []):
        loss_sum, tokens, correct = totals[1 + i].tolist()
        if tokens:
            out[f"eval_loss/{name}"] = loss_sum / tokens
            out[f"eval_token_accuracy/{name}"] = correct / tokens
    return out


def load_metric(name: str):
    import evaluate

    path = PACKAGE.joinpath("metrics", name, f"{name}.py")
    return evaluate.load(str(path))


GENERATION_BATCH = 8  # prompts generated together (left-padded): a fraction of a training micro-batch's memory


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    device,
    max_seconds: float | None = None,
    progress: bool = False,
    batch_size: int = GENERATION_BATCH,
) -> list[str]:
    """Greedy answers to prompts given as token ids (tokenized as training tokenized them: hfgpu.render.prompt_ids).

    Prompts are generated `batch_size` at a time, left-padded with an attention mask (the positions generate
    derives from the mask make each answer the one the prompt alone gets). `max_seconds`: start no new batch
    after that long (the answers made so far are returned, so the list may be shorter than `prompts`).
    `progress`: a progress bar on stderr."""
    from tqdm.auto import tqdm

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="generating eval answers", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for first in range(0, len(prompts), batch_size):
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
            batch = prompts[first : first + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], dtype=torch.long, device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], dtype=torch.long, device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
            )
            answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
            bar.update(len(batch))
    model.train()
    return answers


def task_metrics(
    model,
    tokenizer,
    examples: list[tuple[list[int], str]],
    metrics: list[str],
    max_new_tokens: int,
    device,
    max_len: int | None = None,
    max_seconds: float | None = None,
    batch_size: int = GENERATION_BATCH,
) -> tuple[dict[str, float], list[str | None]]:
    """Generate an answer for each (prompt ids, reference) and score it with each named local metric.

    Returns the scores and the answers, one per example (None where none was generated).
    A prompt that leaves no room for `max_new_tokens` within `max_len` (the planned sequence length: what the
    memory plan covers and the model's positions allow) is skipped and counted in `eval_generation_skipped`.
    After `max_seconds` no new answer is started: the scores cover the answers made, and the prompts left are
    counted in `eval_generation_timed_out`."""
    if not metrics or not examples:
        return {}, []
    fits = [max_len is None or len(p) + max_new_tokens <= max_len for p, _ in examples]
    fitting = [ex for ex, ok in zip(examples, fits) if ok]
    counts = {"eval_generation_skipped": float(len(examples) - len(fitting))} if len(fitting) < len(examples) else {}
    if not fitting:
        return counts, [None] * len(examples)
    predictions = generate_answers(model, tokenizer, [p for p, _ in fitting], max_new_tokens, device, max_seconds, True, batch_size)
    made = iter(predictions)
    answers = [next(made, None) if ok else None for ok in fits]
    if len(predictions) < len(fitting):
        counts["eval_generation_timed_out"] = float(len(fitting) - len(predictions))
    if not predictions:
        return counts, answers
    references = [r for _, r in fitting[: len(predictions)]]
    scores = {}
    for name in metrics:
        for key, value in load_metric(name).compute(predictions=predictions, references=references).items():
            scores[f"eval_{key}"] = float(value)
    return {**scores, **counts}, answers
