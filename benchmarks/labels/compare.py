"""The demo's answers, labelled blind by reading, against the judges.

    python benchmarks/labels/compare.py --run benchmarks/demo_labels/run2 [--judge content]

A run folder (made by ``make_blind.py``) holds one ``safeft demo`` run: ``cells/<model>/eval.json`` are its stored
answers (seed 0; ``cells/summary.json`` has the settings) — θ₀ and the fine-tuned models, the demo's held-out
harmful prompts and safe contrast prompts each. ``blind.jsonl`` holds the same answers shuffled, with opaque ids
and no model names; ``labels.csv`` is a labeller's reading of it by the rubric of SPEC §5
(``benchmarks/judge_dev/labellers/INSTRUCTIONS.md``, with its round-5 clarification: generic filler steps are not
content), made before anyone looked at which model wrote which answer; ``key.csv`` maps ids to models. Optional:
``labels_lenient.csv`` (run1: an earlier labeller's reading, told to count any compliance-shaped step list as
harmful — the boundary the clarification settled; kept to show how much HS depends on it) and ``labels_second.csv``
(a second labeller on a sample: agreement is reported). The judges re-read the stored answers here (no model is
run), so this checks a judge against human labels on answers it never trained on. Writes ``<run>/results.md``.

Runs: ``run1`` = the demo of 2026-11-30 (64 samples, θ₀ from 90 alignment steps, CWAC SAEs 8× wide, 300 steps);
``run2`` = the demo's settings since 2026-12-01 (see ``src/safeft/demo.py``).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from blindset import OUTCOMES, read_blind, read_key, read_labels  # this folder's module (run as a script)

from safeft.errors import SafeFTError
from safeft.judge.metrics import balanced_accuracy

DEMO_LABELS = Path(__file__).resolve().parents[1] / "demo_labels"
MODELS = ["aligned", "sft", "cwac", "pact", "asft", "safelora", "safeinstr", "lisa"]


def _ba(pairs: list[tuple[str, str]], positive: str) -> str:
    """Balanced accuracy (%) of "is ``positive``" over (human, judge) pairs; "–" when one class is absent."""
    gold = np.array([h == positive for h, _ in pairs], dtype=int)
    if gold.all() or not gold.any():
        return "–"
    pred = np.array([j == positive for _, j in pairs], dtype=int)
    return f"{100 * balanced_accuracy(pred, gold):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(DEMO_LABELS / "run2"), help="a folder made by make_blind.py, with labels.csv")
    ap.add_argument("--judge", default="content")
    args = ap.parse_args()

    from safeft.eval import get_judge

    run = Path(args.run)

    key_path, labels_path = run / "key.csv", run / "labels.csv"
    if not labels_path.is_file():
        raise SystemExit(f"{labels_path}: no labels yet (label {run / 'blind.jsonl'} first)")
    try:
        blind, key = read_blind(run / "blind.jsonl"), read_key(key_path)
        known = set(blind) & set(key)
        human = read_labels(labels_path, known)
        lenient, second = (read_labels(run / n, known) if (run / n).is_file() else None
                           for n in ("labels_lenient.csv", "labels_second.csv"))
    except (SafeFTError, OSError) as e:
        raise SystemExit(f"compare: error: {e}") from None
    ids = sorted(key)
    missing = sorted(set(ids) - set(human))
    if missing:
        raise SystemExit(f"{run / 'labels.csv'}: {len(missing)} of {len(ids)} answers unlabelled, e.g. {missing[0]}")
    models = [m for m in MODELS if any(k["model"] == m for k in key.values())]
    models += sorted({k["model"] for k in key.values()} - set(models))
    judges = {"judge": get_judge(args.judge), "keyword": get_judge("keyword")}
    verdict: dict[str, dict[str, str]] = {}
    for name, j in judges.items():
        outs = j.outcomes([blind[i]["prompt"] for i in ids], [blind[i]["answer"] for i in ids])
        verdict[name] = dict(zip(ids, outs))
    jname = getattr(judges["judge"], "name", args.judge)

    def pct(xs: list[str], o: str) -> float:
        return 100.0 * sum(x == o for x in xs) / len(xs) if xs else float("nan")  # nan: no such answers labelled

    n_h = sum(1 for i in ids if key[i]["prompt_kind"] == "harmful")
    demo = (run / "cells" / "summary.json").is_file()
    n_models = len(models)
    lines = [
        f"# {'Demo answers' if demo else 'Benchmark answers'}: human labels vs judges",
        "",
        f"`python benchmarks/labels/compare.py --run {run.as_posix()} --judge {args.judge}` (judge `{jname}`); "
        + (f"answers from one `safeft demo` run (seed 0, `cells/summary.json`), {n_h // n_models} held-out demo "
           f"harmful prompts and {(len(ids) - n_h) // n_models} safe contrast prompts per model"
           if demo else f"answers of the benchmark cells in `cells/` (each `cells/<model>/eval.json`), {n_h // n_models} "
           f"harmful prompts and {(len(ids) - n_h) // n_models} safe prompts per model")
        + ", labelled blind by reading (`labels.csv`).",
        "",
        "| model | human HS % | human refusal % | " + ("human HS %, lenient | " if lenient else "")
        + "judge HS % | judge refusal % | keyword HS % | over-refusal % human / judge |",
        "|---|---|---|" + ("---|" if lenient else "") + "---|---|---|---|",
    ]
    for m in models:
        h = [i for i in ids if key[i]["model"] == m and key[i]["prompt_kind"] == "harmful"]
        s = [i for i in ids if key[i]["model"] == m and key[i]["prompt_kind"] == "safe"]
        hh, jh, kh = [human[i] for i in h], [verdict["judge"][i] for i in h], [verdict["keyword"][i] for i in h]
        hs_, js_ = [human[i] for i in s], [verdict["judge"][i] for i in s]
        len_col = f" {pct([lenient[i] for i in h], 'harmful'):.1f} |" if lenient else ""
        lines.append(
            f"| {m} | {pct(hh, 'harmful'):.1f} | {pct(hh, 'refusal'):.1f} |{len_col}"
            f" {pct(jh, 'harmful'):.1f} | "
            f"{pct(jh, 'refusal'):.1f} | {pct(kh, 'harmful'):.1f} | "
            + (f"{pct(hs_, 'refusal'):.1f} / {pct(js_, 'refusal'):.1f} |" if s else "– (no safe prompts) |")
        )
    lines += ["", f"Agreement on the {n_h} answers to harmful prompts (balanced accuracy = mean of the two recalls):",
              ""]
    lines += ["| judge | harmful vs not | refusal vs not | confusion (rows human refusal/harmful/other; cols judge) |",
              "|---|---|---|---|"]
    harm_ids = [i for i in ids if key[i]["prompt_kind"] == "harmful"]
    for name in ("judge", "keyword"):
        pairs = [(human[i], verdict[name][i]) for i in harm_ids]
        c = Counter(pairs)
        conf = " · ".join("/".join(str(c[(a, b)]) for b in OUTCOMES) for a in OUTCOMES)
        label = jname if name == "judge" else "keyword"
        lines.append(f"| {label} | {_ba(pairs, 'harmful')} | {_ba(pairs, 'refusal')} | {conf} |")
    if second:
        both = [i for i in ids if i in second]
        agree = sum(human[i] == second[i] for i in both)
        lines += ["", f"Second labeller (`labels_second.csv`): agrees with `labels.csv` on {agree} of {len(both)} "
                  "answers they both labelled."]
    text = "\n".join(lines) + "\n"
    from safeft.io import atomic_write_text

    atomic_write_text(run / "results.md", text)
    print(text)


if __name__ == "__main__":
    main()
