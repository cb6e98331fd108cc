"""Data sources: rows from a local file (json, jsonl, csv, parquet, txt) or a Hub dataset and split, checked
against the columns their format needs (`data.columns` renames them). hfgpu.data tokenizes what this loads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hfgpu.errors import HfgpuError
from hfgpu.recipe import DataConfig, resolve_path

FIELDS = {
    "text": ("text",),
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),  # objective dpo/ipo/simpo/orpo (hfgpu.preference_data)
    "unpaired": ("prompt", "completion", "label"),  # objective kto: label true (desirable) or false
}
OPTIONAL = {"input"}
EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def looks_like_hub_id(path: str) -> bool:
    """owner/name: a Hub dataset id, when no local file or folder of that name exists."""
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def _split_names(spec: str) -> set[str]:
    """The split names a datasets split spec reads: "train[:10]+test[-5:]" → {"train", "test"}."""
    return {part.split("[", 1)[0].strip() for part in spec.split("+")}


def _local_split(path: str, split: str, key: str) -> str:
    """A local file has one split, `train`; `split` may slice it (train[:80%], train[-100:], train[:10]+train[-10:])."""
    if _split_names(split) != {"train"}:
        raise HfgpuError(
            f"{key}={split!r}: a local file such as {path!r} has one split, 'train'; slice it (e.g. train[:90%] and "
            "train[90%:]), or use data.eval_path or data.eval_fraction"
        )
    return split


def split_overlap(path: str, train_split: str, eval_split: str, rows: int) -> int:
    """How many of the rows `eval_split` selects `train_split` selects too, in a source of `rows` rows per split
    (0 when they name different splits)."""
    import datasets

    def indices(spec: str) -> set[tuple[str, int]]:
        out = set()
        for a in datasets.ReadInstruction.from_spec(spec).to_absolute({split_name(spec): rows}):
            out.update((a.splitname, i) for i in range(a.from_, a.to))
        return out

    try:
        if split_name(train_split) != split_name(eval_split):
            return 0
        return len(indices(train_split) & indices(eval_split))
    except (ValueError, AttributeError, KeyError):
        return 0


def split_name(spec: str) -> str:
    """The first split a spec reads (the one its row counts refer to)."""
    return spec.split("+", 1)[0].split("[", 1)[0].strip()


def load_rows(path: str, split: str = "train", key: str = "data.split"):
    """A `datasets.Dataset` from a local file/folder or a Hub dataset id; `split` as datasets takes it
    (slices too: train[:90%]); `key`: the recipe key that set it, for errors."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # a parse error is ours to report, in one line
    local = Path(resolve_path(path)).expanduser()
    try:
        if local.is_file():
            builder = EXTENSIONS.get(local.suffix.lower())
            if builder is None:
                raise HfgpuError(f"data file {path!r} has extension {local.suffix!r}: use one of {', '.join(EXTENSIONS)}")
            if local.stat().st_size == 0:
                raise HfgpuError(f"data {path!r} has no rows: add examples or point data.path at another file")
            ds = datasets.load_dataset(builder, data_files={"train": str(local)}, split=_local_split(path, split, key))
            ds.data.table.validate(full=True)  # pyarrow loads bytes that are not UTF-8 and fails only when a row is read
        elif local.is_dir():
            ds = datasets.load_dataset(str(local), split=split)
        elif looks_like_hub_id(path):
            from hfgpu.online import cut_off, unreachable_reason

            no_network = cut_off()  # then offline: the local cache, or a quick failure
            try:
                ds = datasets.load_dataset(path, split=split)
            except Exception:
                if not no_network:
                    raise
                raise HfgpuError(f"could not load data {path!r}: {unreachable_reason()}: connect, or use a local file") from None
        else:
            raise HfgpuError(f"data file {path!r} not found: check data.path (a local file, folder, or a Hub dataset id owner/name)")
    except HfgpuError:
        raise
    except Exception as e:  # datasets raises many types: missing split, offline, parse errors
        if local.exists() and (where := _first_bad_line(local)):
            raise HfgpuError(f"data file {path!r} {where}") from None
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise HfgpuError(f"could not load data {path!r} (split {split!r}): {type(e).__name__}: {detail}") from None
    if len(ds) == 0:
        raise HfgpuError(f"data {path!r} has no rows: add examples or point data.path at another file")
    return ds


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list) -> dict:
    """json's object_pairs_hook: a key written twice is an error (json.loads keeps the last one silently)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _json_kind(value) -> str:
    kinds = {bool: "true/false", int: "a number", float: "a number", str: "text", list: "a list", type(None): "null"}
    return kinds.get(type(value), "an object")


def _row_problem(row) -> str | None:
    """What is wrong with one parsed JSON row that datasets refuses: it is not an object. (A column whose rows hold
    different kinds of value datasets 5 reads as JSON; such rows are dropped later, each with its rule.)"""
    if not isinstance(row, dict):
        return f'a row must be a JSON object like {{"instruction": …, "output": …}}, got {_json_kind(row)}: fix or remove that line'
    return None


def _first_bad_json(path: Path, json_lines: bool) -> str | None:
    with open(path, "rb") as f:
        if not json_lines:  # one JSON document: an array of rows (or an object of columns, which datasets reads too)
            try:
                doc = json.loads(f.read().decode("utf-8"), object_pairs_hook=_no_duplicates)
            except _DuplicateKey as e:
                return f'has the key "{e}" twice in one object: keep one'
            except ValueError as e:
                return f"is not valid JSON ({str(e).split(':')[0]}): fix it, or write one object per line (JSON lines)"
            for i, row in enumerate(doc if isinstance(doc, list) else []):
                if problem := _row_problem(row):
                    return f"row {i + 1} of the array: {problem.replace('that line', 'that row')}"
            return None
        for number, raw in enumerate(f, 1):
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_no_duplicates)
            except _DuplicateKey as e:
                return f'line {number}: key "{e}" appears twice: keep one'
            except ValueError as e:
                reason = str(e).split(":")[0]
                return f"line {number} is not valid JSON ({reason}): fix or remove that line (JSON lines: one object per line)"
            if problem := _row_problem(row):
                return f"line {number}: {problem}"
    return None


def _first_bad_csv(path: Path) -> str | None:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return None
        if len(set(header)) != len(header):
            twice = next(h for h in header if header.count(h) > 1)
            return f'line 1: column "{twice}" appears twice in the header: rename one'
        for row in reader:
            if row and len(row) != len(header):
                return (
                    f"line {reader.line_num} has {len(row)} fields, the header has {len(header)}: quote a value that holds a comma "
                    '("Paris, France"), or fix that line'
                )
    return None


def _first_bad_parquet(path: Path) -> str | None:
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    first = None
    for file in files:
        try:
            schema = pq.read_schema(file)
        except Exception as e:
            return f"({file.name}) is not a readable parquet file ({(str(e).splitlines() or [''])[0][:100]}): write it again"
        if first is None:
            first = (file, schema)
            continue
        for field in schema:
            other = first[1].field(field.name) if field.name in first[1].names else None
            if other is not None and other.type != field.type:
                return (
                    f'({file.name}): column "{field.name}" is {field.type} there but {other.type} in {first[0].name}: '
                    "give the column one type in every file"
                )
    return None


def _first_bad_line(path: Path) -> str | None:
    """After a failed load: the first line that is not UTF-8 (any text format), not JSON, not an object or with a key
    twice (.json/.jsonl), with the wrong number of fields (.csv), or the
    parquet file or column that does not fit the others, said as what is wrong and the fix. Line by line: bounded memory."""
    kind = "parquet" if path.is_dir() else EXTENSIONS.get(path.suffix.lower())
    if kind == "parquet":
        return _first_bad_parquet(path)
    if kind not in ("json", "csv", "text"):
        return None
    with open(path, "rb") as f:
        head = f.read(1).lstrip()
        f.seek(0)
        json_lines = kind == "json" and head != b"[" or path.suffix.lower() == ".jsonl"
        if json_lines and head == b"{" and path.suffix.lower() == ".json":
            try:  # a .json file that opens with an object: JSON lines when its first line is a whole object
                json.loads(f.readline())
            except ValueError:
                json_lines = False
            f.seek(0)
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {number} has bytes that are not UTF-8 (byte {e.start + 1} of the line): save the file as UTF-8"
    if kind == "json":
        return _first_bad_json(path, json_lines)
    if kind == "csv":
        return _first_bad_csv(path)
    return None


def check_columns(ds, cfg: DataConfig, source: str, prefix: str = "data") -> dict[str, str]:
    """field → column, after `data.columns`; every required field must exist. `prefix`: where the format and
    columns keys are (`data`, or `data.mix[1]` for a dataset of a mixture, which may take data.format)."""
    fields = FIELDS[cfg.format]
    unknown = [k for k in cfg.columns if k not in fields]
    if unknown:
        raise HfgpuError(f"{prefix}.columns names {', '.join(unknown)}, not fields of format {cfg.format!r} ({', '.join(fields)})")
    mapping = {f: cfg.columns.get(f, f) for f in fields}
    missing = [f for f, col in mapping.items() if col not in ds.column_names and f not in OPTIONAL]
    if missing:
        have = ", ".join(ds.column_names)
        fixes = "; ".join(f"set {prefix}.columns.{f} to the right one" for f in missing)
        if prefix != "data":
            fixes = f"set {prefix}.format (it is {cfg.format}), or {fixes}"
        raise HfgpuError(
            f"{source} has no column {', '.join(repr(mapping[f]) for f in missing)} for format {cfg.format!r} (columns: {have}): {fixes}"
        )
    return mapping
