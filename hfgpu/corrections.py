"""Stored calibration corrections, per card: what `hfgpu calibrate` measured, as later plans read it.

Torch-free, like the planner that reads it (hfgpu.planner); measuring lives in hfgpu.calibrate.
One JSON file beside the spec cache: {card name: {"factor", "date", "model", "rows"}}.
"""

from __future__ import annotations

import json
from pathlib import Path

from hfgpu.models import cache_dir


def calibration_file() -> Path:
    return cache_dir().parent / "calibration.json"


def load_corrections() -> dict:
    path = calibration_file()
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def correction_for(card_name: str) -> dict | None:
    """{'factor', 'date', 'model', 'rows'} stored by `hfgpu calibrate` for this card, if any."""
    entry = load_corrections().get(card_name)
    return entry if isinstance(entry, dict) and isinstance(entry.get("factor"), (int, float)) else None


def store_correction(card_name: str, entry: dict) -> Path:
    """Record `entry` for this card (replacing an older one); returns the file."""
    table = load_corrections()
    table[card_name] = entry
    path = calibration_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    return path
