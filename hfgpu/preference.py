"""Preference objectives: per-sequence log-probabilities by slices of tokens and the DPO, IPO, SimPO, ORPO and KTO
losses on them, the rewards and accuracy a run logs, and the reference (the data: hfgpu.preference_data).

The `objective` knob (hfgpu.knobs) selects one; the training loop (hfgpu.train) runs `pair_loss` in place of the
next-token loss, in the same step function (hfgpu.step). Checked against TRL's DPOTrainer on the same model and
batch (tests/test_preference.py).

A loader batch holds each pair's two sequences side by side, (pairs, 2, tokens): [:, 0] chosen, [:, 1] rejected,
so that splitting it by rows (the OOM back-off) keeps pairs whole; `flat_pairs` turns it into TRL's layout (the
chosen sequences first, the rejected second), each prompt + response, with `completion_mask` marking the response.
Log-probabilities are computed from the decoder's final hidden states through lm_head one slice of tokens at a
time, each slice recomputed in backward (activation checkpointing of the head), so batch × 2 × seq × vocab logits
never exist.

References: DPO, Rafailov et al. 2023 (β = 0.1); IPO, Azar et al. 2023 (per-token average, TRL's form);
SimPO, Meng et al. 2024 (β = 2.0, γ/β = 0.5, length-normalised, no reference); ORPO, Hong et al. 2024 (λ = 0.1,
no reference); KTO, Ethayarajh et al. 2024 (β = 0.1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hfgpu import objectives
from hfgpu.loss import final_hidden_states
from hfgpu.patches import sliced_linear, sliced_linear_grad
from hfgpu.preference_data import collate_pairs, flat_pairs


@dataclass(frozen=True)
class Objective:
    """What the loss is: `sft` (next-token) or a preference objective with its hyper-parameters (None: the paper's)."""

    name: str = "sft"
    beta: float | None = None
    gamma_ratio: float = 0.5  # SimPO: γ = gamma_ratio · β
    desirable_weight: float = 1.0  # KTO: λ_D
    undesirable_weight: float = 1.0  # KTO: λ_U

    @property
    def record(self) -> objectives.Objective:
        """What the objective is (hfgpu.objectives): its data, reference, loss."""
        return objectives.objective(self.name)

    @property
    def preference(self) -> bool:
        """Trained on preference examples (pairs, or KTO's labelled completions), each (2, tokens) in a batch."""
        return self.record.preference

    @property
    def needs_reference(self) -> bool:
        return self.record.reference


class _SlicedTokenLogps(torch.autograd.Function):
    """log p(target | hidden) per token through lm_head `weight`, `chunk_size` tokens at a time: each slice's fp32
    logits exist only inside the loop, in forward and again in backward (recomputed), as the chunked loss's do, and
    nothing but the hidden states (a view) is saved. The gradient of a token's log-prob with respect to its logits is
    one-hot − softmax, scaled by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, dtype):
        sliced = weight.dtype in (torch.float16, torch.bfloat16) and dtype == torch.float32 and not weight.requires_grad
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        w = None if sliced else weight.to(dtype)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)
                logits = sliced_linear(h, weight).float() if sliced else (h @ w.t()).float()
                t = targets[start : start + chunk_size].unsqueeze(1)
                out[start : start + chunk_size] = (logits.gather(1, t) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size, ctx.dtype, ctx.sliced = chunk_size, dtype, sliced
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        dtype, sliced = ctx.dtype, ctx.sliced
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = None if sliced else weight.to(dtype)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                h = hidden[start : start + ctx.chunk_size].to(dtype)
                logits = sliced_linear(h, weight).float() if sliced else (h @ w.t()).float()
                t = targets[start : start + ctx.chunk_size].unsqueeze(1)
                g = grad_out[start : start + ctx.chunk_size].float().unsqueeze(1)
                # d logp / d logits = one-hot − softmax, built in place in the fp32 logits
                probs = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True)).exp_()
                probs.scatter_add_(1, t, -torch.ones_like(g)).mul_(-g)
                d = probs.to(dtype)
                del logits, probs
                if need_h:
                    grad_h[start : start + ctx.chunk_size] = sliced_linear_grad(d, weight) if sliced else d @ w
                if need_w:
                    grad_w.add_(d.t() @ h)  # in the matmul dtype, as the chunked loss's (no fp32 V × h temporary)
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None


def token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, chunk_size: int = 1024, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """log p(token t+1 | ≤ t) for every position (b, s-1), fp32, from the final hidden states (b, s, h) through
    lm_head `weight` (V, h), `chunk_size` tokens at a time (the full logits never exist). `dtype`: the matmuls'
    (default: autocast's when it is on, else the hidden states')."""
    if dtype is None:
        kind = hidden.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    b, s, h = hidden.shape
    # every position's next token (the last position's target is a dummy, cut below): the hidden states stay a view
    targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).reshape(-1)
    per_token = _SlicedTokenLogps.apply(hidden.reshape(-1, h), weight, targets, chunk_size, dtype)
    return per_token.view(b, s)[:, :-1]


def sequence_logps(
    model, batch: dict, chunk_size: int = 1024, dtype: torch.dtype | None = None, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the response tokens' log-probs, number of response tokens) per sequence of `batch` (input_ids,
    completion_mask; right-padded), through `model` itself (DDP's hooks run); `weight`: lm_head's (default the
    model's output embeddings).

    No attention mask is passed: padding is on the right, so under the causal mask no real token ever attends to
    it, and what the padding positions compute is masked out of the sums. The forward is then the plain causal one
    (SDPA's flash path, no tokens × tokens mask), the one the planner counts and --verify simulates."""
    inputs = {"input_ids": batch["input_ids"]}
    hidden = final_hidden_states(model, inputs)
    if weight is None:
        weight = getattr(model, "module", model).get_output_embeddings().weight
    per_token = token_logps(hidden, weight, batch["input_ids"], chunk_size, dtype)
    mask = batch["completion_mask"][:, 1:].to(per_token.dtype)
    return (per_token * mask).sum(1), mask.sum(1)


@torch.no_grad()
def reference_logps(
    model, batch: dict, chunk_size: int = 1024, dtype: torch.dtype | None = None, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference's log-probs from a peft model: the base with its adapters disabled (no second copy in memory).
    A model without adapters (full fine-tuning) has no frozen copy: its reference comes precomputed in the batch."""
    unwrapped = getattr(model, "module", model)
    if not hasattr(unwrapped, "disable_adapter"):
        raise ValueError("a model without adapters has no reference in it: precompute the reference log-probs (ref_logps)")
    with unwrapped.disable_adapter():
        return sequence_logps(model, batch, chunk_size, dtype, weight)[0]


@dataclass(frozen=True)
class PreferenceStats:
    """What a step logs: the loss and `sums` over its examples, (rewards of chosen/desirable, their count, rewards of
    rejected/undesirable, their count, wins, examples): sums add over micro-batches and processes. A pair wins when
    its chosen reward beats its rejected one; a KTO completion when its reward has its label's sign."""

    loss: torch.Tensor
    sums: torch.Tensor
    rewards_chosen: torch.Tensor | None = None  # per pair (paired objectives)
    rewards_rejected: torch.Tensor | None = None

    @property
    def accuracy(self) -> float:
        return describe_sums(self.sums.tolist())["rewards/accuracy"]

    @property
    def margin(self) -> float:
        return describe_sums(self.sums.tolist())["rewards/margin"]


def _pair_sums(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    n = torch.tensor(float(c.numel()), device=c.device)
    return torch.stack([c.sum(), n, r.sum(), n, (c > r).float().sum(), n]).detach().float()


def preference_loss(
    objective: str,
    logps: torch.Tensor,
    lengths: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    beta: float | None = None,
    gamma_ratio: float = 0.5,
) -> PreferenceStats:
    """The objective's mean loss over the pairs of a [chosen; rejected] batch, from the policy's summed response
    log-probs `logps` (2n), the response lengths (2n) and, for DPO/IPO, the reference's `ref_logps` (2n).

    - dpo:   -log σ(β · ((π_c − ref_c) − (π_r − ref_r)))                      rewards β · (π − ref)
    - ipo:   ((π_c − ref_c)/|c| − (π_r − ref_r)/|r| − 1/(2β))²                 rewards β · (π − ref)
    - simpo: -log σ(β · (π_c/|c| − π_r/|r|) − γ),  γ = gamma_ratio · β        rewards β · π/|y|
    - orpo:  NLL of the chosen response (per token) − β · log σ(log odds_c − log odds_r),
             log odds = log p − log(1 − p), p = exp(π/|y|)                     rewards β · π/|y|
    """
    if objective not in PAIR_LOSSES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(PAIR_LOSSES)}")
    record = objectives.objective(objective)
    beta = record.defaults["beta"] if beta is None else beta
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    chosen, rejected = logps.chunk(2)
    len_c, len_r = lengths.clamp(min=1).chunk(2)
    if record.reference:
        if ref_logps is None:
            raise ValueError(f"{objective} needs the reference model's log-probs")
        ref_c, ref_r = ref_logps.chunk(2)
        # against the reference: the policy's log-ratios, rewards β · (π − ref)
        side_c, side_r = chosen - ref_c, rejected - ref_r
    else:
        # no reference: length-normalised log-probs, rewards β · π/|y|
        side_c, side_r = chosen / len_c, rejected / len_r
    rewards_c, rewards_r = beta * side_c.detach(), beta * side_r.detach()
    losses = PAIR_LOSSES[objective](side_c, side_r, len_c, len_r, beta, gamma_ratio)
    return PreferenceStats(loss=losses.mean(), sums=_pair_sums(rewards_c, rewards_r), rewards_chosen=rewards_c, rewards_rejected=rewards_r)


# each pair objective's per-pair losses from its two sides (the log-ratios against the reference, or the
# length-normalised log-probs without one: preference_loss), the response lengths, β and SimPO's γ/β
PAIR_LOSSES = {
    "dpo": lambda c, r, len_c, len_r, beta, g: -F.logsigmoid(beta * (c - r)),
    "ipo": lambda c, r, len_c, len_r, beta, g: (c / len_c - r / len_r - 1 / (2 * beta)) ** 2,
    "simpo": lambda c, r, len_c, len_r, beta, g: -F.logsigmoid(beta * (c - r) - g * beta),
    "orpo": lambda c, r, len_c, len_r, beta, g: (
        -c - beta * F.logsigmoid((c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r))))
    ),
}


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceStats:
    """KTO (Ethayarajh et al. 2024, eq. 7, TRL's loss_type kto): the mean over the completions of

        desirable:    λ_D · (1 − σ(β · (π − ref − z₀)))          rewards β · (π − ref)
        undesirable:  λ_U · (1 − σ(β · (z₀ − (π − ref))))

    from the policy's and the reference's summed completion log-probs (n), the labels (n, true: desirable) and the
    KL baseline z₀ (detached, ≥ 0). Masks, not index selection: shapes never depend on the labels (the step is
    simulated on fake tensors)."""
    beta = objectives.objective("kto").defaults["beta"] if beta is None else beta
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    ratio = logps - ref_logps
    good = labels.bool()
    losses = torch.where(
        good, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))), undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    )
    rewards = beta * ratio.detach()
    g, b = good.float(), (~good).float()
    wins = ((rewards > 0) & good).float().sum() + ((rewards < 0) & ~good).float().sum()
    sums = torch.stack([(rewards * g).sum(), g.sum(), (rewards * b).sum(), b.sum(), wins, g.sum() + b.sum()]).detach().float()
    return PreferenceStats(loss=losses.mean(), sums=sums)


# --- the step's loss, the reference, evaluation ------------------------------------------------------


def pair_loss(
    model, batch: dict, objective: Objective, chunk_size: int, dtype: torch.dtype | None = None, weight: torch.Tensor | None = None
):
    """The objective's mean loss over the examples of a loader batch (examples, 2, tokens), and its PreferenceStats
    sums. The reference's log-probs come precomputed in the batch (full fine-tuning) or from the model with its
    adapters disabled, under no_grad and before the policy's forward (so its tensors are gone before the step's own
    peak). KTO's KL baseline comes in the batch (`kl`, set for a whole optimizer step by kto_window_kl) or from the
    batch itself (evaluation)."""
    flat = flat_pairs(batch)
    if objective.record.loss == "unpaired":
        return _kto_batch_loss(model, batch, flat, objective, chunk_size, dtype, weight)
    ref = None
    if objective.needs_reference:
        ref = flat["ref_logps"] if "ref_logps" in flat else reference_logps(model, flat, chunk_size, dtype, weight)
    logps, lengths = sequence_logps(model, flat, chunk_size, dtype, weight)
    stats = preference_loss(objective.name, logps, lengths, ref, beta=objective.beta, gamma_ratio=objective.gamma_ratio)
    return stats.loss, stats.sums


_SEQUENCES = ("input_ids", "attention_mask", "completion_mask")


def _halves(flat: dict, n: int) -> tuple[dict, dict]:
    """A KTO batch's [completions; KL sequences]."""
    return {k: flat[k][:n] for k in _SEQUENCES}, {k: flat[k][n:] for k in _SEQUENCES}


def _kto_reference(model, batch: dict, flat: dict, chunk_size: int, dtype, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's log-probs of the completions and of their KL sequences (n each)."""
    if "ref_logps" in batch:
        return batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]
    ref = reference_logps(model, {k: flat[k] for k in _SEQUENCES}, chunk_size, dtype, weight)
    return ref.chunk(2)


def _kto_batch_loss(model, batch: dict, flat: dict, objective: Objective, chunk_size: int, dtype, weight):
    n = batch["input_ids"].shape[0]
    completions, kl_seqs = _halves(flat, n)
    ref, ref_kl = _kto_reference(model, batch, flat, chunk_size, dtype, weight)
    if "kl" in batch:
        kl = batch["kl"]
    else:
        with torch.no_grad():
            kl = (sequence_logps(model, kl_seqs, chunk_size, dtype, weight)[0] - ref_kl).mean().clamp(min=0)
    logps = sequence_logps(model, completions, chunk_size, dtype, weight)[0]
    stats = kto_loss(
        logps,
        ref,
        batch["label"],
        kl,
        beta=objective.beta,
        desirable_weight=objective.desirable_weight,
        undesirable_weight=objective.undesirable_weight,
    )
    return stats.loss, stats.sums


@torch.no_grad()
def kto_window_kl(model, window: list[dict], chunk_size: int, dtype=None, weight=None, reduce=None) -> list[dict]:
    """KTO's KL baseline z₀ for one optimizer step: the mean of (policy − reference) log-probs of every mismatched KL
    sequence in the step's micro-batches (and, through `reduce`, every process's), clamped at 0, as one full batch
    would compute it; each micro-batch gets it as `kl` (one value per example, so that OOM splitting keeps it)."""
    total = None
    for b in window:
        flat = flat_pairs(b)
        _, kl_seqs = _halves(flat, b["input_ids"].shape[0])
        _, ref_kl = _kto_reference(model, b, flat, chunk_size, dtype, weight)
        policy = sequence_logps(model, kl_seqs, chunk_size, dtype, weight)[0]
        part = torch.stack([(policy - ref_kl).sum(), torch.tensor(float(policy.numel()), device=policy.device)])
        total = part if total is None else total + part
    if reduce is not None:
        total = reduce(total)
    kl = (total[0] / total[1].clamp(min=1)).clamp(min=0)
    return [{**b, "kl": kl.expand(b["input_ids"].shape[0]).to(b["input_ids"].device)} for b in window]


SUMS = 6  # the length of PreferenceStats.sums


def describe_sums(sums: list[float], prefix: str = "") -> dict[str, float]:
    """The logged metrics from PreferenceStats' sums (added over micro-batches and processes): the mean reward of the
    chosen (desirable) and rejected (undesirable) responses, the share of examples won and the margin between the
    two means. A side with no example in the sums is left out."""
    chosen, n_chosen, rejected, n_rejected, wins, n = sums
    out = {}
    if n_chosen:
        out[f"{prefix}rewards/chosen"] = chosen / n_chosen
    if n_rejected:
        out[f"{prefix}rewards/rejected"] = rejected / n_rejected
    out[f"{prefix}rewards/accuracy"] = wins / max(n, 1.0)
    if n_chosen and n_rejected:
        out[f"{prefix}rewards/margin"] = chosen / n_chosen - rejected / n_rejected
    return out


@torch.no_grad()
def eval_pairs(model, loader, accelerator, objective: Objective, chunk_size: int, dtype: torch.dtype | None = None) -> dict:
    """The preference loss and rewards over the whole eval set (all processes; accelerate's repeated rows dropped)."""
    model.eval()
    totals = torch.zeros(1 + SUMS, dtype=torch.float64, device=accelerator.device)  # loss sum, then the stats' sums
    for batch in loader:
        loss, sums = pair_loss(model, batch, objective, chunk_size, dtype)
        row = torch.cat([(loss * sums[5]).reshape(1), sums]).double().unsqueeze(0)
        totals += accelerator.gather_for_metrics(row.to(totals.device)).sum(0)
    model.train()
    loss_sum, *sums = totals.tolist()
    return {"eval_loss": loss_sum / max(sums[5], 1.0), **describe_sums(sums, "eval_")}


@torch.no_grad()
def precompute_reference(model, pairs, pad_id: int, batch_size: int, chunk_size: int, device, dtype=None, say=print) -> list:
    """The reference's log-probs of every pair, [chosen, rejected], in one no-grad pass with the model as it is
    (before training: full fine-tuning, where no frozen copy exists)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out = []
    rows = list(pairs)
    for start in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", leave=False):
        batch = {k: v.to(device) for k, v in collate_pairs(rows[start : start + batch_size], pad_id).items()}
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with autocast:  # as accelerate runs training's forward in mixed precision
            logps = sequence_logps(model, flat_pairs(batch), chunk_size, dtype)[0]
        c, r = logps.float().chunk(2)
        out += torch.stack([c, r], dim=1).tolist()
    model.train(was_training)
    return out
