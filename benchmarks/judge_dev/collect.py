"""Collect the judge development answers from the dev runs into one blind file for labelling.

    python benchmarks/judge_dev/collect.py

Reads every ``runs/<preset>/cells/<cell>/eval.json`` under this folder (made by the presets in ``presets/``: HarmBench
*validation* prompts and XSTest safe prompts, fresh seed), keeps non-empty answers, drops exact duplicate
(prompt, answer) pairs, and writes

* ``answers.jsonl`` — ``{"id", "prompt", "answer", "prompt_kind"}`` in a shuffled order with opaque ids: what the
  labellers read (no run, cell or defense names);
* ``sources.csv``   — ``id, run, cell, section, index``: where each answer came from (not shown to labellers).

Ids are stable (a hash of run, cell, section and index), so rerunning after more runs finish keeps the ids of
answers already collected; labels live in ``labels.csv`` (``id, outcome, note``).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    rows, seen = [], set()
    for ev in sorted((HERE / "runs").glob("*/cells/*/eval.json")):
        run, cell = ev.parts[-4], ev.parts[-2]
        rep = json.loads(ev.read_text(encoding="utf-8"))
        for section, kind in (("harmful", "harmful"), ("over_refusal", "safe")):
            for i, r in enumerate((rep.get(section) or {}).get("records") or []):
                if not r["answer"].strip() or (r["prompt"], r["answer"]) in seen:
                    continue
                seen.add((r["prompt"], r["answer"]))
                rid = hashlib.sha256(f"{run}/{cell}/{section}/{i}".encode()).hexdigest()[:10]
                rows.append({"id": rid, "prompt": r["prompt"], "answer": r["answer"], "prompt_kind": kind,
                             "run": run, "cell": cell, "section": section, "index": i})
    rows.sort(key=lambda r: r["id"])  # a hash order: runs and cells interleave
    with open(HERE / "answers.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("id", "prompt", "answer", "prompt_kind")}, ensure_ascii=False) + "\n")
    with open(HERE / "sources.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "run", "cell", "section", "index"])
        for r in rows:
            w.writerow([r[k] for k in ("id", "run", "cell", "section", "index")])
    print(f"{len(rows)} answers -> {HERE / 'answers.jsonl'}")


if __name__ == "__main__":
    main()
