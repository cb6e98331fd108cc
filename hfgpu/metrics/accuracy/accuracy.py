"""Accuracy of generated answers whose first word is a label (classification by generation), as a
local `evaluate` module. A prediction counts when its first word equals the reference's, ignoring case
and trailing punctuation."""

import datasets
import evaluate


def _first_word(s: str) -> str:
    words = s.strip().split()
    return words[0].strip(".,;:!?\"'").lower() if words else ""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        hits = sum(_first_word(p) == _first_word(r) for p, r in zip(predictions, references))
        return {"accuracy": hits / len(references) if references else 0.0}
