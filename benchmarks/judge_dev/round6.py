"""Round 6 of the judge's development answers: the `tiny` preset's fine-tuned models on prompts no benchmark scores.

    OMP_NUM_THREADS=1 python benchmarks/judge_dev/round6.py            # ≈ 40 min on 2 CPU cores beside a bench
    C=benchmarks/judge_dev/round6/generated                           # then the blind set for the labellers
    python benchmarks/labels/make_blind.py --dest benchmarks/judge_dev/round6 --harmful-only --second 60 \
        --cells aligned=$C/aligned sft=$C/sft cwac=$C/cwac lisa=$C/lisa safeinstr=$C/safeinstr salora=$C/salora
    python benchmarks/judge_dev/round6.py --merge                      # after labelling: round6/labelled.csv

Why: the content judge scores 86% harmful-vs-not on its own test split but 71% on `tiny` v2's 2,400 test answers
(docs/judges.md). Its development answers cover 101 prompts, all HarmBench *validation* standard behaviours; the
benchmark's test prompts are a third contextual (a passage, then the request), and no development answer had one.
This round adds answers to prompts the judge has not seen, none of which any benchmark scores:

* HarmBench validation's 19 *contextual* behaviours (HarmBench's own format: context, ``---``, request);
* safety-tuned-llamas' 100 I-MaliciousInstructions (short direct harmful requests of another source).

Models: θ₀ of `tiny` and five of its fine-tunes (p 0.1, seed 0) — SFT, CWAC, Lisa, SafeInstr, SaLoRA — loaded from
the cells' saved adapters (`benchmarks/results/tiny/cells/<cell>/final`, kept locally, not in git); greedy, 64 new
tokens, the cells' own chat template. None of the answers stored under `benchmarks/results/` is used: those stay
the judge's check set. Output: ``round6/generated/<name>/eval.json`` (``harmful.records``: prompt, answer; not in git:
``make_blind.py`` copies each to ``round6/cells/<name>/eval.json``, which is). Kept out of ``runs/`` so that
``collect.py`` (rounds 1–4, the v1 head's ``answers.jsonl``) does not pick it up. A model whose file exists is
skipped (rerun resumes).

Labelling: as rounds 1–4 (``labellers/INSTRUCTIONS.md``, blind, shuffled; ``labellers/r6<x>.labels.csv``), a second
labeller on a random sample (``round6/labels_second.csv``, agreement reported, not merged).

Rule, written before the head is rebuilt with these labels (2026-12-02), the same as for the v2 heads tried before:
the rebuilt head ships (as ``content-v2``) only if (a) its selection score — the mean over sources and tasks of the
balanced accuracy on the *val* split — is at least the shipped v1's on the same val items with v1's own thresholds,
and (b) it passes ``tests/test_content_judge.py::test_shipped_judge_plain_cases``. Either way its test-split numbers
and its agreement with the blind labels of `tiny` v2's test answers (``benchmarks/test_labels/tiny/``, never trained
or tuned on) are reported beside v1's in docs/judges.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CELLS = REPO / "benchmarks" / "results" / "tiny" / "cells"
MODELS = {"aligned": "aligned", "sft": "p0.1-sft-s0", "cwac": "p0.1-cwac-s0", "lisa": "p0.1-lisa-s0",
          "safeinstr": "p0.1-safeinstr-s0", "salora": "p0.1-salora-s0"}


def prompts() -> list[str]:
    """HarmBench validation's contextual behaviours, then safety-tuned-llamas' MaliciousInstructions (in file order)."""
    from safeft.data import shared_data_dir
    from safeft.io import read_jsonl, read_table

    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("round6: no ../shared/data (set SAFEFT_SHARED_DATA)")
    out = []
    for r in read_table(Path(shared) / "harmful" / "harmbench_val.csv"):
        if r["FunctionalCategory"].strip() == "contextual":
            out.append(f"{r['ContextString'].strip()}\n\n---\n\n{r['Behavior'].strip()}")
    for r in read_jsonl(Path(shared) / "harmful" / "safety_tuned_llamas_eval.jsonl"):
        if r["source_set"] == "I-MaliciousInstructions":
            out.append(" ".join(x for x in (r["instruction"].strip(), (r.get("input") or "").strip()) if x))
    return out


def merge(folder: Path) -> None:
    """``labelled.csv`` (id, prompt, answer, outcome, note, model) from the blind set, its key and the labels, in the
    blind file's order: the self-contained file ``safeft.judge.labelled.load_dev_labelled`` reads."""
    import csv
    import io
    import json

    from safeft.io import atomic_write_text

    blind = [json.loads(line) for line in open(folder / "blind.jsonl", encoding="utf-8")]
    key = {r["id"]: r["model"] for r in csv.DictReader(open(folder / "key.csv", encoding="utf-8"))}
    labels = {r["id"]: r for r in csv.DictReader(open(folder / "labels.csv", encoding="utf-8"))}
    missing = [b["id"] for b in blind if b["id"] not in labels]
    if missing:
        raise SystemExit(f"{folder / 'labels.csv'}: {len(missing)} of {len(blind)} answers unlabelled, e.g. {missing[0]}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "prompt", "answer", "outcome", "note", "model"])
    for b in blind:
        lab = labels[b["id"]]
        w.writerow([b["id"], b["prompt"], b["answer"], lab["outcome"].strip(), lab.get("note", ""), key[b["id"]]])
    atomic_write_text(folder / "labelled.csv", buf.getvalue())
    print(f"{len(blind)} labelled answers -> {folder / 'labelled.csv'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--merge", action="store_true",
                    help="join round6/blind.jsonl, key.csv and labels.csv into round6/labelled.csv (no generation)")
    args = ap.parse_args()
    if args.merge:
        merge(HERE / "round6")
        return

    from safeft.config import config_from_dict, load_yaml
    from safeft.eval import generate
    from safeft.io import atomic_write_json
    from safeft.models import load_model
    from safeft.pipeline import load_trained, resolve

    ps = prompts()
    for name in args.models:
        out = HERE / "round6" / "generated" / name / "eval.json"
        if out.is_file():
            print(f"{name}: done ({out})")
            continue
        cell = CELLS / MODELS[name]
        cfg = config_from_dict(load_yaml(cell / "config.yaml"))
        if name == "aligned":
            model, tok, _ = load_model(str(resolve(cfg, cfg.model.aligned)), dtype=cfg.model.dtype)
        else:
            model, tok = load_trained(cfg, cell)
        model.eval()
        t0 = time.perf_counter()
        answers = generate(model, tok, ps, template=cfg.data.template, max_new_tokens=args.max_new_tokens,
                           batch_size=16, desc=name)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, {
            "model": name, "cell": str(cell.relative_to(REPO)), "max_new_tokens": args.max_new_tokens,
            "seconds": round(time.perf_counter() - t0, 1), "command": "python benchmarks/judge_dev/round6.py",
            "harmful": {"records": [{"prompt": p, "answer": a} for p, a in zip(ps, answers)]},
        })
        print(f"{name}: {len(ps)} answers in {time.perf_counter() - t0:.0f} s -> {out}")


if __name__ == "__main__":
    main()
