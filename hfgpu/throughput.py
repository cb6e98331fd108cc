"""The planner's throughput estimate: peak FLOPS × a stated utilization ÷ FLOPs per token, plus the
time costs of the memory savers. An estimate, labelled as such wherever it is shown. Torch-free.
"""

from __future__ import annotations

from hfgpu import memory
from hfgpu.gpus import GPU
from hfgpu.knobs import planning_cc
from hfgpu.models import ModelSpec

# Share of peak FLOPS a run reaches: an estimate (MFU of transformers + peft loops on consumer cards
# is commonly 25-45 %; QLoRA pays for dequantization). Replace with measured tokens/s when calibrated.
UTILIZATION = {"full": 0.40, "lora": 0.35, "qlora": 0.25}
# Time costs of the memory savers (hfgpu.loss, hfgpu.offload), as shares of a step's compute:
# the chunked loss does the plain path's FLOPs in smaller matmuls (benchmarks/memory_savings.py
# measures the ratio on CPU); offloading costs the copy back of the layer inputs over PCIe, which is
# queued on the compute stream (the copy out overlaps compute). 12 GB/s: PCIe 3.0 x16 or 4.0 x8 in practice.
CHUNKED_LOSS_COST = 0.03
TILED_MLP_COST = 0.05  # smaller matmuls; no extra FLOPs (the checkpoint's recompute stops before the MLP)
PCIE_BYTES_PER_S = 12e9


def tokens_per_second(spec: ModelSpec, gpu: GPU, setup: memory.Setup) -> float | None:
    """Compute-bound estimate: peak FLOPS × utilization, plus the memory savers' time costs."""
    compute = compute_tokens_per_second(spec, gpu, setup)
    if compute is None:
        return None
    seconds = (1 + (CHUNKED_LOSS_COST if setup.chunked_loss else 0.0) + (TILED_MLP_COST if setup.tiled_mlp else 0.0)) / compute
    tokens = setup.micro_batch_size * setup.seq_len
    seconds += memory.offloaded_bytes(spec, setup) / PCIE_BYTES_PER_S / tokens * gpu.count
    return 1 / seconds


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
    passes = _passes(setup.strategy)
    if setup.gradient_checkpointing:
        passes += 1.0
    util = UTILIZATION[setup.strategy]
    return util * peak * 1e12 / (passes * forward) * gpu.count


def _passes(strategy: str) -> float:
    """Forward-pass equivalents of one step: forward + backward (weight gradients only when training every weight)."""
    return 3.0 if strategy == "full" else 2.0  # frozen weights skip their weight gradients


def checkpointing_cost(strategy: str) -> float:
    """The step-time increase the estimate charges for gradient checkpointing: one more forward pass."""
    return 1.0 / _passes(strategy)
