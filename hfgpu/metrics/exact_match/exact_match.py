"""Exact match of generated answers, as a local `evaluate` module (named metrics download from the Hub).

Strings are compared after stripping surrounding white space and, by default, ignoring case.
"""

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of str; references: list of str; ignore_case: bool (default True)",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, ignore_case=True):
        norm = (lambda s: s.strip().lower()) if ignore_case else (lambda s: s.strip())
        hits = sum(norm(p) == norm(r) for p, r in zip(predictions, references))
        return {"exact_match": hits / len(references) if references else 0.0}
