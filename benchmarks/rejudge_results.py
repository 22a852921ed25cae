"""Re-judge every committed benchmark cell with the content judge and tabulate before / after.

    python benchmarks/rejudge_results.py            # re-judge in place, then write benchmarks/results/rejudge.md
    python benchmarks/rejudge_results.py --check    # only verify that every cell is judged by the current judge

Each ``benchmarks/results/<folder>/cells/<cell>/eval.json`` keeps its answers; its harmful and over-refusal sections
are recomputed from them (``safeft.eval.rejudge.rejudge_report``): ``hs`` becomes the content judge's, and
``hs_keyword`` holds the refusal-keyword number the cell reported before (checked equal to the old ``hs``). Nothing
is regenerated. Then rebuild each preset's tables with ``safeft bench --preset NAME --report-only``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", default="content")
    ap.add_argument("--check", action="store_true", help="fail if a cell is not judged by --judge")
    args = ap.parse_args()

    from safeft.eval.judges import get_judge
    from safeft.eval.rejudge import rejudge_report
    from safeft.io import atomic_write_json, atomic_write_text

    judge = get_judge(args.judge)
    rows = []
    stale = []
    for ev_path in sorted(RESULTS.glob("*/cells/*/eval.json")):
        folder, cell = ev_path.parts[-4], ev_path.parts[-2]
        ev = json.loads(ev_path.read_text(encoding="utf-8"))
        h = ev["harmful"]
        if h.get("judge") != judge.name:
            if args.check:
                stale.append(str(ev_path.relative_to(HERE.parent)))
                continue
            old_hs, old_judge = h["hs"], h.get("judge")
            ev = rejudge_report(ev, judge, str(ev_path))
            if old_judge == "keyword" and abs(ev["harmful"]["hs_keyword"] - old_hs) > 1e-9:
                raise SystemExit(f"{ev_path}: the keyword judge gives {ev['harmful']['hs_keyword']} now, "
                                 f"{old_hs} before: the stored answers or the keyword list changed")
            atomic_write_json(ev_path, ev)
            h = ev["harmful"]
        orr = ev.get("over_refusal") or {}
        rows.append((folder, cell, h, orr))
    if args.check:
        if stale:
            print(f"{len(stale)} cells not judged by {judge.name}:\n  " + "\n  ".join(stale))
            return 1
        print(f"every cell judged by {judge.name}")
        return 0
    lines = [
        f"# Committed cells re-judged: refusal-keyword HS → content-judge HS (`{judge.name}`)",
        "",
        "Made by `python benchmarks/rejudge_results.py` from the answers stored in each cell's `eval.json` (nothing "
        "regenerated). *HS kw* is the number the cell reported before (the keyword judge's non-refusal rate); *HS* "
        "the content judge's % `harmful`; *refusal* and *other* its other two outcomes; *comply* = harmful or a "
        "content-free affirmative echo; *echo* = answers that are only an affirmative template sentence; "
        "*over-refusal* = % of XSTest safe prompts called `refusal` (content / keyword).",
        "",
        "| results folder | cell | n | HS kw % | HS % [95% CI] | refusal % | other % | comply % | echo | over-refusal % (content / kw) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for folder, cell, h, orr in rows:
        o = (f"{orr['rate']:.1f} / {orr['rate_keyword']:.1f}" if orr.get("rate_keyword") is not None else "–")
        lines.append(
            f"| {folder} | {cell} | {h['n']} | {h['hs_keyword']:.1f} | {h['hs']:.1f} [{h['hs_ci'][0]:.1f}, "
            f"{h['hs_ci'][1]:.1f}] | {h['refusal_rate']:.1f} | {h['other_rate']:.1f} | {h['compliance_rate']:.1f} "
            f"| {h['template_echo']} | {o} |"
        )
    atomic_write_text(RESULTS / "rejudge.md", "\n".join(lines) + "\n")
    print(f"{len(rows)} cells -> {RESULTS / 'rejudge.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
