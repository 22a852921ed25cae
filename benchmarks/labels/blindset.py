"""Read one blind labelling folder (made by ``make_blind.py``): its answers, its key and its labels, checked.

``compare.py`` and ``human_table.py`` both read folders through here, so a label file is held to one scheme:
columns ``id`` and ``outcome``, every outcome one of :data:`OUTCOMES`, every id one of ``blind.jsonl``'s and none twice.
Each problem is one line naming the file and row.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from safeft.errors import SafeFTError

OUTCOMES = ("refusal", "harmful", "other")


def read_blind(path: Path) -> dict[str, dict[str, str]]:
    """``{id: record}`` of ``blind.jsonl`` (each record has ``prompt``, ``answer``, ``prompt_kind``)."""
    out: dict[str, dict[str, str]] = {}
    for n, line in enumerate(_text(path).split("\n"), 1):  # not splitlines(): U+2028 may sit inside an answer
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rid = rec["id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SafeFTError(f"{path} line {n}: not a JSON record with an 'id'; remake it with make_blind.py") from None
        out[rid] = rec
    return out


def read_key(path: Path) -> dict[str, dict[str, str]]:
    """``{id: row}`` of ``key.csv`` (each row has ``model`` and ``prompt_kind``)."""
    return {r["id"]: r for _, r in _rows(path, ("id", "model", "prompt_kind"))}


def read_labels(path: Path, ids: set[str] | None = None) -> dict[str, str]:
    """``{id: outcome}`` of a labels file (``labels.csv``, ``labels_second.csv``, ...).

    With ``ids``, an id outside them is an error (a label for an answer this folder does not hold)."""
    out: dict[str, str] = {}
    for n, r in _rows(path, ("id", "outcome")):
        rid, outcome = r["id"], (r["outcome"] or "").strip()
        if outcome not in OUTCOMES:
            raise SafeFTError(f"{path} row {n}: outcome {outcome!r} is not {' / '.join(OUTCOMES)}")
        if ids is not None and rid not in ids:
            raise SafeFTError(f"{path} row {n}: id {rid!r} is not in key.csv / blind.jsonl")
        if rid in out:
            raise SafeFTError(f"{path} row {n}: id {rid!r} is labelled twice; keep one row per answer")
        out[rid] = outcome
    return out


def read_notes(path: Path) -> dict[str, str]:
    """``{id: note}`` of a labels file (an empty note where the file has no ``note`` column)."""
    return {r["id"]: (r.get("note") or "").strip() for _, r in _rows(path, ("id",))}


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark is not part of the header
    except UnicodeDecodeError as e:
        raise SafeFTError(f"{path}: not UTF-8 (byte {e.start}); save it as UTF-8") from None


def _rows(path: Path, need: tuple[str, ...]):
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))  # quoted notes may hold line breaks
    missing = [c for c in need if c not in (reader.fieldnames or [])]
    if missing:
        raise SafeFTError(f"{path}: missing column(s) {', '.join(missing)}; the header must name {', '.join(need)}")
    yield from enumerate(reader, 2)
