"""hfgpu's exception types.

Every error a user can cause is an `HfgpuError`: the CLI prints its message as one line on stderr
and exits with `exit_code` (2 for bad input), never with a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
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


# a failed write as torch and safetensors report it: torch.save on a full disk raises RuntimeError ("PytorchStreamWriter
# failed writing file …", or "[enforce fail at inline_container.cc:672] . unexpected pos 23616 vs 23508" when the
# zip writer's position no longer matches what reached the disk), safetensors a SafetensorError
_WRITE_WORDS = ("inline_container", "pytorchstreamwriter", "failed writing", "write", "no space", "quota", "i/o error", "errno")


def _mib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def write_failure(e: BaseException, folder: Path, what: str, needed: int | None, after: str) -> HfgpuError | None:
    """The one-line error for `e` raised while writing `what` into `folder`, or None when `e` is not a failed write.
    A full disk (ENOSPC, EDQUOT, or a serialization error while the disk holds less than the write needs) says so
    with the free and needed space; another OSError (permissions, a read-only disk) its reason. `after`: what is
    still intact and how to go on."""
    text = str(e).lower()
    if isinstance(e, HfgpuError) or not (isinstance(e, OSError) or any(w in text for w in _WRITE_WORDS)):
        return None
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = None
    short = needed is None or free is None or free < needed * 1.1 + 2**20  # a margin: the needed size is the payload only
    if isinstance(e, OSError):
        full = e.errno in (errno.ENOSPC, errno.EDQUOT) or "no space" in text
    else:  # torch's or safetensors' serialization error: full when the disk holds less than the write
        full = "no space" in text or short
    if full:
        space = f"{_mib(free)} free" if free is not None else "no space left"
        space += f", about {_mib(needed)} needed" if needed else ""
        return HfgpuError(
            f"could not write {what} to {folder}: the disk is full ({space}): free space there or choose another folder; {after}"
        )
    reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
    return HfgpuError(f"could not write {what} to {folder} ({reason}): fix the folder or choose another; {after}")


def _optional_kernel_notice(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not (text.startswith("Failed to load CPU gemm_4bit_forward") or "'kernels-community/quantization-bitsandbytes'" in text)


_NOTICE_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")  # the second: its offline lookup's note


@contextlib.contextmanager
def library_notices_hidden():
    """Within: libraries' FutureWarnings (deprecations the user cannot act on) are hidden, and so are bitsandbytes'
    import-time notice that its optional CPU kernel (from the Hub, via the `kernels` package) could not be loaded,
    `kernels`' note on that lookup offline (on an AVX512-BF16 CPU they print on every command, and bitsandbytes' own
    fallback computes the same op), and peft's "Could not find a config file in … will assume that the vocabulary
    was not modified" when a base has no config.json beside it (a GGUF file's folder: hfgpu never resizes the
    vocabulary). HFGPU_WARNINGS=1 shows them all. The command line and the Python API (`hfgpu.finetune`, a run's
    `load`) both run inside it; the filters are removed on the way out."""
    if os.environ.get("HFGPU_WARNINGS") == "1":
        yield
        return
    loggers = [logging.getLogger(name) for name in _NOTICE_LOGGERS]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"Could not find a config file in .* will assume that the vocabulary was not modified")
        for logger in loggers:
            logger.addFilter(_optional_kernel_notice)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(_optional_kernel_notice)


def run_command(body: Callable[[], int], interrupted: str = "hfgpu: interrupted") -> int:
    """Run a command-line entry point: a user error is one line on stderr and its exit code, never a traceback;
    libraries' notices a user cannot act on are hidden (library_notices_hidden)."""
    try:
        with library_notices_hidden():
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
