import functools
import os
import sys
import tempfile
import warnings
from pathlib import Path

# Tests never download; the spec cache goes to a fresh folder so counts are really computed.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HFGPU_CACHE", tempfile.mkdtemp(prefix="hfgpu-test-cache-"))
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hfgpu-test-hf-"))
warnings.filterwarnings("ignore", category=FutureWarning)
# One compute thread per test process (and the subprocesses it launches, which inherit this): xdist runs
# one worker per core, and torch's default of a thread per core in every worker and every launched
# process oversubscribes the cores; two workers on 2 cores ran a demo fine-tune 4× slower (165 s vs 40 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads when it loads)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# --- time limits that do not assume an idle machine -------------------------------------------------------
# A limit on a subprocess or a wait is a guard against a hang, never a speed test (benchmarks/ measure speed).
# Each is set for an idle 2-core machine and scaled by how much slower this one is right now: the time a fresh
# interpreter takes to import torch and transformers, against the same on the idle machine.
IDLE_IMPORT_SECONDS = 2.0  # python -c "import torch, transformers" on an idle 2-core machine (2.2 s measured with one core busy)


def _load_factor() -> float:
    import subprocess
    import time

    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True, capture_output=True)
    return max(1.0, (time.perf_counter() - start) / IDLE_IMPORT_SECONDS)


_FACTOR: list[float] = []


def limit(seconds: float) -> float:
    """`seconds` (set for an idle 2-core machine) scaled by this machine's current slowness (≥ 1×, measured once
    per test process)."""
    if not _FACTOR:
        _FACTOR.append(_load_factor())
    return seconds * _FACTOR[0]


def tiny_llama(**overrides):
    """A small Llama config (2 layers, hidden 64 unless overridden)."""
    from transformers import LlamaConfig

    base = dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=512,
    )
    return LlamaConfig(**{**base, **overrides})


# Chat templates of the sentencepiece families (Gemma-2's and Phi-3's, as their repos ship them, shortened)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
_SPM_SPECIALS = {
    "llama": ["<unk>", "<s>", "</s>"],
    "gemma": ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
    "phi3": ["<unk>", "<s>", "</s>"],
}


@functools.cache
def sentencepiece_tokenizer(family: str):
    """A small sentencepiece-style vocabulary (BPE with byte fallback over "▁"-spaced text: specials, the 256
    <0xNN> byte pieces, then ~600 pieces trained here on the demo's data) in transformers' own tokenizer class of
    the family: "llama" (Llama-2, Mistral, TinyLlama), "gemma" (Gemma's, its chat template), "phi3" (Llama-2's with
    Phi-3's chat tokens and template). Characters outside the training text go through the byte pieces."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizer, LlamaTokenizer

    rows = [json.loads(line) for line in (DEMO / "capitals_train.jsonl").read_text().splitlines()]
    corpus = [r["instruction"] + " " + r["output"] for r in rows]
    corpus += [json.loads(line)["messages"][0]["content"] for line in (DEMO / "dates_train.jsonl").read_text().splitlines()]
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer_tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=900, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(_SPM_SPECIALS[family] + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) for m in trained["merges"]]
    if family == "gemma":
        tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
        tokenizer.chat_template = GEMMA_TEMPLATE
    else:
        tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    if family == "phi3":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
        tokenizer.pad_token = "<|endoftext|>"  # as Phi-3's (and its config's pad_token_id)
        # Phi-3's tokenizer.json puts the "▁" before the text with a normalizer, not a Metaspace pre-tokenizer
        from tokenizers import normalizers

        backend = tokenizer.backend_tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
        tokenizer.chat_template = PHI3_TEMPLATE
    return tokenizer


def tiny_model_of(model_type: str, tokenizer):
    """A 2-layer random model of an export architecture with the given tokenizer's vocabulary, its biases and norms
    moved off their initial zeros and ones so that a mix-up shows: "llama", "llama-untied", "llama3-rope" (Llama-3.1's
    rope scaling), "qwen2", "qwen3", "gemma2" (Gemma-2's head_dim 256, soft-capping, 1 + weight norms), "phi3"
    (fused qkv and gate/up), "phi3-longrope" (Phi-3-128k's rope), "qwen2-yarn" (Qwen2.5's yarn)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    shape = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    llama3_rope = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    config = {
        "llama": lambda: tiny_llama(tie_word_embeddings=True, **common),
        "llama-untied": lambda: tiny_llama(tie_word_embeddings=False, **common),
        "llama3-rope": lambda: tiny_llama(
            tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=llama3_rope, max_position_embeddings=131072, **common
        ),
        "qwen2": lambda: Qwen2Config(**shape, tie_word_embeddings=True, **common),
        # Qwen2.5's long-context setting (yarn, factor 4 on 32k) at a small scale: an original context of 4096, where
        # the ramp between interpolated and extrapolated frequencies falls inside the 8 rotary frequencies
        "qwen2-yarn": lambda: Qwen2Config(
            **shape,
            tie_word_embeddings=True,
            max_position_embeddings=16384,
            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096),
            **common,
        ),
        # head_dim 128 as in every Qwen3 (≠ hidden / heads): transformers' reader takes it from Qwen3Config's default,
        # not from the attention.key_length hfgpu writes (llama.cpp's reader uses that)
        "qwen3": lambda: Qwen3Config(**shape, head_dim=128, tie_word_embeddings=False, **common),
        # head_dim and query_pre_attn_scalar 256 as in Gemma-2 2B/9B (transformers' reader takes both from the defaults)
        "gemma2": lambda: Gemma2Config(**shape, head_dim=256, query_pre_attn_scalar=256, attn_implementation="eager", **common),
        "phi3": lambda: Phi3Config(**shape, tie_word_embeddings=False, **common),
        # Phi-3-128k's longrope at a small scale: an original context of 512 (llama.cpp rounds its context up to a
        # multiple of 256) stretched to 4096, one factor per rotary frequency (head_dim 16 → 8), long and short ones
        # different, so either set mistaken for the other shows
        "phi3-longrope": lambda: Phi3Config(
            **shape,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
            original_max_position_embeddings=512,
            rope_scaling=dict(
                rope_type="longrope", long_factor=[1.0 + 0.9 * i for i in range(8)], short_factor=[1.0 + 0.05 * i for i in range(8)]
            ),
            **common,
        ),
    }[model_type]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


# tokenizer family of each export case; the rest use the demo's byte-level BPE tokenizer
_CASE_TOKENIZER = {"llama-spm": "llama", "gemma2": "gemma", "phi3": "phi3", "phi3-longrope": "phi3"}


def export_case(case: str):
    """(model, tokenizer) of an export test case: a tiny_model_of type, or "llama-spm" (a Llama with a Llama-2-style
    sentencepiece vocabulary); Gemma-2 and Phi-3 come with their families' sentencepiece vocabularies."""
    from transformers import AutoTokenizer

    family = _CASE_TOKENIZER.get(case)
    tokenizer = sentencepiece_tokenizer(family) if family else AutoTokenizer.from_pretrained(DEMO / "model")
    return tiny_model_of("llama" if case == "llama-spm" else case, tokenizer), tokenizer


def tiny_lora_of(model, folder, use_rslora: bool = False):
    """`model` wrapped (in place) in a rank-8 LoRA on every linear layer, its B matrices moved off their zero init so
    that the adapter changes the logits, saved to `folder` as peft saves an adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=use_rslora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    peft.save_pretrained(folder)
    return peft.eval()


import pytest

DEMO = ROOT / "hfgpu" / "resources" / "demo"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, hidden-64 Llama with the demo's tokenizer (which has a chat template), saved to disk."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "model")
    cfg = tiny_llama(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_dict(model_dir, out_dir, **over):
    """A small CPU recipe over the demo data; `over` replaces top-level keys or merges into sections."""
    r = {
        "model": str(model_dir),
        "gpu": "cpu",
        "strategy": "lora",
        "data": {
            "path": str(DEMO / "capitals_train.jsonl"),
            "eval_path": str(DEMO / "capitals_eval.jsonl"),
            "format": "alpaca",
            "max_seq_len": 64,
        },
        "train": {
            "max_steps": 8,
            "learning_rate": 3e-3,
            "global_batch_size": 8,
            "log_every": 1,
            "seed": 0,
            "schedule": "constant",
            "warmup": 0,
        },
        "lora": {"r": 8, "dropout": 0.0},
        "output_dir": str(out_dir),
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(r.get(k), dict):
            r[k] = {**r[k], **v}
        else:
            r[k] = v
    return r


def pytest_collection_modifyitems(config, items):
    # The longest test first: under xdist's --dist loadfile a file goes whole to one worker, and the
    # documented-commands run (~5 minutes) scheduled last left the other core idle at the end.
    items.sort(key=lambda item: 0 if item.path.name == "test_docs.py" else 1)


def train_demo(out, *overrides: str):
    """The tiny demo recipe trained into `out` in a subprocess (offline), with `overrides`; returns `out`."""
    import os
    import subprocess
    import sys

    argv = [sys.executable, "-m", "hfgpu.finetune", "recipes/demo_cpu.yaml", f"output_dir={out}", *overrides]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=limit(300))
    assert r.returncode == 0, r.stderr[-2000:]
    return out
