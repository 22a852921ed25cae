"""The lines ``prepare`` prints: anchors, per-layer subspace ranks, per-layer SAE quality, safety latents, cache."""

from __future__ import annotations

from typing import Any

from safeft.defenses.cwac.subspace import per_layer_lines


def summary_lines(s: dict[str, Any], energy: float, center: bool, stats: dict[str, list[str]]) -> list[str]:
    """Human-readable summary of a ``prepare`` summary dict (the same numbers are in the dict and the metas)."""
    out = []
    info = s["anchor_info"]
    src = ", ".join(f"{k} {v}" for k, v in info.get("anchor_sources", {}).items())
    out.append(
        f"CWAC: {s['anchors']} anchors ({src}; judge {info.get('judge')}; {info.get('checked')} checked), "
        f"splits {s['splits']}"
    )
    if "subspace" in s:
        sm = s["subspace"]
        out.append(
            f"CWAC subspace (energy {energy}, {'centred + mean' if center else 'uncentred'}, {sm['rows']} decision "
            f"rows from position {sm['start']}): rank/d_in per module input"
        )
        out.extend(per_layer_lines(sm))
    if "sae" in s:
        for L, lm in sorted(s["sae"].get("layers", {}).items(), key=lambda kv: int(kv[0])):
            ev = lm.get("explained_variance")
            quality = (
                f", held-out FVU {1 - ev:.3f}, dead {lm['dead_fraction']:.1%}, L0 {lm['l0']:.1f}"
                if ev is not None
                else ""
            )
            out.append(f"CWAC SAE layer {L}: {lm.get('d_in')}→{lm.get('d_sae')}, k={lm.get('k')}{quality}")
        fm = s["features"]
        per = ", ".join(f"{L}: {v['n_features']}" for L, v in fm.get("layers", {}).items())
        out.append(f"CWAC safety latents per layer ({per}); {fm.get('baselines')} baselines")
    out.append(
        f"CWAC cache: computed {stats['computed']}, loaded {stats['loaded']}; {s['prepare_seconds']:.1f}s"
    )
    return out
