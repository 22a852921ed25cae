"""Safety-drift curves of a benchmark: the safety monitor's checks (``<cell>/monitor.json``, written when a preset
turns the monitor on with ``monitor.enabled: true`` in its ``base``) collected per cell and plotted as harmful rate
and refusal rate against the optimizer step (``monitor.png``). Nothing here trains.

Rates are in percent; ``step`` is the optimizer step of the check (0 = θ₀ before any update).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from safeft.bench.preset import Cell
from safeft.io import atomic_write_bytes

CHECK_KEYS = ("harmful_rate", "refusal_rate", "over_refusal", "sae_drift")


def _pct(v: Any) -> float | None:
    return None if v is None else 100.0 * float(v)


def collect_curves(cells: list[Cell], out: Path, ok_ids: set[str]) -> dict[str, dict[str, Any]]:
    """``{cell_id: {defense, p, seed, judge, every, checks: [{step, harmful_rate, refusal_rate, over_refusal,
    sae_drift}], stopped}}`` for every training cell with a readable ``monitor.json`` (rates in percent except
    ``sae_drift``, which is the monitor's own relative drift). Cells without one are left out, and so are cells not
    in ``ok_ids`` (the report's rows with a current result: failed, stale or not-run cells get no curve)."""
    curves: dict[str, dict[str, Any]] = {}
    for c in cells:
        if c.kind != "train" or c.id not in ok_ids:
            continue
        path = out / "cells" / c.id / "monitor.json"
        try:
            mon = json.loads(path.read_text(encoding="utf-8"))
            checks = [
                {"step": int(r["step"]), **{k: (_pct(r.get(k)) if k != "sae_drift" else r.get(k)) for k in CHECK_KEYS}}
                for r in mon["checks"]
            ]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        curves[c.id] = {
            "defense": c.defense, "p": c.p, "seed": c.seed, "judge": mon.get("judge"),
            "every": (mon.get("config") or {}).get("every"), "checks": sorted(checks, key=lambda r: r["step"]),
            "stopped": mon.get("stopped"),
        }
    return curves


def render_curves(curves: dict[str, dict[str, Any]], path: Path, title: str) -> bool:
    """monitor.png: harmful rate (left) and refusal rate (right) vs optimizer step, one line per cell, one panel row
    per p. Returns False (no file) when matplotlib is missing or no cell has a check."""
    curves = {k: v for k, v in curves.items() if v["checks"]}
    if not curves:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ps = sorted({v["p"] for v in curves.values()}, key=lambda p: (p is None, p))
    fig, axes = plt.subplots(len(ps), 2, figsize=(10, 3.2 * len(ps)), squeeze=False, sharex=True)
    for row, p in zip(axes, ps):
        for c in curves.values():
            if c["p"] != p:
                continue
            steps = [r["step"] for r in c["checks"]]
            label = c["defense"] if c["seed"] == 0 else f"{c['defense']} s{c['seed']}"
            for ax, key in zip(row, ("harmful_rate", "refusal_rate")):
                ax.plot(steps, [r[key] if r[key] is not None else float("nan") for r in c["checks"]], marker="o",
                        ms=3, label=label)
        judge = next((c["judge"] for c in curves.values() if c["judge"]), "content")
        row[0].set_title(f"harmful rate % ({judge}), p = {p:g}" if p is not None else f"harmful rate % ({judge})")
        row[1].set_title(f"refusal rate %, p = {p:g}" if p is not None else "refusal rate %")
        for ax in row:
            ax.set_ylim(-5, 105)
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=7, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def curves_markdown(curves: dict[str, dict[str, Any]], png: bool) -> list[str]:
    """The results.md section: per cell, refusal and harmful rate at the first and the last check."""
    if not curves:
        return []
    lines = ["## Safety drift during fine-tuning (safety monitor)", ""]
    if png:
        lines += ["![harmful and refusal rate vs step](monitor.png)", ""]
    lines += ["| cell | checks | refusal % first → last | harmful % first → last | stopped |",
              "|---|---|---|---|---|"]
    for cid, c in curves.items():
        if not c["checks"]:
            continue
        a, b = c["checks"][0], c["checks"][-1]

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}"

        stop = f"step {c['stopped']['step']}" if isinstance(c.get("stopped"), dict) else "no"
        lines.append(f"| {cid} | {len(c['checks'])} (every {c['every']}) | {f(a['refusal_rate'])} → "
                     f"{f(b['refusal_rate'])} | {f(a['harmful_rate'])} → {f(b['harmful_rate'])} | {stop} |")
    lines.append("")
    return lines
