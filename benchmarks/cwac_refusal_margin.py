"""How close to the edge are θ₀'s refusals? The first answer token on CWAC's anchors against the evaluated prompts.

    python benchmarks/cwac_refusal_margin.py --cwac-cell benchmarks/results/small-cwac-lam/cells/p0.1-cwac@res10-s0 \
        --aligned-cell benchmarks/results/small-cwac-lam/cells/aligned \
        --cells lam2=benchmarks/results/small-cwac-lam/cells/p0.1-cwac@lam2-s0 \
        --out benchmarks/results/small-cwac-lam/refusal_margin

The echo attack teaches one first token ("Sure"). At the last prompt position (the generation header) this script
reads, for θ₀ and for each trained adapter, the log-probability gap between the model's own top token and that
first token, on four groups: the first ``n`` loss anchors and held-out anchors of the CWAC cell (prompts θ₀ refused
when they were chosen), and the evaluated harmful prompts θ₀ refused / did not refuse (its cell's ``eval.json``).
A small gap under θ₀ means a small push turns the answer into the echo. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from safeft.defenses.cwac.common import first_token_gaps
from safeft.errors import SafeFTError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cwac-cell", required=True, help="a finished CWAC cell (its anchors, θ₀, config, eval.json)")
    ap.add_argument("--aligned-cell", required=True, help="θ₀'s evaluation cell (which prompts it refused)")
    ap.add_argument("--cells", nargs="*", default=[], metavar="NAME=CELL_DIR", help="cells whose final/ adapter to read")
    ap.add_argument("--n", type=int, default=48, help="anchors per split (baseline, causal)")
    ap.add_argument("--first-token", default="Sure", help="the attack's first answer token")
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args()
    try:
        run(args)
    except SafeFTError as e:
        sys.exit(str(e))


def run(args) -> None:
    from cwac_anchor_refusals import cell_adapters, cell_anchors, cell_theta0, eval_records
    from peft import PeftModel

    from safeft.config import build_config
    from safeft.defenses.cwac.common import prompt_ids
    from safeft.io import atomic_write_text
    from safeft.models import load_model

    cell, aligned_cell = Path(args.cwac_cell), Path(args.aligned_cell)
    cells = cell_adapters(args.cells)
    run_json, anchors, split, _ = cell_anchors(cell, None)
    cfg = build_config(cell / "config.yaml")
    refused = {r["prompt"]: bool(r["refusal"]) for r in eval_records(aligned_cell)}
    evaluated = [r["prompt"] for r in eval_records(cell)]
    if set(evaluated) != set(refused):
        raise SafeFTError(f"--aligned-cell {aligned_cell}: evaluated other prompts than --cwac-cell {cell}")
    groups = {
        "loss anchors": [anchors[i] for i in split["baseline"][: args.n]],
        "held-out anchors": [anchors[i] for i in split["causal"][: args.n]],
        "evaluated, θ₀ refused": [p for p in evaluated if refused[p]],
        "evaluated, θ₀ did not refuse": [p for p in evaluated if not refused[p]],
    }
    aligned = cell_theta0(cfg, run_json, "--cwac-cell", cell)
    base, tok, _ = load_model(str(aligned), dtype=cfg.model.dtype)
    ids = tok.encode(args.first_token, add_special_tokens=False)
    if not ids:
        raise SafeFTError(f"--first-token {args.first_token!r}: the tokenizer gives no token for it")
    target = ids[0]
    seqs = {g: prompt_ids(tok, cfg.data.template, ps, int(cfg.data.max_length))
            for g, ps in groups.items()}

    def read(model) -> dict:
        out = {}
        for g, ss in seqs.items():
            gap, p, top = first_token_gaps(model, ss, target)
            out[g] = {"n": len(ss), "median_gap": statistics.median(gap), "median_p": statistics.median(p),
                      "target_top": sum(top)}
        return out

    base.eval()
    res = {"cwac_cell": str(cell), "first_token": args.first_token, "models": {"θ₀": read(base)}}
    for name, adapter in cells.items():
        m = PeftModel.from_pretrained(base, str(adapter))
        m.eval()
        res["models"][name] = read(m)
        base = m.unload()
    atomic_write_text(Path(args.out).with_suffix(".json"), json.dumps(res, indent=1))
    cmd = " ".join(["python benchmarks/cwac_refusal_margin.py", *sys.argv[1:]])
    lines = [f"# θ₀'s first-token margin against the echo (`{cmd}`)", "",
             f"At the generation header: median of log p(top token) − log p({args.first_token!r}) (0 = the echo's "
             f"first token is already the top one), median p({args.first_token!r}), and how many prompts have it on "
             "top. Anchors: the first rows of the CWAC cell's loss (baseline) and held-out (causal) splits.", "",
             "| model | group | n | median gap (nats) | median p | top is the echo's |", "|---|---|---|---|---|---|"]
    for name, per in res["models"].items():
        for g, v in per.items():
            lines.append(f"| {name} | {g} | {v['n']} | {v['median_gap']:.2f} | {v['median_p']:.3g} | "
                         f"{v['target_top']} |")
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
