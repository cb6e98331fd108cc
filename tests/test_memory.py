"""The memory model against real objects on CPU: exact components exactly, fitted ones within tolerance."""

import dataclasses

import pytest
from conftest import tiny_llama

from hfgpu import memory
from hfgpu.measure import measure_step
from hfgpu.modeling import ModelSettings, prepare_model
from hfgpu.models import model_spec

SHAPES = {
    "llama": dict(),
    "wide-gqa": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=256, vocab_size=1500),
}


def setup(
    spec,
    strategy,
    precision="bf16",
    quantization=None,
    double_quant=True,
    ckpt=False,
    optimizer="adamw_torch",
    b=2,
    s=64,
    attention="sdpa",
    targets=None,
    frozen="auto",
):
    return memory.Setup(
        strategy=strategy,
        precision=precision,
        frozen_dtype=frozen,
        quantization=quantization or ("nf4" if strategy == "qlora" else "none"),
        double_quant=double_quant,
        gradient_checkpointing=ckpt,
        micro_batch_size=b,
        seq_len=s,
        optimizer=optimizer,
        attention=attention,
        lora_r=16,
        lora_targets=tuple(targets or spec.linear_names),
    )


def settings_of(st, targets=None):
    return ModelSettings(
        strategy=st.strategy,
        precision=st.precision,
        frozen_dtype=st.frozen_dtype,
        quantization=st.quantization,
        double_quant=st.double_quant,
        gradient_checkpointing=st.gradient_checkpointing,
        attention=st.attention,
        lora_targets=tuple(targets or ()),
    )


EXACT = [
    ("lora", "bf16", None, True, "adamw_torch"),
    ("lora", "fp32", None, True, "adamw_8bit"),
    ("full", "bf16", None, True, "adamw_torch"),
    ("full", "fp32", None, True, "adamw_8bit"),
    ("qlora", "bf16", "nf4", True, "adamw_torch"),
    ("qlora", "fp32", "nf4", False, "paged_adamw_8bit"),
    ("qlora", "fp16", "fp4", True, "adamw_8bit"),
    # GTX 10 (Pascal): fp32 compute on a 16-bit frozen base, norms in fp32 (hfgpu.patches.upcast_per_use)
    ("lora", "fp32", None, True, "adamw_torch", "fp16"),
    ("qlora", "fp32", "nf4", True, "adamw_8bit", "bf16"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strategy,precision,quant,dq,optimizer,frozen", [row + ("auto",) * (6 - len(row)) for row in EXACT])
def test_weights_gradients_and_optimizer_state_are_exact(shape, strategy, precision, quant, dq, optimizer, frozen):
    cfg = tiny_llama(**SHAPES[shape])
    spec = model_spec(cfg)
    st = setup(spec, strategy, precision, quant, dq, optimizer=optimizer, frozen=frozen)
    measured = measure_step(cfg, settings_of(st), 1, 16, optimizer=optimizer)
    assert measured.weights == memory.weight_bytes(spec, st)  # autocast's copies exist only inside the step: transient
    assert measured.trainable_state == memory.trainable_state_bytes(spec, st)


@pytest.mark.parametrize("targets", [None, ("q_proj", "v_proj")])
def test_lora_trainable_parameters_match_peft(targets):
    cfg = tiny_llama()
    spec = model_spec(cfg)
    st = setup(spec, "lora", targets=targets)
    model = prepare_model(cfg, settings_of(st, targets))
    trainable, _ = model.get_nb_trainable_parameters()
    assert memory.trainable_params(spec, st) == trainable


# Activations and logits are fitted (benchmarks/memory_cpu.py); a shape outside the fitting grid must be
# predicted within these bounds. Checkpointing's peak is a max of two phases, fitted more loosely.
HELD_OUT = dict(hidden_size=160, num_attention_heads=5, num_key_value_heads=1, intermediate_size=432, num_hidden_layers=3, vocab_size=2500)


@pytest.mark.parametrize(
    "strategy,precision,ckpt,attention,tolerance,frozen",
    [
        row + ("auto",) * (6 - len(row))
        for row in [
            ("lora", "bf16", False, "sdpa", 0.05),
            ("lora", "fp32", False, "eager", 0.05),
            ("full", "bf16", False, "sdpa", 0.05),
            ("full", "fp32", True, "sdpa", 0.08),
            ("lora", "bf16", True, "sdpa", 0.15),
            ("qlora", "bf16", False, "sdpa", 0.08),
            ("qlora", "bf16", True, "sdpa", 0.15),
            ("lora", "fp32", True, "sdpa", 0.15, "fp16"),  # Pascal: a 16-bit base cast to fp32 per use
            ("qlora", "fp32", False, "sdpa", 0.08, "fp16"),
        ]
    ],
)
def test_step_peak_is_predicted_on_a_held_out_shape(strategy, precision, ckpt, attention, tolerance, frozen):
    cfg = tiny_llama(**HELD_OUT)
    spec = model_spec(cfg)
    st = setup(spec, strategy, precision, ckpt=ckpt, b=2, s=96, attention=attention, frozen=frozen)
    measured = measure_step(cfg, settings_of(st), 2, 96)
    predicted = memory.breakdown(spec, st, 80 * 2**30).tensor_peak
    assert predicted == pytest.approx(measured.peak, rel=tolerance)


def test_logits_scale_with_vocab_and_tokens():
    spec = model_spec("meta-llama/Llama-3.1-8B")
    st = setup(spec, "lora", b=2, s=2048)
    logits = memory.logits_bytes(spec, st)
    assert memory.logits_bytes(spec, dataclasses.replace(st, micro_batch_size=1)) * 2 == pytest.approx(logits, rel=1e-6)
    # several bytes per logit: 16-bit logits, their fp32 upcast and the loss's gradient (DESIGN.md: k ≈ 12–20 incl. grads)
    per_logit = logits / (2 * 2048 * 128256)
    assert 6 < per_logit < 20


def test_nf4_double_quant_is_about_4_13_bits_per_weight():
    spec = model_spec("meta-llama/Llama-3.1-8B")
    st = setup(spec, "qlora")
    quantized = sum(g.count * memory._quantized_linear_bytes(g.in_features * g.out_features, g.out_features, st) for g in spec.linears)
    assert quantized * 8 / spec.linear_params == pytest.approx(4.127, abs=0.002)


def test_a_plan_warns_when_the_libraries_differ_from_those_the_coefficients_were_fitted_on(monkeypatch):
    from importlib import metadata

    import hfgpu
    from hfgpu import memory

    memory.version_drift.cache_clear()
    assert memory.version_drift() is None  # the pinned test environment is the fitted one
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "6.1.0" if name == "transformers" else real(name))
    memory.version_drift.cache_clear()
    w = hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 4090").warnings
    memory.version_drift.cache_clear()
    fitted = memory.activation_coefficients()["measured"]["versions"]["transformers"]
    assert any(f"transformers 6.1.0 (fitted on {fitted}" in x and "--verify" in x for x in w)


def test_transient_and_peak_phase_mean_what_they_say():
    """`transient` holds the per-step allocations (autocast's weight copies are not weights: a real step's
    persistent weights exclude them), and `peak_phase` names the moment that sets the peak."""
    cfg = tiny_llama(tie_word_embeddings=True)
    spec = model_spec(cfg)
    full = setup(spec, "full", "bf16", "none", False, b=1, s=16)
    m = memory.breakdown(spec, full, 8 * 2**30)
    copies, constants = memory.transient_bytes(spec, full)
    assert copies == 2 * (spec.linear_params + spec.vocab_size * spec.hidden_size) and m.transient == copies + constants
    measured = measure_step(cfg, settings_of(full), 1, 16)
    assert measured.weights == m.weights
    # 16 tokens, tied embeddings: the three dense fp32 V × h gradients at the end of backward outgrow the loss phase
    assert m.peak_phase == "embedding gradient" and measured.peak_phase == "backward"
    assert m.tensor_peak == pytest.approx(measured.peak, rel=0.02)
    q = setup(spec, "qlora", "bf16", "nf4", True)
    assert memory.breakdown(spec, q, 8 * 2**30).transient >= memory.dequant_workspace_bytes(spec, q) > 0
    assert memory.breakdown(spec, dataclasses.replace(q, gradient_checkpointing=False), 8 * 2**30).peak_phase == "loss"
    big = model_spec("meta-llama/Llama-3.1-8B")
    long = memory.Setup(
        strategy="qlora",
        precision="bf16",
        quantization="nf4",
        gradient_checkpointing=True,
        chunked_loss=True,
        micro_batch_size=1,
        seq_len=8192,
        optimizer="adamw_torch",
        attention="sdpa",
        lora_r=16,
        lora_targets=tuple(big.linear_names),
    )
    assert memory.breakdown(big, long, 24 * 2**30).peak_phase == "recompute"  # the chunked loss is small; one layer's recompute is not
    assert memory.breakdown(big, dataclasses.replace(long, chunked_loss=False, seq_len=1024), 24 * 2**30).peak_phase == "loss"


def test_versions_in_the_tested_range_do_not_warn(monkeypatch):
    """peft 0.22 (what `pip install -e .` brings today) refits to the same coefficients as 0.21: no warning on every
    plan; a major.minor outside the recorded range still warns, naming the range."""
    from importlib import metadata

    from hfgpu import memory

    tested = memory.activation_coefficients()["measured"]["tested"]
    assert "0.22" in tested["peft"] and "5.25" in tested["transformers"]
    real = metadata.version
    for peft, warns in (("0.22.0", False), ("0.21.9", False), ("0.23.0", True)):
        monkeypatch.setattr(metadata, "version", lambda name, v=peft: v if name == "peft" else real(name))
        memory.version_drift.cache_clear()
        drift = memory.version_drift()
        assert (drift is not None) == warns, (peft, drift)
        if warns:
            assert f"peft {peft} (fitted on" in drift and "same coefficients under 0.21, 0.22" in drift
    memory.version_drift.cache_clear()
