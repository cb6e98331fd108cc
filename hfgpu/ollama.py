"""The Ollama Modelfile of an exported run (`hfgpu export RUN --ollama DIR`): FROM the GGUF file, the prompt format
the run was trained with as Ollama's Go TEMPLATE — the chat template (derived by rendering the Jinja template and
checked against it) for chat data, the Alpaca prompt for Alpaca rows, the raw text for text, prompt/completion and
preference rows — its default system prompt as SYSTEM, the stop tokens and greedy decoding."""

from __future__ import annotations

from hfgpu.errors import HfgpuError
from hfgpu.render import ALPACA, ALPACA_JINJA

_MARK = "\x00{}\x00"  # a sentinel no chat template prints


def ollama_template(tokenizer) -> tuple[str, str | None]:
    """The run's chat template as the Go template an Ollama Modelfile takes, and the default system prompt the
    template inserts when a conversation has none (SmolLM2's, Qwen2.5's; None when it inserts none), derived by
    rendering the Jinja template around sentinels: each role's text before and after its content, and the generation
    prompt. The default system prompt becomes the Modelfile's SYSTEM, which Ollama puts first in a conversation that
    has no system message, as the Jinja template does. Refused when the derived template does not reproduce the Jinja
    rendering of sample conversations, with and without a system message (templates that treat other turns
    specially)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise HfgpuError("--ollama needs a chat template: this run's tokenizer has none; set data.chat_template when training")
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    empty = render([], False) if _renders_empty(tokenizer) else ""
    pieces = {}
    for role in ("system", "user", "assistant"):
        try:
            text = render([{"role": role, "content": _MARK.format(role)}], False)
        except Exception:  # a template may refuse a lone system or assistant message
            continue
        before, _, after = text[len(empty) :].partition(_MARK.format(role))
        pieces[role] = (before, after)
    default_system = None
    if "system" in pieces and "user" in pieces:  # a lone user message rendered after a system block it inserted
        sys_before, sys_after = pieces["system"]
        before = pieces["user"][0]
        if sys_before and before.startswith(sys_before) and sys_after in before[len(sys_before) :]:
            default_system, _, _ = before[len(sys_before) :].partition(sys_after)
            inserted = sys_before + default_system + sys_after
            for role in ("user", "assistant"):
                if role in pieces and pieces[role][0].startswith(inserted):
                    pieces[role] = (pieces[role][0][len(inserted) :], pieces[role][1])
    generation = render([{"role": "user", "content": "x"}], True)[len(render([{"role": "user", "content": "x"}], False)) :]
    sample = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of Peru?"},
    ]
    go_render = lambda msgs: (  # noqa: E731  (what the Go template below renders)
        empty + "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in msgs if m["role"] in pieces) + generation
    )
    no_system = sample[1:]
    ollama_adds = [{"role": "system", "content": default_system}] if default_system is not None else []
    if (
        "user" not in pieces
        or "assistant" not in pieces
        or go_render(sample) != render(sample, True)
        or go_render(ollama_adds + no_system) != render(no_system, True)
    ):
        raise HfgpuError(
            "--ollama: this chat template treats some turns specially (its rendering is not the same text around each "
            "message), so no Modelfile TEMPLATE is derived: export with --out only and write the TEMPLATE by hand"
        )
    esc = lambda s: s.replace("{{", "{{ `{{` }}")  # noqa: E731  (literal braces in a Go template)
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{esc(b)}{{{{ .Content }}}}{esc(a)}'
        for i, (role, (b, a)) in enumerate(pieces.items())
    )
    # no {{- trims: every character around the content is the template's own
    return f"{esc(empty)}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{esc(generation)}", default_system


def _renders_empty(tokenizer) -> bool:
    try:
        tokenizer.apply_chat_template([], tokenize=False)
        return True
    except Exception:
        return False


# a run trained on raw text (text, prompt/completion, preference rows) sees its prompt as it is, its answer closed by EOS
RAW_JINJA = (
    "{% for message in messages %}{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def prompt_format(data) -> str:
    """How a run's prompts were rendered in training (as `hfgpu generate` renders them): "chat" (the chat template),
    "alpaca" or "raw"; a mixture of datasets in different formats is refused, since one Modelfile has one template."""
    formats = {m.format or data.format for m in data.mix} if data.mix else {data.format}
    kinds = {"chat" if f == "chat" else "alpaca" if f == "alpaca" else "raw" for f in formats}
    if len(kinds) > 1:
        raise HfgpuError(
            f"--ollama: the run trained on several prompt formats ({', '.join(sorted(formats))}), and a Modelfile has one "
            "TEMPLATE: export with --out only and write the TEMPLATE by hand"
        )
    return kinds.pop()


def gguf_chat_template(tokenizer, fmt: str) -> str | None:
    """The chat template a GGUF file of the run carries (llama.cpp's chat mode reads it): the run's prompt format."""
    if fmt == "chat":
        return getattr(tokenizer, "chat_template", None)
    return ALPACA_JINJA if fmt == "alpaca" else RAW_JINJA


def _plain_template(tokenizer, before: str) -> str:
    """Ollama's TEMPLATE for a run trained on single prompts: each user message after `before` (the Alpaca prompt, or
    nothing), each earlier answer closed by EOS, as ALPACA_JINJA / RAW_JINJA render them."""
    esc = lambda s: s.replace("{{", "{{ `{{` }}")  # noqa: E731
    head, _, tail = before.partition("{instruction}")
    eos = esc(tokenizer.eos_token or "")
    return (
        f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{esc(head)}{{{{ .Content }}}}{esc(tail)}'
        f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{eos}{{{{ end }}}}{{{{ end }}}}'
    )


def ollama_modelfile(tokenizer, gguf_name: str, fmt: str = "chat") -> str:
    """A Modelfile: FROM the exported file, the run's prompt format (`fmt`, from prompt_format) as Ollama's TEMPLATE
    (and a chat template's default system prompt as SYSTEM), the stop tokens (EOS and the template's end-of-turn
    special tokens) and the run's generation defaults (greedy, as hfgpu's eval and generate decode)."""
    if fmt == "chat":
        template, system = ollama_template(tokenizer)
    else:
        template, system = _plain_template(tokenizer, ALPACA if fmt == "alpaca" else "{instruction}"), None
    stops = []
    for t in [tokenizer.eos_token] + [t for t in tokenizer.all_special_tokens if t in template]:
        if t and t not in stops and t != tokenizer.bos_token:
            stops.append(t)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")  # greedy: what hfgpu generate and the eval metrics do
    return "\n".join(lines) + "\n"
