"""GTX 10 (Pascal): the frozen base stored in 16 bits and computed in fp32, so an 8B QLoRA fits an 8 GB card.

Pascal computes in fp32 (fp16 runs at 1/64 rate), and the parameters bitsandbytes leaves unquantized
(embeddings, lm_head: 1.05 B for Llama-3's vocabulary) took 4 bytes each. Stored in fp16 and cast to fp32
where they are used (hfgpu.patches.upcast_per_use, the chunked loss by slices of the vocabulary), they take 2.
"""

import json

import pytest
import torch
from conftest import DEMO, recipe_dict, tiny_llama

import hfgpu
from hfgpu import memory
from hfgpu.finetune import finetune
from hfgpu.loss import chunked_causal_lm_loss
from hfgpu.modeling import ModelSettings, prepare_model
from hfgpu.recipe import validate_recipe
from hfgpu.step import forward_backward


@pytest.fixture(scope="module")
def fp16_model_dir(tmp_path_factory):
    """A tiny Llama whose weights are fp16 numbers (as a 16-bit checkpoint's are), with the demo tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("fp16-llama")
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "model")
    cfg = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _step(model_dir, strategy, frozen, chunk):
    s = ModelSettings(
        strategy=strategy,
        precision="fp32",
        frozen_dtype=frozen,
        quantization="nf4" if strategy == "qlora" else "none",
        gradient_checkpointing=True,
    )
    model = prepare_model(str(model_dir), s)
    ids = (torch.arange(96) * 7 % 500 + 3).reshape(2, 48)
    loss = forward_backward(model, {"input_ids": ids, "labels": ids}, chunk=chunk, adapters_16bit=False, offload=False)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return model, loss.item(), grads


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
@pytest.mark.parametrize("chunk", [None, 32])
def test_a_16bit_base_computed_in_fp32_gives_the_fp32_loss_and_gradients(fp16_model_dir, strategy, chunk):
    model, loss, grads = _step(fp16_model_dir, strategy, "fp16", chunk)
    _, ref_loss, ref_grads = _step(fp16_model_dir, strategy, "fp32", None)
    base = model.get_base_model().model
    assert base.embed_tokens.weight.dtype == torch.float16 and model.get_output_embeddings().weight.dtype == torch.float16
    assert base.norm.weight.dtype == torch.float32  # norms computed in fp32, as nothing else mixes dtypes
    if strategy == "lora":
        assert base.layers[0].mlp.down_proj.base_layer.weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # the adapters
    assert loss == pytest.approx(ref_loss, abs=1e-3)  # the bound; in fact equal to float rounding:
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    # LoRA: the same numbers in the same fp32 arithmetic. QLoRA: bitsandbytes dequantizes to the dtype the
    # weight was quantized from in backward (fp16 here, fp32 in the reference), a 2e-4 relative difference
    torch.testing.assert_close(grads, ref_grads, rtol=0, atol=(1e-6 if strategy == "lora" else 3e-4) * ref_grads.abs().max().item())


def test_the_chunked_loss_casts_a_16bit_head_by_slices_and_equals_the_fp32_head(monkeypatch):
    torch.manual_seed(0)
    head = torch.randn(300, 16).half()
    hidden = torch.randn(2, 40, 16, requires_grad=True)
    labels = torch.randint(0, 300, (2, 40))
    monkeypatch.setattr("hfgpu.patches.upcast_slice_rows", lambda h: 64)  # several slices, the last one short
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk_size=16, dtype=torch.float32)
    loss.backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    ref = torch.nn.functional.cross_entropy((hidden[:, :-1] @ head.float().t()).reshape(-1, 300), labels[:, 1:].reshape(-1))
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-5, atol=1e-7)


def test_a_pascal_rule_run_trains_as_the_fp32_run_and_its_adapter_loads_with_plain_peft(fp16_model_dir, tmp_path):
    def run(out, frozen):
        r = recipe_dict(fp16_model_dir, tmp_path / out, strategy="lora", frozen_dtype=frozen, train={"max_steps": 6, "eval_every": None})
        return finetune(validate_recipe(r), say=lambda *a, **k: None)

    pascal, reference = run("pascal", "fp16"), run("fp32", "fp32")
    losses = [
        [json.loads(line)["loss"] for line in (res.output_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        for res in (pascal, reference)
    ]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=1e-3)
    assert losses[0][-1] < losses[0][0]
    assert json.loads((pascal.output_dir / "plan.json").read_text())["frozen_dtype"] == "fp16"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fp16_model_dir, dtype=torch.float32), pascal.output_dir).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pascal.model.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# --- the planner -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu,seq_len", [("GTX 1080", 1024), ("GTX 1080 Ti", 4096)])
def test_llama_3_1_8b_qlora_fits_a_gtx_10_card(gpu, seq_len):
    p = hfgpu.plan("meta-llama/Llama-3.1-8B", gpu, seq_len=seq_len)
    assert p.fits and p.strategy == "qlora" and p.precision == "fp32" and p.knobs.frozen_dtype == "fp16"
    assert "cast to fp32 where it is used" in p.reasons["frozen_dtype"]
    fp32_base = memory.breakdown(p.spec, p.setup().replace(frozen_dtype="fp32"), p.gpu.vram_bytes)
    vocab = p.spec.embedding_params + p.spec.lm_head_params
    assert fp32_base.weights - p.memory.weights == 2 * vocab  # 2 bytes less per embedding and lm_head weight
    assert not fp32_base.fits  # what it was before: 8.88 GiB of 7.60 at 128 tokens


def test_the_frozen_dtype_is_the_compute_dtype_off_pascal_and_on_cpu():
    assert hfgpu.plan("Qwen/Qwen2.5-7B", "RTX 3060").knobs.frozen_dtype == "bf16"
    assert hfgpu.plan("Qwen/Qwen2.5-0.5B", "cpu", strategy="lora").knobs.frozen_dtype == "fp32"
    assert hfgpu.plan("Qwen/Qwen2.5-0.5B", "cpu", strategy="lora", frozen_dtype="bf16").knobs.frozen_dtype == "bf16"
    assert hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 4090", strategy="full").knobs.frozen_dtype == "fp32"


@pytest.mark.parametrize(
    "knobs,message",
    [
        (dict(strategy="full", frozen_dtype="fp16"), "frozen_dtype='fp16': strategy='full' trains every weight"),
        (dict(precision="bf16", frozen_dtype="fp16"), "frozen_dtype='fp16' with precision='bf16'"),
        (dict(frozen_dtype="fp8"), "frozen_dtype='fp8' is not one of bf16, fp16, fp32"),
    ],
)
def test_a_frozen_dtype_that_cannot_work_is_refused_naming_it(knobs, message):
    with pytest.raises(hfgpu.HfgpuError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 4090", **knobs)


@pytest.mark.parametrize(
    "knobs", [dict(strategy="lora", chunked_loss=True), dict(strategy="qlora", chunked_loss=False, gradient_checkpointing=True)]
)
@pytest.mark.slow
def test_the_planned_pascal_step_is_the_simulated_one(knobs):
    """A real step on fake tensors (the 16-bit base, the casts by slices, the fp32 norms) against the plan."""
    from hfgpu.simulate import simulate

    p = hfgpu.plan("meta-llama/Llama-3.2-1B", "GTX 1070", seq_len=1024, **knobs)
    assert p.knobs.frozen_dtype == "fp16"
    sim = simulate(p.spec.config, p.setup(), spec=p.spec)
    assert sim.weights == p.memory.weights
    assert sim.peak == pytest.approx(p.memory.tensor_peak, rel=0.03)
