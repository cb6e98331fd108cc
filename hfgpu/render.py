"""Rendering: a row of each format as prompt/completion segments (which text is learned), the Alpaca template,
chat messages through the tokenizer's chat template turn by turn. hfgpu.data tokenizes the segments."""

from __future__ import annotations

from typing import Any

from hfgpu.errors import HfgpuError

ROLES = {"system", "user", "assistant", "tool"}
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# the Alpaca prompt as a chat template, for a GGUF file of a run trained on Alpaca rows (llama.cpp's chat mode reads
# the file's template and adds BOS itself): one instruction per turn, the answer closed by EOS as training closed it
ALPACA_JINJA = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    + ALPACA.replace("{instruction}", "{{ message['content'] }}")
    + "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class BadRow(Exception):
    """A row that does not match its format: dropped and counted under `rule` (never trained as-is)."""

    def __init__(self, rule: str):
        super().__init__(rule)
        self.rule = rule


def _text(value: Any, name: str, required: bool = True) -> str:
    """A field's text: strings and numbers as they are; missing, lists and mappings are bad rows."""
    if value is None:
        if required:
            raise BadRow(f"missing {name!r}")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRow(f"{type(value).__name__}-valued {name!r}")
    return str(value)


def message_text(m: dict) -> str:
    """A message's text: a string, or OpenAI-style parts [{type: text, text: …}] joined."""
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(part, dict) for part in c):
        if any(part.get("type", "text") != "text" or not isinstance(part.get("text"), str) for part in c):
            raise BadRow("non-text message content (images, audio)")
        return "".join(part["text"] for part in c)
    raise BadRow(f"{type(c).__name__}-valued message content")


TEMPLATE_FIX = (
    "set data.chat_template to a template that renders turns incrementally (hfgpu ships one for ChatML models such as Qwen3: "
    "data.chat_template=hfgpu:chat_templates/chatml.jinja), or use format prompt_completion"
)


def chat_messages(messages: Any, row: int) -> list[dict]:
    """Checked {role, content} messages with plain-text content."""
    if not isinstance(messages, list) or not messages:
        raise HfgpuError(f"chat row {row}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise HfgpuError(f"chat row {row}: each message needs 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise HfgpuError(f"chat row {row}: unknown role {str(m['role'])[:40]!r}: use one of {', '.join(sorted(ROLES))}")
        out.append({**m, "content": message_text(m)})
    return out


def chat_segments(messages: Any, tokenizer, template: str | None, row: int) -> list[tuple[str, bool]]:
    messages = chat_messages(messages, row)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant turn")
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise BadRow("empty completion")
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=template)
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise HfgpuError(
                f"chat row {row}: the chat template does not render turns incrementally (as Qwen3's does), so assistant "
                f"tokens cannot be found: {TEMPLATE_FIX}"
            )
        segments += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    rest = render(messages, False)[len(done) :]
    if rest:
        segments.append((rest, False))
    return segments


def segments_of(
    row: dict, fmt: str, cols: dict[str, str], tokenizer=None, template: str | None = None, index: int = 0
) -> list[tuple[str, bool]]:
    """(text, learned) segments of one row; the final learned segment is followed by EOS (except chat).
    Raises BadRow when the row does not match the format."""
    get = lambda f: row.get(cols[f]) if cols[f] in row else None
    if fmt == "text":
        segs = [(_text(get("text"), cols["text"]), True)]
    elif fmt == "alpaca":
        inp = _text(get("input"), cols["input"], required=False)
        prompt = (ALPACA_INPUT if inp else ALPACA).format(instruction=_text(get("instruction"), cols["instruction"]), input=inp)
        segs = [(prompt, False), (_text(get("output"), cols["output"]), True)]
    elif fmt == "prompt_completion":
        segs = [(_text(get("prompt"), cols["prompt"]), False), (_text(get("completion"), cols["completion"]), True)]
    else:
        return chat_segments(get("messages"), tokenizer, template, index)
    if not segs[-1][0].strip():
        raise BadRow("empty completion" if fmt != "text" else "empty text")
    return segs


def prompt_and_reference(row: dict, fmt: str, cols: dict[str, str], tokenizer=None, template: str | None = None) -> tuple[str, str, str]:
    """The text to generate from, the expected answer, and what the row asks as its author wrote it (no template:
    shown beside the answers before and after), for task metrics (BadRow when there is no answer)."""
    if fmt == "chat":
        msgs = chat_messages(row[cols["messages"]], 0)
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if not turns:
            raise BadRow("no assistant turn")
        prompt = tokenizer.apply_chat_template(msgs[: turns[-1]], tokenize=False, add_generation_prompt=True, chat_template=template)
        users = [m["content"] for m in msgs[: turns[-1]] if m["role"] == "user"]
        return prompt, msgs[turns[-1]]["content"], users[-1] if users else ""
    segs = segments_of(row, fmt, cols)
    if fmt == "alpaca":
        question = " ".join(str(row[cols[k]]) for k in ("instruction", "input") if cols.get(k) in row and row[cols[k]])
    else:
        question = str(row[cols["prompt"]]) if fmt == "prompt_completion" else ""
    return segs[0][0], segs[-1][0], question


def prompt_ids(prompt: str, fmt: str, tokenizer) -> list[int]:
    """A prompt's tokens exactly as training tokenizes a row's first segment: special tokens (BOS) are
    added for the plain formats; a chat template already rendered its own."""
    return tokenizer(prompt, add_special_tokens=fmt != "chat")["input_ids"]
