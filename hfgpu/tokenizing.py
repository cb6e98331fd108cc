"""The tokenization base both data paths share (next-token rows: hfgpu.data; preference pairs and labelled
completions: hfgpu.preference_data): the label that the loss skips, a batch of rows tokenized with its masks, the
prepared train/eval sets, the rule-by-rule drop report, chat templates, and which rows train and which evaluate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfgpu.errors import HfgpuError
from hfgpu.recipe import DataConfig, resolve_path
from hfgpu.render import BadRow, segments_of
from hfgpu.sources import load_rows, split_name, split_overlap

IGNORE = -100  # the label of a token the loss skips (prompt, padding): transformers' and torch's ignore_index
# --- tokenizing --------------------------------------------------------------------------------------


CHARS_PER_TOKEN = 64  # no vocabulary's token spans more: a text cut there still yields ≥ max_len tokens


def _tokenized_features():
    import datasets

    ints = datasets.Sequence(datasets.Value("int64"))
    return datasets.Features(
        {
            "input_ids": ints,
            "labels": ints,
            "length": datasets.Value("int64"),
            "truncated": datasets.Value("bool"),
            "learned": datasets.Value("int64"),
            "problem": datasets.Value("string"),
            "row": datasets.Value("int64"),
        }
    )


def _end_of_turn(ids: list[int], special: set[int]) -> int:
    """How many tokens of an assistant segment are learned: up to and including its last special
    token (the template's end of turn), not the separator a template prints after it."""
    for k in range(len(ids) - 1, -1, -1):
        if ids[k] in special:
            return k + 1
    return len(ids)


def tokenize_batch(batch: dict, indices: list[int], *, fmt, cols, tokenizer, template, max_len, train_on_prompt, too_long, segmenter=None):
    """Rows → token ids and labels. `segmenter(row, index)`: the rows' (text, learned) segments, when not the format's."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "truncated": [], "learned": [], "problem": [], "row": []}
    special = set(tokenizer.all_special_ids)
    cap = max_len * CHARS_PER_TOKEN
    n = len(next(iter(batch.values())))
    for i in range(n):
        row = {k: v[i] for k, v in batch.items()}
        ids: list[int] = []
        labels: list[int] = []
        problem, cut = "", False
        try:
            segs = segmenter(row, indices[i]) if segmenter else segments_of(row, fmt, cols, tokenizer, template, indices[i])
        except BadRow as e:
            segs, problem = [], e.rule
        for j, (text, learned) in enumerate(segs):
            if len(ids) >= max_len:
                cut = True  # bounded work and memory for huge rows: nothing past max_len is ever kept
                break
            if len(text) > cap:
                text, cut = text[:cap], True
            piece = tokenizer(text, add_special_tokens=(j == 0 and fmt != "chat"))["input_ids"]
            last = learned and j == len(segs) - 1
            if last and fmt != "chat" and tokenizer.eos_token_id is not None and (not piece or piece[-1] != tokenizer.eos_token_id):
                piece = piece + [tokenizer.eos_token_id]  # only when the text does not already end with it
            ids += piece
            if learned and fmt == "chat" and not train_on_prompt:
                k = _end_of_turn(piece, special)
                labels += piece[:k] + [IGNORE] * (len(piece) - k)
            else:
                labels += piece if (learned or train_on_prompt) else [IGNORE] * len(piece)
        truncated = cut or len(ids) > max_len
        if truncated and too_long == "truncate":
            ids, labels = ids[:max_len], labels[:max_len]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["truncated"].append(truncated)
        out["learned"].append(sum(1 for x in labels[1:] if x != IGNORE))  # tokens the loss sees (labels shift by one)
        out["problem"].append(problem)
        out["row"].append(indices[i])
    return out


@dataclass
class Prepared:
    train: Any  # datasets.Dataset with input_ids, labels (+ position_ids when packed)
    eval: Any | None
    eval_prompts: list[tuple[list[int], str]]  # (prompt token ids, tokenized as training does; reference) for task metrics
    stats: dict = field(default_factory=dict)
    eval_questions: list[str] = field(default_factory=list)  # what each eval prompt asks, as the row wrote it (shown with answers)


def describe_drops(why: dict[str, list[int]]) -> str:
    """'2 missing 'output' (rows 4, 7); 1 list-valued 'completion' (row 9)'."""
    parts = []
    for rule, rows in sorted(why.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(str(r) for r in rows[:3]) + (", …" if len(rows) > 3 else "")
        parts.append(f"{len(rows)} {rule} (row{'s' if len(rows) > 1 else ''} {shown})")
    return "; ".join(parts)


def load_chat_template(value: str | None) -> str | None:
    """`data.chat_template`: a Jinja string, a .jinja file, or `hfgpu:chat_templates/NAME.jinja` (shipped)."""
    if not value or "{" in value:
        return value
    path = Path(resolve_path(value)).expanduser()
    if not path.is_file():
        raise HfgpuError(
            f"data.chat_template {value!r} is neither a Jinja template nor a file: pass the template text, a .jinja file, or "
            f"hfgpu:chat_templates/chatml.jinja"
        )
    return path.read_text(encoding="utf-8")


EVAL_FRACTION_SEED = 0  # data.eval_fraction: the same held-out rows on every run and every resume


def train_and_eval_rows(cfg: DataConfig):
    """The rows to train on and to evaluate on (None: no eval data) of data.path with its split, eval_split, eval_path or
    eval_fraction, and what the run reports about them (the eval rows that are training rows, the share held out)."""
    train_rows = load_rows(cfg.path, cfg.split, "data.split")
    held_out, stats = None, {}
    if cfg.eval_fraction:
        if cfg.eval_path or cfg.eval_split:
            other = f"data.eval_path={cfg.eval_path}" if cfg.eval_path else f"data.eval_split={cfg.eval_split}"
            raise HfgpuError(f"data.eval_fraction={cfg.eval_fraction} and {other} both choose the eval rows: keep one")
        n_eval = round(len(train_rows) * cfg.eval_fraction)
        if n_eval < 1 or n_eval >= len(train_rows):
            raise HfgpuError(
                f"data.eval_fraction={cfg.eval_fraction} of {len(train_rows)} rows holds out {n_eval}: "
                "choose a fraction that leaves at least one row on each side"
            )
        parts = train_rows.train_test_split(test_size=n_eval, seed=EVAL_FRACTION_SEED, shuffle=True)
        train_rows, held_out = parts["train"], parts["test"]
        stats["eval_held_out"] = cfg.eval_fraction
    if not (cfg.eval_path or cfg.eval_split or held_out is not None):
        return train_rows, None, stats
    eval_key = "data.eval_split" if cfg.eval_split else "data.eval_path"
    eval_rows = held_out if held_out is not None else load_rows(cfg.eval_path or cfg.path, cfg.eval_split or "train", eval_key)
    same_source = held_out is None and resolve_path(cfg.eval_path or cfg.path) == resolve_path(cfg.path)
    if same_source and split_name(cfg.split) == split_name(cfg.eval_split or "train"):
        # the same rows to draw from: say so when the eval rows are training rows (never silently)
        whole = len(load_rows(cfg.path, split_name(cfg.split), "data.split"))
        shared = split_overlap(cfg.path, cfg.split, cfg.eval_split or "train", whole)
        if shared:
            stats["eval_overlap"] = shared
            stats["eval_overlap_of"] = len(eval_rows)
            stats["eval_overlap_keys"] = f"{eval_key}={cfg.eval_split or cfg.eval_path} and data.split={cfg.split}"
    return train_rows, eval_rows, stats
