"""Simulate one real training step on fake tensors to check a plan's memory (`hfgpu plan --verify`).

The real transformers modules, the real peft wrapping and the real optimizer step run under
`FakeTensorMode` on CPU-device tensors: no weights, no GPU, only shapes and dtypes. A dispatch-level
tracker (hfgpu.memtrack.PeakTracker) records the peak of live tensor bytes, exactly as it does for a
real CPU step (tests/test_simulate.py checks the two agree). Differences from a GPU that are mapped
explicitly: 4-bit bitsandbytes weights cannot run on fake tensors, so a QLoRA base is simulated in
the compute dtype and its bytes are replaced by the exact NF4 bytes plus bitsandbytes'
dequantization workspace; SDPA runs its flash kernel on CPU as on CUDA (no s×s matrix); the CUDA
context, workspaces and allocator slack are outside tensor peaks and come from the planner's
allowances.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from hfgpu import memory, objectives
from hfgpu.measure import tracked_step
from hfgpu.modeling import DTYPES, ModelSettings, apply_settings


@dataclass(frozen=True)
class Simulation:
    weights: int
    trainable_state: int
    peak: int  # tensor peak of one step: weights + state + activations + logits
    seconds: float
    peak_phase: str = "forward"  # where the peak was set: forward (the loss), backward or optimizer

    @property
    def transient(self) -> int:
        return self.peak - self.weights - self.trainable_state

    def to_dict(self) -> dict:
        return {
            "weights": self.weights,
            "trainable_state": self.trainable_state,
            "transient": self.transient,
            "peak": self.peak,
            "peak_phase": self.peak_phase,
            "seconds": round(self.seconds, 2),
        }


@contextlib.contextmanager
def _unpacked_masks():
    # transformers looks for packed sequences in position_ids; on fake tensors that check cannot read
    # values, so it would assume packing and build an explicit s × s mask a real unpacked batch never has.
    from transformers import masking_utils

    real = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = real


@contextlib.contextmanager
def _no_module_to():
    # Under FakeTensorMode Module.to() fails ("Couldn't swap … weakref"); peft calls it while wrapping.
    real = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.nn.Module.to = real


def simulate(config: dict, s: memory.Setup, spec=None, plain_path: bool = False) -> Simulation:
    """Peak tensor bytes of one training step for `config` under setup `s` (a Plan's knobs).

    `plain_path=True` simulates the plain transformers + peft path hfgpu improves on: transformers'
    RMSNorm, peft's fp32 copies of each adapter's input, and for QLoRA peft's
    prepare_model_for_kbit_training (every non-quantized parameter in fp32)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from hfgpu.models import model_spec, pretrained_config
    from hfgpu.optim import make_optimizer

    start = time.perf_counter()
    cfg = pretrained_config(config)
    if s.precision == "fp32" and (getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)):
        from hfgpu.errors import HfgpuError

        raise HfgpuError(
            "--verify cannot simulate a mixture-of-experts step in fp32 (torch's fake-tensor grouped matmul takes bf16 only, "
            "and transformers' eager experts have data-dependent shapes): plan without --verify, or with precision bf16"
        )
    settings = ModelSettings.from_knobs(s)
    quantized = s.quantization != "none"
    storage = settings.storage_dtype
    with FakeTensorMode(allow_non_fake_inputs=True), _unpacked_masks():
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=storage, attn_implementation="sdpa" if s.attention == "flash_attention_2" else s.attention
        )
        simulated_linear = 0
        if quantized:  # the linears bitsandbytes quantizes are simulated in the compute dtype it dequantizes to
            head = model.get_output_embeddings()
            linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]
            for m in linears:
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(DTYPES[s.precision])
            simulated_linear = sum(p.numel() * p.element_size() for m in linears for p in m.parameters(recurse=False))
        if quantized and plain_path:  # what prepare_model_for_kbit_training leaves: every non-quantized parameter in fp32
            for module in model.modules():
                if not isinstance(module, torch.nn.Linear) or module is model.get_output_embeddings():
                    for p in module.parameters(recurse=False):
                        p.data = p.data.float()
        with _no_module_to():
            model = apply_settings(model, settings, plain_path=plain_path)
        model.train()
        # bitsandbytes' 8-bit optimizers read tensor values (block maxima), which fake tensors lack:
        # their state is exact analytically (tests/test_memory.py), so it is added, not simulated.
        optimizer = (
            make_optimizer([p for p in model.parameters() if p.requires_grad], s.optimizer) if s.optimizer == "adamw_torch" else None
        )
        # a preference batch holds each example's two sequences (a pair's, or a KTO completion and its KL sequence)
        shape = (
            (s.micro_batch_size, 2, s.seq_len)
            if objectives.objective(s.objective).batch_sequences == 2
            else (s.micro_batch_size, s.seq_len)
        )
        ids = torch.randint(0, cfg.vocab_size, shape)
        chunk = memory.loss_chunk_tokens(cfg.vocab_size) if s.chunked_loss else None
        step = tracked_step(
            model,
            optimizer,
            ids,
            s.precision,
            chunk,
            offload=s.activation_offloading and s.gradient_checkpointing,
            simulate=True,
            adapters_16bit=not plain_path,
            objective=s.objective,
        )
    weights, state, peak = step.weights, step.trainable_state, step.peak
    if optimizer is None:
        spec = spec or model_spec(config)
        analytic_state = memory.trainable_state_bytes(spec, s) - 4 * memory.trainable_params(spec, s)
        state += analytic_state
        peak += analytic_state
    if quantized:
        spec = spec or model_spec(config)
        # NF4 weights (and the biases bitsandbytes keeps in the load dtype) replace the compute-dtype linears
        exact_linear = memory.quantized_weight_bytes(spec, s) + memory.BYTES[s.frozen_dtype] * memory.linear_bias_params(spec)
        correction = exact_linear - simulated_linear
        weights += correction
        peak += correction + memory.dequant_workspace_bytes(spec, s)
    return Simulation(weights=weights, trainable_state=state, peak=peak, seconds=time.perf_counter() - start, peak_phase=step.peak_phase)
