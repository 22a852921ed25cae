"""Fine-tune accuracy of benchmark cells against one reference cell, paired by task sentence.

    python benchmarks/paired_fa.py --reference benchmarks/results/tiny/cells/p0.1-cwac-s0 \
        benchmarks/results/tiny/cells/p0.1-lisa-s0 benchmarks/results/tiny/cells/p0.1-safeinstr-s0

Every cell of one preset answers the same held-out task sentences, so a difference in FA is read sentence by
sentence: the mean of (correct in the cell − correct in the reference) with a 95% percentile bootstrap over
sentences (2,000 resamples, seed 0), which is tighter than two independent FA intervals side by side (FA is read
on 80 sentences in ``tiny``: each cell's own CI is about ±10 points). Reads each cell's ``eval.json`` ``task``
records (``prompt``, ``correct``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safeft.errors import SafeFTError
from safeft.eval.metrics import paired_difference
from safeft.eval.rejudge import read_judge_input

N_BOOT, SEED = 2000, 0


def task_correct(cell: Path) -> dict[str, bool]:
    """``{task prompt: correct}`` of a cell folder (or its eval.json)."""
    path = cell / "eval.json" if cell.is_dir() else cell
    if not path.is_file():
        raise SafeFTError(f"{path}: no such file; give a finished cell's folder or its eval.json")
    kind, ev = read_judge_input(path)
    task = ev.get("task") if kind == "eval" else None
    recs = task.get("records") if isinstance(task, dict) else None
    if not recs or not isinstance(recs, list):
        raise SafeFTError(f"{path}: no task records (eval.json 'task.records'); was the cell evaluated on a task?")
    out = {}
    for i, r in enumerate(recs):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("correct"), bool):
            raise SafeFTError(f"{path}: task record {i} lacks a text 'prompt' or a true/false 'correct'")
        if r["prompt"] in out:
            raise SafeFTError(f"{path}: task record {i} repeats an earlier sentence; pairing by sentence needs each once")
        out[r["prompt"]] = r["correct"]
    return out


def paired_fa(cell: dict[str, bool], ref: dict[str, bool]) -> tuple[float, float, float, float, int]:
    """(FA of ``cell`` on the sentences both answered, cell − ref in points, its 95% CI low, high, that count)."""
    d, lo, hi, n = paired_difference(
        cell, ref, n_boot=N_BOOT, seed=SEED,
        empty="no task sentence answered by both cells: they are from different presets or tasks")
    fa = 100 * sum(cell[p] for p in ref if p in cell) / n
    return fa, d, lo, hi, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="the cell every other is compared with")
    ap.add_argument("cells", type=Path, nargs="+")
    a = ap.parse_args()
    try:
        ref = task_correct(a.reference)
        rows = [(c, paired_fa(task_correct(c), ref)) for c in a.cells]
    except SafeFTError as e:
        raise SystemExit(f"paired_fa: error: {e}") from None
    name = a.reference.name if a.reference.is_dir() else a.reference.parent.name
    print(f"| cell | sentences | FA % | FA − {name} (paired) [95% CI] |")
    print("|---|---|---|---|")
    for c, (fa, d, lo, hi, n) in rows:
        cname = c.name if c.is_dir() else c.parent.name
        print(f"| {cname} | {n} | {fa:.1f} | {d:+.1f} [{lo:+.1f}, {hi:+.1f}] |")


if __name__ == "__main__":
    main()
