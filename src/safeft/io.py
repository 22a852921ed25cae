"""Small, safe I/O helpers: atomic writes, strict JSONL/CSV readers with file:line errors, hashing."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from safeft.errors import SafeFTError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``: readers never see a
    half-written file, and a crash leaves the previous version intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _reject_nan(value: str) -> Any:
    raise ValueError(f"{value} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows to a non-finite number")
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file: one JSON object per line, blank lines skipped.

    Raises :class:`SafeFTError` naming ``path:line`` for a missing file, non-UTF-8 bytes, bad JSON, NaN/Infinity or a
    line that is not an object."""
    path = Path(path)
    if not path.is_file():
        raise SafeFTError(f"{path}: file not found; check the path")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise SafeFTError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    rows = []
    # split on "\n" only: str.splitlines() would also break on U+2028 inside JSON strings
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=_reject_nan, parse_float=_finite_float)
        except (json.JSONDecodeError, ValueError, RecursionError) as e:
            raise SafeFTError(f"{path}:{i}: malformed JSON ({e}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise SafeFTError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Read a CSV with a header row (RFC 4180; fields may hold newlines)."""
    path = Path(path)
    if not path.is_file():
        raise SafeFTError(f"{path}: file not found; check the path")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = [dict(r) for r in reader]
    except UnicodeDecodeError as e:
        raise SafeFTError(f"{path}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    except csv.Error as e:
        raise SafeFTError(f"{path}: malformed CSV ({e})") from None
    return rows


def read_table(path: str | os.PathLike) -> list[dict]:
    """Read rows from .jsonl/.json/.csv/.parquet, choosing by extension."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(p)
    if suffix == ".csv":
        return read_csv(p)
    if suffix == ".json":
        if not p.is_file():
            raise SafeFTError(f"{p}: file not found; check the path")
        try:
            obj = json.loads(p.read_text(encoding="utf-8"), parse_constant=_reject_nan)
        except (json.JSONDecodeError, ValueError, UnicodeDecodeError) as e:
            raise SafeFTError(f"{p}: malformed JSON ({e})") from None
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise SafeFTError(f"{p}: expected a JSON list of objects")
        return obj
    if suffix == ".parquet":
        if not p.is_file():
            raise SafeFTError(f"{p}: file not found; check the path")
        import datasets

        return list(datasets.Dataset.from_parquet(str(p)))
    raise SafeFTError(f"{p}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def require_columns(rows: Iterable[dict], columns: Iterable[str], source: str) -> None:
    """Check every row has every column, naming the first offending row (1-based)."""
    columns = list(columns)
    for i, r in enumerate(rows, start=1):
        missing = [c for c in columns if c not in r]
        if missing:
            raise SafeFTError(
                f"{source}: row {i} lacks column(s) {missing}; it has {sorted(r)}. "
                f"Rename the columns or pass the right column names"
            )


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def iter_chunks(seq: list, size: int) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: keys as text, tuples as lists, NaN / inf as null (a diverged run still gets its
    record), a one-element tensor as its number, anything else as its text."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "numel") and hasattr(obj, "item") and obj.numel() == 1:  # a one-element tensor (no torch import)
        return obj.item()
    return str(obj)
