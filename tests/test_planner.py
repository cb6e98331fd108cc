import pytest
from conftest import limit

import hfgpu
from hfgpu.errors import DoesNotFit, HfgpuError
from hfgpu.gpus import GPU

KEYS = {
    "model",
    "gpu",
    "strategy",
    "precision",
    "quantization",
    "gradient_checkpointing",
    "micro_batch_size",
    "grad_accum_steps",
    "seq_len",
    "optimizer",
    "attention",
    "lora",
    "params_total",
    "params_trainable",
    "memory",
    "fits",
    "reasons",
    "warnings",
    "tokens_per_second_estimate",
}


def test_small_model_on_a_4090_is_full_fine_tuned_and_explained():
    p = hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 4090")
    assert p.fits and p.strategy == "full" and p.precision == "bf16" and p.quantization == "none"
    assert p.params_trainable == p.params_total == 494032768
    assert p.micro_batch_size * p.grad_accum_steps == 16
    d = p.to_dict()
    assert KEYS <= set(d) and d["gpu"] == {"name": "GeForce RTX 4090", "count": 1, "vram_gb": 24.0, "compute_capability": "8.9"}
    assert set(d["memory"]) == {
        "weights",
        "trainable_state",
        "activations",
        "logits",
        "transient",
        "overhead",
        "total",
        "budget",
        "margin",
        "peak_phase",
    }
    assert d["memory"]["total"] <= d["memory"]["budget"] < 24 * 1024**3
    assert d["memory"]["margin"] == d["memory"]["budget"] - d["memory"]["total"] and d["fit"] in ("fits", "tight")
    for knob in (
        "strategy",
        "precision",
        "quantization",
        "gradient_checkpointing",
        "micro_batch_size",
        "grad_accum_steps",
        "seq_len",
        "optimizer",
        "attention",
    ):
        assert d["reasons"][knob]
    assert d["tokens_per_second_estimate"] > 0
    text = str(p)
    assert "FITS" in text and "bf16" in text and "total (peak)" in text


@pytest.mark.parametrize(
    "gpu,precision", [("RTX 4090", "bf16"), ("RTX 3060", "bf16"), ("2080 Ti", "fp16"), ("GTX 1080", "fp32"), ("T4", "fp16")]
)
def test_precision_follows_the_card(gpu, precision):
    p = hfgpu.plan_or_closest("HuggingFaceTB/SmolLM2-135M", gpu)
    assert p.precision == precision and p.attention == "sdpa"


def test_pascal_plans_carry_the_torch_install_warning():
    p = hfgpu.plan("HuggingFaceTB/SmolLM2-135M", "1080", strategy="lora")
    assert any("cu126" in w for w in p.warnings)


def test_strategy_descends_with_memory():
    assert hfgpu.plan("meta-llama/Llama-3.2-1B", "RTX 4090").strategy == "full"
    assert hfgpu.plan("meta-llama/Llama-3.2-3B", "RTX 4090", seq_len=1024).strategy == "lora"
    p = hfgpu.plan("mistralai/Mistral-7B-v0.3", "RTX 3060 12GB", seq_len=1024)
    assert p.strategy == "qlora" and p.quantization == "nf4" and p.fits


def test_checkpointing_only_when_needed_and_the_largest_micro_batch():
    small = hfgpu.plan("HuggingFaceTB/SmolLM2-135M", "4090", strategy="lora", seq_len=512)
    assert not small.gradient_checkpointing and small.micro_batch_size == 16 and small.grad_accum_steps == 1
    tight = hfgpu.plan("mistralai/Mistral-7B-v0.3", "RTX 3060 12GB", seq_len=2048)
    assert tight.gradient_checkpointing and "does not fit" in tight.reasons["gradient_checkpointing"]


def test_fixed_knobs_are_kept():
    p = hfgpu.plan(
        "Qwen/Qwen2.5-0.5B",
        "4090",
        strategy="lora",
        micro_batch_size=2,
        seq_len=512,
        optimizer="adamw_8bit",
        gradient_checkpointing=True,
        lora_r=8,
        lora_targets="q_proj,v_proj",
        attention="eager",
    )
    assert (p.strategy, p.micro_batch_size, p.grad_accum_steps, p.seq_len, p.optimizer, p.gradient_checkpointing, p.attention) == (
        "lora",
        2,
        8,
        512,
        "adamw_8bit",
        True,
        "eager",
    )
    assert p.lora.r == 8 and p.lora.alpha == 16 and p.lora.target_modules == ("q_proj", "v_proj")
    assert p.reasons["strategy"] == "fixed by you"


def test_more_memory_per_token_means_more_memory():
    base = dict(strategy="lora", gradient_checkpointing=False, micro_batch_size=1, chunked_loss=False)
    m = lambda **k: hfgpu.plan_or_closest("meta-llama/Llama-3.2-1B", "4090", **{**base, **k}).memory
    assert m(seq_len=2048).activations > m(seq_len=1024).activations
    assert m(seq_len=1024, gradient_checkpointing=True).activations < m(seq_len=1024).activations
    assert m(seq_len=1024, attention="eager").activations > m(seq_len=1024).activations
    assert m(seq_len=1024, micro_batch_size=2).logits == pytest.approx(2 * m(seq_len=1024).logits, abs=2)


def test_two_cards_split_the_global_batch():
    p = hfgpu.plan("Qwen/Qwen2.5-0.5B", "2x RTX 3090", strategy="lora", micro_batch_size=2)
    assert p.gpu.count == 2 and p.grad_accum_steps == 4 and p.global_batch_size == 16


def test_custom_memory_card_plans_with_a_warning():
    p = hfgpu.plan("Qwen/Qwen2.5-0.5B", "12GB")
    assert p.gpu.vram_gb == 12 and any("compute capability unknown" in w for w in p.warnings)
    p2 = hfgpu.plan("Qwen/Qwen2.5-0.5B", GPU(name="lab card", vram_gb=16, compute_capability=(7, 5)))
    assert p2.precision == "fp16"


def test_does_not_fit_carries_the_closest_plan_and_alternatives():
    with pytest.raises(DoesNotFit) as e:
        hfgpu.plan("meta-llama/Llama-3.1-8B", "GTX 1060 3GB")
    assert e.value.exit_code == 3
    closest = e.value.closest
    assert not closest.fits and closest.strategy == "qlora" and closest.micro_batch_size == 1 and closest.gradient_checkpointing
    assert any("fits with" in a for a in e.value.alternatives) and "does not fit on" in str(e.value)
    with pytest.raises(DoesNotFit) as e:
        hfgpu.plan("Qwen/Qwen2.5-7B", "RTX 4090", strategy="full")
    assert any("strategy='lora' fits" in a or "seq_len" in a for a in e.value.alternatives)


@pytest.mark.parametrize(
    "knobs,needle",
    [
        (dict(gpu="1080", attention="flash_attention_2"), "attention='flash_attention_2' needs compute capability ≥ 8.0"),
        (dict(gpu="2080 Ti", precision="bf16"), "use precision='fp16'"),
        (dict(gpu="4090", strategy="qlora", quantization="none"), "strategy='qlora' quantizes"),
        (dict(gpu="4090", strategy="full", quantization="nf4"), "strategy='full' trains every weight"),
        (dict(gpu="1080", strategy="lora", quantization="int8"), "LLM.int8"),
        (dict(gpu="4090", seq_len=0), "seq_len=0 must be"),
        (dict(gpu="4090", seq_len=10**6), "beyond Qwen/Qwen2.5-0.5B's maximum of 32768"),
        (dict(gpu="4090", micro_batch_size=0), "micro_batch_size=0"),
        (dict(gpu="4090", strategy="lorra"), "strategy='lorra' is not one of"),
        (dict(gpu="4090", lora_targets="q_proj,qq_proj"), "qq_proj not among"),
        (dict(gpu="4090", lora_dropout=1.5), "lora_dropout=1.5"),
    ],
)
def test_contradictory_or_bad_knobs_name_the_value_and_the_fix(knobs, needle):
    gpu = knobs.pop("gpu")
    with pytest.raises(HfgpuError) as e:
        hfgpu.plan("Qwen/Qwen2.5-0.5B", gpu, **knobs)
    assert needle in str(e.value) and "\n" not in str(e.value) and type(e.value) is HfgpuError


def test_all_problems_are_reported_at_once():
    with pytest.raises(HfgpuError) as e:
        hfgpu.plan("Qwen/Qwen2.5-0.5B", "1080", precision="bf16", attention="flash_attention_2", micro_batch_size=0)
    msg = str(e.value)
    assert "precision='bf16'" in msg and "flash_attention_2" in msg and "micro_batch_size=0" in msg


@pytest.mark.parametrize(
    "call",
    [
        lambda: hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 4090", seq_length=512),
        lambda: hfgpu.plan_or_closest("Qwen/Qwen2.5-0.5B", "RTX 4090", seq_length=512),
    ],
)
def test_an_unknown_keyword_is_a_did_you_mean_not_a_type_error_or_a_no_op(call):
    with pytest.raises(HfgpuError, match=r"plan(_or_closest)?\(\) has no knob 'seq_length': did you mean 'seq_len'\?"):
        call()


def test_the_checkpointing_reason_says_why_and_quotes_the_throughput_models_cost():
    from dataclasses import replace

    from hfgpu.models import model_spec
    from hfgpu.throughput import checkpointing_cost, compute_tokens_per_second

    # fixed offloading forces checkpointing on a plan that would fit without it: the reason says so
    p = hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 4090", strategy="lora", activation_offloading=True)
    reason = p.reasons["gradient_checkpointing"]
    assert p.gradient_checkpointing and "activation_offloading (fixed) needs it" in reason and "does not fit" not in reason
    # the cost in the words is the one in the estimate
    s = p.setup()
    spec, card = model_spec("Qwen/Qwen2.5-0.5B"), p.gpu
    on, off = (compute_tokens_per_second(spec, card, replace(s, gradient_checkpointing=c)) for c in (True, False))
    assert off / on == pytest.approx(1 + checkpointing_cost("lora")) == pytest.approx(1.5)
    assert "+50% step time" in reason


def test_plan_json_knobs_read_back():
    """hub.Run reads plan.json as a typed record: the knobs come back as the plan resolved them."""
    import json

    p = hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 3060", strategy="qlora", seq_len=1024)
    back = hfgpu.Plan.knobs_of(json.loads(json.dumps(p.to_dict())))
    assert back == p.knobs.replace(global_batch_size=p.global_batch_size)
    full = hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 4090", strategy="full")
    back = hfgpu.Plan.knobs_of(json.loads(json.dumps(full.to_dict())))
    assert (back.strategy, back.micro_batch_size, back.optimizer, back.lora_r) == ("full", full.micro_batch_size, full.optimizer, "auto")


def test_saver_reasons_quote_the_rules_the_search_used():
    """A saver a rule decides (no GPU, a blocker, fixed by you) carries that rule's words; the search
    never tried what the rule excluded."""
    from hfgpu.knobs import PYTHON, Knobs
    from hfgpu.search import _saver_rules, _savers, problem

    cpu = hfgpu.plan("Qwen/Qwen2.5-0.5B", "cpu", strategy="lora", seq_len=256)
    assert cpu.reasons["activation_offloading"] == "off: no GPU"
    fixed = hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 4090", strategy="lora", chunked_loss=False, tiled_mlp=True)
    assert fixed.reasons["chunked_loss"] == "off (fixed by you)"
    assert (
        fixed.tiled_mlp
        and fixed.reasons["tiled_mlp"].startswith("on: in backward")
        and fixed.reasons["tiled_mlp"].endswith("(fixed by you)")
    )
    assert "tiled_mlp (fixed) needs it" in fixed.reasons["gradient_checkpointing"]

    c = problem("Qwen/Qwen2.5-0.5B", "cpu", Knobs(strategy="lora"), PYTHON, False)
    allowed, rule = _saver_rules(c)
    assert allowed["activation_offloading"] == (False,) and rule["activation_offloading"] == "off: no GPU"
    assert not any(
        combo["activation_offloading"]
        for combo in _savers(c, strategy="lora", precision="fp32", quantization="none", optimizer="adamw_torch")
    )


def test_all_linear_targets_are_peft_s_keyword_everywhere(tmp_path):
    """`all-linear` (what peft's docs tell users to type) means every linear layer but the output head,
    in plan(), on the CLI and in a recipe."""
    import subprocess
    import sys

    from hfgpu.finetune import plan_for
    from hfgpu.recipe import validate_recipe

    auto = hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 3060", strategy="lora")
    given = hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 3060", strategy="lora", lora_targets="all-linear")
    assert given.lora_targets == auto.lora_targets and "lm_head" not in given.lora_targets and given.memory.total == auto.memory.total
    assert "(all-linear, as you asked)" in given.reasons["lora"]
    recipe = validate_recipe(
        {
            "model": "Qwen/Qwen2.5-0.5B",
            "gpu": "RTX 3060",
            "data": {"path": "x.jsonl"},
            "strategy": "lora",
            "lora": {"target_modules": "all-linear"},
        }
    )
    assert plan_for(recipe).lora_targets == auto.lora_targets
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hfgpu",
            "plan",
            "Qwen/Qwen2.5-0.5B",
            "--gpu",
            "RTX 3060",
            "--strategy",
            "lora",
            "--lora-targets",
            "all-linear",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=limit(120),
    )
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads(r.stdout)["lora"]["target_modules"] == list(auto.lora_targets)
    bad = hfgpu.plan_or_closest  # a typo next to it is still refused, naming the layers
    with pytest.raises(HfgpuError, match="all_linear not among"):
        bad("Qwen/Qwen2.5-0.5B", "RTX 3060", strategy="lora", lora_targets="all_linear")


def test_what_fits_instead_is_the_nearest_plan_on_the_users_card_first():
    """A lighter strategy in order (LoRA before QLoRA), then a shorter sequence, then a smaller model of the same
    family from the catalog, and only then a larger card."""
    with pytest.raises(DoesNotFit) as e:
        hfgpu.plan("meta-llama/Llama-3.1-8B", "RTX 4090", strategy="full")
    assert e.value.alternatives[0].startswith("strategy='lora' fits")
    with pytest.raises(DoesNotFit) as e:
        hfgpu.plan("meta-llama/Llama-3.1-8B", "2x RTX 3090", strategy="full", distributed="zero3")
    assert e.value.alternatives[0].startswith("strategy='lora' fits")
    with pytest.raises(DoesNotFit) as e:
        hfgpu.plan("meta-llama/Llama-3.1-8B", "GTX 1060 6GB", seq_len=2048)
    alts = e.value.alternatives
    smaller = next(i for i, a in enumerate(alts) if a.startswith("the smaller meta-llama/Llama-3.2-"))
    card = next(i for i, a in enumerate(alts) if a.startswith("a GeForce"))
    assert smaller < card and "does not fit on" in str(e.value) and "the smaller meta-llama/Llama-3.2-" in str(e.value)


def test_a_plan_within_the_models_known_error_of_the_budget_is_tight():
    """The margin is shown; a plan whose margin is under the memory model's known error (measured against
    simulations, memory.known_error) is "tight" — in its header, plan.json and a warning that says what to do."""
    from hfgpu import memory

    roomy = hfgpu.plan("Qwen/Qwen2.5-0.5B", "RTX 4090", strategy="lora", seq_len=512, micro_batch_size=1)
    assert roomy.fit == "fits" and not roomy.tight and roomy.memory.margin == roomy.memory.budget - roomy.memory.total
    error = memory.known_error(roomy.setup())
    assert 0 < error < 0.1
    # a card whose budget leaves half the known error as margin
    budget = roomy.memory.total + 0.5 * error * roomy.memory.tensor_peak
    card = GPU(name="snug card", vram_gb=budget / (1 - memory.COEFFICIENTS["headroom"]) / 2**30, compute_capability=(8, 9))
    same = {k: getattr(roomy, k) for k in ("gradient_checkpointing", "chunked_loss", "optimizer", "precision")}
    snug = hfgpu.plan("Qwen/Qwen2.5-0.5B", card, strategy="lora", seq_len=512, micro_batch_size=1, **same)
    assert snug.memory.total == roomy.memory.total
    assert snug.fits and snug.tight and snug.fit == "tight" and snug.to_dict()["fit"] == "tight"
    assert snug.to_dict()["memory"]["margin"] == snug.memory.margin
    assert any(w.startswith("tight fit:") and "known error for lora" in w and "--verify" in w for w in snug.warnings)
    assert "FITS (TIGHT)" in str(snug) and "to spare" in str(snug)


def test_the_fastest_plan_that_fits_is_chosen_and_the_runner_up_is_named():
    """Llama-3.1-8B QLoRA on an RTX 3060 12 GB kept 2.9 GiB of full logits at micro-batch 1 because it fitted
    without the chunked loss; the chunked loss is free and leaves room for a larger, faster micro-batch."""
    from hfgpu import memory, search
    from hfgpu.knobs import PYTHON, Knobs
    from hfgpu.throughput import tokens_per_second

    p = hfgpu.plan("meta-llama/Llama-3.1-8B", "RTX 3060")
    assert p.strategy == "qlora" and p.knobs.chunked_loss and p.micro_batch_size > 1
    assert "the runner-up" in p.reasons["micro_batch_size"] and "fastest" in p.reasons["micro_batch_size"]
    # no plan that fits with room at this strategy and optimizer is estimated more than the resolution faster
    c = search.problem(p.spec, p.gpu, Knobs(), PYTHON, True)
    best = p.tokens_per_second_estimate
    chosen = dict(
        precision=p.precision, frozen_dtype=p.knobs.frozen_dtype, strategy=p.strategy, quantization=p.quantization, optimizer=p.optimizer
    )
    for combo in search._savers(c, **chosen):
        for mb in (1, 2, 4, 8, 16):
            s = c.setup(**chosen, **combo, micro_batch_size=mb)
            m = memory.breakdown(p.spec, s, p.gpu.vram_bytes)
            if m.fits and not search.is_tight(s, m):
                assert tokens_per_second(p.spec, p.gpu, s) <= best * (1 + search.SPEED_RESOLUTION)


def test_a_larger_micro_batch_is_estimated_faster():
    from hfgpu.throughput import tokens_per_second

    p = hfgpu.plan("meta-llama/Llama-3.1-8B", "RTX 4090", strategy="qlora", seq_len=512, micro_batch_size=1)
    one, four = (tokens_per_second(p.spec, p.gpu, p.setup().replace(micro_batch_size=mb)) for mb in (1, 4))
    assert four > one * 1.02  # launches and QLoRA's dequantization are paid per micro-batch, not per token


def test_the_runner_up_sentence_agrees_with_the_choice():
    """When the runner-up is estimated as fast or faster, the reason says why the chosen plan was kept in words that
    match it: "the chunked loss … stays on" only when the chosen plan has it and the runner-up does not; otherwise
    what the runner-up would have added. (It said "the one with fewer savers … not enough to add a saver" of a plan
    that had the extra saver.)"""
    import hfgpu

    seen = set()
    for model in ("EleutherAI/pythia-160m", "Qwen/Qwen2.5-1.5B", "HuggingFaceTB/SmolLM2-135M", "meta-llama/Llama-3.2-1B"):
        for card in ("GTX 1080", "RTX 3060 12GB", "RTX 4090"):
            p = hfgpu.plan(model, card)
            reason = p.reasons["micro_batch_size"]
            assert "not enough to add a saver" not in reason and "the one with fewer savers)" not in reason
            if "so it stays on" in reason:
                assert p.chunked_loss and "without the chunked loss" in reason
                seen.add("chunked")
            if "not enough to take on" in reason:
                taken = reason.split("not enough to take on ")[1].split(";")[0]
                assert taken != "the change", reason
                seen.add("other")
    assert seen == {"chunked", "other"}  # both kinds occur on these cards
