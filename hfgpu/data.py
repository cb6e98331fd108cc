"""Data: load rows, render them as prompt/completion segments, tokenize with label masks, pack, collate.

Formats (`data.format`):
- text: a `text` column; every token is learned.
- alpaca: `instruction`, optional `input`, `output`; the Alpaca prompt template; only the output is learned.
- prompt_completion: `prompt` and `completion`; only the completion is learned.
- chat: `messages`, a list of {role, content} rendered with the tokenizer's chat template; only
  assistant turns are learned.
`data.columns` renames fields (`{output: answer}`); `data.train_on_prompt` learns prompts too.

Tokenization goes through `datasets.map`, whose fingerprint cache makes a second run with the same
data and tokenizer skip it. Packing puts several examples in one sequence with position_ids that
restart at 0 for each: transformers' sdpa/eager build a block-diagonal causal mask from them (when no
attention mask and no cache are passed) and FlashAttention-2 runs varlen, so examples never attend
to each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfgpu.errors import HfgpuError
from hfgpu.recipe import DataConfig, resolve_path

IGNORE = -100
FIELDS = {
    "text": ("text",),
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
}
OPTIONAL = {"input"}
ROLES = {"system", "user", "assistant", "tool"}
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


# --- loading ------------------------------------------------------------------------------------


def load_rows(path: str, split: str = "train"):
    """A `datasets.Dataset` from a local file/folder or a Hub dataset id."""
    import datasets

    datasets.disable_progress_bars()
    local = Path(resolve_path(path)).expanduser()
    try:
        if local.is_file():
            builder = EXTENSIONS.get(local.suffix.lower())
            if builder is None:
                raise HfgpuError(f"data file {path!r} has extension {local.suffix!r}: use one of {', '.join(EXTENSIONS)}")
            if local.stat().st_size == 0:
                raise HfgpuError(f"data {path!r} has no rows: add examples or point data.path at another file")
            ds = datasets.load_dataset(builder, data_files={"train": str(local)}, split="train")
        elif local.is_dir():
            ds = datasets.load_dataset(str(local), split=split)
        elif path.count("/") == 1 and not path.startswith((".", "/", "~")):
            ds = datasets.load_dataset(path, split=split)
        else:
            raise HfgpuError(f"data file {path!r} not found: check data.path (a local file, folder, or a Hub dataset id owner/name)")
    except HfgpuError:
        raise
    except Exception as e:  # datasets raises many types: missing split, offline, parse errors
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise HfgpuError(f"could not load data {path!r} (split {split!r}): {type(e).__name__}: {detail}") from None
    if len(ds) == 0:
        raise HfgpuError(f"data {path!r} has no rows: add examples or point data.path at another file")
    return ds


def check_columns(ds, cfg: DataConfig, source: str) -> dict[str, str]:
    """field → column, after `data.columns`; every required field must exist."""
    fields = FIELDS[cfg.format]
    unknown = [k for k in cfg.columns if k not in fields]
    if unknown:
        raise HfgpuError(f"data.columns names {', '.join(unknown)}, not fields of format {cfg.format!r} ({', '.join(fields)})")
    mapping = {f: cfg.columns.get(f, f) for f in fields}
    missing = [f for f, col in mapping.items() if col not in ds.column_names and f not in OPTIONAL]
    if missing:
        have = ", ".join(ds.column_names)
        fixes = "; ".join(f"set data.columns.{f} to the right one" for f in missing)
        raise HfgpuError(f"{source} has no column {', '.join(repr(mapping[f]) for f in missing)} for format {cfg.format!r} (columns: {have}): {fixes}")
    return mapping


# --- rendering ------------------------------------------------------------------------------------


def _chat_segments(messages: Any, tokenizer, template: str | None, row: int) -> list[tuple[str, bool]]:
    if not isinstance(messages, list) or not messages:
        raise HfgpuError(f"chat row {row}: 'messages' must be a non-empty list of {{role, content}}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise HfgpuError(f"chat row {row}: each message needs 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise HfgpuError(f"chat row {row}: unknown role {m['role']!r}: use one of {', '.join(sorted(ROLES))}")
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=template)
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise HfgpuError(f"chat row {row}: the chat template does not render turns incrementally, so assistant tokens cannot be found: use format prompt_completion")
        segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    rest = render(messages, False)[len(done):]
    if rest:
        segments.append((rest, False))
    return segments


def segments_of(row: dict, fmt: str, cols: dict[str, str], tokenizer=None, template: str | None = None, index: int = 0) -> list[tuple[str, bool]]:
    """(text, learned) segments of one row; the final learned segment is followed by EOS (except chat)."""
    get = lambda f: row.get(cols[f]) if cols[f] in row else None
    if fmt == "text":
        return [(str(get("text") or ""), True)]
    if fmt == "alpaca":
        inp = get("input")
        prompt = (ALPACA_INPUT if inp else ALPACA).format(instruction=get("instruction") or "", input=inp or "")
        return [(prompt, False), (str(get("output") or ""), True)]
    if fmt == "prompt_completion":
        return [(str(get("prompt") or ""), False), (str(get("completion") or ""), True)]
    return _chat_segments(get("messages"), tokenizer, template, index)


def prompt_and_reference(row: dict, fmt: str, cols: dict[str, str], tokenizer=None, template: str | None = None) -> tuple[str, str]:
    """The text to generate from and the expected answer, for task metrics."""
    if fmt == "chat":
        msgs = row[cols["messages"]]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True, chat_template=template)
        return prompt, msgs[last]["content"]
    segs = segments_of(row, fmt, cols)
    return segs[0][0], segs[-1][0]


# --- tokenizing --------------------------------------------------------------------------------------


def _tokenize_batch(batch: dict, *, fmt, cols, tokenizer, template, max_len, train_on_prompt, too_long):
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "truncated": [], "learned": []}
    n = len(next(iter(batch.values())))
    for i in range(n):
        row = {k: v[i] for k, v in batch.items()}
        segs = segments_of(row, fmt, cols, tokenizer, template, i)
        ids: list[int] = []
        labels: list[int] = []
        for j, (text, learned) in enumerate(segs):
            piece = tokenizer(text, add_special_tokens=(j == 0 and fmt != "chat"))["input_ids"]
            if learned and fmt != "chat" and j == len(segs) - 1 and tokenizer.eos_token_id is not None:
                piece = piece + [tokenizer.eos_token_id]
            ids += piece
            labels += piece if (learned or train_on_prompt) else [IGNORE] * len(piece)
        truncated = len(ids) > max_len
        if truncated and too_long == "truncate":
            ids, labels = ids[:max_len], labels[:max_len]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["truncated"].append(truncated)
        out["learned"].append(sum(1 for x in labels[1:] if x != IGNORE))  # tokens the loss sees (labels shift by one)
    return out


@dataclass
class Prepared:
    train: Any  # datasets.Dataset with input_ids, labels (+ position_ids when packed)
    eval: Any | None
    eval_prompts: list[tuple[str, str]]  # (prompt, reference) for task metrics
    stats: dict = field(default_factory=dict)


def tokenize(ds, cfg: DataConfig, tokenizer, max_len: int, source: str):
    cols = check_columns(ds, cfg, source)
    if cfg.format == "chat" and not (cfg.chat_template or getattr(tokenizer, "chat_template", None)):
        raise HfgpuError("format chat needs a chat template: this tokenizer has none; set data.chat_template or use format prompt_completion")
    kwargs = dict(fmt=cfg.format, cols=cols, tokenizer=tokenizer, template=cfg.chat_template, max_len=max_len,
                  train_on_prompt=cfg.train_on_prompt, too_long=cfg.too_long)
    tok = ds.map(_tokenize_batch, batched=True, fn_kwargs=kwargs, remove_columns=ds.column_names, desc="tokenizing")
    stats = {"examples": len(tok), "too_long": int(sum(tok["truncated"]))}
    keep = [i for i, (length, learned) in enumerate(zip(tok["length"], tok["learned"])) if learned > 0 and (cfg.too_long == "truncate" or length <= max_len)]
    stats["dropped"] = len(tok) - len(keep)
    if len(keep) < len(tok):
        tok = tok.select(keep)
    if len(tok) == 0:
        raise HfgpuError(f"{source}: no example has tokens to learn within max_seq_len={max_len} (all too long or empty): raise data.max_seq_len or check the data")
    return tok.remove_columns(["truncated", "learned"]), stats, cols


def pack(tok, max_len: int):
    """Concatenate examples in order into sequences of at most max_len tokens, position_ids restarting per example."""
    import datasets

    seqs: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "length": []}
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_pos: list[int] = []
    for ids, labels in zip(tok["input_ids"], tok["labels"]):
        if cur_ids and len(cur_ids) + len(ids) > max_len:
            for k, v in zip(("input_ids", "labels", "position_ids"), (cur_ids, cur_labels, cur_pos)):
                seqs[k].append(v)
            seqs["length"].append(len(cur_ids))
            cur_ids, cur_labels, cur_pos = [], [], []
        cur_ids += ids
        # the model shifts labels: never predict an example's first token from the previous example
        cur_labels += [IGNORE] + labels[1:]
        cur_pos += list(range(len(ids)))
    if cur_ids:
        for k, v in zip(("input_ids", "labels", "position_ids"), (cur_ids, cur_labels, cur_pos)):
            seqs[k].append(v)
        seqs["length"].append(len(cur_ids))
    return datasets.Dataset.from_dict(seqs)


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Share of pad tokens when `lengths` are batched in order and padded to each batch's longest."""
    total = pad = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        total += max(chunk) * len(chunk)
        pad += max(chunk) * len(chunk) - sum(chunk)
    return pad / total if total else 0.0


def prepare_data(cfg: DataConfig, tokenizer, max_len: int, micro_batch_size: int) -> Prepared:
    train_rows = load_rows(cfg.path, cfg.split)
    tok, stats, cols = tokenize(train_rows, cfg, tokenizer, max_len, f"data {cfg.path!r}")
    stats["padding_before"] = padding_fraction(tok["length"], micro_batch_size)
    if cfg.packing:
        tok = pack(tok, max_len)
        stats["padding_after"] = padding_fraction(tok["length"], micro_batch_size)
        stats["sequences"] = len(tok)
    eval_ds, prompts = None, []
    if cfg.eval_path or cfg.eval_split:
        eval_rows = load_rows(cfg.eval_path or cfg.path, cfg.eval_split or "train")
        eval_ds, eval_stats, eval_cols = tokenize(eval_rows, cfg, tokenizer, max_len, f"eval data {(cfg.eval_path or cfg.path)!r}")
        stats["eval_examples"] = len(eval_ds)
        prompts = [prompt_and_reference(r, cfg.format, eval_cols, tokenizer, cfg.chat_template) for r in eval_rows]
    return Prepared(train=tok, eval=eval_ds, eval_prompts=prompts, stats=stats)


def collate(features: list[dict], pad_id: int) -> dict:
    """Pad to the longest in the batch. Packed batches carry position_ids and no attention mask."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    packed = "position_ids" in features[0]
    batch: dict[str, list] = {"input_ids": [], "labels": []}
    batch["position_ids" if packed else "attention_mask"] = []
    for f in features:
        n = len(f["input_ids"])
        pad = longest - n
        batch["input_ids"].append(list(f["input_ids"]) + [pad_id] * pad)
        batch["labels"].append(list(f["labels"]) + [IGNORE] * pad)
        if packed:
            batch["position_ids"].append(list(f["position_ids"]) + list(range(pad)))  # padding is one more "example"
        else:
            batch["attention_mask"].append([1] * n + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
