"""Join the part labellers' files of one blind folder into its ``labels.csv``.

    python benchmarks/labels/join_parts.py --run benchmarks/test_labels/small/batch7

A folder made with ``make_blind.py --parts N`` holds ``part1.jsonl`` … ``partN.jsonl`` (consecutive pieces of
``blind.jsonl``), each read by its own labeller into ``labels_part1.csv`` … ``labels_partN.csv`` (``id,outcome,note``).
This checks each label file against its own part (every answer labelled once, no id from elsewhere, every outcome in
the rubric's scheme, through the same reader ``compare.py`` uses), checks that the parts cover ``blind.jsonl``
exactly, and writes ``labels.csv`` in ``blind.jsonl``'s order. An existing ``labels.csv`` is never overwritten.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from pathlib import Path

from blindset import read_blind, read_labels, read_notes  # this folder's module (run as a script)

from safeft.errors import SafeFTError


def join(run: Path) -> Path:
    """Write ``run/labels.csv`` from the part label files; return its path. Raises SafeFTError naming the problem."""
    out = run / "labels.csv"
    if out.exists():
        raise SafeFTError(f"{out} exists: remove it first if the part labels should replace it")
    parts = sorted(run.glob("part*.jsonl"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not parts:
        raise SafeFTError(f"{run}: no part*.jsonl; make the folder with make_blind.py --parts N")
    blind = read_blind(run / "blind.jsonl")
    labels: dict[str, str] = {}
    notes: dict[str, str] = {}
    for part in parts:
        ids = read_blind(part)
        lab_file = run / f"labels_{part.stem}.csv"
        if not lab_file.is_file():
            raise SafeFTError(f"{lab_file}: missing; the labeller of {part.name} writes it")
        got = read_labels(lab_file, set(blind))
        elsewhere = [i for i in got if i not in ids]
        if elsewhere:
            raise SafeFTError(f"{lab_file}: id {elsewhere[0]!r} belongs to another part, not {part.name}; "
                              "move its row to that part's label file")
        if len(got) < len(ids):
            first = next(i for i in ids if i not in got)
            raise SafeFTError(f"{lab_file}: {len(ids) - len(got)} of {len(ids)} answers of {part.name} unlabelled "
                              f"(first: {first}); label every line")
        dup = set(got) & set(labels)
        if dup:
            raise SafeFTError(f"{part}: id {sorted(dup)[0]!r} is also in an earlier part; remake the parts")
        labels.update(got)
        notes.update(read_notes(lab_file))
    if set(labels) != set(blind):
        stray = sorted(set(labels) ^ set(blind))[0]
        raise SafeFTError(f"{run}: the parts do not cover blind.jsonl exactly (id {stray!r}); remake the parts")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "outcome", "note"])
    w.writerows([rid, labels[rid], notes.get(rid, "")] for rid in blind)  # blind.jsonl's order
    from safeft.io import atomic_write_text

    atomic_write_text(out, buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a blind folder with part*.jsonl and labels_part*.csv")
    args = ap.parse_args()
    try:
        out = join(Path(args.run))
    except SafeFTError as e:
        sys.exit(str(e))
    n = sum(1 for _ in open(out, encoding="utf-8")) - 1
    print(f"{n} labels -> {out}")


if __name__ == "__main__":
    main()
