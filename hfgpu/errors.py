"""hfgpu's exception types.

Every error a user can cause is an `HfgpuError`: the CLI prints its message as one line on stderr
and exits with `exit_code` (2 for bad input), never with a traceback.
"""

from __future__ import annotations

from typing import Any


class HfgpuError(Exception):
    """A problem the user can fix; the message names the value and the fix."""

    exit_code = 2


class DoesNotFit(HfgpuError):
    """No plan fits the card. Carries the closest plan found and what would fit instead."""

    exit_code = 3

    def __init__(self, message: str, closest: Any = None, alternatives: list[str] | None = None):
        super().__init__(message)
        self.closest = closest  # the Plan with the smallest peak, `fits == False`
        self.alternatives = alternatives or []
