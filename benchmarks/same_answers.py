"""How far two evaluations of the same model agree, answer by answer: a check that a rebuilt model (another machine,
another install) still writes the answers its committed cell wrote.

    python benchmarks/same_answers.py benchmarks/results/tiny/cells/aligned/eval.json /tmp/aligned-rebuilt/eval.json

For each section both files have (harmful, over_refusal, copyright), prompts are matched by text; it prints how many
answers are identical, how many start the same (first 40 characters), and how many got the same judge outcome,
then the rates (HS, refusal) each file reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safeft.errors import SafeFTError
from safeft.eval.rejudge import read_judge_input

SECTIONS = ("harmful", "over_refusal", "copyright")


def records(path: Path) -> dict[str, dict[str, dict]]:
    """``{section: {prompt: record}}`` of an eval.json (read and format-checked as ``safeft judge`` reads one)."""
    kind, ev = read_judge_input(path)
    if kind != "eval":
        raise SafeFTError(f"{path}: a JSONL of records has no sections to compare; give a cell's eval.json")
    out = {}
    for s in SECTIONS:
        recs = (ev.get(s) or {}).get("records")
        if recs:
            out[s] = {r["prompt"]: r for r in recs}
    if not out:
        raise SafeFTError(f"{path}: no answer records in any of {', '.join(SECTIONS)}; give a cell's eval.json")
    return out


def compare(a: dict[str, dict[str, dict]], b: dict[str, dict[str, dict]]) -> list[dict]:
    rows = []
    for s in SECTIONS:
        if s not in a or s not in b:
            continue
        common = sorted(set(a[s]) & set(b[s]))
        ra, rb = [a[s][p] for p in common], [b[s][p] for p in common]
        rows.append({
            "section": s,
            "n": len(common),
            "identical": sum(x["answer"] == y["answer"] for x, y in zip(ra, rb)),
            "same_start": sum(x["answer"][:40] == y["answer"][:40] for x, y in zip(ra, rb)),
            "same_outcome": sum(x.get("outcome") == y.get("outcome") for x, y in zip(ra, rb)),
            "rates": {
                o: [round(100 * sum(r.get("outcome") == o for r in rr) / max(len(rr), 1), 1) for rr in (ra, rb)]
                for o in ("harmful", "refusal")
            },
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args()
    try:
        rows = compare(records(args.a), records(args.b))
    except SafeFTError as e:
        raise SystemExit(f"same_answers: error: {e}") from None
    print("| section | prompts | identical answers | same first 40 chars | same outcome | HS % a → b | refusal % a → b |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        h, f = r["rates"]["harmful"], r["rates"]["refusal"]
        print(f"| {r['section']} | {r['n']} | {r['identical']} | {r['same_start']} | {r['same_outcome']} "
              f"| {h[0]} → {h[1]} | {f[0]} → {f[1]} |")


if __name__ == "__main__":
    main()
