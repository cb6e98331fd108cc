"""Preference data: prompt/chosen/rejected pairs and KTO's labelled completions, checked row by row (malformed rows
dropped under the rule that names why), tokenized with response masks (plain rows as TRL's trainers tokenize them,
chat rows as hfgpu's chat format masks them), and collated as (examples, 2, tokens) for hfgpu.preference's losses.
data.prepare_data calls prepare_pairs for data.format preference and unpaired."""

from __future__ import annotations

import torch

# --- data: pairs of responses ------------------------------------------------------------------------


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _texts(row: dict, cols: dict[str, str], fields: tuple[str, ...]) -> tuple[dict[str, str], str | None]:
    """The text of each field of a preference row (a prompt's every message, a response's assistant messages), or the
    rule the row breaks. Plain rows hold strings; conversational rows messages (a string stands for one message)."""
    from hfgpu.render import BadRow, message_text

    texts = {}
    for field in fields:
        name = cols.get(field, field)
        value = row.get(name)
        if value is None:
            return texts, f"missing {name!r}"
        if _is_messages(value):
            try:
                texts[field] = "".join(message_text(m) for m in value if field == "prompt" or m.get("role") == "assistant")
            except BadRow as e:
                return texts, e.rule
            if field != "prompt" and not any(m.get("role") == "assistant" for m in value):
                return texts, f"no assistant message in {name!r}"
        elif isinstance(value, str):
            texts[field] = value
        else:
            return texts, f"{type(value).__name__}-valued {name!r}"
    return texts, None


def pair_problem(row: dict, cols: dict[str, str]) -> str | None:
    """Why a preference row cannot be trained on (the rule its count is reported under), or None."""
    texts, problem = _texts(row, cols, ("prompt", "chosen", "rejected"))
    if problem:
        return problem
    if not texts["chosen"].strip() or not texts["rejected"].strip():
        return "empty response"
    if texts["chosen"].strip() == texts["rejected"].strip():
        return "chosen and rejected identical"
    return None


def _chat_pair_segments(prompt, response, tokenizer, template, index: int) -> list[tuple[str, bool]]:
    """A conversational pair's side rendered with the chat template: the prompt's turns (assistant turns in it
    included) are not learned, the response's assistant turns are."""
    from hfgpu.render import chat_segments

    as_messages = lambda v, role: v if _is_messages(v) else [{"role": role, "content": v}]  # noqa: E731
    prompt_msgs = as_messages(prompt, "user")
    segments = chat_segments(prompt_msgs + as_messages(response, "assistant"), tokenizer, template, index)
    skip = sum(1 for m in prompt_msgs if m["role"] == "assistant")  # learned segments that belong to the prompt
    out = []
    for text, learned in segments:
        if learned and skip:
            skip -= 1
            learned = False
        out.append((text, learned))
    return out


def _tokenize_responses(kept: list[tuple[int, dict]], prompt: str, response: str, tokenizer, template, max_len: int) -> dict:
    """(row index, row) → each row's prompt + response tokenized as hfgpu's prompt_completion format does (plain rows:
    prompt with BOS, response + EOS) or, when the rows hold chat messages, with the chat template (the response's
    assistant turns learned up to their end-of-turn token). data.tokenize_batch's columns (input_ids, labels, …)."""
    from hfgpu.errors import HfgpuError
    from hfgpu.tokenizing import tokenize_batch

    chat = any(_is_messages(r.get(name)) for _, r in kept[:1] for name in (prompt, response))
    if chat and not (template or getattr(tokenizer, "chat_template", None)):
        raise HfgpuError("conversational preference rows need a chat template: this tokenizer has none; set data.chat_template")
    segmenter = None
    if chat:
        segmenter = lambda row, index: _chat_pair_segments(row["prompt"], row["completion"], tokenizer, template, index)  # noqa: E731
    return tokenize_batch(
        {"prompt": [r[prompt] for _, r in kept], "completion": [r[response] for _, r in kept]},
        [i for i, _ in kept],
        fmt="chat" if chat else "prompt_completion",
        cols={"prompt": "prompt", "completion": "completion"},
        tokenizer=tokenizer,
        template=template,
        max_len=max_len,
        train_on_prompt=False,
        too_long="truncate",
        segmenter=segmenter,
    )


def tokenize_pairs(
    rows, tokenizer, max_len: int, columns: dict[str, str] | None = None, template: str | None = None
) -> tuple[list[dict], dict]:
    """Preference rows → per pair the chosen and rejected sequences (prompt + response) and which tokens are the
    response. Plain rows are tokenized as hfgpu's prompt_completion format is (prompt with BOS, response + EOS: the
    masks TRL's DPOTrainer computes); conversational rows with the chat template, the response's assistant turns
    learned up to their end-of-turn token, as the chat format's are. Returns (pairs, {rule: [1-based rows]} dropped)."""
    from hfgpu.tokenizing import IGNORE

    cols = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", **(columns or {})}
    rows = [dict(r) for r in rows]
    kept, dropped = [], {}
    for i, row in enumerate(rows):
        if (why := pair_problem(row, cols)) is None:
            kept.append((i, row))
        else:
            dropped.setdefault(why, []).append(i + 1)
    sides = {side: _tokenize_responses(kept, cols["prompt"], cols[side], tokenizer, template, max_len) for side in ("chosen", "rejected")}
    pairs = []
    for k, (i, _) in enumerate(kept):
        c, r = ({key: sides[s][key][k] for key in ("input_ids", "labels", "problem", "truncated")} for s in ("chosen", "rejected"))
        if c["problem"] or r["problem"]:
            dropped.setdefault(c["problem"] or r["problem"], []).append(i + 1)
            continue
        if not any(x != IGNORE for x in c["labels"][1:]) or not any(x != IGNORE for x in r["labels"][1:]):
            dropped.setdefault("no response tokens within max_seq_len", []).append(i + 1)
            continue
        pairs.append(
            {
                "chosen_ids": c["input_ids"],
                "chosen_mask": [int(x != IGNORE) for x in c["labels"]],
                "rejected_ids": r["input_ids"],
                "rejected_mask": [int(x != IGNORE) for x in r["labels"]],
                "length": max(len(c["input_ids"]), len(r["input_ids"])),
                "truncated": bool(c["truncated"] or r["truncated"]),
                "row": i,
            }
        )
    return pairs, dropped


def unpaired_problem(row: dict, cols: dict[str, str]) -> str | None:
    """Why a KTO row cannot be trained on, or None (its label is checked by tokenize_unpaired: a wrong one is refused)."""
    texts, problem = _texts(row, cols, ("prompt", "completion"))
    if problem:
        return problem
    if not texts["completion"].strip():
        return "empty completion"
    return None


def check_labels(rows: list[dict], name: str, source: str) -> None:
    """KTO's labels are booleans (true: desirable): anything else is refused, naming the first such row and value."""
    from hfgpu.errors import HfgpuError

    for i, row in enumerate(rows):
        value = row.get(name)
        if not isinstance(value, bool):
            raise HfgpuError(
                f"{source} row {i + 1}: label {value!r:.40} is not a boolean: write the column {name!r} as true (a desirable "
                "completion) or false (undesirable), JSON booleans; data.columns.label names another column"
            )


def tokenize_unpaired(
    rows, tokenizer, max_len: int, columns: dict[str, str] | None = None, template: str | None = None, source: str = "data"
) -> tuple[list[dict], dict]:
    """KTO rows → per example its sequence (prompt + completion, the completion learned) and its KL sequence: its
    prompt with the completion of the example before it (the first takes the last's), TRL's mismatched pairs with the
    whole data set as one batch, fixed, so that a full fine-tune can precompute their reference log-probs. Plain and
    conversational rows are tokenized as tokenize_pairs does. Returns (examples, {rule: [1-based rows]} dropped)."""
    from hfgpu.errors import HfgpuError
    from hfgpu.tokenizing import IGNORE

    cols = {"prompt": "prompt", "completion": "completion", "label": "label", **(columns or {})}
    rows = [dict(r) for r in rows]
    check_labels(rows, cols["label"], source)
    kept, dropped = [], {}
    for i, row in enumerate(rows):
        if (why := unpaired_problem(row, cols)) is None:
            kept.append((i, row))
        else:
            dropped.setdefault(why, []).append(i + 1)
    tok = _tokenize_responses(kept, cols["prompt"], cols["completion"], tokenizer, template, max_len)
    examples = []
    for k, (i, row) in enumerate(kept):
        if tok["problem"][k]:
            dropped.setdefault(tok["problem"][k], []).append(i + 1)
            continue
        mask = [int(x != IGNORE) for x in tok["labels"][k]]
        if not any(mask[1:]):
            dropped.setdefault("no completion tokens within max_seq_len", []).append(i + 1)
            continue
        start = mask.index(1)  # the prompt (and a chat template's assistant header) comes before
        ids = tok["input_ids"][k]
        examples.append({"ids": ids, "mask": mask, "start": start, "label": row[cols["label"]], "row": i, "truncated": tok["truncated"][k]})
    if len(examples) < 2 and examples:
        raise HfgpuError(
            f"{source}: KTO needs at least 2 examples (each one's KL baseline uses another's completion); it has {len(examples)}"
        )
    out = []
    for k, e in enumerate(examples):
        other = examples[k - 1]  # the first example takes the last one's completion
        kl_ids = (e["ids"][: e["start"]] + other["ids"][other["start"] :])[:max_len]
        kl_mask = ([0] * e["start"] + other["mask"][other["start"] :])[:max_len]
        out.append(
            {
                "completion_ids": e["ids"],
                "completion_mask": e["mask"],
                "kl_ids": kl_ids,
                "kl_mask": kl_mask,
                "label": e["label"],
                "length": max(len(e["ids"]), len(kl_ids)),
                "truncated": e["truncated"],
                "row": e["row"],
            }
        )
    return out, dropped


def _sides(example: dict) -> tuple[str, str]:
    return ("chosen", "rejected") if "chosen_ids" in example else ("completion", "kl")


def collate_pairs(pairs: list[dict], pad_id: int) -> dict:
    """Each example's two sequences side by side, padded on the right to the batch's longest: input_ids,
    attention_mask, completion_mask of shape (examples, 2, tokens). A pair's are its chosen and rejected sequences;
    a KTO example's its completion and its KL sequence (its prompt with another example's completion), with `label`
    (examples,). `ref_logps` (examples, 2) when the reference's log-probs were precomputed."""
    sides = _sides(pairs[0])
    longest = max(max(len(p[f"{sides[0]}_ids"]), len(p[f"{sides[1]}_ids"])) for p in pairs)
    out = {"input_ids": [], "attention_mask": [], "completion_mask": []}
    for p in pairs:
        rows = {"input_ids": [], "attention_mask": [], "completion_mask": []}
        for side in sides:
            ids, mask = p[f"{side}_ids"], p[f"{side}_mask"]
            pad = longest - len(ids)
            rows["input_ids"].append(list(ids) + [pad_id] * pad)
            rows["attention_mask"].append([1] * len(ids) + [0] * pad)
            rows["completion_mask"].append(list(mask) + [0] * pad)
        for k, v in rows.items():
            out[k].append(v)
    batch = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
    if "label" in pairs[0]:
        batch["label"] = torch.tensor([bool(p["label"]) for p in pairs])
    if "ref_logps" in pairs[0]:
        batch["ref_logps"] = torch.tensor([p["ref_logps"] for p in pairs], dtype=torch.float32)
    return batch


def flat_pairs(batch: dict) -> dict:
    """(pairs, 2, …) → TRL's layout (2·pairs, …): every chosen sequence, then every rejected one (a KTO batch: every
    completion, then every KL sequence). Per-example values (label, kl) are left out."""
    return {k: torch.cat([v[:, 0], v[:, 1]]) for k, v in batch.items() if v.dim() >= 2}


def prepare_pairs(cfg, tokenizer, max_len: int):
    """`data.format: preference` (or `unpaired`, KTO's): the training (and eval) examples of data.path, as
    data.prepare_data returns them, under the same rules: malformed rows are dropped with a count, and refused when
    they are most of the data."""
    import datasets

    from hfgpu.errors import HfgpuError
    from hfgpu.sources import check_columns
    from hfgpu.tokenizing import Prepared, describe_drops, load_chat_template, train_and_eval_rows

    train_rows, eval_rows, extra = train_and_eval_rows(cfg)
    template = load_chat_template(cfg.chat_template)
    unpaired = cfg.format == "unpaired"
    what, fields = ("labelled completions", "prompt, completion, label") if unpaired else ("preference pairs", "prompt, chosen, rejected")

    def one(rows, source: str):
        cols = check_columns(rows, cfg, source)
        if unpaired:
            pairs, why = tokenize_unpaired(rows, tokenizer, max_len, cols, template, source)
        else:
            pairs, why = tokenize_pairs(rows, tokenizer, max_len, cols, template)
        too_long = sum(p["truncated"] for p in pairs)
        if cfg.too_long == "drop":
            for p in pairs:
                if p["truncated"]:
                    why.setdefault("longer than max_seq_len (data.too_long: drop)", []).append(p["row"] + 1)
            pairs = [p for p in pairs if not p["truncated"]]
        data_rules = ("empty", "chosen and", "longer", "no response", "no completion")  # rows of this format, unusable
        malformed = {rule: rows_ for rule, rows_ in why.items() if not rule.startswith(data_rules)}
        if (n_bad := sum(map(len, malformed.values()))) * 2 > len(rows):
            raise HfgpuError(
                f"{source}: {n_bad} of {len(rows)} rows are not {what} ({describe_drops(malformed)}): check data.format "
                f"and data.columns ({fields})"
            )
        if not pairs:
            raise HfgpuError(f"{source}: no example is left to train on ({describe_drops(why)}): fix the rows, or raise data.max_seq_len")
        stats = {"examples": len(rows), "too_long": too_long, "dropped": len(rows) - len(pairs), "drop_reasons": why}
        if unpaired:
            stats["desirable"] = sum(bool(p["label"]) for p in pairs)
        ds = datasets.Dataset.from_list([{k: v for k, v in p.items() if k != "truncated"} for p in pairs])
        return ds, stats

    train, stats = one(train_rows, f"data {cfg.path!r}")
    stats.update(extra)
    evaluation = None
    if eval_rows is not None:
        evaluation, eval_stats = one(eval_rows, f"eval data {cfg.eval_path or cfg.path!r}")
        stats["eval_examples"] = len(evaluation)
    return Prepared(train=train, eval=evaluation, eval_prompts=[], stats=stats)
