"""Can this machine reach the Hub? One short attempt per process, before the first Hub call.

Without network and without HF_HUB_OFFLINE, huggingface_hub retries every request five times with back-off
(1 + 2 + 4 + 8 + 8 s) and logs each retry: `hfgpu plan some-org/model --gpu 4090` printed eleven lines over 24 s
before its own. Here one TCP connection to the endpoint (HF_ENDPOINT, default huggingface.co), name lookup
included, is given PROBE_TIMEOUT_S; when it fails, the process switches huggingface_hub, transformers and
datasets to offline mode — they then read only the local Hub cache, at once and quietly — and hfgpu's error
says the Hub cannot be reached. Torch-free and cheap: planning imports it.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import urllib.parse

PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "ON", "YES", "TRUE")
_reachable: dict[str, bool] = {}  # endpoint → the answer, once per process
_switched = []  # non-empty once this process turned offline mode on itself


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_asked() -> bool:
    """Whether the user asked for offline mode (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE), not hfgpu after a failed probe."""
    return not _switched and any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _connects(url: str, timeout: float) -> bool:
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    answer: list[bool] = []

    def attempt() -> None:  # in a thread: a name lookup can hang past any socket timeout
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def hub_reachable() -> bool:
    """Whether the Hub endpoint accepts a connection (False when offline mode is asked for); asked once per process.
    When it does not, huggingface_hub, transformers and datasets are put in offline mode for the rest of the process."""
    url = endpoint()
    if offline_asked() or _switched:
        return _reachable.get(url, False)
    if url not in _reachable:
        _reachable[url] = _connects(url, PROBE_TIMEOUT_S)
        if not _reachable[url]:
            _go_offline()
    return _reachable[url]


def cut_off() -> bool:
    """True when the Hub cannot be reached and the user did not ask for offline mode (probing once): a failed Hub
    request then means "no network", which hfgpu's errors say instead of the library's exception."""
    return not hub_reachable() and not offline_asked()


def probe_unless_local(path: str) -> None:
    """Before a from_pretrained of `path`: when it is not a local folder or file it names the Hub, and the probe runs
    first (without network the libraries then read the cache alone, at once, with no retries)."""
    from pathlib import Path

    if not Path(path).exists():
        hub_reachable()


def _go_offline() -> None:
    _switched.append(True)
    os.environ["HF_HUB_OFFLINE"] = "1"  # read at import by huggingface_hub and datasets
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True


def unreachable_reason() -> str:
    """How an error says why a Hub download failed when it was not asked to be offline."""
    host = urllib.parse.urlsplit(endpoint()).netloc or endpoint()
    return f"the Hub ({host}) cannot be reached from here, and it is not in the local Hub cache"
