"""hfgpu's exception types.

Every error a user can cause is an `HfgpuError`: the CLI prints its message as one line on stderr
and exits with `exit_code` (2 for bad input), never with a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any, Callable


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


def _optional_kernel_notice(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not (text.startswith("Failed to load CPU gemm_4bit_forward") or "'kernels-community/quantization-bitsandbytes'" in text)


def run_command(body: Callable[[], int], interrupted: str = "hfgpu: interrupted") -> int:
    """Run a command-line entry point: a user error is one line on stderr and its exit code, never a traceback.
    Libraries' FutureWarnings (deprecations the user cannot act on) are hidden unless HFGPU_WARNINGS=1, and so is
    bitsandbytes' import-time notice that its optional CPU kernel (from the Hub, via the `kernels` package) could
    not be loaded, and `kernels`' note on that lookup offline: on an AVX512-BF16 CPU they print on every command,
    and bitsandbytes' own fallback computes the same op."""
    if os.environ.get("HFGPU_WARNINGS") != "1":
        warnings.filterwarnings("ignore", category=FutureWarning)
        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_optional_kernel_notice)
        logging.getLogger("kernels._internals.hf_hub").addFilter(_optional_kernel_notice)  # its offline lookup's note
    try:
        return body()
    except HfgpuError as e:
        print(f"hfgpu: {'does not fit' if isinstance(e, DoesNotFit) else 'error'}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hfgpu … | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
