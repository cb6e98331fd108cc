"""Preference objectives (issue 15, first part): per-sequence log-probabilities by slices of tokens and the
DPO, IPO, SimPO and ORPO losses on them, with the rewards and accuracy a run logs.

Not yet wired into recipes, the planner or the loop (see the README's "Preference tuning" status); what is
here is checked against TRL's DPOTrainer on the same model and batch (tests/test_preference.py).

A batch holds the chosen sequences first and the rejected ones second (TRL's layout), each prompt + response,
with `completion_mask` marking the response tokens. Log-probabilities are computed from the decoder's final
hidden states through lm_head one slice of tokens at a time, each slice recomputed in backward
(activation checkpointing of the head), so batch × 2 × seq × vocab logits never exist.

References: DPO, Rafailov et al. 2023 (β = 0.1); IPO, Azar et al. 2023 (per-token average, TRL's form);
SimPO, Meng et al. 2024 (β = 2.0, γ/β = 0.5, length-normalised, no reference); ORPO, Hong et al. 2024 (λ = 0.1,
no reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hfgpu.loss import final_hidden_states

OBJECTIVES = ("dpo", "ipo", "simpo", "orpo")
NEEDS_REFERENCE = {"dpo": True, "ipo": True, "simpo": False, "orpo": False}
DEFAULTS = {"dpo": {"beta": 0.1}, "ipo": {"beta": 0.1}, "simpo": {"beta": 2.0, "gamma_ratio": 0.5}, "orpo": {"beta": 0.1}}


def _slice_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.to(hidden.dtype).t()).float()
    return torch.gather(logits.log_softmax(-1), 1, targets.unsqueeze(1)).squeeze(1)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log p(token t+1 | ≤ t) for every position (b, s-1), fp32, from the final hidden states (b, s, h) through
    lm_head `weight` (V, h), `chunk_size` tokens at a time; each slice's logits are recomputed in backward."""
    b, s, h = hidden.shape
    flat = hidden[:, :-1].reshape(-1, h)
    targets = input_ids[:, 1:].reshape(-1)
    out = []
    for start in range(0, flat.shape[0], chunk_size):
        part = (flat[start : start + chunk_size], weight, targets[start : start + chunk_size])
        if torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad):
            out.append(checkpoint(_slice_logps, *part, use_reentrant=False))
        else:
            out.append(_slice_logps(*part))
    return torch.cat(out).view(b, s - 1)


def sequence_logps(model, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the response tokens' log-probs, number of response tokens) per sequence of `batch` (input_ids,
    attention_mask, completion_mask), through `model` itself (DDP's hooks run)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    hidden = final_hidden_states(model, inputs)
    weight = getattr(model, "module", model).get_output_embeddings().weight
    per_token = token_logps(hidden, weight, batch["input_ids"], chunk_size)
    mask = batch["completion_mask"][:, 1:].to(per_token.dtype)
    return (per_token * mask).sum(1), mask.sum(1)


@torch.no_grad()
def reference_logps(model, batch: dict, chunk_size: int = 1024) -> torch.Tensor:
    """The reference's log-probs: for a peft model the base with its adapters disabled (no second copy in memory)."""
    unwrapped = getattr(model, "module", model)
    if hasattr(unwrapped, "disable_adapter"):
        with unwrapped.disable_adapter():
            return sequence_logps(model, batch, chunk_size)[0]
    return sequence_logps(model, batch, chunk_size)[0]


@dataclass(frozen=True)
class PreferenceStats:
    """What a step logs: the loss, the implicit rewards, how often chosen beats rejected, and the margin."""

    loss: torch.Tensor
    rewards_chosen: torch.Tensor  # per pair
    rewards_rejected: torch.Tensor

    @property
    def accuracy(self) -> float:
        return (self.rewards_chosen > self.rewards_rejected).float().mean().item()

    @property
    def margin(self) -> float:
        return (self.rewards_chosen - self.rewards_rejected).mean().item()


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
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    beta = DEFAULTS[objective]["beta"] if beta is None else beta
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    chosen, rejected = logps.chunk(2)
    len_c, len_r = lengths.clamp(min=1).chunk(2)
    if NEEDS_REFERENCE[objective]:
        if ref_logps is None:
            raise ValueError(f"{objective} needs the reference model's log-probs")
        ref_c, ref_r = ref_logps.chunk(2)
        ratio_c, ratio_r = chosen - ref_c, rejected - ref_r
        rewards_c, rewards_r = beta * ratio_c.detach(), beta * ratio_r.detach()
        if objective == "dpo":
            losses = -F.logsigmoid(beta * (ratio_c - ratio_r))
        else:
            losses = (ratio_c / len_c - ratio_r / len_r - 1 / (2 * beta)) ** 2
    else:
        avg_c, avg_r = chosen / len_c, rejected / len_r
        rewards_c, rewards_r = beta * avg_c.detach(), beta * avg_r.detach()
        if objective == "simpo":
            losses = -F.logsigmoid(beta * (avg_c - avg_r) - gamma_ratio * beta)
        else:  # orpo
            log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
            losses = -avg_c - beta * F.logsigmoid(log_odds)
    return PreferenceStats(loss=losses.mean(), rewards_chosen=rewards_c, rewards_rejected=rewards_r)


# --- data: pairs of responses ------------------------------------------------------------------------


def pair_problem(row: dict, cols: dict[str, str]) -> str | None:
    """Why a preference row cannot be trained on (the rule its count is reported under), or None."""
    for field in ("prompt", "chosen", "rejected"):
        value = row.get(cols.get(field, field))
        if value is None:
            return f"missing {cols.get(field, field)!r}"
        if not isinstance(value, str):
            return f"{type(value).__name__}-valued {cols.get(field, field)!r}"
    chosen, rejected = row[cols.get("chosen", "chosen")], row[cols.get("rejected", "rejected")]
    if not chosen.strip() or not rejected.strip():
        return "empty response"
    if chosen.strip() == rejected.strip():
        return "chosen and rejected identical"
    return None


def tokenize_pairs(rows: list[dict], tokenizer, max_len: int, columns: dict[str, str] | None = None) -> tuple[list[dict], dict]:
    """Plain prompt/chosen/rejected rows → per pair the chosen and rejected sequences (prompt + response + EOS,
    tokenized as hfgpu's prompt_completion format is: the masks TRL's SFTTrainer computes) and which tokens are the
    response. Returns (pairs, {rule: [1-based rows]} of the rows dropped)."""
    from hfgpu.data import IGNORE, _tokenize_batch

    cols = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", **(columns or {})}
    kept, dropped = [], {}
    for i, row in enumerate(rows):
        if (why := pair_problem(row, cols)) is None:
            kept.append((i, row))
        else:
            dropped.setdefault(why, []).append(i + 1)
    sides = {}
    for side in ("chosen", "rejected"):
        batch = {"prompt": [r[cols["prompt"]] for _, r in kept], "completion": [r[cols[side]] for _, r in kept]}
        sides[side] = _tokenize_batch(
            batch,
            [i for i, _ in kept],
            fmt="prompt_completion",
            cols={"prompt": "prompt", "completion": "completion"},
            tokenizer=tokenizer,
            template=None,
            max_len=max_len,
            train_on_prompt=False,
            too_long="truncate",
        )
    pairs = []
    for k, (i, _) in enumerate(kept):
        c, r = ({key: sides[s][key][k] for key in ("input_ids", "labels")} for s in ("chosen", "rejected"))
        if not any(x != IGNORE for x in c["labels"][1:]) or not any(x != IGNORE for x in r["labels"][1:]):
            dropped.setdefault("no response tokens within max_seq_len", []).append(i + 1)
            continue
        pairs.append(
            {
                "chosen_ids": c["input_ids"],
                "chosen_mask": [int(x != IGNORE) for x in c["labels"]],
                "rejected_ids": r["input_ids"],
                "rejected_mask": [int(x != IGNORE) for x in r["labels"]],
            }
        )
    return pairs, dropped


def collate_pairs(pairs: list[dict], pad_id: int) -> dict:
    """[chosen…; rejected…] padded on the right: input_ids, attention_mask, completion_mask (TRL's layout)."""
    seqs = [(p["chosen_ids"], p["chosen_mask"]) for p in pairs] + [(p["rejected_ids"], p["rejected_mask"]) for p in pairs]
    longest = max(len(ids) for ids, _ in seqs)
    out = {"input_ids": [], "attention_mask": [], "completion_mask": []}
    for ids, mask in seqs:
        pad = longest - len(ids)
        out["input_ids"].append(list(ids) + [pad_id] * pad)
        out["attention_mask"].append([1] * len(ids) + [0] * pad)
        out["completion_mask"].append(list(mask) + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
