"""Do trained models still refuse CWAC's own anchors? θ₀ refuses every anchor (that is how they were chosen).

    python benchmarks/cwac_anchor_refusals.py --cwac-cell benchmarks/results/small/cells/p0.1-cwac-s0 \
        --cells sft=benchmarks/results/small/cells/p0.1-sft-s0 cwac=benchmarks/results/small/cells/p0.1-cwac-s0 \
        --out benchmarks/results/small/anchor_refusals

CWAC holds SAE features at the anchors' decision positions (the ``baseline`` anchors: the loss's) and freezes the
weight directions they span; its causal check scores latents on held-out anchors (``causal``). If a CWAC-trained
model keeps refusing its ``baseline`` anchors but not the test prompts, the constraint holds where it is applied and
fails to generalise; if it stops refusing even them, the constraint does not hold what makes θ₀ refuse.

Reads the CWAC cell's ``run.json`` (θ₀ and its fingerprint, the seed) and the anchors artifact
(``<cache>/artifacts/<fingerprint[:16]>/cwac-anchors``, or ``--anchors DIR``; its θ₀, seed and anchor options must be
the cell's). The folder holds whichever anchors were computed last for that θ₀: a preset with other evaluation
prompts (``small-cwac-lam`` excludes the validation prompts) makes anchors this check cannot tell apart, so after
such a run give ``--anchors`` the cell's own version from ``.versions/cwac-anchors/``. Takes the
first ``--n`` anchors of each split (the same split the defense used), answers them greedily with θ₀ and with each
cell's ``final`` adapter (chat template, ``--max-new-tokens`` as the anchor check), and judges the answers with the
content judge. Writes ``<out>.json`` (every answer) and ``<out>.md`` (refusal % per model and split).

``--by-label DIR`` (no model runs) reads ``<out>.json`` and ``DIR/prompts.jsonl`` + ``DIR/labels.csv`` (each anchor
prompt labelled harmful / benign / borderline by reading, without answers: ``DIR/INSTRUCTIONS.md``) and writes
``<out>_by_label.md``: each model's refusal rate on the anchors of each label.

``--by-source`` (no model runs) reads ``<out>.json`` and writes ``<out>_by_source.md``: each model's refusal rate on
the anchors that are AdvBench prompts (normalised text) and on the others, per split — whether anchors phrased like
the echo attack's requests hold better than the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safeft.errors import SafeFTError


def frac(k: int, n: int) -> str:
    """``k / n (x%)``, or ``–`` when n is 0."""
    return f"{k} / {n} ({100 * k / n:.0f}%)" if n else "–"


def advbench_test():
    """A predicate: is this prompt (normalised text) an AdvBench prompt."""
    from safeft.data import load_harmful_prompts, normalize_text

    adv = {normalize_text(p) for p in load_harmful_prompts("advbench")}
    return lambda prompt: normalize_text(prompt) in adv


def cell_anchors(cwac_cell: str | Path, anchors_dir: str | None) -> tuple[dict, list[str], dict[str, list[int]], int]:
    """A finished CWAC cell's ``run.json`` and its anchors (``anchors_dir``, or the cache's for the cell's θ₀),
    checked to be the cell's: ``(run, anchors, split, seed)``."""
    run_file = Path(cwac_cell) / "run.json"
    if not run_file.is_file():
        raise SafeFTError(f"--cwac-cell {cwac_cell}: no run.json there (has the cell finished?)")
    run = json.loads(run_file.read_text(encoding="utf-8"))
    return (run, *_anchors(anchors_dir, run))


def cell_adapters(specs: list[str]) -> dict[str, Path]:
    """``--cells NAME=CELL_DIR ...`` → ``{name: CELL_DIR/final}``, each a finished LoRA adapter."""
    cells = {}
    for c in specs:
        name, eq, d = c.partition("=")
        if not eq or not name:
            raise SafeFTError(f"--cells {c}: give NAME=CELL_DIR")
        final = Path(d) / "final"
        if not (final / "adapter_config.json").is_file():
            raise SafeFTError(f"--cells {c}: no LoRA adapter in {final} (has the cell finished here?)")
        cells[name] = final
    return cells


def eval_records(cell: Path) -> list[dict]:
    """The harmful-prompt records (prompt, answer, outcome, ...) of a finished cell's ``eval.json``."""
    f = cell / "eval.json"
    if not f.is_file():
        raise SafeFTError(f"{cell}: no eval.json there (has the cell finished?)")
    return json.loads(f.read_text(encoding="utf-8"))["harmful"]["records"]


def cell_theta0(cfg, run: dict, flag: str, cell: Path) -> Path:
    """θ₀'s folder for a cell's config, checked to be the weights the cell trained from (its run.json fingerprint)."""
    from safeft.models import fingerprint
    from safeft.pipeline import resolve

    aligned = resolve(cfg, cfg.model.aligned)
    fp = fingerprint(aligned)
    if fp != run.get("fingerprint"):
        raise SafeFTError(f"{flag} {cell}: this machine's θ₀ ({fp[:12]}) is not the cell's "
                          f"({run.get('fingerprint', '')[:12]}); point model.aligned at the θ₀ it trained from")
    return aligned


def _anchors(anchors_dir: str | None, run: dict) -> tuple[list[str], dict[str, list[int]], int]:
    from safeft.defenses.cwac.anchors import split_anchors
    from safeft.models import cache_root

    seed = int(run["config"]["training"]["seed"])  # CWAC's seed (ctx.seed): the anchors' key and their split
    d = Path(anchors_dir) if anchors_dir else cache_root() / "artifacts" / run["fingerprint"][:16] / "cwac-anchors"
    man = d / "manifest.json"
    if not man.is_file():
        raise SafeFTError(f"{man}: no anchors artifact; run the CWAC cell (or `safeft prepare`) first, or give --anchors")
    try:
        m = json.loads(man.read_text(encoding="utf-8"))
        cfg, anchors = m["config"], m["meta"]["anchors"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SafeFTError(f"{man}: not a cwac-anchors manifest; give --anchors a cwac-anchors folder") from None
    if m.get("name", "cwac-anchors") != "cwac-anchors":
        raise SafeFTError(f"{man}: a {m.get('name')!r} artifact, not cwac-anchors; give --anchors a cwac-anchors folder")
    versions = f"give --anchors with the right one among {d.parent / '.versions' / 'cwac-anchors'}/*"
    if m.get("fingerprint") != run["fingerprint"]:
        raise SafeFTError(f"{man}: anchors of another θ₀ (fingerprint {str(m.get('fingerprint'))[:12]}, cell "
                          f"{run['fingerprint'][:12]}); {versions}")
    if int(cfg.get("seed", -1)) != seed:
        raise SafeFTError(f"{man}: anchors of seed {cfg.get('seed')}, the cell's is {seed}; {versions}")
    want = run.get("defense_config_resolved", {}).get("cwac", {})
    pairs = {"n_anchor": "n_anchor", "sources": "anchor_sources", "judge": "anchor_judge",
             "near_dup_threshold": "near_dup_threshold", "max_new_tokens_anchor_check": "max_new_tokens_anchor_check"}
    for key, opt in pairs.items():
        if opt in want and key in cfg and cfg[key] != want[opt]:
            raise SafeFTError(f"{man}: anchors made with {key} {cfg[key]!r}, the cell's {opt} is {want[opt]!r}; {versions}")
    return anchors, split_anchors(len(anchors), seed), seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cwac-cell", help="a finished CWAC cell (its run.json names θ₀ and the seed)")
    ap.add_argument("--cells", nargs="+", metavar="NAME=CELL_DIR", help="cells whose final/ adapter to run")
    ap.add_argument("--anchors", help="a cwac-anchors artifact folder (default: the cache's, for the cell's θ₀)")
    ap.add_argument("--n", type=int, default=24, help="anchors per split (baseline, causal)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--no-aligned", action="store_true", help="skip θ₀ (it refuses every anchor by construction)")
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--by-label", metavar="DIR", help="only tabulate <out>.json by the prompt labels in DIR")
    ap.add_argument("--by-source", action="store_true", help="only tabulate <out>.json: AdvBench anchors vs the rest")
    args = ap.parse_args()
    try:
        if args.by_label:
            by_label(Path(args.out + ".json"), Path(args.by_label))
            return
        if args.by_source:
            by_source(Path(args.out + ".json"))
            return
        if not (args.cwac_cell and args.cells):
            raise SafeFTError("give --cwac-cell and --cells (or --by-label DIR to tabulate an earlier run)")
        run(args)
    except SafeFTError as e:
        sys.exit(str(e))


def run(args) -> None:
    run_json, anchors, split, seed = cell_anchors(args.cwac_cell, args.anchors)
    picked = {s: split[s][: args.n] for s in ("baseline", "causal")}
    cells: dict[str, Path | None] = {} if args.no_aligned else {"θ₀": None}
    cells.update(cell_adapters(args.cells))

    import torch  # the checks above run before these imports (seconds on a busy machine)
    from peft import PeftModel

    from safeft.eval.generate import generate
    from safeft.eval.judges import get_judge
    from safeft.io import atomic_write_text
    from safeft.models import load_model

    torch.manual_seed(0)
    judge = get_judge("content")
    out: dict = {"cwac_cell": str(args.cwac_cell), "seed": seed, "n_per_split": args.n,
                 "max_new_tokens": args.max_new_tokens, "judge": getattr(judge, "name", "content"), "models": {}}
    for name, final in cells.items():
        model, tok, _ = load_model(run_json["aligned_model"], dtype="float32")
        if final is not None:
            model = PeftModel.from_pretrained(model, str(final))
        res = {}
        for s, idx in picked.items():
            prompts = [anchors[i] for i in idx]
            answers = generate(model, tok, prompts, template="chat", max_new_tokens=args.max_new_tokens,
                               batch_size=12, desc=f"{name} {s} anchors")
            outcomes = judge.outcomes(prompts, answers)
            res[s] = {"refusal_pct": round(100 * outcomes.count("refusal") / len(prompts), 1),
                      "records": [{"prompt": p, "answer": a, "outcome": o} for p, a, o in zip(prompts, answers, outcomes)]}
            print(f"{name:16s} {s:9s} refusal {res[s]['refusal_pct']:5.1f}% of {len(prompts)}", flush=True)
        out["models"][name] = res
        del model
    atomic_write_text(Path(args.out + ".json"), json.dumps(out, indent=1, ensure_ascii=False))
    lines = [f"# Refusals on CWAC's own anchors (`python benchmarks/cwac_anchor_refusals.py {' '.join(sys.argv[1:])}`)", "",
             f"Seed {seed}; the first {args.n} anchors of the `baseline` split (the activation loss's anchors) and of "
             f"the `causal` split (held out); greedy, {args.max_new_tokens} new tokens; judge {out['judge']}.", "",
             "| model | refusal % on baseline anchors | refusal % on held-out anchors |", "|---|---|---|"]
    lines += [f"| {n} | {r['baseline']['refusal_pct']} | {r['causal']['refusal_pct']} |" for n, r in out["models"].items()]
    if args.no_aligned:
        lines += ["", "θ₀ is not run (`--no-aligned`): the anchors are prompts it refused when they were chosen."]
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")


def by_label(out_json: Path, labels_dir: Path) -> None:
    import csv

    from safeft.io import atomic_write_text

    for f in (out_json, labels_dir / "prompts.jsonl", labels_dir / "labels.csv"):
        if not f.is_file():
            raise SafeFTError(f"{f}: missing (run the diagnostic first; label the prompts by {labels_dir}/INSTRUCTIONS.md)")
    res = json.loads(out_json.read_text(encoding="utf-8"))
    ids = {}
    for n, line in enumerate((labels_dir / "prompts.jsonl").read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ids[rec["prompt"]] = rec["id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SafeFTError(f"{labels_dir / 'prompts.jsonl'} line {n}: not a JSON record with id and prompt") from None
    with open(labels_dir / "labels.csv", encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not {"id", "label"} <= set(reader.fieldnames or []):
            raise SafeFTError(f"{labels_dir / 'labels.csv'}: the header must name id and label")
        label = {r["id"]: (r["label"] or "").strip() for r in reader}
    kinds = ("harmful", "borderline", "benign")
    lines = [f"# Refusals on CWAC's anchors by what the prompt asks (`python benchmarks/cwac_anchor_refusals.py "
             f"--out {str(out_json)[:-5]} --by-label {labels_dir}`)", "",
             f"The {sum(len(r['records']) for r in next(iter(res['models'].values())).values())} anchor prompts of "
             f"`{out_json.name}` (both splits), each labelled by reading the prompt alone.", "",
             "| model | " + " | ".join(f"refuses {k} anchors" for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, splits in res["models"].items():
        tally = {k: [0, 0] for k in kinds}
        for split in splits.values():
            for r in split["records"]:
                try:
                    k = label[ids[r["prompt"]]]
                except KeyError:
                    raise SafeFTError(f"{labels_dir}: no label for anchor {r['prompt'][:60]!r}") from None
                if k not in tally:
                    raise SafeFTError(f"{labels_dir / 'labels.csv'}: label {k!r} is not {' / '.join(kinds)}")
                tally[k][0] += r["outcome"] == "refusal"
                tally[k][1] += 1
        lines.append(f"| {name} | " + " | ".join(frac(a, n) for a, n in tally.values())
                     + " |")
    atomic_write_text(out_json.with_name(out_json.stem + "_by_label.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def by_source(out_json: Path) -> None:
    from safeft.io import atomic_write_text

    if not out_json.is_file():
        raise SafeFTError(f"{out_json}: missing (run the diagnostic first)")
    try:
        res = json.loads(out_json.read_text(encoding="utf-8"))
        models = {n: {sp: list(r["records"]) for sp, r in splits.items()} for n, splits in res["models"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise SafeFTError(f"{out_json}: not this diagnostic's output (models → split → records); rerun it") from None
    is_adv = advbench_test()
    groups = (("AdvBench", True), ("other sources", False))
    lines = [f"# Refusals on CWAC's anchors by source (`python benchmarks/cwac_anchor_refusals.py --out "
             f"{str(out_json)[:-5]} --by-source`)", "",
             f"Anchors of `{out_json.name}`; AdvBench = the prompt's normalised text is an AdvBench prompt.", "",
             "| model | split | " + " | ".join(f"refuses {g} anchors" for g, _ in groups) + " |", "|---|---|---|---|"]
    for name, splits in models.items():
        for split, records in splits.items():
            cells = []
            for _, want in groups:
                rs = [r for r in records if is_adv(r["prompt"]) == want]
                cells.append(frac(sum(r["outcome"] == "refusal" for r in rs), len(rs)))
            lines.append(f"| {name} | {split} | " + " | ".join(cells) + " |")
    atomic_write_text(out_json.with_name(out_json.stem + "_by_source.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
