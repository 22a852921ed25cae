"""Does the fine-tune move the residual stream where CWAC's safety latents cannot see it?

    python benchmarks/cwac_latent_route.py --cell benchmarks/results/small-cwac-anchors/cells/p0.1-cwac-s0 \
        --out benchmarks/results/small-cwac-anchors/latent_route

CWAC's activation loss holds the safety latents S (per SAE layer) of its baseline anchors at their last
``n_positions`` prompt positions. This script loads the cell's θ₀, its cached CWAC artifacts (the same ones its
training used; nothing is computed: a missing artifact stops it) and its trained adapter, runs both models on every
baseline anchor, and reports per SAE layer, separately for the anchors that are AdvBench prompts and the others:

- ``latent drift``: (1/n) Σ_b ‖z_S,b − z_S,b^base‖² / mean ‖z^base‖² — the quantity the loss holds down (0 at θ₀);
- ``residual drift``: mean_b ‖h_b − h_b⁰‖ / ‖h_b⁰‖ over those positions — how far the whole residual stream moved;
- ``in span(S)``: mean_b ‖P Δh_b‖ / ‖Δh_b‖ with P the projection onto the span of S's encoder directions (the
  directions the held latents read) — how much of that move the held latents could see at all.

``--adapter DIR`` measures another cell's adapter (e.g. SFT's ``final/``, same θ₀) against the same artifacts.
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
    args = ap.parse_args()
    try:
        run(Path(args.cell), Path(args.out), Path(args.adapter) if args.adapter else None)
    except SafeFTError as e:
        sys.exit(str(e))


def run(cell: Path, out: Path, adapter: Path | None = None) -> None:
    for f in ("config.yaml", "run.json", "final/adapter_config.json"):
        if not (cell / f).is_file():
            raise SafeFTError(f"--cell {cell}: no {f} there (a finished LoRA CWAC cell is needed)")
    adapter = adapter or cell / "final"
    if not (adapter / "adapter_config.json").is_file():
        raise SafeFTError(f"--adapter {adapter}: no LoRA adapter there")
    import torch
    from peft import PeftModel

    from safeft.artifacts import session
    from safeft.config import build_config
    from safeft.data import load_harmful_prompts, normalize_text
    from safeft.defenses import build_defenses
    from safeft.io import atomic_write_text
    from safeft.models import fingerprint, load_model
    from safeft.pipeline import build_context, build_splits, resolve

    cfg = build_config(cell / "config.yaml")
    (d,) = [x for x in build_defenses(cfg.defense.name, cfg.defense.options) if x.name == "cwac"] or [None]
    if d is None:
        raise SafeFTError(f"--cell {cell}: not a CWAC cell (defense {cfg.defense.name})")
    run_json = json.loads((cell / "run.json").read_text(encoding="utf-8"))
    aligned = resolve(cfg, cfg.model.aligned)
    fp = fingerprint(aligned)
    if fp != run_json.get("fingerprint"):
        raise SafeFTError(f"--cell {cell}: this machine's θ₀ ({fp[:12]}) is not the cell's ({run_json.get('fingerprint', '')[:12]})")
    model, tok, _ = load_model(str(aligned), dtype=cfg.model.dtype)
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)  # CWAC checks what is trained
    ctx = build_context(cfg, model, tok, build_splits(cfg), aligned, None, fp)
    d.log = lambda *_: None
    d.progress = False
    with session(strict=ctx.artifacts_dir, source="the cell's cached artifacts"):
        d.prepare(model, ctx)  # loads; with LoRA it re-projects A, which training already kept projected
    act = d.activation_term
    if act is None:
        raise SafeFTError(f"--cell {cell}: CWAC has no activation term here (activation: false)")
    adv = {normalize_text(p) for p in load_harmful_prompts("advbench")}
    base = [d.anchors[i] for i in d.splits["baseline"]]
    groups = {"AdvBench": [i for i, p in enumerate(base) if normalize_text(p) in adv]}
    groups["other sources"] = [i for i in range(len(base)) if i not in set(groups["AdvBench"])]
    model.eval()
    res: dict = {"cell": str(cell), "adapter": str(adapter), "layers": act.layers, "groups": {}}
    with torch.no_grad():
        for g, idx in groups.items():
            if not idx:
                continue
            h = act.hidden(model, idx)
            with model.disable_adapter():
                h0 = act.hidden(model, idx)
            per = {}
            for L in act.layers:
                sae, S = act.saes[L], act.features[L]
                z = sae.activate(sae.pre_acts(h[L].float()))[..., S]
                lat = float((z - act.z_base[L][idx]).pow(2).sum()) * act.inv_norm[L] / len(idx)
                dh, b0 = (h[L] - h0[L]).float(), h0[L].float()
                resid = float((dh.flatten(1).norm(dim=1) / b0.flatten(1).norm(dim=1)).mean())
                q, _ = torch.linalg.qr(sae.W_enc[:, S].float())  # d × |S| orthonormal basis of what S reads
                inside = (dh.flatten(0, 1) @ q).flatten(0).view(len(idx), -1).norm(dim=1)
                frac = float((inside / dh.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())
                per[L] = {"latent_drift": lat, "residual_drift": resid, "in_span_S": frac}
            res["groups"][g] = {"n": len(idx), "layers": per}
    n_s, d_model = len(act.features[act.layers[0]]), act.saes[act.layers[0]].d_in
    chance = res["chance_in_span"] = (n_s / d_model) ** 0.5
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=1))
    lines = [f"# Where the fine-tune moves the residual stream (`python benchmarks/cwac_latent_route.py --cell {cell} "
             f"--out {out}" + (f" --adapter {adapter}" if adapter != cell / "final" else "") + "`)", "",
             f"CWAC's {len(base)} baseline anchors (its activation loss's), last {act.n_positions} prompt positions, "
             f"θ (adapter `{adapter}`) against θ₀; S = {len(act.features[act.layers[0]])} safety latents per layer. "
             f"A random direction would put {chance:.2f} of its norm in span(S) (√(|S|/d)).", "",
             "| anchors | layer | latent drift (the loss's quantity) | residual drift ‖Δh‖/‖h₀‖ | share of ‖Δh‖ in span(S) |",
             "|---|---|---|---|---|"]
    for g, r in res["groups"].items():
        for L, v in r["layers"].items():
            lines.append(f"| {g} (n {r['n']}) | {L} | {v['latent_drift']:.4f} | {v['residual_drift']:.3f} | "
                         f"{v['in_span_S']:.3f} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
