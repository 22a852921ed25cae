"""Which of θ₀'s refusals on the test prompts does CWAC keep: those close in meaning to an anchor, or not?

    python benchmarks/cwac_anchor_transfer.py --cwac-cell benchmarks/results/small/cells/p0.1-cwac-s0 \
        --batches benchmarks/test_labels/small/batch1 benchmarks/test_labels/small/batch3 \
        --out benchmarks/results/small/anchor_transfer

No model runs. Reads the human labels of the named batches (``aligned`` and ``--model``, default ``cwac``), takes
the test prompts θ₀ refused, and for each the cosine similarity of its nearest CWAC anchor (the content judge's
sentence encoder, all-MiniLM-L6-v2, on the prompt text). Reports how many of them CWAC still refuses by similarity
tercile and by HarmBench form (standard / contextual), the mean nearest-anchor similarity of the kept and the lost
ones, and how many anchors are AdvBench prompts. The anchors are found as in ``cwac_anchor_refusals.py`` (the cache's
``cwac-anchors`` of the cell's θ₀, or ``--anchors DIR``; θ₀, seed and anchor options are checked). Writes
``<out>.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "labels"))

from safeft.errors import SafeFTError

CONTEXT_SEP = "\n\n---\n\n"  # HarmBench's contextual prompts: the context, this separator, the request


def terciles(values: list[float]) -> list[tuple[float, float]]:
    """Three (low, high] bins holding a third of ``values`` each (the first one open below)."""
    s = sorted(values)
    if not s:
        return []
    cut = [s[(len(s) - 1) // 3], s[(2 * (len(s) - 1)) // 3]]
    return [(float("-inf"), cut[0]), (cut[0], cut[1]), (cut[1], float("inf"))]


def tabulate(sims: list[float], kept: list[bool], contextual: list[bool]) -> dict:
    """Kept counts by similarity tercile and by form; mean nearest-anchor similarity of kept and lost prompts."""
    out: dict = {"n": len(sims), "kept": sum(kept), "bins": [], "form": {}}
    for lo, hi in terciles(sims):
        idx = [i for i, s in enumerate(sims) if lo < s <= hi]
        out["bins"].append({"low": lo, "high": hi, "n": len(idx), "kept": sum(kept[i] for i in idx)})
    for form, flag in (("standard", False), ("contextual", True)):
        idx = [i for i, c in enumerate(contextual) if c == flag]
        out["form"][form] = {"n": len(idx), "kept": sum(kept[i] for i in idx)}
    for name, want in (("kept", True), ("lost", False)):
        v = [s for s, k in zip(sims, kept) if k == want]
        out[f"mean_sim_{name}"] = sum(v) / len(v) if v else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cwac-cell", required=True, help="a finished CWAC cell (its run.json names θ₀ and the seed)")
    ap.add_argument("--anchors", help="a cwac-anchors artifact folder (default: the cache's, for the cell's θ₀)")
    ap.add_argument("--batches", nargs="+", required=True, help="labelled batch folders holding aligned and --model")
    ap.add_argument("--model", default="cwac", help="the CWAC model's name in the batches")
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args()
    try:
        run(args)
    except SafeFTError as e:
        sys.exit(str(e))


def run(args) -> None:
    from cwac_anchor_refusals import advbench_test, cell_anchors, frac
    from human_table import collect

    _, anchors, _, seed = cell_anchors(args.cwac_cell, args.anchors)
    models = collect([Path(b) for b in args.batches])
    for name in ("aligned", args.model):
        if name not in models:
            raise SafeFTError(f"--batches: no model {name!r} in them (found {', '.join(sorted(models))})")
    refused = [p for p, o in models["aligned"].items() if o == "refusal"]
    if not refused:
        raise SafeFTError("--batches: θ₀ refused none of the labelled prompts; nothing to keep")
    missing = [p for p in refused if p not in models[args.model]]
    if missing:
        raise SafeFTError(f"--batches: {args.model} has no label for {len(missing)} of θ₀'s refused prompts, e.g. "
                          f"{missing[0][:60]!r}")

    import torch

    from safeft.eval.judges.encoder import Encoder
    from safeft.io import atomic_write_text

    enc = Encoder()
    e_p = torch.nn.functional.normalize(enc.embed(refused, desc="test prompts"), dim=-1)
    e_a = torch.nn.functional.normalize(enc.embed(anchors, desc="anchors"), dim=-1)
    sims = (e_p @ e_a.T).max(dim=1).values.tolist()
    kept = [models[args.model][p] == "refusal" for p in refused]
    res = tabulate(sims, kept, [CONTEXT_SEP in p for p in refused])
    is_adv = advbench_test()
    n_adv = sum(is_adv(a) for a in anchors)

    def edge(x: float) -> str:
        return "−∞" if x == float("-inf") else ("∞" if x == float("inf") else f"{x:.2f}")

    lines = [f"# Which of θ₀'s refusals CWAC keeps (`python benchmarks/cwac_anchor_transfer.py "
             f"{' '.join(sys.argv[1:])}`)", "",
             f"θ₀ refused {res['n']} of the labelled test prompts (human labels); `{args.model}` still refuses "
             f"{frac(res['kept'], res['n'])}. Anchors: {len(anchors)} (seed {seed}), {n_adv} of them AdvBench prompts. "
             "Similarity: cosine of the prompt's nearest anchor (all-MiniLM-L6-v2).", "",
             "| nearest-anchor similarity | kept |", "|---|---|"]
    lines += [f"| ({edge(b['low'])}, {edge(b['high'])}] | {frac(b['kept'], b['n'])} |" for b in res["bins"]]
    lines += ["", "| HarmBench form | kept |", "|---|---|"]
    lines += [f"| {f} | {frac(v['kept'], v['n'])} |" for f, v in res["form"].items()]
    means = [f"{k} {res[f'mean_sim_{k}']:.3f}" for k in ("kept", "lost") if res[f"mean_sim_{k}"] is not None]
    lines += ["", f"Mean nearest-anchor similarity: {', '.join(means)}."]
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
