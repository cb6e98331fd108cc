"""The planner's throughput estimate: peak FLOPS × a stated utilization ÷ FLOPs per token, plus the
time costs of the memory savers. An estimate, labelled as such wherever it is shown. Torch-free.
"""

from __future__ import annotations

from hfgpu import memory, objectives
from hfgpu.gpus import GPU
from hfgpu.knobs import planning_cc
from hfgpu.models import ModelSpec

# Share of peak FLOPS a run reaches: an estimate (MFU of transformers + peft loops on consumer cards
# is commonly 25-45 %; QLoRA pays for dequantization). Replace with measured tokens/s when calibrated.
UTILIZATION = {"full": 0.40, "lora": 0.35, "qlora": 0.25}
# Time costs of the memory savers (hfgpu.loss, hfgpu.offload), as shares of a step's compute:
# the chunked loss does the plain path's FLOPs in smaller matmuls without its fp32 copies of the logits:
# benchmarks/memory_savings.py measures it at 0.90-0.93 of the plain step's time on CPU, so it is charged as
# free (not as a gain) until the GPU layer measures it; offloading costs the copy back of the layer inputs over PCIe, which is
# queued on the compute stream (the copy out overlaps compute). 12 GB/s: PCIe 3.0 x16 or 4.0 x8 in practice.
CHUNKED_LOSS_COST = 0.0
TILED_MLP_COST = 0.05  # smaller matmuls; no extra FLOPs (the checkpoint's recompute stops before the MLP)
PCIE_BYTES_PER_S = 12e9
# What a micro-batch costs whatever its size, so that larger micro-batches are faster:
# - launching its kernels: eager PyTorch + peft run ~40 kernels per decoder layer and pass (7 LoRA linears of
#   3-4 kernels each, attention, norms, activations) at ~12 µs of host time each. An estimate until the GPU
#   layer (tests/gpu) measures tokens/s against micro-batch;
# - a frozen base stored other than it computes: bitsandbytes dequantizes each 4-bit weight to the compute
#   dtype in every pass, and a 16-bit base under fp32 compute is cast per use (GTX 10): the stored bytes read
#   and the compute-dtype copy written, at the card's memory bandwidth (a separate kernel: not overlapped).
LAUNCH_SECONDS_PER_LAYER_PASS = 0.5e-3
# what a GPU check measured replaces these estimates (hfgpu/resources/cuda_measured.json, scripts/apply_gpu_results.py)
_measured = memory.cuda_measured().get("throughput", {})
UTILIZATION.update({k: v for k, v in _measured.get("utilization", {}).items() if k in UTILIZATION})
LAUNCH_SECONDS_PER_LAYER_PASS = _measured.get("launch_seconds_per_layer_pass", LAUNCH_SECONDS_PER_LAYER_PASS)


def tokens_per_second(spec: ModelSpec, gpu: GPU, setup: memory.Setup) -> float | None:
    """Compute-bound estimate: peak FLOPS × utilization, plus the memory savers' time costs."""
    compute = compute_tokens_per_second(spec, gpu, setup)
    if compute is None:
        return None
    seconds = (1 + (CHUNKED_LOSS_COST if setup.chunked_loss else 0.0) + (TILED_MLP_COST if setup.tiled_mlp else 0.0)) / compute
    tokens = memory.step_tokens(setup)
    seconds += memory.offloaded_bytes(spec, setup) / PCIE_BYTES_PER_S / tokens * gpu.count
    seconds += micro_batch_seconds(spec, gpu, setup) / tokens / gpu.count
    return 1 / seconds


def micro_batch_seconds(spec: ModelSpec, gpu: GPU, setup: memory.Setup) -> float:
    """The part of one micro-batch's time that does not grow with its tokens (see LAUNCH_SECONDS_PER_LAYER_PASS)."""
    passes = _passes(setup.strategy) + (1.0 if setup.gradient_checkpointing else 0.0) + reference_passes(setup)
    seconds = LAUNCH_SECONDS_PER_LAYER_PASS * spec.num_layers * passes
    if gpu.bandwidth_gbps and (setup.quantization != "none" or memory.upcast(setup)):
        stored = {"nf4": 0.5, "fp4": 0.5, "int8": 1.0}.get(setup.quantization, memory.BYTES[setup.frozen_dtype])
        moved = (stored + memory.BYTES[setup.precision]) * spec.linear_params
        seconds += passes * moved / (gpu.bandwidth_gbps * 1e9)
    return seconds


def compute_tokens_per_second(spec: ModelSpec, gpu: GPU, setup: memory.Setup) -> float | None:
    cc = planning_cc(gpu)
    if setup.precision == "fp32" or gpu.tensor_tflops is None:
        peak = gpu.fp32_tflops
        if setup.precision == "fp16" and peak and cc >= (7, 5):
            peak *= 2  # GTX 16 series: no tensor cores, fp16 at twice the fp32 rate
    else:
        peak = gpu.tensor_tflops
    if not peak:
        return None
    matmul = spec.linear_params + spec.vocab_size * spec.hidden_size  # lm_head runs even when tied
    forward = 2 * matmul + 2 * spec.num_layers * setup.seq_len * spec.q_dim  # causal attention ≈ half of 4·s·d
    passes = _passes(setup.strategy) + reference_passes(setup)
    if setup.gradient_checkpointing:
        passes += 1.0
    util = UTILIZATION[setup.strategy]
    return util * peak * 1e12 / (passes * forward) * gpu.count


def reference_passes(setup: memory.Setup) -> float:
    """No-grad forwards per forward with gradients. DPO/IPO's reference: one per example (each step with LoRA/QLoRA,
    where it is the base with the adapters disabled; once before training in full fine-tuning, the same for one
    epoch). KTO: the reference on the completion and on its KL sequence, and the policy on the KL sequence."""
    return objectives.objective(setup.objective).reference_passes


def _passes(strategy: str) -> float:
    """Forward-pass equivalents of one step: forward + backward (weight gradients only when training every weight)."""
    return 3.0 if strategy == "full" else 2.0  # frozen weights skip their weight gradients


def reference_cost(setup: memory.Setup) -> float:
    """The compute the reference adds to a step, as a share of the step without it."""
    return reference_passes(setup) / (_passes(setup.strategy) + (1.0 if setup.gradient_checkpointing else 0.0))


def checkpointing_cost(strategy: str) -> float:
    """The step-time increase the estimate charges for gradient checkpointing: one more forward pass."""
    return 1.0 / _passes(strategy)
