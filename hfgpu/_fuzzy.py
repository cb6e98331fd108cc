"""Closest-name suggestions for error messages."""

from __future__ import annotations

import difflib


def closest(word: str, candidates: list[str], n: int = 3) -> list[str]:
    """The `n` candidates nearest to `word` (case-insensitive), best first; never empty if candidates exist."""
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.0)
    return [lowered[h] for h in hits]


def did_you_mean(word: str, candidates: list[str], n: int = 3) -> str:
    names = closest(word, candidates, n)
    return ("did you mean " + ", ".join(repr(x) for x in names) + "?") if names else ""
