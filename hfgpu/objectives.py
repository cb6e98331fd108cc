"""One record per training objective, and the registry that names them (`objective` knob: sft, dpo, ipo, simpo,
orpo, kto). Torch-free: the planner, the recipe schema and the model card read these records; the losses
(hfgpu.preference) are looked up by the record's `loss`.

What a record holds is what used to be spread over a dozen modules as comparisons of the objective's name: the data
it trains on, what a loss unit is, whether and how it needs a reference, how many sequences an example has, what it
adds to a step's compute, its hyper-parameters with their defaults, papers and the words the recipe and the card use.
A new objective is one record here plus its loss (and a test); `register` adds one at run time (tests do).

References: DPO, Rafailov et al. 2023 (β = 0.1); IPO, Azar et al. 2023 (TRL's default β); SimPO, Meng et al. 2024
(β 2.0, γ/β 0.5); ORPO, Hong et al. 2024 (λ 0.1); KTO, Ethayarajh et al. 2024 (β 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Hyper:
    """One hyper-parameter of an objective (recipe section `preference`): its default and what the recipe says of it."""

    name: str
    default: float
    comment: str
    symbol: str = "β"  # how the model card writes it: "β=0.1"


@dataclass(frozen=True)
class Objective:
    """Everything hfgpu needs to know of one objective, by attribute (never by comparing its name)."""

    name: str
    paper: str | None  # "DPO (Rafailov et al. 2023)"; None: plain next-token training
    data_format: str | None  # the data.format it trains on; None: any of the next-token formats
    rows: str  # what its data rows are, in errors: "prompt/chosen/rejected pairs"
    unit: str  # what the global batch counts: sequences, pairs, labelled completions
    sequences_per_example: int  # sequences an example puts through the forward with gradients (a pair: 2; KTO: 1)
    reference: bool  # compared with a frozen reference model (the base with the adapters disabled, or precomputed)
    reference_passes: float  # no-grad forwards per forward with gradients (the throughput model)
    loss: str | None  # hfgpu.preference's kind of loss: "pair" (PAIR_LOSSES[name]), "unpaired" (kto_loss); None: next-token
    hyper: tuple[Hyper, ...] = field(default=())
    card_rows: str = ""  # what the model card says it trained on; "" : `rows`
    # the plan's reason for the objective knob: {paper}, {micro_batch}, {sequences} (one micro-batch's sequences)
    reason: str = ""

    @property
    def preference(self) -> bool:
        """Trained on preference examples (pairs, or labelled completions), not on next tokens."""
        return self.loss is not None

    @property
    def pairs(self) -> bool:
        """Trained on prompt/chosen/rejected pairs (the pair losses)."""
        return self.loss == "pair"

    @property
    def batch_sequences(self) -> int:
        """Sequences a loader batch holds per example: (n, 2, tokens) for preference data (a pair's two sides, or a
        KTO completion and its KL sequence), (n, tokens) for next-token data."""
        return 2 if self.preference else 1

    @property
    def trained_on(self) -> str:
        return self.card_rows or self.rows

    @property
    def defaults(self) -> dict[str, float]:
        return {h.name: h.default for h in self.hyper}


_BETA_REFERENCE = "how far the policy may move from the reference; lower moves further"
REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add (or replace) an objective in the registry; returns it."""
    REGISTRY[objective.name] = objective
    return objective


def objective(name: str) -> Objective:
    """The record of `name` (validated upstream: the knob's choices are the registry's names)."""
    return REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


_PAIRS = dict(
    data_format="preference",
    rows="prompt/chosen/rejected pairs",
    unit="pairs",
    sequences_per_example=2,
    loss="pair",
    reason="{paper}: each example is a prompt with a chosen and a rejected response, both in one forward (micro-batch "
    "{micro_batch} = {sequences} sequences of seq_len), log-probabilities by slices of tokens",
)
for _o in (
    Objective("sft", None, None, "rows", "sequences", 1, False, 0.0, None),
    Objective(
        "dpo",
        "DPO (Rafailov et al. 2023)",
        reference=True,
        reference_passes=1.0,
        hyper=(Hyper("beta", 0.1, f"β (DPO paper): {_BETA_REFERENCE}"),),
        **_PAIRS,
    ),
    Objective(
        "ipo",
        "IPO (Azar et al. 2023)",
        reference=True,
        reference_passes=1.0,
        hyper=(Hyper("beta", 0.1, "β (IPO, τ in the paper): the regularisation; the target margin is 1/(2β)"),),
        **_PAIRS,
    ),
    Objective(
        "simpo",
        "SimPO (Meng et al. 2024)",
        reference=False,
        reference_passes=0.0,
        hyper=(
            Hyper("beta", 2.0, "β (SimPO paper): the scale of the length-normalised reward"),
            Hyper("gamma_ratio", 0.5, "γ/β (SimPO paper): the target reward margin as a share of β", "γ/β"),
        ),
        **_PAIRS,
    ),
    Objective(
        "orpo",
        "ORPO (Hong et al. 2024)",
        reference=False,
        reference_passes=0.0,
        hyper=(Hyper("beta", 0.1, "λ (ORPO paper): the weight of the odds-ratio term beside the chosen answers' NLL"),),
        **_PAIRS,
    ),
    # KTO: the reference on the completion and on its KL sequence, and the policy on the KL sequence
    Objective(
        "kto",
        "KTO (Ethayarajh et al. 2024)",
        "unpaired",
        "prompt/completion/label rows",
        "labelled completions",
        1,  # the completion; its KL sequence runs without gradients
        True,
        3.0,
        "unpaired",
        hyper=(
            Hyper("beta", 0.1, f"β (KTO paper): {_BETA_REFERENCE.split(';')[0]}"),
            Hyper("desirable_weight", 1.0, "λ_D (KTO paper): keep λ_D·n_D / λ_U·n_U in [1, 4/3]", "λ_D"),
            Hyper("undesirable_weight", 1.0, "λ_U (KTO paper)", "λ_U"),
        ),
        card_rows="completions labelled desirable or not",
        reason="{paper}: each example is a prompt and one completion labelled desirable or not; its KL baseline comes from "
        "mismatched prompt/completion sequences run without gradients; log-probabilities by slices of tokens",
    ),
):
    register(_o)
