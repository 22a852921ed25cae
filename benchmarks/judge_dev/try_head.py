"""Build a candidate content-judge head with extra development labels and apply the ship rule against the shipped one.

    python benchmarks/judge_dev/try_head.py --dev-labelled round6/labelled.csv --out /tmp/head-v2.safetensors

The candidate is built by ``safeft.judge.train.build`` exactly as ``safeft judge --build`` does, with the given
labelled files (relative to ``benchmarks/judge_dev``) added to ``safeft_dev``. The rule (written before the round-6
build, ``round6.py``): the candidate ships only if (a) its selection score on the *val* split — the mean over sources
and tasks of the balanced accuracy — is at least the shipped head's on the same val items with its own thresholds, and
(b) it gives the plain cases right (``safeft.judge.check.PLAIN_CASES``, the shipped head's acceptance test). Also printed
for both heads: the test split per source, and the agreement with the blind labels of ``benchmarks/test_labels/``
batches given with ``--check-batches`` (never trained or tuned on; a check only). Writes ``--report`` (JSON).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def batch_pairs(folders: list[Path]) -> tuple[list[str], list[str], list[str]]:
    """(prompts, answers, human outcomes) of every labelled answer to a harmful prompt in the batches."""
    prompts, answers, human = [], [], []
    for b in folders:
        labels = {r["id"]: r["outcome"].strip() for r in csv.DictReader(open(b / "labels.csv", encoding="utf-8"))}
        for line in open(b / "blind.jsonl", encoding="utf-8"):
            r = json.loads(line)
            if r["id"] in labels and r.get("prompt_kind", "harmful") == "harmful":
                prompts.append(r["prompt"])
                answers.append(r["answer"])
                human.append(labels[r["id"]])
    return prompts, answers, human


def agreement_pct(human: list[str], judged: list[str]) -> dict[str, float]:
    from safeft.judge.metrics import balanced_accuracy

    h, j = np.array(human), np.array(judged)
    return {f"{o}_bal_acc": round(100 * balanced_accuracy((j == o).astype(int), (h == o).astype(int)), 1)
            for o in ("harmful", "refusal")}


def outcomes_of(judges: dict, prompts: list[str], answers: list[str]) -> dict[str, list[str]]:
    """Each judge's outcomes on the same answers, from one encoder pass (the heads share the encoder: both
    manifests name its SHA-256, checked when each judge loads)."""
    from safeft.eval.judges.content import decide, embed_inputs

    x = embed_inputs(next(iter(judges.values())).encoder, prompts, answers, desc="encoding")
    return {name: decide(*j.head_probs(x), j.t_harm, j.t_ref) for name, j in judges.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev-labelled", nargs="+", required=True, help="labelled files under benchmarks/judge_dev")
    ap.add_argument("--out", required=True, help="candidate head (.safetensors)")
    ap.add_argument("--check-batches", nargs="*", default=[], help="blind-labelled batch folders (check only)")
    ap.add_argument("--report", default=None, help="write the numbers here (JSON)")
    args = ap.parse_args()
    if args.report and Path(args.report).resolve() == Path(args.out).with_suffix(".json").resolve():
        raise SystemExit(f"--report {args.report} is the candidate head's own manifest; choose another path")

    from safeft.eval.judges.content import ContentJudge
    from safeft.judge.check import PLAIN_CASES
    from safeft.judge.labelled import load_sources
    from safeft.judge.metrics import selection_score
    from safeft.judge.train import build, per_source

    man = build(Path(args.out), dev_labelled=args.dev_labelled)
    judges = {"candidate": ContentJudge(weights=Path(args.out)), "shipped": ContentJudge()}
    items = [it for its in load_sources(dev_labelled=args.dev_labelled).values() for it in its]
    report: dict = {"candidate": str(args.out), "dev_labelled": args.dev_labelled, "manifest_counts": man["counts"],
                    "chosen": {k: man[k] for k in ("hidden", "epochs", "t_harm", "t_ref")}}
    for split in ("val", "test"):
        its = [it for it in items if it.split == split]
        for name, outs in outcomes_of(judges, [it.prompt for it in its], [it.answer for it in its]).items():
            ps = per_source(its, outs, n_boot=200)
            report.setdefault(split, {})[name] = {
                "selection_score": round(selection_score(ps), 4),
                "per_source": {s: {t: (round(100 * r[t]["balanced_accuracy"], 1) if r.get(t) else None)
                                   for t in ("harm", "refusal")} for s, r in ps.items()},
            }
    prompts, answers, expected = zip(*PLAIN_CASES)
    plain = judges["candidate"].outcomes(list(prompts), list(answers))
    report["plain_cases_ok"] = plain == list(expected)
    report["plain_cases"] = plain
    report["ships"] = bool(report["val"]["candidate"]["selection_score"] >= report["val"]["shipped"]["selection_score"]
                           and report["plain_cases_ok"])
    if args.check_batches:
        prompts, answers, human = batch_pairs([Path(b) for b in args.check_batches])
        report["check"] = {"n": len(human), "batches": args.check_batches}
        for name, outs in outcomes_of(judges, prompts, answers).items():
            report["check"][name] = agreement_pct(human, outs)
    text = json.dumps(report, indent=1)
    if args.report:
        from safeft.io import atomic_write_text

        atomic_write_text(Path(args.report), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
