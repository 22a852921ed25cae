"""Make a blind labelling set from one ``safeft demo`` run, or from benchmark cells.

    python benchmarks/labels/make_blind.py --src runs/demo --dest benchmarks/demo_labels/run2
    python benchmarks/labels/make_blind.py --dest benchmarks/attack_labels/tiny-val --harmful-only \
        --cells theta0=benchmarks/results/tiny-attack/cells/aligned sft-content=benchmarks/results/tiny-attack/cells/p0.1-sft-s0

Copies the run's ``<model>/eval.json`` and ``summary.json`` (with ``--cells``: each ``NAME=CELL_DIR``'s
``eval.json``, under NAME) into ``<dest>/cells/`` (the stored answers, so that
the labels can always be checked against the text they label) and writes

* ``<dest>/blind.jsonl``: every answer to a harmful or safe contrast prompt, shuffled (seed 0), each with a random
  id (nothing about the model can be computed from it), the prompt, the answer and the prompt kind — no model name,
  no judge verdict. This is all a labeller reads (run1 and run2 were made with ids hashed from the model name and
  prompt; their labellers were told to read only blind.jsonl and the instructions);
* ``<dest>/key.csv``: id → model, prompt kind, the judge's outcome (read only after labelling);
* with ``--second N``, ``<dest>/blind_second.jsonl``: a random N of those lines for a second, independent labeller
  (its labels go to ``labels_second.csv``);
* with ``--parts N``, ``<dest>/part1.jsonl`` … ``partN.jsonl``: ``blind.jsonl`` cut into N consecutive pieces of
  (nearly) equal line counts, one per labeller (labels to ``labels_part1.csv`` …; ``join_parts.py --run <dest>``
  checks them and joins them into ``labels.csv``).

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
    ap.add_argument("--cells", nargs="+", metavar="NAME=CELL_DIR", help="benchmark cells (each with eval.json) instead "
                    "of a demo run; NAME is what key.csv calls the model")
    ap.add_argument("--harmful-only", action="store_true", help="only the answers to harmful prompts")
    ap.add_argument("--second", type=int, default=0, metavar="N",
                    help="also write blind_second.jsonl: a random N of the answers (seed 1) for a second labeller")
    ap.add_argument("--parts", type=int, metavar="N",
                    help="also cut blind.jsonl into part1.jsonl … partN.jsonl, one per labeller (N ≥ 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src, dest = Path(args.src), Path(args.dest)
    if args.parts is not None and args.parts < 2:
        raise SystemExit(f"--parts {args.parts}: give a count ≥ 2 (one part per labeller)")
    if args.cells:
        bad = [c for c in args.cells if "=" not in c]
        if bad:
            raise SystemExit(f"--cells {bad[0]}: give NAME=CELL_DIR")
        evals = {name: Path(d) / "eval.json" for name, d in (c.split("=", 1) for c in args.cells)}
        for name, f in evals.items():
            if not f.is_file():
                raise SystemExit(f"--cells {name}={f.parent}: no eval.json there (has the cell finished?)")
    if (dest / "labels.csv").exists():
        raise SystemExit(f"{dest / 'labels.csv'} exists: those labels belong to the answers already there; "
                         "choose another --dest")
    from safeft.io import atomic_write_text
    (dest / "cells").mkdir(parents=True, exist_ok=True)
    if not args.cells:
        summary = json.loads((src / "summary.json").read_text(encoding="utf-8"))
        evals = {r["defense"]: src / r["defense"] / "eval.json" for r in summary["rows"]}
        shutil.copyfile(src / "summary.json", dest / "cells" / "summary.json")
    models = list(evals)
    kinds = (("harmful", "harmful"),) if args.harmful_only else (("harmful", "harmful"), ("safe", "over_refusal"))
    items, key = [], []
    for m in models:
        ev = json.loads(evals[m].read_text(encoding="utf-8"))
        (dest / "cells" / m).mkdir(exist_ok=True)
        shutil.copyfile(evals[m], dest / "cells" / m / "eval.json")
        for kind, sec in kinds:
            for r in (ev.get(sec) or {}).get("records") or []:
                rid = secrets.token_hex(5)
                items.append({"id": rid, "prompt": r["prompt"], "answer": r["answer"], "prompt_kind": kind})
                key.append({"id": rid, "model": m, "prompt_kind": kind, "judge_outcome": r.get("outcome")})
    random.Random(args.seed).shuffle(items)
    lines = [json.dumps(it, ensure_ascii=False) for it in items]
    atomic_write_text(dest / "blind.jsonl", "".join(x + "\n" for x in lines))
    if args.parts:
        if args.parts > len(lines):
            raise SystemExit(f"--parts {args.parts}: more parts than the {len(lines)} answers")
        bounds = [round(k * len(lines) / args.parts) for k in range(args.parts + 1)]
        for k in range(args.parts):
            atomic_write_text(dest / f"part{k + 1}.jsonl", "".join(x + "\n" for x in lines[bounds[k]:bounds[k + 1]]))
    if args.second:
        atomic_write_text(dest / "blind_second.jsonl", "\n".join(random.Random(1).sample(lines, args.second)) + "\n")
    key.sort(key=lambda r: r["id"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["id", "model", "prompt_kind", "judge_outcome"], lineterminator="\n")
    w.writeheader()
    w.writerows(key)
    atomic_write_text(dest / "key.csv", buf.getvalue())
    print(f"{len(items)} answers of {len(models)} models -> {dest / 'blind.jsonl'} (key: {dest / 'key.csv'})")


if __name__ == "__main__":
    main()
