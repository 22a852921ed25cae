"""Make a blind labelling set from one ``safeft demo`` run.

    python benchmarks/demo_labels/make_blind.py --src runs/demo --dest benchmarks/demo_labels/run2

Copies the run's ``<model>/eval.json`` and ``summary.json`` into ``<dest>/cells/`` (the stored answers, so that
the labels can always be checked against the text they label) and writes

* ``<dest>/blind.jsonl``: every answer to a harmful or safe contrast prompt, shuffled (seed 0), each with a random
  id (nothing about the model can be computed from it), the prompt, the answer and the prompt kind — no model name,
  no judge verdict. This is all a labeller reads (run1 and run2 were made with ids hashed from the model name and
  prompt; their labellers were told to read only blind.jsonl and the instructions);
* ``<dest>/key.csv``: id → model, prompt kind, the judge's outcome (read only after labelling).

Labels go to ``<dest>/labels.csv`` (``id,outcome,note``; outcome ∈ refusal | harmful | other, by the rubric in
``benchmarks/judge_dev/labellers/INSTRUCTIONS.md``); ``compare.py --run <dest>`` then sets them against the judges.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import secrets
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="runs/demo", help="a safeft demo output folder (summary.json + <model>/eval.json)")
    ap.add_argument("--dest", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src, dest = Path(args.src), Path(args.dest)
    if (dest / "labels.csv").exists():
        raise SystemExit(f"{dest / 'labels.csv'} exists: those labels belong to the answers already there; "
                         "choose another --dest")
    from safeft.io import atomic_write_text
    summary = json.loads((src / "summary.json").read_text(encoding="utf-8"))
    models = [r["defense"] for r in summary["rows"]]
    (dest / "cells").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "summary.json", dest / "cells" / "summary.json")
    items, key = [], []
    for m in models:
        ev = json.loads((src / m / "eval.json").read_text(encoding="utf-8"))
        (dest / "cells" / m).mkdir(exist_ok=True)
        shutil.copyfile(src / m / "eval.json", dest / "cells" / m / "eval.json")
        for kind, sec in (("harmful", "harmful"), ("safe", "over_refusal")):
            for r in (ev.get(sec) or {}).get("records") or []:
                rid = secrets.token_hex(5)
                items.append({"id": rid, "prompt": r["prompt"], "answer": r["answer"], "prompt_kind": kind})
                key.append({"id": rid, "model": m, "prompt_kind": kind, "judge_outcome": r.get("outcome")})
    random.Random(args.seed).shuffle(items)
    atomic_write_text(dest / "blind.jsonl", "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    key.sort(key=lambda r: r["id"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["id", "model", "prompt_kind", "judge_outcome"], lineterminator="\n")
    w.writeheader()
    w.writerows(key)
    atomic_write_text(dest / "key.csv", buf.getvalue())
    print(f"{len(items)} answers of {len(models)} models -> {dest / 'blind.jsonl'} (key: {dest / 'key.csv'})")


if __name__ == "__main__":
    main()
