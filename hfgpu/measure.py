"""Measure a real training step's tensor memory on CPU, to check the planner's memory model.

One step is run with the same model preparation, autocast and optimizer that training uses; a
dispatch-level tracker records the peak of live tensor bytes. The step runs with gradients of a
previous micro-batch still alive, as under gradient accumulation, which is where the planner puts
its peak (weights + gradients + optimizer state + activations + logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfgpu.memtrack import PeakTracker, state_tensors, storage_bytes
from hfgpu.modeling import DTYPES, ModelSettings, prepare_model
from hfgpu.optim import make_optimizer
from hfgpu.step import forward_backward as step_forward_backward


@dataclass(frozen=True)
class StepMemory:
    weights: int  # parameters and quantization constants
    trainable_state: int  # gradients + optimizer state
    peak: int  # the most tensor bytes alive at once during forward, backward and optimizer step (512-byte blocks)
    peak_phase: str = "forward"  # where that peak was: forward (the loss), backward (a recompute) or optimizer

    @property
    def transient(self) -> int:
        """Activations, logits and loss: what the step adds on top of its persistent state."""
        return self.peak - self.weights - self.trainable_state


def forward_backward(
    model,
    ids: torch.Tensor,
    precision: str,
    chunk_size: int | None = None,
    offload: bool = False,
    simulate: bool = False,
    adapters_16bit: bool = True,
    objective: str = "sft",
) -> torch.Tensor:
    """One micro-batch of random `ids` through training's own step (hfgpu.step.forward_backward), under
    the autocast accelerate gives training. `simulate`: fake tensors; `adapters_16bit=False`: peft's
    default fp32 copies of adapter inputs (the plain path). A preference `objective` takes `ids` as its examples'
    two sequences (micro-batch, 2, seq_len), every token a response token."""
    from hfgpu.preference import Objective

    autocast = precision != "fp32"
    goal = Objective(objective)
    batch = {"input_ids": ids, "labels": ids}
    if goal.preference:
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids)}
        if goal.needs_reference and not hasattr(model, "disable_adapter"):  # full fine-tuning: precomputed
            batch["ref_logps"] = torch.zeros(ids.shape[:2])
        if goal.record.loss == "unpaired":  # labelled completions
            batch["label"] = torch.ones(ids.shape[0], dtype=torch.bool)
    return step_forward_backward(
        model,
        batch,
        chunk=chunk_size,
        adapters_16bit=autocast and adapters_16bit,
        offload=offload,
        autocast=DTYPES[precision] if autocast else None,
        simulate=simulate,
        objective=goal,
    )


def tracked_step(
    model,
    optimizer,
    ids: torch.Tensor,
    precision: str,
    chunk_size: int | None = None,
    offload: bool = False,
    simulate: bool = False,
    adapters_16bit: bool = True,
    objective: str = "sft",
) -> StepMemory:
    """One warm-up step (gradients and optimizer state come to exist), then one tracked step with the
    previous gradients still alive, as under accumulation. `optimizer` may be None (state added by the caller).
    The other arguments are forward_backward's."""

    def step():
        forward_backward(model, ids, precision, chunk_size, offload, simulate, adapters_16bit, objective)

    step()
    if optimizer is not None:
        optimizer.step()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    weights = storage_bytes(state_tensors(model)) - storage_bytes(grads)
    trainable_state = storage_bytes(state_tensors(model, optimizer)) - weights
    with PeakTracker(baseline=state_tensors(model, optimizer)) as tracker:
        step()
        if optimizer is not None:
            tracker.phase = "optimizer"
            optimizer.step()
    return StepMemory(weights=weights, trainable_state=trainable_state, peak=tracker.peak_bytes, peak_phase=tracker.peak_phase)


def measure_step(config, settings: ModelSettings, micro_batch_size: int, seq_len: int, optimizer: str = "adamw_torch") -> StepMemory:
    """The tensor memory of a real training step on CPU tensors."""
    model = prepare_model(config, settings)
    model.train()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer)
    ids = torch.randint(0, config.vocab_size, (micro_batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    return tracked_step(model, opt, ids, settings.precision)
