"""Data: rows (hfgpu.sources) rendered as prompt/completion segments (hfgpu.render), tokenized with label masks,
packed, collated.

Formats (`data.format`):
- text: a `text` column; every token is learned.
- alpaca: `instruction`, optional `input`, `output`; the Alpaca prompt template; only the output is learned.
- prompt_completion: `prompt` and `completion`; only the completion is learned.
- chat: `messages`, a list of {role, content} rendered with the tokenizer's chat template; only
  assistant turns are learned.
- preference (objectives dpo, ipo, simpo, orpo): `prompt`, `chosen`, `rejected`, strings or chat messages;
  unpaired (objective kto): `prompt`, `completion`, `label` (true: desirable). Tokenized by hfgpu.preference_data.
`data.columns` renames fields (`{output: answer}`); `data.train_on_prompt` learns prompts too.

Tokenization goes through `datasets.map`, whose fingerprint cache makes a second run with the same
data and tokenizer skip it. Packing puts several examples in one sequence with position_ids that
restart at 0 for each: transformers' sdpa/eager build a block-diagonal causal mask from them (when no
attention mask and no cache are passed) and FlashAttention-2 runs varlen, so examples never attend
to each other.
"""

from __future__ import annotations

from functools import lru_cache

from hfgpu.errors import HfgpuError
from hfgpu.recipe import DataConfig
from hfgpu.render import BadRow, prompt_and_reference, prompt_ids
from hfgpu.sources import check_columns
from hfgpu.tokenizing import (  # noqa: F401  (the shared base, re-exported for older imports)
    CHARS_PER_TOKEN,
    EVAL_FRACTION_SEED,
    IGNORE,
    Prepared,
    _tokenized_features,
    describe_drops,
    load_chat_template,
    tokenize_batch,
    train_and_eval_rows,
)


def tokenize(ds, cfg: DataConfig, tokenizer, max_len: int, source: str, prefix: str = "data"):
    cols = check_columns(ds, cfg, source, prefix)
    keys = f"{prefix}.format and {prefix}.columns"
    template = load_chat_template(cfg.chat_template)
    if cfg.format == "chat" and not (template or getattr(tokenizer, "chat_template", None)):
        raise HfgpuError(
            "format chat needs a chat template: this tokenizer has none; set data.chat_template or use format prompt_completion"
        )
    kwargs = dict(
        fmt=cfg.format,
        cols=cols,
        tokenizer=tokenizer,
        template=template,
        max_len=max_len,
        train_on_prompt=cfg.train_on_prompt,
        too_long=cfg.too_long,
    )
    tok = ds.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        fn_kwargs=kwargs,
        remove_columns=ds.column_names,
        desc="tokenizing",
        features=_tokenized_features(),
    )
    # one pass over the columns: each row is kept, or dropped under the rule that names why (1-based rows)
    why: dict[str, list[int]] = {}
    wrong_format: set[str] = set()  # rules that mean the row is not in this format (empty rows are data)
    keep = []
    for i, (problem, learned, truncated, row) in enumerate(zip(tok["problem"], tok["learned"], tok["truncated"], tok["row"])):
        if problem:
            reason = problem
            if not problem.startswith("empty"):
                wrong_format.add(problem)
        elif learned == 0:
            reason = "no learned tokens within max_seq_len"
        elif truncated and cfg.too_long == "drop":
            reason = "longer than max_seq_len (data.too_long: drop)"
        else:
            keep.append(i)
            continue
        why.setdefault(reason, []).append(row + 1)
    stats = {"examples": len(tok), "too_long": int(sum(tok["truncated"])), "dropped": len(tok) - len(keep), "drop_reasons": why}
    malformed = {rule: why[rule] for rule in wrong_format}
    if (n_bad := sum(map(len, malformed.values()))) * 2 > len(tok):
        raise HfgpuError(
            f"{source}: {n_bad} of {len(tok)} rows do not match format {cfg.format!r} ({describe_drops(malformed)}): check {keys}"
        )
    if len(keep) < len(tok):
        tok = tok.select(keep)
    if len(tok) == 0:
        raise HfgpuError(
            f"{source}: no example has tokens to learn within max_seq_len={max_len} (all too long or empty): raise "
            f"data.max_seq_len or check the data"
        )
    return tok.remove_columns(["truncated", "learned", "problem", "row"]), stats, cols


@lru_cache(maxsize=8)
def tokenized_fingerprint(ds) -> str:
    """SHA-256 of the tokenized training data (every column's values, in order): what a checkpoint
    must match to be resumed exactly. Reads Arrow batches: bounded memory, ~1 s per 10⁸ tokens."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(",".join(sorted(ds.column_names)).encode())
    for batch in ds.with_format("arrow").iter(batch_size=10_000):
        for name in sorted(batch.column_names):
            col = batch.column(name)
            for chunk in getattr(col, "chunks", [col]):
                if hasattr(chunk, "flatten") and hasattr(chunk, "value_lengths"):
                    h.update(np.asarray(chunk.value_lengths()).tobytes())
                    h.update(np.asarray(chunk.flatten()).tobytes())
                else:
                    h.update(np.asarray(chunk).tobytes())
    return h.hexdigest()[:16]


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
    """The training (and eval) examples of `data.path`, or of every dataset of `data.mix`, tokenized, packed when asked."""
    if cfg.format in ("preference", "unpaired"):
        from hfgpu.preference_data import prepare_pairs

        out = prepare_pairs(cfg, tokenizer, max_len)
    elif cfg.mix:
        out = _prepare_mix(cfg, tokenizer, max_len)
    else:
        out = _prepare_one(cfg, tokenizer, max_len, f"data {cfg.path!r}")
    stats = out.stats
    stats["padding_before"] = padding_fraction(out.train["length"], micro_batch_size)
    if cfg.packing:
        out.train = pack(out.train, max_len)
        stats["padding_after"] = padding_fraction(out.train["length"], micro_batch_size)
        stats["sequences"] = len(out.train)
    return out


def _prepare_one(cfg: DataConfig, tokenizer, max_len: int, source: str, prefix: str = "data") -> Prepared:
    train_rows, eval_rows, extra = train_and_eval_rows(cfg)
    tok, stats, cols = tokenize(train_rows, cfg, tokenizer, max_len, source, prefix)
    stats.update(extra)
    eval_ds, prompts, questions = None, [], []
    if eval_rows is not None:
        eval_ds, eval_stats, eval_cols = tokenize(eval_rows, cfg, tokenizer, max_len, f"eval {source}", prefix)
        stats["eval_examples"] = len(eval_ds)
        template = load_chat_template(cfg.chat_template)
        for r in eval_rows:
            try:
                prompt, reference, question = prompt_and_reference(r, cfg.format, eval_cols, tokenizer, template)
            except BadRow:
                continue  # counted in the eval data's dropped rows
            prompts.append((prompt_ids(prompt, cfg.format, tokenizer), reference))
            questions.append(question)
    return Prepared(train=tok, eval=eval_ds, eval_prompts=prompts, stats=stats, eval_questions=questions)


MIX_SEED = 0  # data.mix: which examples a weighted or sampled source gives, and their order, the same every run


def mix_counts(available: list[int], sources: list) -> list[int]:
    """How many examples each source of data.mix gives: `samples` exactly; every example of a source with
    neither; and the weighted sources in proportion to their weights, as many as the scarcest allows
    without repeating any (LLaMA-Factory's interleave "first_exhausted")."""
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    total_weight = sum(sources[i].weight for i in weighted)
    scale = min((available[i] / (sources[i].weight / total_weight) for i in weighted), default=0.0)
    counts = []
    for i, s in enumerate(sources):
        if s.samples is not None:
            counts.append(s.samples)
        elif s.weight is not None:
            counts.append(max(1, min(available[i], int(scale * s.weight / total_weight + 1e-9))))
        else:
            counts.append(available[i])
    return counts


def _take(ds, n: int, seed: int):
    """`n` examples of `ds`, seeded: a shuffled prefix, or whole shuffled passes and a prefix when n > len(ds)."""
    import random

    order: list[int] = []
    passes = 0
    while len(order) < n:
        idx = list(range(len(ds)))
        random.Random(seed * 1_000_003 + passes).shuffle(idx)
        order += idx[: n - len(order)]
        passes += 1
    return ds.select(order)


def _prepare_mix(cfg: DataConfig, tokenizer, max_len: int) -> Prepared:
    """Each dataset of data.mix prepared as data.path would be (its own format, columns, splits; data.eval_fraction
    held out of each), its share taken (mix_counts, seeded), the shares concatenated and shuffled (seeded) so that
    batches and packs mix the sources. Eval rows keep their source (a `source` column) for per-source metrics."""
    import datasets

    parts: list[Prepared] = []
    for i, src in enumerate(cfg.mix):
        update = {"path": src.path, "mix": None, "split": src.split, "eval_split": src.eval_split, "eval_path": src.eval_path}
        if src.format is not None:
            update["format"] = src.format
        if src.columns is not None:
            update["columns"] = src.columns
        sub = cfg.model_copy(update=update)
        parts.append(_prepare_one(sub, tokenizer, max_len, f"data.mix[{i}] {src.path!r}", f"data.mix[{i}]"))
    counts = mix_counts([len(p.train) for p in parts], cfg.mix)
    taken = [_take(p.train, n, MIX_SEED + i) for i, (p, n) in enumerate(zip(parts, counts))]
    train = datasets.concatenate_datasets(taken).shuffle(seed=MIX_SEED).flatten_indices()
    stats = {key: sum(p.stats[key] for p in parts) for key in ("examples", "too_long", "dropped")}
    stats["drop_reasons"] = {
        f"{src.label}: {rule}": rows for src, p in zip(cfg.mix, parts) for rule, rows in p.stats["drop_reasons"].items()
    }
    stats["sources"] = [
        {"name": src.label, "examples": len(p.train), "used": n, "eval_examples": len(p.eval) if p.eval is not None else 0}
        for src, p, n in zip(cfg.mix, parts, counts)
    ]
    evals = [p.eval.add_column("source", [i] * len(p.eval)) for i, p in enumerate(parts) if p.eval is not None and len(p.eval)]
    eval_ds = datasets.concatenate_datasets(evals) if evals else None
    if eval_ds is not None:
        stats["eval_examples"] = len(eval_ds)
        stats["eval_sources"] = [src.label for src in cfg.mix]
        if cfg.eval_fraction:
            stats["eval_held_out"] = cfg.eval_fraction
    prompts = [x for p in parts for x in p.eval_prompts]
    questions = [q for p in parts for q in p.eval_questions]
    return Prepared(train=train, eval=eval_ds, eval_prompts=prompts, stats=stats, eval_questions=questions)


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
    if "source" in features[0]:  # data.mix eval rows: which dataset each came from (hfgpu.evaluation.eval_loss)
        batch["source"] = [f["source"] for f in features]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
