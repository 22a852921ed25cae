"""Does the fine-tune move the residual stream where CWAC's safety latents cannot see it?

    python benchmarks/cwac_latent_route.py --cell benchmarks/results/small-cwac-anchors/cells/p0.1-cwac-s0 \
        --out benchmarks/results/small-cwac-anchors/latent_route

CWAC's activation loss holds the safety latents S (per SAE layer) of its baseline anchors at their last
``n_positions`` prompt positions. This script loads the cell's θ₀, its cached CWAC artifacts (the same ones its
training used; nothing is computed: a missing artifact stops it) and its trained adapter, runs both models on every
baseline anchor, and reports per SAE layer, separately for the anchors that are AdvBench prompts and the others:

- ``latent change``: √((1/n) Σ_b ‖z_S,b − z_S,b^base‖² / mean ‖z^base‖²) — the root of what the loss holds down
  (0 at θ₀), a relative change like the next one;
- ``residual change``: mean_b ‖h_b − h_b⁰‖ / ‖h_b⁰‖ over those positions — how far the whole residual stream moved;
- ``in span(S)``: mean_b ‖P Δh_b‖ / ‖Δh_b‖ with P the projection onto the span of S's encoder directions (the
  directions the held latents read) — how much of that move the held latents could see — beside the same share for
  as many randomly drawn other latents of the same SAE (the control: the residual stream is not isotropic).

The adapter is measured as trained: CWAC's ``prepare`` projects LoRA A, so the weights are restored after it.

``--adapter DIR`` measures another cell's adapter (e.g. SFT's ``final/``, same θ₀) against the same artifacts.
``--eval-prompts`` adds a group: the cell's evaluated harmful prompts (from its ``eval.json``), which no loss term
sees; their θ₀ codes stand in for baselines (right-padded batches, as the loss uses when packing is off).
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safeft.errors import SafeFTError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", required=True, help="a finished CWAC cell (config.yaml, run.json, final/)")
    ap.add_argument("--adapter", help="another LoRA adapter folder to measure (default: the cell's final/)")
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--eval-prompts", action="store_true",
                    help="also measure the cell's evaluated harmful prompts (eval.json), which no loss term sees")
    args = ap.parse_args()
    try:
        run(Path(args.cell), Path(args.out), Path(args.adapter) if args.adapter else None, args.eval_prompts)
    except SafeFTError as e:
        sys.exit(str(e))


def run(cell: Path, out: Path, adapter: Path | None = None, eval_prompts: bool = False) -> None:
    need = ("config.yaml", "run.json", "final/adapter_config.json") + (("eval.json",) if eval_prompts else ())
    for f in need:
        if not (cell / f).is_file():
            raise SafeFTError(f"--cell {cell}: no {f} there (a finished LoRA CWAC cell is needed)")
    adapter = adapter or cell / "final"
    if not (adapter / "adapter_config.json").is_file():
        raise SafeFTError(f"--adapter {adapter}: no LoRA adapter there (give a finished cell's final/ folder)")
    import torch
    from cwac_anchor_refusals import advbench_test, cell_theta0, eval_records
    from peft import PeftModel

    from safeft.artifacts import session
    from safeft.config import build_config
    from safeft.defenses import build_defenses
    from safeft.defenses.cwac.common import pad_id, prompt_ids
    from safeft.io import atomic_write_text
    from safeft.models import load_model
    from safeft.pipeline import build_context, build_splits

    cfg = build_config(cell / "config.yaml")
    found = [x for x in build_defenses(cfg.defense.name, cfg.defense.options) if x.name == "cwac"]
    if len(found) != 1:
        raise SafeFTError(f"--cell {cell}: not a CWAC cell (defense {cfg.defense.name})")
    d = found[0]
    run_json = json.loads((cell / "run.json").read_text(encoding="utf-8"))
    aligned = cell_theta0(cfg, run_json, "--cell", cell)
    fp = run_json["fingerprint"]
    model, tok, _ = load_model(str(aligned), dtype=cfg.model.dtype)
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)  # CWAC checks what is trained
    ctx = build_context(cfg, model, tok, build_splits(cfg), aligned, None, fp)
    d.log = lambda *_: None
    d.progress = False
    # prepare installs the weight constraint and projects every LoRA A: keep the adapter as trained (another
    # defense's adapter, e.g. SFT's, must be measured unprojected)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with session(strict=ctx.artifacts_dir, source="the cell's cached artifacts"):
        d.prepare(model, ctx)  # loads the cached artifacts; computes nothing
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in lora:
                p.copy_(lora[n])
    act = d.activation_term
    if act is None:
        raise SafeFTError(f"--cell {cell}: CWAC has no activation term here (activation: false)")
    is_adv = advbench_test()
    base = [d.anchors[i] for i in d.splits["baseline"]]
    in_adv = [is_adv(p) for p in base]
    groups = {"AdvBench": [i for i, a in enumerate(in_adv) if a], "other sources": [i for i, a in enumerate(in_adv) if not a]}
    model.eval()
    gen = torch.Generator().manual_seed(0)
    res: dict = {"cell": str(cell), "adapter": str(adapter), "layers": act.layers, "groups": {}}
    anchor_seqs = act.seqs
    if eval_prompts:
        prompts = [r["prompt"] for r in eval_records(cell)]
        eval_seqs = prompt_ids(tok, ctx.template, prompts, int(ctx.max_length))
        groups["evaluation prompts"] = list(range(len(anchor_seqs), len(anchor_seqs) + len(eval_seqs)))
    with torch.no_grad():
        for g, idx in groups.items():
            if not idx:
                continue
            if g == "evaluation prompts":  # not anchors: no stored baselines, the common prefix may differ
                act.seqs, act.packed, act.pad = eval_seqs, False, pad_id(tok)
                idx = [i - len(anchor_seqs) for i in idx]
            h = act.hidden(model, idx)
            with model.disable_adapter():
                h0 = act.hidden(model, idx)
            per = {}
            for L in act.layers:
                sae, S = act.saes[L], act.features[L]
                others = torch.tensor([j for j in range(sae.W_enc.shape[1]) if j not in set(S.tolist())])
                controls = [others[torch.randperm(len(others), generator=gen)[: len(S)]] for _ in range(5)]
                z = sae.activate(sae.pre_acts(h[L].float()))[..., S]
                if act.seqs is anchor_seqs:
                    z_base = act.z_base[L][idx]
                else:  # θ₀'s own codes on these prompts
                    z_base = sae.activate(sae.pre_acts(h0[L].float()))[..., S]
                per[L] = route(h[L], h0[L], z, z_base, act.inv_norm[L], sae.W_enc[:, S],
                               [sae.W_enc[:, c] for c in controls])
            res["groups"][g] = {"n": len(idx), "layers": per}
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=1))
    lines = [f"# Where the fine-tune moves the residual stream (`python benchmarks/cwac_latent_route.py --cell {cell} "
             f"--out {out}" + (f" --adapter {adapter}" if adapter != cell / "final" else "")
             + (" --eval-prompts" if eval_prompts else "") + "`)", "",
             f"CWAC's {len(base)} baseline anchors (its activation loss's), last {act.n_positions} prompt positions, "
             f"θ (adapter `{adapter}`, as trained) against θ₀; S = the safety latents of each SAE layer "
             f"({len(act.features[act.layers[0]])} per layer). Latent change = √(the loss's normalised squared "
             "distance), comparable with the residual's relative change. Share in span = ‖PΔh‖/‖Δh‖ for the span of "
             "the encoder directions of S, and (control) of as many random other latents of the same SAE, mean of 5 "
             "draws.", "",
             "| anchors | layer | latent change (S) | residual change ‖Δh‖/‖h₀‖ | share of Δh in span(S) | "
             "in span(random latents) |", "|---|---|---|---|---|---|"]
    for g, r in res["groups"].items():
        for L, v in r["layers"].items():
            lines.append(f"| {g} (n {r['n']}) | {L} | {v['latent_change']:.3f} | {v['residual_change']:.3f} | "
                         f"{v['in_span_S']:.3f} | {v['in_span_control']:.3f} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def span_share(dh, directions) -> float:
    """mean over anchors of ‖P Δh_b‖ / ‖Δh_b‖ (all of an anchor's positions together), P the orthogonal projection
    onto the span of ``directions`` [d, k] (rank taken by SVD, tolerance 1e-6 of the largest singular value)."""
    import torch

    u, sv, _ = torch.linalg.svd(directions.float(), full_matrices=False)
    q = u[:, sv > sv[0] * 1e-6]
    inside = (dh @ q).flatten(1).norm(dim=1)
    return float((inside / dh.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


def route(h, h0, z, z_base, inv_norm: float, s_dirs, control_dirs) -> dict:
    """Per SAE layer, for anchors' hidden states ``h`` (θ) and ``h0`` (θ₀) [n, P, d] and safety latents ``z`` /
    ``z_base`` [n, P, |S|]: latent change √((1/n) Σ ‖z − z_base‖² · inv_norm) (the loss's quantity, square-rooted),
    residual change mean ‖Δh‖/‖h₀‖, share of Δh in span(S) and in the spans of ``control_dirs``."""
    dh, b0 = (h - h0).float(), h0.float()
    lat = float((z - z_base).pow(2).sum()) * inv_norm / len(h)
    return {
        "latent_drift": lat,
        "latent_change": lat ** 0.5,
        "residual_change": float((dh.flatten(1).norm(dim=1) / b0.flatten(1).norm(dim=1)).mean()),
        "in_span_S": span_share(dh, s_dirs),
        "in_span_control": sum(span_share(dh, c) for c in control_dirs) / max(1, len(control_dirs)),
    }

if __name__ == "__main__":
    main()
