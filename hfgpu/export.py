"""Export a finished run to GGUF, the file llama.cpp, Ollama and LM Studio run.

    hfgpu export outputs/run --format gguf --quant q8_0 --out run.gguf

Built on the `gguf` package (llama.cpp's own Python library for the format: its writer, its tensor names, its
quantizers), not a copy of llama.cpp's converter. A LoRA/QLoRA run is merged into its base first (in 16 bits, as
`hfgpu merge` does); a full run is exported as it is. The file is written tensor by tensor: the header and the
tensor table first (from shapes alone), then each tensor converted, written and dropped, so the memory beyond the
loaded model is one tensor at a time, never the model twice.

Types: f32, f16, bf16, q8_0 and q4_0 (the ones the gguf package quantizes; the k-quants such as q4_k_m need
llama.cpp's own `llama-quantize`, which takes this file's f16 export). Architectures: llama (and mistral, which
llama.cpp runs as llama), qwen2, qwen3, gemma2, phi3. Tokenizers: byte-level BPE (Llama-3, Qwen, SmolLM2, the
demo's) and sentencepiece BPE with byte fallback (Llama-2, Mistral, Gemma, Phi-3), with the vocabulary, merges,
scores, token types, special ids, the pre-tokenizer name llama.cpp recognises and the chat template. Rope: plain,
linear, Llama-3's (as `rope_freqs`), Phi-3's longrope (as `rope_factors_long` / `rope_factors_short`) and YaRN.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from hfgpu.errors import HfgpuError, write_failure
from hfgpu.gguf_rope import rope_metadata

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
# model_type → (llama.cpp architecture, whether q_proj/k_proj rows are permuted for its rope layout)
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "gemma2": ("gemma2", False),
    "phi3": ("phi3", False),
}
# the pre-tokenizer llama.cpp selects by this name (llama-vocab.cpp); by model type, and by the vocabulary's size
# where one model type ships several (Llama-2's sentencepiece is not byte-level BPE and is refused before this)
PRE_TOKENIZERS = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe", "mistral": "llama-bpe"}
# rope types whose frequencies llama.cpp reads from a `rope_freqs` tensor (per-dimension divisors), by architecture
SMOLLM_VOCAB = 49152  # SmolLM/SmolLM2's vocabulary: llama.cpp's "smollm" pre-tokenizer


@dataclass(frozen=True)
class Exported:
    path: Path
    quant: str
    tensors: int
    bytes: int


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise HfgpuError(
            f"--quant {quant!r} is not one of {', '.join(QUANTS)}; for a k-quant such as q4_k_m, export f16 and run "
            "llama.cpp's llama-quantize on it"
        )


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and out.is_dir():
        raise HfgpuError(f"--out {str(out)!r} is a folder: name the .gguf file to write, e.g. --out {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise HfgpuError(f"--out {str(out)!r} exists: choose another file, or pass --overwrite to replace it")
    if out.suffix != ".gguf":
        raise HfgpuError(f"--out {str(out)!r} does not end in .gguf: name the file NAME.gguf")


def check_architecture(config) -> tuple[str, bool]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise HfgpuError(
            f"cannot export model type {model_type!r} to GGUF yet: supported are {', '.join(sorted(ARCHITECTURES))}; "
            "for another, merge the run (hfgpu merge) and use llama.cpp's convert_hf_to_gguf.py"
        )
    return ARCHITECTURES[model_type]


_ROTARY = ("q_proj.weight", "k_proj.weight")  # the rows llama.cpp's rope reads interleaved


def _layout(config):
    """(llama.cpp architecture name, its HF → GGUF tensor-name map, rope_heads): rope_heads(hf_name) is the head
    count whose q/k rows llama.cpp wants permuted (q: heads, k: KV heads; llama only), else None."""
    import gguf

    arch_name, permute = check_architecture(config)
    arch = gguf.MODEL_ARCH[arch_name.upper()]
    n_head = config.num_attention_heads
    n_kv = config.num_key_value_heads or n_head

    def rope_heads(hf_name: str) -> int | None:
        if not (permute and hf_name.endswith(_ROTARY)):
            return None
        return n_head if hf_name.endswith("q_proj.weight") else n_kv

    return arch_name, gguf.get_tensor_name_map(arch, config.num_hidden_layers), rope_heads


def _laid_out(tensor, heads: int | None):
    """`tensor` detached, its rows permuted to llama.cpp's rope layout when `heads` is given (q/k of llama)."""
    tensor = tensor.detach()
    return _permute(tensor, heads).contiguous() if heads else tensor


def _permute(w, n_head: int):
    """HF's q/k rows (rotary halves) → llama.cpp's interleaved pairs (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(name: str, quant: str, shape: tuple[int, ...]):
    """The GGML type a tensor is stored in: 1-D tensors (norms, biases) stay f32, as llama.cpp keeps them; matrices
    whose rows do not divide into the quant's blocks fall back to f16."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or quant == "f32":
        return T.F32
    kind = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    return kind if shape[-1] % block == 0 else T.F16


CHUNK_BYTES = 16 * 2**20  # fp32 bytes converted at a time: the export's memory beyond the loaded model


class _Streamed:
    """A tensor as the GGUF writer takes it (`nbytes`, `tofile`), converted to its GGML type a slice of rows at a
    time as it is written: a row's blocks (32 values for q8_0/q4_0) never cross rows, so slices convert alone."""

    def __init__(self, tensor, kind):
        import gguf
        import numpy as np

        self.tensor, self.kind = tensor, kind
        shape = tuple(tensor.shape)
        plain = {gguf.GGMLQuantizationType.F32: 4, gguf.GGMLQuantizationType.F16: 2}.get(kind)
        self.nbytes = int(np.prod(shape)) * plain if plain else int(np.prod(gguf.quant_shape_to_byte_shape(shape, kind)))

    def tofile(self, fout) -> None:
        import torch

        t = self.tensor
        rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
        step = max(1, CHUNK_BYTES // (4 * rows.shape[-1]))
        for start in range(0, rows.shape[0], step):
            part = rows[start : start + step].to(torch.float32).cpu().numpy()
            fout.write(_convert(part, self.kind).tobytes())


def _convert(array, kind):
    """A float32 numpy array as the bytes of GGML type `kind`."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if kind == T.F32:
        return array.astype(np.float32)
    if kind == T.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, kind)


def _tokenizer_metadata(writer, tokenizer, config, chat_template: str | None) -> None:
    """The vocabulary as llama.cpp reads it: byte-level BPE as its "gpt2" tokenizer (Llama-3, Qwen, SmolLM2), BPE
    with byte fallback over "▁"-spaced text (the sentencepiece vocabularies of Llama-2, Mistral, Gemma, Phi-3) as its
    "llama" tokenizer; then the special ids, whether BOS/EOS are added, and the chat template."""
    import json

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    byte_level = "ByteLevel" in json.dumps(backend.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not model.get("merges") or not (byte_level or model.get("byte_fallback")):
        raise HfgpuError(
            f"cannot export this tokenizer to GGUF yet (a {model.get('type')} model): supported are byte-level BPE "
            "(Llama-3, Qwen, SmolLM2) and sentencepiece BPE with byte fallback (Llama-2, Mistral, Gemma, Phi-3); for "
            "another, merge the run (hfgpu merge) and use llama.cpp's convert_hf_to_gguf.py"
        )
    vocab = tokenizer.get_vocab()
    size = max(config.vocab_size, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    merges = [" ".join(pair) for pair in pairs]
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i, f"[PAD{i}]")  # rows of the embedding beyond the vocabulary (padded to a multiple)
        tokens.append(token)
        if i in special:
            types.append(2 if i == tokenizer.unk_token_id and not byte_level else 3)  # unknown, control
        elif token in added:
            types.append(4)  # user-defined
        elif i not in by_id:
            types.append(5)  # unused
        elif not byte_level and _BYTE_TOKEN.fullmatch(token):
            types.append(6)  # byte (the fallback <0xNN> pieces)
        else:
            types.append(1)  # normal
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        pre = "smollm" if config.vocab_size == SMOLLM_VOCAB else PRE_TOKENIZERS.get(config.model_type, "default")
        writer.add_tokenizer_pre(pre)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        # llama.cpp's sentencepiece tokenizer merges the adjacent pair whose joined token scores highest: a merge's
        # rank, negated, makes that BPE's merge order; tokens no merge makes (characters, bytes, specials) score 0
        rank = {}
        for r, pair in enumerate(pairs):
            rank.setdefault("".join(pair), -float(r))
        writer.add_token_scores([rank.get(t, 0.0) if types[i] == 1 else 0.0 for i, t in enumerate(tokens)])
        writer.add_add_space_prefix(_prepends_space(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)  # llama.cpp's sentencepiece tokenizer ignores them; transformers' reader uses them
    for setter, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
    ):
        if token_id is not None:
            setter(token_id)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]))
    writer.add_add_eos_token(bool(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]))
    if chat_template:
        writer.add_chat_template(chat_template)


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _prepends_space(backend: dict) -> bool:
    """Whether the tokenizer puts a "▁" before the text (llama.cpp's add_space_prefix): a Metaspace pre-tokenizer
    that prepends (Llama-2, Mistral), or a normalizer that prepends "▁" (Phi-3's); Gemma's does neither."""

    def parts(node):
        if not isinstance(node, dict):
            return []
        return [node] + [p for key in ("pretokenizers", "normalizers") for child in node.get(key) or [] for p in parts(child)]

    for node in parts(backend.get("pre_tokenizer")):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True):
            return True
    return any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in parts(backend.get("normalizer")))


def _write_tensors(writer, plan) -> int:
    """The header and tensor table from shapes alone, then each tensor converted and written a slice at a time;
    `plan` is [(gguf name, GGML type, shape, a function giving the torch tensor)], each tensor made only when it is
    written (a permuted copy is one tensor at a time). Returns the bytes of tensor data."""
    import gguf
    import numpy as np

    plain = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    for new, kind, shape, _ in plan:
        dtype = plain.get(kind, np.uint8)
        byte_shape = shape if kind in plain else gguf.quant_shape_to_byte_shape(shape, kind)
        nbytes = int(np.prod(byte_shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(new, byte_shape if dtype is np.uint8 else shape, np.dtype(dtype), nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = 0
    for _, kind, _, make in plan:
        streamed = _Streamed(make(), kind)
        writer.write_tensor_data(streamed)  # the writer asks for its bytes and calls tofile: converted slice by slice
        total += streamed.nbytes
    writer.close()
    return total


def write_gguf(
    model, tokenizer, out: Path, quant: str = "q8_0", name: str = "model", say=print, chat_template: str | None = None
) -> Exported:
    """`model` (a transformers causal LM of a supported architecture, in any float dtype) and its tokenizer to one
    GGUF file, tensor by tensor. `chat_template`: the one the file carries (None: the tokenizer's)."""
    import gguf

    check_quant(quant)
    config = model.config
    arch_name, names, rope_heads = _layout(config)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer = gguf.GGUFWriter(str(out), arch_name)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if head_dim != config.hidden_size // n_head or arch_name == "gemma2":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    extra = rope_metadata(writer, config, arch_name, head_dim)
    if arch_name == "gemma2":
        _gemma2_metadata(writer, config, head_dim)
    if arch_name == "phi3":  # as convert_hf_to_gguf.py writes Phi-3: a window of 0 is none
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[quant]  # llama_ftype
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(writer, tokenizer, config, chat_template or getattr(tokenizer, "chat_template", None))

    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = list(extra)  # (gguf name, GGML type, shape, a function giving the tensor as llama.cpp lays it out)
    for hf_name, p in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads a missing output.weight as tied to token_embd
        if "rotary_emb" in hf_name:
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise HfgpuError(f"GGUF export: no llama.cpp name for tensor {hf_name!r} of model type {config.model_type!r}")
        if arch_name == "gemma2" and hf_name.endswith("norm.weight"):
            make = partial(_plus_one, p)  # Gemma's RMSNorm scales by 1 + weight; llama.cpp's by the weight
        else:
            make = partial(_laid_out, p, rope_heads(hf_name))
        plan.append((new, _tensor_type(new, quant, tuple(p.shape)), tuple(p.shape), make))
    total = _write_tensors(writer, plan)
    say(f"wrote {out} ({quant}, {len(plan)} tensors, {total / 2**20:.1f} MiB of tensor data)")
    return Exported(path=out, quant=quant, tensors=len(plan), bytes=out.stat().st_size)


def _plus_one(tensor):
    return tensor.detach().float() + 1


def _gemma2_metadata(writer, config, head_dim: int) -> None:
    """Gemma-2's soft-capping and sliding window; refused when its attention scale is not the one llama.cpp uses
    (1/√head_dim, or 1/√(hidden/heads) for the 46-layer 27B)."""
    scalar = getattr(config, "query_pre_attn_scalar", head_dim)
    llama_cpp_scalar = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 46 else head_dim
    if scalar != llama_cpp_scalar:
        raise HfgpuError(
            f"Gemma-2 with query_pre_attn_scalar={scalar}: llama.cpp scales attention by 1/sqrt({llama_cpp_scalar}) for "
            "this shape, so its GGUF would compute another model; only Gemma-2's published shapes export"
        )
    if config.attn_logit_softcapping:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_sliding_window(int(config.sliding_window))


ADAPTER_QUANTS = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's own convert_lora_to_gguf.py writes
_MERGED = "export --format gguf (the merged model) instead"


def check_adapter_quant(quant: str) -> None:
    if quant not in ADAPTER_QUANTS:
        choices = ", ".join(ADAPTER_QUANTS)
        raise HfgpuError(f"--quant {quant!r} for --format gguf-lora is not one of {choices} (an adapter is small: f16 is the default)")


def _adapter_alpha(cfg: dict, where: str) -> float:
    """The `adapter.lora.alpha` that makes llama.cpp's scale (alpha / rank, per tensor) equal peft's, or a refusal
    for what a llama.cpp adapter cannot carry."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise HfgpuError(f"{where} is a {cfg.get('peft_type')} adapter: llama.cpp takes LoRA adapters only; {_MERGED}")
    unsupported = {"use_dora": "DoRA magnitudes", "modules_to_save": "fully trained modules", "alpha_pattern": "per-module alphas"}
    for key, what in unsupported.items():
        if cfg.get(key):
            raise HfgpuError(f"{where} has {what} ({key}), which a llama.cpp adapter cannot carry: {_MERGED}")
    if cfg.get("bias", "none") != "none":
        raise HfgpuError(f"{where} trains biases (bias={cfg['bias']!r}), which a llama.cpp adapter cannot carry: {_MERGED}")
    if cfg.get("use_rslora") and cfg.get("rank_pattern"):  # one stored alpha cannot give alpha / sqrt(r) for several r
        raise HfgpuError(f"{where} is rsLoRA with per-module ranks (rank_pattern), which a llama.cpp adapter cannot carry: {_MERGED}")
    alpha = float(cfg["lora_alpha"])
    # rsLoRA scales by alpha / sqrt(r); llama.cpp divides by r, so the stored alpha is alpha · sqrt(r)
    return alpha * float(cfg["r"]) ** 0.5 if cfg.get("use_rslora") else alpha


def write_gguf_lora(adapter_dir: str | Path, config, out: Path, quant: str = "f16", name: str = "adapter", say=print) -> Exported:
    """A peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors) as the GGUF adapter llama.cpp
    applies with `--lora` to a GGUF of the base (`config`: the base's transformers config): tensors named after
    the base's (`blk.0.attn_q.weight.lora_a` / `.lora_b`), A as (r, in) and B as (out, r), llama's q/k rows of B
    permuted as the base's are, and `adapter.lora.alpha` so that llama.cpp's alpha / r is peft's scale."""
    import json

    import gguf
    from safetensors import safe_open

    check_adapter_quant(quant)
    adapter_dir = Path(adapter_dir)
    alpha = _adapter_alpha(json.loads((adapter_dir / "adapter_config.json").read_text()), str(adapter_dir))
    arch_name, names, rope_heads = _layout(config)
    writer = gguf.GGUFWriter(str(out), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    plan = []
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in sorted(f.keys()):
            if ".lora_A." not in key and ".lora_B." not in key:
                raise HfgpuError(f"{adapter_dir} holds {key!r}, not a LoRA A/B matrix: {_MERGED}")
            base = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
            if base.endswith(("embed_tokens.weight", "lm_head.weight")):
                module = base.removesuffix(".weight")
                raise HfgpuError(f"{adapter_dir} adapts {module}, which llama.cpp adapters do not take: {_MERGED}")
            new = names.get_name(base, try_suffixes=(".weight",))
            if new is None:
                raise HfgpuError(f"GGUF adapter export: no llama.cpp name for {base!r} of model type {config.model_type!r}")
            is_b = ".lora_B." in key
            heads = rope_heads(base) if is_b else None  # the permutation of W's rows is B's
            shape = tuple(f.get_slice(key).get_shape())
            kind = _tensor_type(new, quant, shape)
            plan.append((f"{new}.lora_{'b' if is_b else 'a'}", kind, shape, partial(_laid_out_key, f, key, heads)))
        total = _write_tensors(writer, plan)
    say(f"wrote {out} ({quant} LoRA adapter, {len(plan)} tensors, {total / 2**20:.1f} MiB of tensor data)")
    return Exported(path=out, quant=quant, tensors=len(plan), bytes=out.stat().st_size)


def _laid_out_key(f, key: str, heads: int | None):
    return _laid_out(f.get_tensor(key), heads)


BYTES_PER_WEIGHT = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}  # ggml's blocks: 32 weights + a scale


@contextmanager
def _replacing(out: Path, needed: int | None = None):
    """A temporary path beside `out` to write; `out` (new, or an existing file) is replaced only once the new file
    is whole, and the temporary one is removed whatever happens. A failed write (a full disk) is one line naming the
    folder and the `needed` bytes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    existed = out.exists()
    try:
        yield tmp
        tmp.replace(out)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        error = write_failure(e, out.parent, out.name, needed, f"{out} is unchanged" if existed else "nothing was written")
        if error is None:
            raise
        raise error from None
    finally:
        tmp.unlink(missing_ok=True)


def _gguf_bytes(model, quant: str) -> int:
    return int(sum(p.numel() for p in model.parameters()) * BYTES_PER_WEIGHT[quant])


def _loaded(run):
    """(model, tokenizer) of a run in its 16-bit type (fp32 for an fp32 plan), a QLoRA base unquantized as
    `hfgpu merge` loads it; refused before anything is written when llama.cpp cannot run the architecture."""
    import torch

    model, tokenizer = run.load(dtype=torch.float32 if run.plan.knobs.precision == "fp32" else torch.bfloat16)
    check_architecture(model.config)
    return model, tokenizer


def _lora_run(run_dir, fmt: str, instead: str):
    from hfgpu.run import Run

    run = Run(run_dir)
    if not run.is_adapter:
        raise HfgpuError(f"--format {fmt}: {str(run_dir)!r} is a full fine-tune, {instead}")
    return run


def export_run(run_dir: str | Path, out: str | Path, quant: str = "q8_0", overwrite: bool = False, say=print) -> Exported:
    """A finished run (its LoRA merged into the 16-bit base, or its full model) to a GGUF file."""
    from hfgpu.run import Run

    check_quant(quant)
    out = Path(out)
    _check_out(out, overwrite)
    run = Run(run_dir)
    model, tokenizer = _loaded(run)
    if run.is_adapter:
        model = model.merge_and_unload()
    from hfgpu.ollama import gguf_chat_template, prompt_format

    try:  # the chat template llama.cpp's chat mode will use: the prompt format the run trained with
        template = gguf_chat_template(tokenizer, prompt_format(run.recipe.data))
    except HfgpuError:  # several formats: the tokenizer's, as it was
        template = None
    with _replacing(out, _gguf_bytes(model, quant)) as tmp:
        result = write_gguf(model, tokenizer, tmp, quant, name=Path(run.path).name, say=lambda *a: None, chat_template=template)
    say(f"exported {run.path} → {out} ({quant}, {result.tensors} tensors, {out.stat().st_size / 2**20:.1f} MiB)")
    return Exported(path=out, quant=quant, tensors=result.tensors, bytes=out.stat().st_size)


def export_adapter(run_dir: str | Path, out: str | Path, quant: str = "f16", overwrite: bool = False, say=print) -> Exported:
    """A finished LoRA/QLoRA run's adapter (not merged) as a llama.cpp GGUF adapter, for `llama-cli -m BASE.gguf
    --lora OUT`: the base as GGUF is the file the run trained on when that was a GGUF, else a GGUF of the same base
    model (a QLoRA adapter, trained on the 4-bit base, applies to a 16-bit or q8_0 GGUF of it as it does to the
    16-bit base in `hfgpu merge`)."""
    from hfgpu.models import load_config, pretrained_config

    check_adapter_quant(quant)
    out = Path(out)
    _check_out(out, overwrite)
    run = _lora_run(run_dir, "gguf-lora", f"not a LoRA adapter: {_MERGED}")
    base = run.base_model_path
    config = pretrained_config(load_config(base)[2])  # a GGUF base's config comes from its metadata
    with _replacing(out) as tmp:
        result = write_gguf_lora(run.path, config, tmp, quant, name=Path(run.path).name, say=lambda *a: None)
    say(f"exported the adapter of {run.path} → {out} ({quant}, {result.tensors} tensors, {out.stat().st_size / 2**20:.1f} MiB)")
    if base.lower().endswith(".gguf"):
        say(f"run it with: llama-cli -m {base} --lora {out}")
    else:
        say(f"the base as GGUF: hfgpu export {run_dir} --format gguf-base --out BASE.gguf; then: llama-cli -m BASE.gguf --lora {out}")
    return Exported(path=out, quant=quant, tensors=result.tensors, bytes=out.stat().st_size)


def export_base(run_dir: str | Path, out: str | Path, quant: str = "q8_0", overwrite: bool = False, say=print) -> Exported:
    """A LoRA/QLoRA run's base model alone (not merged) as GGUF: the file llama.cpp applies the run's
    `--format gguf-lora` adapter to, for a run whose base came from the Hub or a folder. The base loads as
    `hfgpu merge` loads it (a QLoRA base unquantized) and is written as `export_run` writes a model, with the
    run's tokenizer (the one the adapter was trained with)."""
    check_quant(quant)
    out = Path(out)
    _check_out(out, overwrite)
    run = _lora_run(run_dir, "gguf-base", "it has no separate base: export it with --format gguf")
    base = run.base_model_path
    if base.lower().endswith(".gguf"):
        raise HfgpuError(
            f"--format gguf-base: the run's base is already the GGUF file {base!r}: use it with llama-cli -m {base} --lora ADAPTER.gguf"
        )
    model, tokenizer = _loaded(run)
    model = model.unload()  # peft's adapter layers removed, the base's weights as they were
    with _replacing(out, _gguf_bytes(model, quant)) as tmp:
        result = write_gguf(model, tokenizer, tmp, quant, name=Path(run.base_model).name, say=lambda *a: None)
    size = out.stat().st_size
    say(f"exported the base of {run.path} ({run.base_model}) → {out} ({quant}, {result.tensors} tensors, {size / 2**20:.1f} MiB)")
    adapter = Path(run_dir) / "adapter-f16.gguf"
    say(f"with the adapter (hfgpu export {run_dir} --format gguf-lora writes {adapter}): llama-cli -m {out} --lora {adapter}")
    return Exported(path=out, quant=quant, tensors=result.tensors, bytes=size)


FORMATS = ("gguf", "gguf-lora", "gguf-base")


def export_to(
    run_dir: str | Path,
    quant: str | None = None,
    out: Path | None = None,
    ollama: str | None = None,
    overwrite: bool = False,
    format: str = "gguf",
    say=print,
):
    """`hfgpu export`: the GGUF file (default RUN/model-QUANT.gguf, or inside the --ollama folder) and, with
    `ollama`, a Modelfile beside it; says how to run it. `format="gguf-lora"`: the adapter alone
    (RUN/adapter-QUANT.gguf), for llama.cpp's --lora; `format="gguf-base"`: the base it applies to
    (RUN/base-QUANT.gguf)."""
    from hfgpu.run import Run

    if format not in FORMATS:
        raise HfgpuError(
            f"--format {format!r} is not one of {', '.join(FORMATS)} (gguf: the merged or full model; gguf-lora: the adapter; "
            "gguf-base: the base alone)"
        )
    if format != "gguf":  # one part of a LoRA run: its adapter, or its base
        if ollama:
            raise HfgpuError(f"--ollama with --format {format}: the Ollama export is the merged model; {_MERGED}")
        export, default_quant, stem = {"gguf-lora": (export_adapter, "f16", "adapter"), "gguf-base": (export_base, "q8_0", "base")}[format]
        quant = quant or default_quant
        return export(run_dir, out or Path(run_dir) / f"{stem}-{quant}.gguf", quant, overwrite, say)
    quant = quant or "q8_0"
    folder = Path(ollama) if ollama else None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise HfgpuError(f"--ollama {str(folder)!r} is a file: name a folder for the GGUF file and the Modelfile")
    out = out or ((folder or Path(run_dir)) / f"model-{quant}.gguf")
    modelfile = None
    if folder is not None:
        modelfile = folder / "Modelfile"
        if modelfile.exists() and not overwrite:
            raise HfgpuError(f"{str(modelfile)!r} exists: choose another --ollama folder, or pass --overwrite to replace it")
        run = Run(run_dir)
        from transformers import AutoTokenizer

        from hfgpu.ollama import ollama_modelfile, prompt_format

        text = ollama_modelfile(AutoTokenizer.from_pretrained(run.path), out.name, prompt_format(run.recipe.data))  # before writing
        if out.parent.resolve() != folder.resolve():
            raise HfgpuError(f"--out {str(out)!r} with --ollama: the GGUF file goes in the Ollama folder; leave --out out")
    result = export_run(run_dir, out, quant, overwrite, say)
    if modelfile is not None:
        folder.mkdir(parents=True, exist_ok=True)
        modelfile.write_text(text)
        name = Path(run_dir).resolve().name.lower().replace("_", "-")
        say(f"wrote {modelfile}; run it with: ollama create {name} -f {modelfile} && ollama run {name}")
    else:
        say(f"run it with: llama-cli -m {out}   (or: llama-server -m {out})")
    return result
