"""The memory model: one function per component of a training step's peak GPU memory, in bytes.

Exact where it can be (weights, quantization constants, trainable parameters, gradients, optimizer
state: tests/test_memory.py checks each against real objects). Activations and logits come from
per-token coefficients fitted to the tensor peaks of real training steps measured on CPU
(`python benchmarks/memory_cpu.py --refit` writes resources/activation_coefficients.json, with the
versions and grid it was measured on). Everything that is not exact is named in `COEFFICIENTS`.

The peak is modelled as weights + gradients + optimizer state + activations + logits + transient +
overhead: under gradient accumulation the previous micro-batch's gradients are alive during the next
forward, so nothing here is freed before the activations peak. `transient` is what a step allocates
that does not scale with its tokens (autocast's 16-bit weight copies, bitsandbytes' dequantization
workspace, the embedding's dense gradient); `peak_phase` says which moment sets the peak: the loss
(the end of the forward, every kept activation and the logits alive), with checkpointing the
recompute of one layer in backward, or in full fine-tuning the end of backward, where the embedding's
dense gradients (exact) can outgrow a short step's activations.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache

from hfgpu import objectives
from hfgpu._package import PACKAGE
from hfgpu.knobs import KNOB_FIELDS, Knobs
from hfgpu.models import ModelSpec
from hfgpu.units import GIB

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Coefficients that are not exact, with their provenance (see DESIGN.md, "The memory model").
COEFFICIENTS = {
    # CUDA context: ~300-400 MB with lazy module loading (ptrblck, pytorch#107667, #109888); 426 MiB
    # seen on torch 2.10+cu130 (unsloth-zoo PR #1053). Budgeted at the high end.
    "cuda_context_bytes": int(0.45 * GIB),
    # cuBLAS/cuDNN workspaces created on first use, and small kernel buffers: an allowance, not measured.
    "workspace_bytes": int(0.15 * GIB),
    # Caching-allocator fragmentation on transient tensors (activations, logits): an allowance until
    # GPU calibration (issue "Memory truth") replaces it with max_memory_reserved / max_memory_allocated.
    "fragmentation": 0.10,
    # Share of the card the planner leaves unused: a desktop's display and compositor on consumer
    # cards, and the error of this model. `fits` means total <= budget = (1 - headroom) * vram.
    "headroom": 0.05,
}


@lru_cache(maxsize=1)
def cuda_measured() -> dict:
    """hfgpu/resources/cuda_measured.json: the allowances and constants a GPU check measured (written by
    scripts/apply_gpu_results.py from `make gpu-check`'s results, with their provenance); {} until one has run."""
    path = PACKAGE.joinpath("resources/cuda_measured.json")
    return json.loads(path.read_text()) if path.is_file() else {}


# measured values replace the allowances above, key by key (cuda_context_bytes, fragmentation)
COEFFICIENTS.update({k: v for k, v in cuda_measured().get("memory", {}).items() if k in COEFFICIENTS})

CHUNK_BYTES = 128 * 1024**2  # chunked loss: one slice's fp32 logits at most (hfgpu.loss)


UPCAST_SLICE_BYTES = 64 * 1024**2  # a 16-bit lm_head under fp32 compute: one fp32 slice of its rows at a time


def upcast_slice_rows(hidden_size: int) -> int:
    """Rows of a 16-bit lm_head the chunked loss casts to fp32 at once (hfgpu.loss)."""
    return max(1, UPCAST_SLICE_BYTES // (4 * hidden_size))


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per slice of the chunked loss: as many as keep one slice's fp32 logits under CHUNK_BYTES
    (multiple of 64, 64–4096). Llama-3 (128,256 tokens): 256; Llama-2 (32,000): 1024."""
    return max(64, min(4096, CHUNK_BYTES // (4 * vocab_size) // 64 * 64))


MLP_TILE = 1024  # tiled MLP: tokens per tile (hfgpu.patches.tile_mlps)


BNB_4BIT_BLOCK = 64  # bitsandbytes 4-bit blocksize for weights (BitsAndBytesConfig default)
BNB_DQ_BLOCK = 256  # double quantization groups 256 absmax values
BNB_OPT_BLOCK = 256  # 8-bit optimizers quantize state in blocks of 256
BNB_OPT_MIN_8BIT = 4096  # tensors smaller than this keep 32-bit optimizer state (bnb min_8bit_size)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak memory of one training step on one GPU, by component, in bytes."""

    weights: int  # parameters as stored (+ quantization constants)
    trainable_state: int  # gradients + optimizer state
    activations: int  # tensors saved for backward by the decoder layers
    logits: int  # lm_head output and the cross-entropy loss, forward and backward
    overhead: int  # CUDA context, workspaces, allocator fragmentation
    budget: int  # what the plan may use: the card's memory less the planner's headroom
    transient: int = 0  # per step, not per token: autocast's weight copies, dequantization workspace, embedding gradient
    peak_phase: str = "loss"  # "loss" (end of the forward), "recompute" (one checkpointed layer) or "embedding gradient" (end of backward)

    @property
    def tensor_peak(self) -> int:
        """The tensors alive at the peak: everything but the CUDA context, workspaces and fragmentation."""
        return self.weights + self.trainable_state + self.activations + self.logits + self.transient

    @property
    def total(self) -> int:
        return self.tensor_peak + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def margin(self) -> int:
        """Budget left at the peak (negative when it does not fit)."""
        return self.budget - self.total

    def to_dict(self) -> dict:
        return {
            "weights": self.weights,
            "trainable_state": self.trainable_state,
            "activations": self.activations,
            "logits": self.logits,
            "transient": self.transient,
            "overhead": self.overhead,
            "total": self.total,
            "budget": self.budget,
            "margin": self.margin,
            "peak_phase": self.peak_phase,
        }


_NOT_READ = {"grad_accum_steps", "global_batch_size"}  # knobs that do not change a step's memory
_BY_HAND = {"distributed": "none", "chunked_loss": False, "activation_offloading": False, "tiled_mlp": False}


@dataclass(frozen=True)
class Setup(Knobs):
    """A resolved knob record (no "auto" left) and the number of processes: what the memory model,
    the throughput model and the simulation take. `Plan.setup()` builds it."""

    world_size: int = 1  # processes (one per card)

    def __post_init__(self) -> None:
        super().__post_init__()
        # A setup built by hand (tests, benchmarks, the calibration grid) leaves what it does not name as
        # the old defaults: one process, no saver, alpha 2r. The planner always resolves every knob.
        for name, value in _BY_HAND.items():
            if getattr(self, name) == "auto":
                object.__setattr__(self, name, value)
        if self.frozen_dtype == "auto":  # the frozen base in the compute dtype (fp32 master weights in full fine-tuning)
            object.__setattr__(self, "frozen_dtype", "fp32" if self.strategy == "full" else self.precision)
        if self.lora_alpha == "auto" and isinstance(self.lora_r, int):
            object.__setattr__(self, "lora_alpha", 2 * self.lora_r)
        left = [f.name for f in KNOB_FIELDS if getattr(self, f.name) == "auto" and f.name not in _NOT_READ]
        if left:
            raise ValueError(f"memory.Setup needs resolved knobs; still auto: {', '.join(left)}")

    @classmethod
    def of(cls, k: Knobs, world_size: int = 1) -> "Setup":
        return cls(**{f.name: getattr(k, f.name) for f in KNOB_FIELDS}, world_size=world_size)


def sequences_per_example(s: Setup) -> int:
    """Sequences one example puts through the forward with gradients: 2 for a preference pair (both sides in one
    batch), else 1 (KTO's mismatched KL sequence runs without gradients, before it)."""
    return objectives.objective(s.objective).sequences_per_example


def step_tokens(s: Setup) -> int:
    """Tokens of one micro-batch's forward: micro-batch × sequences per example × seq_len. A preference pair's two
    sequences go through one forward; the reference's no-grad forward runs before it (its tensors are freed before
    the policy's forward starts), so it adds time, not memory."""
    return s.micro_batch_size * sequences_per_example(s) * s.seq_len


# --- exact components --------------------------------------------------------------------------------


def lora_tensors(spec: ModelSpec, r: int, targets: tuple[str, ...]) -> list[tuple[int, int]]:
    """(numel, count) of every LoRA tensor: A is r × in, B is out × r, per targeted Linear."""
    out = []
    for g in spec.linears:
        if g.name in targets:
            out += [(r * g.in_features, g.count), (g.out_features * r, g.count)]
    return out


def trainable_tensors(spec: ModelSpec, s: Setup) -> list[tuple[int, int]]:
    if s.strategy == "full":
        return list(spec.param_numels)
    return lora_tensors(spec, s.lora_r, s.lora_targets)


def trainable_params(spec: ModelSpec, s: Setup) -> int:
    return sum(n * c for n, c in trainable_tensors(spec, s))


def _quantized_linear_bytes(numel: int, out_features: int, s: Setup) -> int:
    if s.quantization == "int8":
        return numel + 4 * out_features  # int8 weight + fp32 row scales (SCB)
    blocks = math.ceil(numel / BNB_4BIT_BLOCK)
    data = math.ceil(numel / 2) + 16 * 4  # packed nibbles, 16-entry code book
    if not s.double_quant:
        return data + 4 * blocks  # fp32 absmax per block
    groups = math.ceil(blocks / BNB_DQ_BLOCK)
    return data + blocks + 4 * groups + 256 * 4 + 4  # uint8 absmax, fp32 second-level absmax and code, offset


def upcast(s: Setup) -> bool:
    """A frozen base stored in 16 bits under fp32 compute (GTX 10): each weight is cast to fp32 where it is used."""
    return s.strategy != "full" and s.frozen_dtype != s.precision


def weight_bytes(spec: ModelSpec, s: Setup) -> int:
    """Parameters as stored on the GPU, adapters included."""
    adapters = 4 * trainable_params(spec, s) if s.strategy != "full" else 0  # peft keeps adapters in fp32
    if s.strategy == "full":
        return 4 * spec.params_total + spec.buffer_bytes
    # the frozen base in frozen_dtype: embeddings, lm_head, linears (and their biases); with fp32 compute
    # and a 16-bit base everything else (norms, expert tensors) is in fp32 (hfgpu.patches.upcast_per_use)
    frozen, other = BYTES[s.frozen_dtype], BYTES[s.precision]
    embeddings = spec.embedding_params + spec.lm_head_params
    if s.quantization == "none":
        return frozen * (embeddings + spec.linear_params) + other * spec.other_params + adapters + spec.buffer_bytes
    quantized = quantized_weight_bytes(spec, s)
    # bitsandbytes keeps the linears' biases as loaded and casts them per use; everything else not quantized is
    # frozen in the compute dtype (hfgpu.modeling; peft's prepare_model_for_kbit_training would upcast it to fp32)
    return quantized + frozen * (embeddings + linear_bias_params(spec)) + other * spec.other_params + adapters + spec.buffer_bytes


def quantized_weight_bytes(spec: ModelSpec, s: Setup) -> int:
    """The linears' weights as bitsandbytes stores them (4-bit or int8, with their constants); biases not included."""
    return sum(g.count * _quantized_linear_bytes(g.in_features * g.out_features, g.out_features, s) for g in spec.linears)


def linear_bias_params(spec: ModelSpec) -> int:
    return sum(g.count * g.out_features for g in spec.linears if g.bias)


def autocast_copy_bytes(spec: ModelSpec, s: Setup) -> int:
    """Full fine-tuning under 16-bit autocast (fp32 master weights): the 16-bit weight copies a step holds at
    its peak, beyond what the other components count. Autocast caches one copy of each weight for the
    model's forward (accelerate wraps only the forward) and drops the cache when the forward returns;
    lm_head's V × h copy is autocast's on the plain path and the chunked loss's own otherwise.
    - without checkpointing each linear saves its copy for backward: all are alive at the loss;
    - with checkpointing and the plain loss (computed inside the forward): all are alive with its logits;
    - with checkpointing and the chunked loss (after the forward) the copies meet neither the logits nor
      the recompute: the step's peak is the largest of the forward's end (every decoder copy), the loss
      (lm_head's copy + the chunked logits) and one layer's recompute (+ that layer's copies), and this
      returns what that adds to max(logits, recompute), which activations + logits already count.
    Embeddings are read in fp32."""
    if s.strategy != "full" or s.precision == "fp32" or s.quantization != "none":
        return 0
    head, decoder = 2 * spec.vocab_size * spec.hidden_size, 2 * spec.linear_params
    if not (s.gradient_checkpointing and s.chunked_loss):
        return decoder + head
    logits, recompute = logits_bytes(spec, s), int(recompute_bytes(spec, s))
    peak = max(decoder, logits + head, recompute + decoder // max(spec.num_layers, 1))
    return peak - max(logits, recompute)


def embedding_gradient_bytes(spec: ModelSpec, s: Setup) -> int:
    """Full fine-tuning, the end of backward (exact): the embedding's backward builds a dense fp32 V × h
    gradient before adding it into the accumulated one. With tied embeddings lm_head's gradient waits for
    it and autograd sums the two into a third before accumulating: 3 × 4 · V · h. By then the layers'
    activations are freed, so this phase competes with the loss phase rather than adding to it."""
    if s.strategy != "full":
        return 0
    return (3 if spec.tie_word_embeddings else 1) * 4 * spec.vocab_size * spec.hidden_size


def _adam_state_bytes(numel: int, optimizer: str) -> int:
    if optimizer == "adamw_torch":
        return 8 * numel + 4  # exp_avg + exp_avg_sq in fp32, and a step counter
    if numel < BNB_OPT_MIN_8BIT:
        return 8 * numel  # bitsandbytes keeps small tensors' state in 32-bit
    return 2 * numel + 2 * 4 * math.ceil(numel / BNB_OPT_BLOCK)  # two uint8 states + fp32 absmax each


def trainable_state_bytes(spec: ModelSpec, s: Setup) -> int:
    """Gradients (fp32: master weights in full fine-tuning, fp32 adapters otherwise) + optimizer state."""
    total = 0
    tensors = trainable_tensors(spec, s)
    for numel, count in tensors:
        total += count * (4 * numel + _adam_state_bytes(numel, s.optimizer))
    if s.optimizer != "adamw_torch" and any(n >= BNB_OPT_MIN_8BIT for n, _ in tensors):
        total += 2 * 256 * 4  # the two shared 256-entry quantization maps of 8-bit state
    return total


# --- fitted components -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def activation_coefficients() -> dict:
    text = PACKAGE.joinpath("resources/activation_coefficients.json").read_text()
    return json.loads(text)


KNOWN_ERROR_DEFAULT = 0.05  # where the coefficient file names none for a mode


def known_error(s: Setup) -> float:
    """How far under a simulated step's tensor peak the model's estimate has fallen, at most, as a fraction of
    it, for this setup's mode (strategy, 16-bit or fp32, checkpointing, attention): measured on held-out real
    models at full depth by benchmarks/memory_cpu.py (`under`). A plan whose margin is smaller than this share
    of its tensor peak is "tight" (hfgpu.planner.Plan.tight)."""
    table = activation_coefficients().get("known_error", {})
    return float(table.get(mode_key(s), {}).get("under", KNOWN_ERROR_DEFAULT))


@lru_cache(maxsize=1)
def version_drift() -> str | None:
    """A warning when the installed transformers or peft (major.minor) are outside the versions the activation
    coefficients were checked on: fitted on `measured.versions`, and refitted to the same coefficients under each
    major.minor of `measured.tested` (their modules decide what a step keeps for backward). Reads package metadata
    only (no import)."""
    from importlib import metadata

    measured = activation_coefficients().get("measured", {})
    fitted, tested = measured.get("versions", {}), measured.get("tested", {})
    drift = []
    for name in ("transformers", "peft"):
        want = fitted.get(name)
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        good = set(tested.get(name, [])) | ({".".join(want.split(".")[:2])} if want else set())
        if want and ".".join(have.split(".")[:2]) not in good:
            checked = f"fitted on {want}" + (f"; same coefficients under {', '.join(sorted(good))}" if len(good) > 1 else "")
            drift.append(f"{name} {have} ({checked})")
    if not drift:
        return None
    return f"the memory model was fitted on other library versions than this machine's: {', '.join(drift)}; check the plan with --verify"


def mode_key(s: Setup, checkpointing: bool | None = None) -> str:
    """The calibration table's row for this setup: strategy, 16-bit or fp32 compute, checkpointing, attention."""
    bits = "fp32" if s.precision == "fp32" else "16bit"
    strategy = "lora" if s.strategy == "qlora" and s.quantization == "int8" else s.strategy
    attention = "eager" if s.attention == "eager" else "sdpa"
    ckpt = s.gradient_checkpointing if checkpointing is None else checkpointing
    return f"{strategy}|{bits}|{'ckpt' if ckpt else 'nockpt'}|{attention}"


def layer_features(spec: ModelSpec, s: Setup) -> dict[str, float]:
    """Per-token, per-layer sizes the fitted coefficients multiply."""
    lora_in = sum(g.count * g.in_features for g in spec.linears if g.name in s.lora_targets) / max(spec.num_layers, 1)
    f = {
        "hidden": spec.hidden_size,
        "inter": spec.intermediate_size,
        "qkv": spec.q_dim + 2 * spec.kv_dim,
        "lora_in": lora_in if s.strategy != "full" else 0.0,
    }
    if s.attention == "eager":
        f["heads_seq"] = spec.num_heads * s.seq_len  # eager attention keeps the s × s probabilities
    return f


def transient_per_token(spec: ModelSpec, s: Setup) -> tuple[float, float, float]:
    """(bytes kept through the step, bytes of one layer's backward, logits bytes) per token of the micro-batch.

    Without checkpointing every layer's saved tensors are alive when the loss is computed:
    kept = L · Σ coef·feature + c·hidden, and the loss adds to it.
    With checkpointing only each layer's input is kept (ckpt_input · L · hidden); the peak is the
    larger of the loss phase (logits) and the recompute of one layer in backward. Offloading is
    subtracted in activation_bytes (offloaded_bytes: exact).
    """
    table = activation_coefficients()["modes"]
    row = table[mode_key(s, checkpointing=False)]
    features = layer_features(spec, s)
    one_layer = sum(row["layer"].get(n, 0.0) * v for n, v in features.items())
    if s.strategy != "full" and s.lora_dropout > 0:
        # each adapter's dropout keeps its output (lora_A's input) and a bool mask, per input feature
        one_layer += features["lora_in"] * (BYTES[s.precision] + 1)
    base = row["model_hidden"] * spec.hidden_size
    logits = row["vocab"] * spec.vocab_size
    if not s.gradient_checkpointing:
        return spec.num_layers * one_layer + base, 0.0, logits
    kept = table[mode_key(s)]["ckpt_input"] * spec.num_layers * spec.hidden_size
    return kept + base, one_layer, logits


def offloaded_bytes(spec: ModelSpec, s: Setup) -> int:
    """Bytes one step moves to CPU memory and back with offloading (the pinned host memory it needs):
    the checkpointed layer inputs (the residual stream: fp32 in full fine-tuning and fp32 compute,
    else 16-bit), less the two on the GPU while one layer is recomputed (its input and the next's)."""
    if not (s.activation_offloading and s.gradient_checkpointing):
        return 0
    return max(spec.num_layers - 2, 0) * spec.hidden_size * step_tokens(s) * _residual_bytes(s)


def recompute_bytes(spec: ModelSpec, s: Setup) -> float:
    """With checkpointing: what one layer's recompute and backward hold (0 without checkpointing): the
    per-layer features × RECOMPUTE_FACTOR (its backward's gradients come on top of what the recomputed forward
    saves; see the constant's comment), the tiled MLP's intermediates for one tile of tokens only, and in full
    fine-tuning with tied embeddings lm_head's fp32 gradient, which waits through the whole backward for the
    embedding's (autograd sums the two before accumulating)."""
    if not s.gradient_checkpointing:
        return 0.0
    tokens = step_tokens(s)
    _, one_layer, _ = transient_per_token(spec, s)
    layer = tokens * one_layer
    if s.attention == "eager":
        # the backward of eager attention's softmax: the gradients of the s × s probabilities and of the
        # scores, in the compute dtype, beside what the recomputed forward saved
        layer += 2 * spec.num_heads * s.seq_len * tokens * BYTES[s.precision]
    if s.tiled_mlp:
        row = activation_coefficients()["modes"][mode_key(s, checkpointing=False)]
        layer -= max(0, tokens - MLP_TILE) * row["layer"].get("inter", 0.0) * spec.intermediate_size
    waiting = 4 * spec.vocab_size * spec.hidden_size if s.strategy == "full" and spec.tie_word_embeddings else 0
    return RECOMPUTE_FACTOR[s.tiled_mlp] * layer + waiting


def activation_bytes(spec: ModelSpec, s: Setup) -> int:
    """What the decoder layers hold at the step's peak; with checkpointing the recompute of one layer
    counts as far as it exceeds the loss phase (logits_bytes), which happens at another moment."""
    tokens = step_tokens(s)
    kept, _, _ = transient_per_token(spec, s)
    recompute = max(0.0, recompute_bytes(spec, s) - logits_bytes(spec, s))
    if s.activation_offloading and s.gradient_checkpointing:
        # on the card: two layers' inputs (exact), and one layer's recompute and backward
        row = activation_coefficients()["modes"][mode_key(s, checkpointing=False)]
        on_card = min(2, spec.num_layers) * _residual_bytes(s) * spec.hidden_size * tokens
        return int(on_card + max(row["model_hidden"] * spec.hidden_size * tokens, 0.0) + recompute)
    return int(max(tokens * kept, 0.0) + recompute)


def _loss_phase_bytes(spec: ModelSpec, s: Setup) -> int:
    """What the step holds beyond weights and state at the loss (or one layer's recompute, whichever is larger)."""
    return activation_bytes(spec, s) + logits_bytes(spec, s) + autocast_copy_bytes(spec, s) + vocab_transient_bytes(spec, s)


def peak_phase(spec: ModelSpec, s: Setup) -> str:
    """The moment of the step that sets the peak: "embedding gradient" (full fine-tuning, the end of backward)
    when its dense gradients outgrow everything the loss phase holds; else "recompute" when one checkpointed
    layer's recompute and backward outgrow the loss (logits); else "loss" (the end of the forward)."""
    if embedding_gradient_bytes(spec, s) > _loss_phase_bytes(spec, s):
        return "embedding gradient"
    return "recompute" if recompute_bytes(spec, s) > logits_bytes(spec, s) else "loss"


def transient_bytes(spec: ModelSpec, s: Setup) -> tuple[int, int]:
    """(autocast weight copies, the per-step constants: dequantization workspace, the fitted vocab × hidden
    term, and the embedding gradient as far as it outgrows the loss phase)."""
    end_of_backward = max(0, embedding_gradient_bytes(spec, s) - _loss_phase_bytes(spec, s))
    return autocast_copy_bytes(spec, s), dequant_workspace_bytes(spec, s) + vocab_transient_bytes(spec, s) + end_of_backward


# One checkpointed layer's recompute and backward: its peak over the per-layer features (one_layer, fitted
# without checkpointing: what the forward saves) was 1.31-1.37 untiled and 0.97-1.14 tiled on simulated
# Llama-3.1-8B, Llama-3.2-1B, Qwen2.5-0.5B/1.5B steps where the recompute dominates (chunked loss, 2k-16k
# tokens, with offloading, which leaves exactly this on the card); rounded up. The same holds without
# offloading (Qwen2.5-0.5B full fine-tuning, 16k tokens: 1.35). Checked against simulation in tests/test_offload.py.
RECOMPUTE_FACTOR = {False: 1.40, True: 1.20}


def _residual_bytes(s: Setup) -> int:
    """Bytes per element of the residual stream (the checkpointed layer inputs): fp32 in full
    fine-tuning (fp32 master weights) and fp32 compute, else 16-bit."""
    return 4 if s.strategy == "full" or s.precision == "fp32" else 2


def vocab_transient_bytes(spec: ModelSpec, s: Setup) -> int:
    """A per-step cost that does not scale with tokens (fitted: coefficient `vocab_hidden`, bytes per
    vocab × hidden element): in full fine-tuning the embedding's and lm_head's backward build dense
    gradients before adding them into the accumulated ones; in QLoRA autocast makes a 16-bit copy of
    the fp32 lm_head that prepare_model_for_kbit_training left behind."""
    row = activation_coefficients()["modes"][mode_key(s, checkpointing=False)]
    return int(row.get("vocab_hidden", 0.0) * spec.vocab_size * spec.hidden_size)


def logits_bytes(spec: ModelSpec, s: Setup) -> int:
    tokens = step_tokens(s)
    if not s.chunked_loss:
        loss = int(tokens * max(transient_per_token(spec, s)[2], 0.0))
        if not upcast(s):
            return loss
        # a 16-bit lm_head under fp32 compute: its backward holds one fp32 slice of the head beside the logits'
        # fp32 gradient, after the loss's own peak (measured: it raises the peak only when it is the larger)
        rows = min(spec.vocab_size, upcast_slice_rows(spec.hidden_size))
        return max(loss, 4 * tokens * spec.vocab_size + 4 * rows * spec.hidden_size)
    # one slice at a time: its fp32 logits and logsumexp's fp32 temporary (8 bytes per logit, exact);
    # the hidden states' gradient (and, when lm_head trains, an fp32 gradient of lm_head) wait from
    # the loss to backward (checked by simulation: tests/test_loss.py)
    held = tokens * spec.hidden_size * _residual_bytes(s) + (4 * spec.vocab_size * spec.hidden_size if s.strategy == "full" else 0)
    # a 16-bit lm_head under fp32 compute: one fp32 slice of its rows and that slice's logits (hfgpu.loss)
    chunk = min(tokens, loss_chunk_tokens(spec.vocab_size))
    rows = min(spec.vocab_size, upcast_slice_rows(spec.hidden_size))
    sliced = upcast(s) * 4 * rows * (spec.hidden_size + chunk)
    return chunk * spec.vocab_size * 8 + held + sliced


def dequant_workspace_bytes(spec: ModelSpec, s: Setup) -> int:
    """bitsandbytes dequantizes one weight at a time to the compute dtype (and its gradient input in backward);
    a 16-bit base under fp32 compute casts one weight at a time to fp32 (hfgpu.patches._UpcastLinear)."""
    largest = max((g.in_features * g.out_features for g in spec.linears), default=0)
    if s.quantization == "none":  # one slice of rows of one weight at a time
        return upcast(s) * max((4 * g.in_features * min(g.out_features, upcast_slice_rows(g.in_features)) for g in spec.linears), default=0)
    return 2 * largest * BYTES[s.precision]


def overhead_bytes(activations: int, logits: int) -> int:
    c = COEFFICIENTS
    return c["cuda_context_bytes"] + c["workspace_bytes"] + int(c["fragmentation"] * (activations + logits))


def budget_bytes(vram_bytes: int) -> int:
    return int(vram_bytes * (1 - COEFFICIENTS["headroom"]))


SHARDED_WEIGHTS = ("fsdp", "zero3")  # parameters, gradients and optimizer state sharded across processes
SHARDED_STATE = ("fsdp", "zero2", "zero3")  # gradients and optimizer state sharded


def per_process(spec: ModelSpec, s: Setup) -> tuple[int, int]:
    """(weights, trainable state) held by one process under the distributed mode.

    - ddp: everything replicated; DDP's gradient buckets hold a second copy of the gradients.
    - zero2: weights replicated; gradients and optimizer state split N ways.
    - fsdp / zero3 (full sharding): weights, gradients and optimizer state split N ways, plus one
      decoder layer's weights gathered whole while it runs (forward, and again in backward).
    """
    weights, state = weight_bytes(spec, s), trainable_state_bytes(spec, s)
    n = max(1, s.world_size)
    if s.distributed == "ddp" and n > 1:
        grads = 4 * trainable_params(spec, s)
        return weights, state + grads
    if s.distributed in SHARDED_STATE and n > 1:
        state = math.ceil(state / n)
    if s.distributed in SHARDED_WEIGHTS and n > 1:
        layer = weights // max(spec.num_layers, 1)  # one layer's share of the stored weights, gathered
        weights = math.ceil(weights / n) + layer
    return weights, state


def breakdown(spec: ModelSpec, s: Setup, vram_bytes: int, correction: float = 1.0) -> MemoryBreakdown:
    """`correction`: a card's measured/planned ratio for the non-exact parts (hfgpu calibrate)."""
    act = int(activation_bytes(spec, s) * correction)
    logits = int(logits_bytes(spec, s) * correction)
    weights, state = per_process(spec, s)
    copies, constants = transient_bytes(spec, s)
    n = max(1, s.world_size)
    if s.distributed in SHARDED_WEIGHTS and n > 1:  # copies of the shard, and of the layer gathered whole
        copies = math.ceil(copies / n) + copies // max(spec.num_layers, 1)
    constants = int(constants * correction)
    return MemoryBreakdown(
        weights=weights,
        trainable_state=state,
        activations=act,
        logits=logits,
        overhead=int(overhead_bytes(act + constants, logits) * correction),
        budget=budget_bytes(vram_bytes),
        transient=copies + constants,
        peak_phase=peak_phase(spec, s),
    )
