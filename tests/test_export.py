"""GGUF export (hfgpu.export) read back by an independent reader: transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=…)`) loads hfgpu's file, its logits match the merged safetensors model (f16: 1e-3
relative; q8_0: equal to the model whose weights went through Q8_0's rounding, which explains the whole
difference), and its tokenizer gives the same ids and chat rendering. The Ollama Modelfile's template reproduces
the Jinja rendering. Bad input: one line, exit 2, nothing overwritten."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import DEMO, export_case, recipe_dict, tiny_lora_of

from hfgpu.cli import main as hfgpu_main
from hfgpu.errors import HfgpuError
from hfgpu.export import export_adapter, export_run, write_gguf, write_gguf_lora
from hfgpu.finetune import finetune
from hfgpu.ollama import ollama_modelfile, ollama_template
from hfgpu.recipe import validate_recipe

TEXTS = [
    "What is the capital of Peru? The capital of Peru is Lima.",
    "Die Hauptstadt von Österreich ist Wien; 東京は日本の首都です; Москва — столица России. 3.14 ≈ π!",
]
CHAT = [{"role": "user", "content": "Name the capital city of Peru."}, {"role": "assistant", "content": "Lima"}]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("export") / "run"
    finetune(validate_recipe(recipe_dict(tiny_model_dir, out, train={"max_steps": 3})), say=lambda *a, **k: None)
    return out


def _merged(run):
    from hfgpu.hub import Run

    model, tokenizer = Run(run).load(dtype=torch.float32)
    return model.merge_and_unload().eval(), tokenizer


def _read_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _logits(model, tokenizer, text=TEXTS[0]):
    with torch.no_grad():
        return model(tokenizer(text, return_tensors="pt")["input_ids"]).logits


def _q8_rounded(model):
    """The model with every matrix through Q8_0's quantize → dequantize (gguf's reference implementation), as the
    file stores them; 1-D tensors stay float32, as in the file."""
    import gguf

    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2 and p.shape[-1] % 32 == 0:
                q = gguf.quants.quantize(p.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)).reshape(p.shape))
    return model


def test_f16_export_of_a_lora_run_reads_back_with_the_merged_models_logits_and_tokenizer(lora_run, tmp_path):
    merged, tokenizer = _merged(lora_run)
    out = export_run(lora_run, tmp_path / "run-f16.gguf", quant="f16", say=lambda *a: None)
    assert out.tensors == 2 * 9 + 2  # 9 per layer, embeddings and the final norm; lm_head tied: not written
    model, tok = _read_back(out.path)
    for text in TEXTS:
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
        a, b = _logits(merged, tokenizer, text), _logits(model, tok, text)
        assert ((a - b).norm() / a.norm()).item() < 1e-3
    # lora_run trained on Alpaca rows: the file's chat template is the Alpaca prompt it saw, not the tokenizer's
    from hfgpu.render import ALPACA_JINJA

    assert tok.chat_template == ALPACA_JINJA
    assert tok.apply_chat_template(CHAT, tokenize=False) == tokenizer.apply_chat_template(CHAT, tokenize=False, chat_template=ALPACA_JINJA)
    assert (tok.bos_token_id, tok.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_q8_0_export_differs_from_the_merged_model_only_by_q8_0_rounding(lora_run, tmp_path):
    merged, tokenizer = _merged(lora_run)
    out = export_run(lora_run, tmp_path / "run-q8.gguf", quant="q8_0", say=lambda *a: None)
    model, tok = _read_back(out.path)
    exact, rounded, read = _logits(merged, tokenizer), _logits(_q8_rounded(merged), tokenizer), _logits(model, tok)
    assert ((read - exact).norm() / exact.norm()).item() > 1e-4  # the rounding is visible
    assert ((read - rounded).norm() / rounded.norm()).item() < 1e-5  # and it is all there is


LEADING_SPACE = "  two  spaces, then\n\na blank line"


@pytest.mark.parametrize("case", ["llama-untied", "qwen2", "qwen3", "llama-spm", "gemma2", "phi3"])
def test_each_supported_architecture_reads_back_with_its_logits_and_tokenizer(case, tmp_path):
    """A 2-layer model of each architecture (Qwen's q/k/v biases, Qwen3's q/k norms, an untied lm_head, Gemma-2's
    1 + weight norms and soft-capping, Phi-3's fused qkv and gate/up) and each tokenizer kind (byte-level BPE;
    sentencepiece BPE with byte fallback: Llama-2's, Gemma's, Phi-3's, bytes for characters not in the vocabulary):
    transformers' reader gives the same logits, ids and chat rendering."""
    model, tokenizer = export_case(case)
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, quant="f32", say=lambda *a: None)
    read, tok = _read_back(path)
    assert read.config.model_type == model.config.model_type
    a, b = _logits(model, tokenizer), _logits(read, tok)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for text in TEXTS + [LEADING_SPACE]:
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"], text
    if tokenizer.chat_template:
        assert tok.apply_chat_template(CHAT, tokenize=False) == tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_a_sentencepiece_vocabulary_is_written_as_llama_cpps_llama_tokenizer(tmp_path):
    """What llama.cpp's sentencepiece tokenizer reads: model "llama", a merge's rank (negated) as the score of the
    token it makes, the <0xNN> fallback pieces typed BYTE, <unk> UNKNOWN, the specials CONTROL, and the space prefix
    the tokenizer adds (Llama-2's Metaspace, Phi-3's normalizer; none for Gemma)."""
    import gguf

    for case, prefix in (("llama-spm", True), ("phi3", True), ("gemma2", False)):
        model, tokenizer = export_case(case)
        path = tmp_path / f"{case}.gguf"
        write_gguf(model, tokenizer, path, quant="f32", say=lambda *a: None)
        fields = gguf.GGUFReader(path).fields
        assert fields["tokenizer.ggml.model"].contents() == "llama"
        assert fields["tokenizer.ggml.add_space_prefix"].contents() is prefix, case
        tokens, scores, types = (fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type"))
        vocab = tokenizer.get_vocab()
        assert types[vocab["<0x41>"]] == 6 and types[tokenizer.unk_token_id] == 2 and types[tokenizer.bos_token_id] == 3
        first, second = _first_merges(tokenizer)
        assert scores[vocab["".join(first)]] == 0.0 and scores[vocab["".join(second)]] == -1.0
        assert tokens[:3] == tokenizer.convert_ids_to_tokens([0, 1, 2])


def _first_merges(tokenizer):
    import json

    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges[:2]]


def test_llama_3_rope_scaling_is_written_as_llama_cpps_rope_freqs(tmp_path):
    """Llama-3.1/3.2's scaled rope: the `rope_freqs` tensor llama.cpp divides each frequency by, equal to what
    llama.cpp's own convert_hf_to_gguf.py computes (its formula, written out here), and different from 1 where the
    scaling acts. llama.cpp running the file is checked in test_llama_cpp.py."""
    import math

    model, tokenizer = export_case("llama3-rope")
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, quant="f32", say=lambda *a: None)
    got = _tensors(path)["rope_freqs.weight"]
    rope = model.config.rope_parameters
    dim = model.config.hidden_size // model.config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high, old = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    expected = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            expected.append(1.0)
        elif wavelen > old / low:
            expected.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            expected.append(1 / ((1 - smooth) / factor + smooth))
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert max(expected) == factor and min(expected) == 1.0


def test_phi_3_longrope_is_written_as_llama_cpps_rope_factors_and_attention_factor(tmp_path):
    """Phi-3-128k's longrope: the long and short factors as `rope_factors_long` / `rope_factors_short`, the original
    context llama.cpp compares its context with, and the attention factor llama.cpp's convert_hf_to_gguf.py writes
    (its formula, written out here: √(1 + ln(max / original) / ln original)). llama.cpp running the file, on both
    sides of the original context: test_llama_cpp.py."""
    import math

    import gguf

    model, tokenizer = export_case("phi3-longrope")
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, quant="f16", say=lambda *a: None)
    tensors, fields = _tensors(path), gguf.GGUFReader(path).fields
    rope = model.config.rope_parameters
    assert tensors["rope_factors_long.weight"].tolist() == pytest.approx(rope["long_factor"])
    assert tensors["rope_factors_short.weight"].tolist() == pytest.approx(rope["short_factor"])
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["rope_factors_long.weight"] == types["rope_factors_short.weight"] == gguf.GGMLQuantizationType.F32
    assert fields["phi3.rope.scaling.original_context_length"].contents() == 512
    assert fields["phi3.context_length"].contents() == 4096
    expected = math.sqrt(1 + math.log(4096 / 512) / math.log(512))
    assert fields["phi3.rope.scaling.attn_factor"].contents() == pytest.approx(expected, rel=1e-6)


def test_yarn_is_written_as_llama_cpp_reads_it(tmp_path):
    """YaRN: llama.cpp's type, factor, original context and ramp bounds, from which it derives transformers'
    frequencies and attention scale (llama.cpp running the file: test_llama_cpp.py)."""
    import gguf

    model, tokenizer = export_case("qwen2-yarn")
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, quant="f16", say=lambda *a: None)
    fields = gguf.GGUFReader(path).fields
    assert fields["qwen2.rope.scaling.type"].contents() == "yarn"
    assert fields["qwen2.rope.scaling.factor"].contents() == 4.0
    assert fields["qwen2.rope.scaling.original_context_length"].contents() == 4096
    assert fields["qwen2.rope.scaling.yarn_beta_fast"].contents() == 32.0
    assert fields["qwen2.rope.scaling.yarn_beta_slow"].contents() == 1.0
    assert fields["qwen2.context_length"].contents() == 16384


def test_what_llama_cpp_would_compute_differently_is_refused(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "model")
    model, _ = export_case("llama")
    model.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(HfgpuError, match="cannot export rope scaling 'dynamic' of model type 'llama' to GGUF yet"):
        write_gguf(model, tokenizer, tmp_path / "y.gguf", say=lambda *a: None)
    yarn, _ = export_case("qwen2-yarn")
    yarn.config.rope_parameters = {**yarn.config.rope_parameters, "attention_factor": 1.5}
    with pytest.raises(HfgpuError, match="attention factor 1.5 is not llama.cpp's 1 \\+ 0.1 ln\\(4\\) = 1.139"):
        write_gguf(yarn, tokenizer, tmp_path / "y.gguf", say=lambda *a: None)
    yarn.config.rope_parameters = {**yarn.config.rope_parameters, "attention_factor": None, "truncate": False}
    with pytest.raises(HfgpuError, match="truncate=false \\(llama.cpp always rounds the ramp's bounds\\)"):
        write_gguf(yarn, tokenizer, tmp_path / "y.gguf", say=lambda *a: None)
    assert not (tmp_path / "y.gguf").exists()
    gemma, spm = export_case("gemma2")
    gemma.config.query_pre_attn_scalar = 144
    with pytest.raises(HfgpuError, match="query_pre_attn_scalar=144: llama.cpp scales attention by 1/sqrt\\(256\\)"):
        write_gguf(gemma, spm, tmp_path / "g.gguf", say=lambda *a: None)


def test_the_ollama_modelfile_template_reproduces_the_chat_template(lora_run, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lora_run)
    text = ollama_modelfile(tokenizer, "model-q8_0.gguf")
    assert text.startswith("FROM ./model-q8_0.gguf\n") and 'PARAMETER stop "</s>"' in text and "PARAMETER temperature 0" in text
    template, system = ollama_template(tokenizer)
    assert system is None and "SYSTEM" not in text
    assert '{{ if eq .Role "system" }}<|system|>\n{{ .Content }}</s>\n' in template
    assert template.endswith("{{ end }}{{ end }}<|assistant|>\n")


def test_the_ollama_export_prompts_in_the_format_the_run_trained_with(lora_run, tiny_model_dir, tmp_path):
    """lora_run trained on Alpaca rows: its Modelfile TEMPLATE and its GGUF's chat template are the Alpaca prompt
    training rendered (not the tokenizer's chat template, which it never saw); a chat run's are its chat template."""
    import jinja2
    from transformers import AutoTokenizer

    from hfgpu.render import ALPACA

    assert hfgpu_main(["export", str(lora_run), "--ollama", str(tmp_path / "ollama")]) == 0
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    head, tail = ALPACA.split("{instruction}")
    assert f'TEMPLATE """{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{head}{{{{ .Content }}}}{tail}' in modelfile
    assert "<|user|>" not in modelfile and 'PARAMETER stop "</s>"' in modelfile
    template = _read_back_template(tmp_path / "ollama" / "model-q8_0.gguf")
    rendered = jinja2.Template(template).render(messages=[{"role": "user", "content": "Capital of Peru?"}], eos_token="</s>")
    assert rendered == ALPACA.format(instruction="Capital of Peru?")  # the prompt training rendered for that row

    chat = tmp_path / "chat-run"
    rows = [{"messages": [{"role": "user", "content": f"Capital {i}?"}, {"role": "assistant", "content": "Lima"}]} for i in range(8)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_dict(tiny_model_dir, chat, data={"path": str(data), "eval_path": None, "format": "chat"}, train={"max_steps": 1})
    finetune(validate_recipe(recipe), say=lambda *a, **k: None)
    assert hfgpu_main(["export", str(chat), "--ollama", str(tmp_path / "ollama-chat")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(chat)
    assert (tmp_path / "ollama-chat" / "Modelfile").read_text() == ollama_modelfile(tokenizer, "model-q8_0.gguf")
    assert _read_back_template(tmp_path / "ollama-chat" / "model-q8_0.gguf") == tokenizer.chat_template


def _read_back_template(path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(str(path), "r").fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's: a system block of its own when the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a "
    "helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] "
    "+ '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def test_a_default_system_prompt_becomes_the_modelfiles_system():
    """Ollama puts SYSTEM first in a conversation without a system message, as the Jinja template does; the
    user and assistant branches leave the inserted block out (else it would appear twice)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "model")
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    template, system = ollama_template(tokenizer)
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in template
    assert template.count("You are a helpful") == 0
    assert f'SYSTEM """{system}"""' in ollama_modelfile(tokenizer, "m.gguf")


def test_bad_export_input_is_one_line_and_overwrites_nothing(lora_run, tmp_path, capsys):
    existing = tmp_path / "mine.gguf"
    existing.write_bytes(b"my file")
    digest = hashlib.sha256(existing.read_bytes()).hexdigest()
    cases = [
        (["export", str(lora_run), "--out", str(existing)], ["exists", "--overwrite"]),
        (
            ["export", str(lora_run), "--quant", "q4_k_m", "--out", str(tmp_path / "a.gguf")],
            ["'q4_k_m'", "f16, bf16, q8_0, q4_0", "llama-quantize"],
        ),
        (["export", str(lora_run), "--out", str(tmp_path / "a.bin")], ["does not end in .gguf"]),
        (["export", str(tmp_path), "--out", str(tmp_path / "b.gguf")], ["plan.json"]),
        (["export", str(lora_run), "--format", "ggml", "--out", str(tmp_path / "c.gguf")], ["'ggml'", "gguf, gguf-lora, gguf-base"]),
        (
            ["export", str(lora_run), "--format", "gguf-lora", "--quant", "q4_0", "--out", str(tmp_path / "c.gguf")],
            ["'q4_0'", "f32, f16, bf16, q8_0"],
        ),
        (["export", str(lora_run), "--format", "gguf-lora", "--ollama", str(tmp_path / "o")], ["--ollama", "merged"]),
        (["export", str(lora_run), "--format", "gguf-lora", "--out", str(existing)], ["exists", "--overwrite"]),
        (["export", str(lora_run), "--format", "gguf-base", "--out", str(existing)], ["exists", "--overwrite"]),
        (["export", str(lora_run), "--format", "gguf-base", "--ollama", str(tmp_path / "o")], ["--ollama", "merged"]),
        (["export", str(lora_run), "--format", "gguf-base", "--quant", "q4_k", "--out", str(tmp_path / "d.gguf")], ["'q4_k'"]),
    ]
    for argv, words in cases:
        assert hfgpu_main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("hfgpu: error:") and "Traceback" not in err
        for w in words:
            assert w in err, (w, err)
    assert hashlib.sha256(existing.read_bytes()).hexdigest() == digest
    assert not list(tmp_path.glob("*.part"))


def _tensors(path) -> dict:
    import gguf
    import numpy as np

    return {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize(
    "model_type,rslora", [("llama", False), ("llama-untied", True), ("qwen2", False), ("qwen3", False), ("gemma2", False), ("phi3", False)]
)
def test_a_gguf_lora_adapter_applied_as_llama_cpp_applies_it_gives_the_merged_models_tensors(model_type, rslora, tmp_path):
    """llama.cpp adds (alpha / r) · B · A to each adapted tensor, r read from B's shape (llama-adapter.h): hfgpu's
    base GGUF plus its adapter GGUF so applied equal its GGUF of the merged model tensor by tensor (llama's q/k rows
    permuted alike; rsLoRA's alpha / sqrt(r) carried in the alpha), with one A/B pair per adapted linear layer. The
    merged export is the one transformers' reader checks above; llama.cpp itself applies the adapter in
    test_llama_cpp.py."""
    import gguf
    import numpy as np

    model, tokenizer = export_case(model_type)
    linear = sum(isinstance(m, torch.nn.Linear) for name, m in model.named_modules() if ".layers." in name)
    write_gguf(model, tokenizer, tmp_path / "base.gguf", quant="f32", say=lambda *a: None)
    peft = tiny_lora_of(model, tmp_path / "adapter", use_rslora=rslora)
    out = write_gguf_lora(tmp_path / "adapter", model.config, tmp_path / "adapter.gguf", quant="f32", say=lambda *a: None)
    write_gguf(peft.merge_and_unload(), tokenizer, tmp_path / "merged.gguf", quant="f32", say=lambda *a: None)
    fields = gguf.GGUFReader(out.path).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["general.architecture"].contents() == {"llama-untied": "llama"}.get(model_type, model_type)
    alpha = fields["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx(16 * 8**0.5 if rslora else 16)
    base, adapter, merged = _tensors(tmp_path / "base.gguf"), _tensors(out.path), _tensors(tmp_path / "merged.gguf")
    pairs = {name.removesuffix(".lora_a") for name in adapter if name.endswith(".lora_a")}
    assert len(pairs) == linear and set(adapter) == {p + s for p in pairs for s in (".lora_a", ".lora_b")}
    assert set(merged) == set(base) and pairs <= set(base)
    for name, expected in merged.items():
        weight = base[name]
        if name in pairs:
            a, b = adapter[name + ".lora_a"], adapter[name + ".lora_b"]
            assert a.shape == (8, weight.shape[1]) and b.shape == (weight.shape[0], 8)
            assert not np.allclose(weight, expected, atol=1e-4)  # the adapter changes this tensor
            weight = weight + alpha / b.shape[1] * (b @ a)
        np.testing.assert_allclose(weight, expected, rtol=1e-5, atol=2e-6, err_msg=name)


@pytest.mark.parametrize(
    "change,words",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "fully trained modules"),
        ({"bias": "all"}, "trains biases"),
        ({"alpha_pattern": {"q_proj": 32}}, "per-module alphas"),
        ({"use_rslora": True, "rank_pattern": {"q_proj": 4}}, "rsLoRA with per-module ranks"),
        ({"peft_type": "IA3"}, "IA3 adapter"),
    ],
)
def test_what_a_llama_cpp_adapter_cannot_carry_is_refused_with_the_merged_export_named(lora_run, tmp_path, change, words):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(HfgpuError, match=words) as e:
        export_adapter(run, tmp_path / "a.gguf", say=lambda *a: None)
    assert "--format gguf (the merged model)" in str(e.value)
    assert not list(tmp_path.glob("*.gguf*"))


def test_hfgpu_export_format_gguf_lora_writes_the_runs_adapter_and_says_how_to_run_it(lora_run, capsys):

    assert hfgpu_main(["export", str(lora_run), "--format", "gguf-lora"]) == 0
    said = capsys.readouterr().out
    path = lora_run / "adapter-f16.gguf"
    tensors = _tensors(path)
    assert len(tensors) == 2 * 7 * 2  # the demo recipe adapts all 7 linear layers of 2 layers
    assert f"--lora {path}" in said and f"hfgpu export {lora_run} --format gguf-base" in said
    path.unlink()


def test_hfgpu_export_format_gguf_base_writes_the_base_the_adapter_applies_to(lora_run, tmp_path, capsys):
    """The base alone: the run's base model, unmerged, tensor for tensor what hfgpu's GGUF writer makes of the
    base loaded by transformers (not the merged model), with the run's tokenizer; the printed llama-cli command
    pairs it with the run's adapter. llama.cpp loading the two together: tests/test_llama_cpp.py."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfgpu.hub import Run

    out = tmp_path / "base.gguf"
    assert hfgpu_main(["export", str(lora_run), "--format", "gguf-base", "--quant", "f32", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"llama-cli -m {out} --lora {lora_run / 'adapter-f16.gguf'}" in said
    base = AutoModelForCausalLM.from_pretrained(Run(lora_run).base_model_path, dtype=torch.float32)
    write_gguf(base, AutoTokenizer.from_pretrained(lora_run), tmp_path / "expected.gguf", quant="f32", say=lambda *a: None)
    got, expected = _tensors(out), _tensors(tmp_path / "expected.gguf")
    merged, _ = _merged(lora_run)
    write_gguf(merged, AutoTokenizer.from_pretrained(lora_run), tmp_path / "merged.gguf", quant="f32", say=lambda *a: None)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert any(not np.array_equal(got[n], t) for n, t in _tensors(tmp_path / "merged.gguf").items())  # not the merged model
    fields = gguf.GGUFReader(out).fields
    assert fields["general.name"].contents() == Path(Run(lora_run).base_model).name
    assert len(fields["tokenizer.ggml.tokens"].contents()) == len(AutoTokenizer.from_pretrained(lora_run))


def test_an_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(
        HfgpuError, match="cannot export model type 'gpt2' to GGUF yet: supported are gemma2, llama, mistral, phi3, qwen2, qwen3"
    ):
        write_gguf(model, AutoTokenizer.from_pretrained(DEMO / "model"), tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()


def test_a_gguf_file_is_a_base_the_planner_plans_and_training_fine_tunes(lora_run, tmp_path):
    """`model: FILE.gguf`: its config comes from the GGUF metadata (the plan counts what the original folder's
    counts), transformers dequantizes its tensors, and LoRA, QLoRA and full runs train on it; the run records the
    file, and generate/merge/export reload it."""
    import yaml

    import hfgpu
    from hfgpu.hub import Run, merge

    gguf = export_run(lora_run, tmp_path / "base.gguf", quant="f16", say=lambda *a: None).path
    merged, _ = _merged(lora_run)
    assert hfgpu.plan(str(gguf), "RTX 4090").params_total == sum(p.numel() for p in merged.parameters())
    for strategy in ("lora", "qlora", "full"):
        out = tmp_path / f"on-gguf-{strategy}"
        recipe = recipe_dict(str(gguf), out, strategy=strategy, train={"max_steps": 2})
        result = finetune(validate_recipe(recipe), say=lambda *a, **k: None)
        assert result.metrics["steps"] == 2
        assert yaml.safe_load((out / "resolved_recipe.yaml").read_text())["model"] == str(gguf.resolve())
    # the folder + gguf_file form is the same recipe
    folder_form = recipe_dict(str(gguf.parent), tmp_path / "on-gguf-folder", train={"max_steps": 1}) | {"gguf_file": gguf.name}
    assert validate_recipe(folder_form).model == str(gguf)
    finetune(validate_recipe(folder_form), say=lambda *a, **k: None)
    assert yaml.safe_load((tmp_path / "on-gguf-folder" / "resolved_recipe.yaml").read_text())["model"] == str(gguf.resolve())
    run = Run(tmp_path / "on-gguf-lora")
    model, tokenizer = run.load(dtype=torch.float32)
    assert _logits(model, tokenizer).isfinite().all()
    # plain peft loads it as the run's README.md says: the file's folder is the recorded base, the file is named
    from peft import AutoPeftModelForCausalLM

    assert json.loads((run.path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(gguf.parent.resolve())
    assert f'from_pretrained("{run.path.resolve()}", gguf_file="{gguf.name}")' in (run.path / "README.md").read_text()
    plain = AutoPeftModelForCausalLM.from_pretrained(run.path, gguf_file=gguf.name, dtype=torch.float32)
    ours = _logits(model, tokenizer)  # peft resizes the embeddings to len(tokenizer), one row more than this tiny vocabulary
    torch.testing.assert_close(_logits(plain, tokenizer)[..., : ours.shape[-1]], ours, rtol=0, atol=0)
    merge(run.path, tmp_path / "merged-from-gguf", say=lambda *a: None)
    assert (tmp_path / "merged-from-gguf" / "model.safetensors").is_file()
    from hfgpu.export import export_base

    with pytest.raises(HfgpuError, match=f"already the GGUF file '{gguf.resolve()}'"):
        export_base(run.path, tmp_path / "again.gguf", say=lambda *a: None)
    with pytest.raises(HfgpuError, match="full fine-tune, it has no separate base: export it with --format gguf"):
        export_base(tmp_path / "on-gguf-full", tmp_path / "again.gguf", say=lambda *a: None)
    assert not (tmp_path / "again.gguf").exists()


def test_a_gguf_files_config_is_read_once_and_read_again_when_the_file_changes(lora_run, tmp_path, monkeypatch):
    """Reading a GGUF's config parses its whole vocabulary; the user cache keeps it under the file's path, size and
    modification time."""
    import os

    from hfgpu import models

    monkeypatch.setenv("HFGPU_CACHE", str(tmp_path / "cache"))
    gguf = export_run(lora_run, tmp_path / "base.gguf", quant="f16", say=lambda *a: None).path
    first = models._gguf_config(str(gguf))
    assert len(list((tmp_path / "cache").rglob("gguf-*.json"))) == 1

    def unread(text):
        raise AssertionError("read the GGUF again")

    monkeypatch.setattr(models, "_read_gguf_config", unread)
    assert models._gguf_config(str(gguf)) == first
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))  # the file changed
    with pytest.raises(AssertionError, match="read the GGUF again"):
        models._gguf_config(str(gguf))


def test_a_file_that_is_not_a_readable_gguf_model_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00not a model")
    assert hfgpu_main(["plan", str(bad), "--gpu", "4090"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"hfgpu: error: cannot read the GGUF file {str(bad)!r} as a model") and "original model's folder" in err


def test_an_adapter_gguf_is_not_taken_for_a_model(lora_run, tmp_path, capsys):
    """A gguf-lora file read as a model gave a made-up 6.6 B Llama (transformers' defaults): refused by its general.type."""
    adapter = export_adapter(lora_run, tmp_path / "adapter-f16.gguf", say=lambda *a: None).path
    assert hfgpu_main(["plan", str(adapter), "--gpu", "4090"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a LoRA adapter (GGUF), not a model" in err[0] and "--lora" in err[0]
    with pytest.raises(HfgpuError, match="is a LoRA adapter"):
        finetune(validate_recipe(recipe_dict(str(adapter), tmp_path / "never")), say=lambda *a, **k: None)
    assert not (tmp_path / "never").exists()
