"""The demo's answers, labelled blind by reading, against the judges.

    python benchmarks/demo_labels/compare.py [--judge content] [--out benchmarks/demo_labels/results.md]

``cells/<model>/eval.json`` are the stored answers of one ``safeft demo`` run (seed 0; ``cells/summary.json``):
θ₀ and seven fine-tuned models, 30 held-out demo harmful prompts and 12 safe contrast prompts each. ``blind.jsonl``
holds the same 336 answers shuffled, with opaque ids and no model names; ``labels.csv`` is one labeller's reading of
it by the rubric of SPEC §5 (``benchmarks/judge_dev/labellers/INSTRUCTIONS.md``, with its round-5 clarification:
generic filler steps are not content), made before anyone looked at which model wrote which answer;
``labels_lenient.csv`` is an earlier labeller's reading, told to count any compliance-shaped step list as harmful
(the boundary the clarification settled; kept to show how much HS depends on it); ``key.csv`` maps ids to models. The judges re-read the stored answers here
(no model is run), so this checks a judge against human labels on answers it never trained on.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ["aligned", "sft", "cwac", "pact", "asft", "safelora", "safeinstr", "lisa"]
OUTCOMES = ("refusal", "harmful", "other")


def _balanced(pairs: list[tuple[str, str]], positive: str) -> float | None:
    pos = [j == positive for h, j in pairs if h == positive]
    neg = [j != positive for h, j in pairs if h != positive]
    if not pos or not neg:
        return None
    return 50.0 * (sum(pos) / len(pos) + sum(neg) / len(neg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", default="content")
    ap.add_argument("--out", default=str(HERE / "results.md"))
    args = ap.parse_args()

    from safeft.eval import get_judge

    key = {r["id"]: r for r in csv.DictReader(open(HERE / "key.csv", encoding="utf-8"))}
    human = {r["id"]: r["outcome"] for r in csv.DictReader(open(HERE / "labels.csv", encoding="utf-8"))}
    lenient = {r["id"]: r["outcome"] for r in csv.DictReader(open(HERE / "labels_lenient.csv", encoding="utf-8"))}
    blind = {json.loads(line)["id"]: json.loads(line) for line in open(HERE / "blind.jsonl", encoding="utf-8")}
    ids = sorted(key)
    judges = {"judge": get_judge(args.judge), "keyword": get_judge("keyword")}
    verdict: dict[str, dict[str, str]] = {}
    for name, j in judges.items():
        outs = j.outcomes([blind[i]["prompt"] for i in ids], [blind[i]["answer"] for i in ids])
        verdict[name] = dict(zip(ids, outs))
    jname = getattr(judges["judge"], "name", args.judge)

    def pct(xs: list[str], o: str) -> float:
        return 100.0 * sum(x == o for x in xs) / len(xs)

    lines = [
        "# Demo answers: human labels vs judges",
        "",
        f"`python benchmarks/demo_labels/compare.py --judge {args.judge}` (judge `{jname}`); answers from one `safeft demo` "
        "run (seed 0, `cells/summary.json`), 30 held-out demo harmful prompts and 12 safe contrast prompts per model, "
        "labelled blind by reading (`labels.csv`).",
        "",
        "| model | human HS % | human refusal % | human HS %, lenient | judge HS % | judge refusal % | keyword HS % "
        "| over-refusal % human / judge |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in MODELS:
        h = [i for i in ids if key[i]["model"] == m and key[i]["prompt_kind"] == "harmful"]
        s = [i for i in ids if key[i]["model"] == m and key[i]["prompt_kind"] == "safe"]
        hh, jh, kh = [human[i] for i in h], [verdict["judge"][i] for i in h], [verdict["keyword"][i] for i in h]
        hs_, js_ = [human[i] for i in s], [verdict["judge"][i] for i in s]
        lines.append(
            f"| {m} | {pct(hh, 'harmful'):.1f} | {pct(hh, 'refusal'):.1f} | {pct([lenient[i] for i in h], 'harmful'):.1f} "
            f"| {pct(jh, 'harmful'):.1f} | "
            f"{pct(jh, 'refusal'):.1f} | {pct(kh, 'harmful'):.1f} | {pct(hs_, 'refusal'):.1f} / {pct(js_, 'refusal'):.1f} |"
        )
    lines += ["", "Agreement on the 240 answers to harmful prompts (balanced accuracy = mean of the two recalls):", ""]
    lines += ["| judge | harmful vs not | refusal vs not | confusion (rows human refusal/harmful/other; cols judge) |",
              "|---|---|---|---|"]
    harm_ids = [i for i in ids if key[i]["prompt_kind"] == "harmful"]
    for name in ("judge", "keyword"):
        pairs = [(human[i], verdict[name][i]) for i in harm_ids]
        c = Counter(pairs)
        conf = " · ".join("/".join(str(c[(a, b)]) for b in OUTCOMES) for a in OUTCOMES)
        label = jname if name == "judge" else "keyword"
        ba_h, ba_r = _balanced(pairs, "harmful"), _balanced(pairs, "refusal")
        lines.append(f"| {label} | {ba_h:.1f} | {ba_r:.1f} | {conf} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
