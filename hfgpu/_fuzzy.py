"""Closest-name suggestions for error messages."""

from __future__ import annotations

import difflib


def closest(word: str, candidates: list[str], n: int = 3, cutoff: float = 0.0) -> list[str]:
    """The `n` candidates nearest to `word` (case-insensitive), best first."""
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=cutoff)
    return [lowered[h] for h in hits]


def did_you_mean(word: str, candidates: list[str], n: int = 3, cutoff: float = 0.0) -> str:
    names = closest(word, candidates, n, cutoff)
    return ("did you mean " + ", ".join(repr(x) for x in names) + "?") if names else ""
