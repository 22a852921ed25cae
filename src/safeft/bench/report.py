"""Benchmark reports built from the cells on disk: ``summary.json`` (one row per cell), ``results.md`` (tables) and
``pareto.png`` (HS vs FA), plus the safety monitor's curves (``monitor.png``, safeft.bench.curves) when the preset
turns the monitor on. Rebuilt after every run and by ``safeft bench --report-only``; nothing here trains.

Units: hs, fa, over_refusal, gibberish_rate in percent; CIs are 95% bootstrap ``[lo, hi]`` in percent; seconds are
wall-clock; cost ratios divide a cell's mean optimizer-step time / peak memory by those of the ``sft`` cell with
the same p and seed in the same results folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from safeft.bench.curves import collect_curves, curves_markdown, render_curves
from safeft.bench.preset import ALIGNED, Cell, Preset, cell_config, config_hash, expand_vars, split_variant
from safeft.bench.runner import _fmt_s, cell_command, read_json, stale_defaults
from safeft.errors import SafeFTError
from safeft.eval.metrics import mean_range
from safeft.io import atomic_write_bytes, atomic_write_json, atomic_write_text

ROW_KEYS = [
    "preset",
    "model",
    "task",
    "n",
    "p",
    "defense",
    "seed",
    "hs",
    "hs_ci",
    "refusal_rate",
    "compliance_rate",
    "hs_keyword",
    "fa",
    "fa_ci",
    "over_refusal",
    "judge",
    "train_seconds",
    "step_time_ratio_vs_sft",
    "peak_mem_ratio_vs_sft",
    "prepare_seconds",
    "command",
]
EXTRA_KEYS = [
    "refusal_rate_ci",
    "compliance_rate_ci",
    "hs_keyword_ci",
    "other_rate",
    "over_refusal_keyword",
    "template_echo",
    "gibberish_rate",
    "n_eval_harmful",
    "n_eval_task",
    "judge_accuracy",
    "status",
    "reason",
    "cell_id",
    "step_seconds_mean",
    "peak_memory_mb",
    "n_harmful_train",
    "wall_seconds",
    "hs_copyright",
    "n_eval_copyright",
    "theta0_fingerprint",
]
ABLATION = ["sft", "cwac-weight", "cwac-activation", "cwac"]


def judge_accuracy() -> dict[str, Any]:
    """Measured agreement of the judges with human labels, by judge name, from the content judge's manifest (its
    test splits; the keyword judge measured on the same items): ``{name: {source: {"harm": bal. acc,
    "refusal": bal. acc}}}``. Empty when the manifest cannot be read."""
    from safeft.eval.judges.content import DEFAULT_WEIGHTS, load_manifest

    try:
        meta = load_manifest(DEFAULT_WEIGHTS)
    except SafeFTError:
        return {}
    out: dict[str, Any] = {}
    for key, name in (("content", f"content:{meta['name']}"), ("keyword", "keyword")):
        out[name] = {
            src: {t: (r[t] or {}).get("balanced_accuracy") for t in ("harm", "refusal")}
            for src, r in meta["metrics"]["test"][key].items()
        }
    return out


def _acc_text(acc: dict[str, Any]) -> str:
    parts = []
    for src, r in acc.items():
        vals = [f"{t} {r[t]:.0%}" for t in ("harm", "refusal") if r.get(t) is not None and r[t] == r[t]]
        if vals:
            parts.append(f"{src}: " + ", ".join(vals))
    return "; ".join(parts)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def build_rows(preset: Preset, cells: list[Cell], out: Path, judge_acc: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per cell (schema: ROW_KEYS + EXTRA_KEYS). status: ok | failed | skipped | not run (+ reason)."""
    rows: list[dict[str, Any]] = []
    runs: dict[str, dict] = {}
    for c in cells:
        cdir = out / "cells" / c.id
        row: dict[str, Any] = dict.fromkeys(ROW_KEYS + EXTRA_KEYS)
        row.update(
            {
                "preset": preset.name,
                "defense": c.defense,
                "p": c.p,
                "seed": c.seed,
                "cell_id": c.id,
                "command": cell_command(c, cdir),
                "model": c.overrides.get("model.aligned"),
                "task": c.overrides.get("data.task"),
                "n": None if c.kind == "eval" else c.overrides.get("data.n"),
            }
        )
        rows.append(row)
        if c.skip:
            row.update(status="skipped", reason=c.skip, command=None)
            continue
        try:
            cfg = cell_config(c, cdir)
        except SafeFTError as e:
            row.update(status="failed", reason=str(e))
            continue
        row.update(
            model=cfg["model"]["aligned"],
            task=cfg["data"]["task"],
            n=None if c.kind == "eval" else cfg["data"]["n"],
        )
        info = read_json(cdir / "cell.json")
        if info is None:
            row.update(status="not run", reason="no result yet: run `safeft bench` for this preset")
            continue
        if info.get("hash") not in (None, config_hash(c, cfg)):
            row.update(status="not run", reason="the preset changed since this cell ran: rerun to refresh it")
            continue
        stale = stale_defaults(c, cdir)
        if stale:
            row.update(status="not run", reason=stale)
            continue
        row["wall_seconds"] = info.get("wall_seconds")
        if info.get("status") != "ok":
            row.update(status="failed", reason=info.get("error"))
            continue
        ev = read_json(cdir / "eval.json") or {}
        harm, task, orr = ev.get("harmful") or {}, ev.get("task") or {}, ev.get("over_refusal") or {}
        row.update(
            status="ok",
            hs=harm.get("hs"),
            hs_ci=harm.get("hs_ci"),
            refusal_rate=harm.get("refusal_rate"),
            refusal_rate_ci=harm.get("refusal_rate_ci"),
            compliance_rate=harm.get("compliance_rate"),
            compliance_rate_ci=harm.get("compliance_rate_ci"),
            hs_keyword=harm.get("hs_keyword"),
            hs_keyword_ci=harm.get("hs_keyword_ci"),
            other_rate=harm.get("other_rate"),
            over_refusal_keyword=orr.get("rate_keyword"),
            fa=task.get("fa"),
            fa_ci=task.get("fa_ci"),
            over_refusal=orr.get("rate"),
            judge=ev.get("judge") or harm.get("judge"),
            template_echo=harm.get("template_echo"),
            gibberish_rate=harm.get("gibberish_rate"),
            n_eval_harmful=harm.get("n"),
            n_eval_task=task.get("n"),
            hs_copyright=(ev.get("copyright") or {}).get("hs"),
            n_eval_copyright=(ev.get("copyright") or {}).get("n"),
        )
        row["judge_accuracy"] = judge_acc.get(row["judge"]) if judge_acc else None
        if c.kind == "train":
            run = read_json(cdir / "run.json") or {}
            runs[c.id] = run
            row.update(
                train_seconds=run.get("train_seconds"),
                prepare_seconds=run.get("prepare_seconds"),
                step_seconds_mean=run.get("step_seconds_mean"),
                peak_memory_mb=run.get("peak_memory_mb"),
                n_harmful_train=run.get("n_harmful_train"),
                theta0_fingerprint=run.get("fingerprint"),
            )
    sft = {(r["p"], r["seed"]): r for r in rows if r["defense"] == "sft" and r["status"] == "ok"}
    for r in rows:
        ref = sft.get((r["p"], r["seed"]))
        if r["status"] == "ok" and r["defense"] != ALIGNED and ref is not None:
            r["step_time_ratio_vs_sft"] = _ratio(r["step_seconds_mean"], ref["step_seconds_mean"])
            r["peak_mem_ratio_vs_sft"] = _ratio(r["peak_memory_mb"], ref["peak_memory_mb"])
    return rows


# ---- markdown ----------------------------------------------------------------------------------------------------


def _pct_ci(v: float | None, ci: list | None) -> str:
    if v is None:
        return "–"
    return f"{v:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{v:.1f}"


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def _status(r: dict[str, Any]) -> str:
    if r["status"] == "ok":
        return "ok"
    reason = (r.get("reason") or "").splitlines()
    return f"{r['status']}: {reason[-1][:120] if reason else ''}".replace("|", "/")


def _machines(preset: Preset, cells: list[Cell], out: Path) -> list[str]:
    seen = []
    for c in cells:
        m = (read_json(out / "cells" / c.id / "cell.json") or {}).get("machine")
        if m:
            s = f"{m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}" + (
                f", GPU {m['gpu']}" if m.get("gpu") else ", CPU only"
            )
            if s not in seen:
                seen.append(s)
    return seen


def theta0_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A header line naming which cells trained from which θ₀ weights, when they are not all the same file: a θ₀
    rebuilt by the same recipe on another machine can differ in its last bits (other CPU kernels)."""
    by_fp: dict[str, list[str]] = {}
    for r in rows:
        if r.get("theta0_fingerprint"):
            by_fp.setdefault(r["theta0_fingerprint"], []).append(r["cell_id"])
    if len(by_fp) < 2:
        return []
    parts = [f"`{fp[:12]}` ({len(cells)} cells: {', '.join(cells)})" for fp, cells in by_fp.items()]
    return [
        "- **θ₀ weights differ between cells**: " + "; ".join(parts) + ". Each θ₀ was built by the same alignment "
        "recipe and seed; the cache was rebuilt on another machine, whose floating point differs in the last bits. "
        "To see how far a rebuild moved, evaluate it with the `aligned` cell's config and compare the answers: "
        "`python benchmarks/same_answers.py cells/aligned/eval.json REBUILT/eval.json` (run.json `fingerprint`)."
    ]


def render_markdown(preset: Preset, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """results.md: header (model, data, judge + accuracy, seeds, machine, wall time, command), one table per p
    (θ₀ row on top), and the CWAC ablation."""
    b = meta.get("settings") or preset.base
    ja = meta.get("judge_check") or {}
    judges = sorted({r["judge"] for r in rows if r["judge"]}) or [b.get("eval.judge", "content")]
    jtxt = ", ".join(f"`{j}`" for j in judges)
    accs = [f"`{j}` {_acc_text(ja[j])}" for j in [*judges, "keyword"] if j in ja]
    if accs:
        jtxt += (" — balanced accuracy vs human labels on held-out test splits (docs/judges.md): "
                 + " · ".join(dict.fromkeys(accs)))
    ok = [r for r in rows if r["status"] == "ok"]
    n_h = sorted({r["n_eval_harmful"] for r in ok if r["n_eval_harmful"] is not None})
    n_t = sorted({r["n_eval_task"] for r in ok if r["n_eval_task"] is not None})
    lines = [
        f"# Benchmark `{preset.name}`",
        "",
        preset.description.strip(),
        "",
        f"- **model**: θ₀ = `{b.get('model.aligned', 'smollm2-135m')}`; θ_b = `{b.get('model.base') or 'none (defenses needing it are skipped)'}`; "
        f"{b.get('training.method', 'lora')} fine-tuning (r = {b.get('training.lora_r', 8)}), lr {b.get('training.lr', '1e-4')}, "
        + (
            f"{b['training.max_steps']} steps"
            if (b.get("training.max_steps") or -1) > 0
            else f"{b.get('training.epochs', 1)} epoch(s)"
        )
        + f", batch {b.get('training.batch_size', 8)}",
        f"- **data**: task `{b.get('data.task', 'sst2')}`, n = {b.get('data.n', 1000)} samples, p ∈ {{{', '.join(f'{p:g}' for p in preset.p)}}} "
        f"of them harmful pairs from `{b.get('data.harmful_source', 'advbench')}`"
        + (f" (a stable-hash share {b['data.poison_share']:g} of its prompts; the rest is left to the defenses)"
           if float(b.get("data.poison_share", 1.0)) < 1 else ""),
        f"- **evaluation**: HS on {'/'.join(map(str, n_h)) or '?'} held-out `{b.get('eval.harmful_source', 'harmbench')}` prompts "
        f"(greedy, {b.get('eval.max_new_tokens', 128)} new tokens); FA on {'/'.join(map(str, n_t)) or '?'} held-out task examples; "
        f"over-refusal on {b.get('eval.n_xstest', 0)} XSTest safe prompts",
        f"- **judge**: {jtxt}",
        f"- **seeds**: {', '.join(map(str, preset.seeds))}",
        f"- **machine**: {'; '.join(meta.get('machines') or []) or 'unknown'}",
        *theta0_lines(rows),
        f"- **wall time**: {_fmt_s(meta.get('cells_wall_seconds'))} summed over cells"
        + (f"; this invocation {_fmt_s(meta['wall_seconds'])}" if meta.get("wall_seconds") else ""),
        f"- **command**: `{meta['command']}` (report rebuilt {meta['generated_at']})",
        "",
        "HS = harmful score: % of answers the judge calls `harmful` (gives or attempts content that advances the "
        "request; lower is better). *refusal* = % `refusal`; *comply* = % harmful or a content-free affirmative echo "
        '("Sure, here is …"); *HS kw* = the refusal-keyword judge\'s non-refusal rate on the same answers (the number '
        "reported as HS before the content judge; evasive and echo answers count there). FA = fine-tune accuracy "
        "(%, higher is better); 95% bootstrap CIs in brackets; *echo* = answers that are only an affirmative template "
        "sentence. Over-refusal = % of safe prompts the judge calls `refusal`. Cost ratios: mean step time and peak "
        "memory ÷ the SFT cell's.",
        "",
    ]
    head = (
        "| defense | HS % ↓ [CI] | refusal % | comply % | HS kw % | FA % ↑ [CI] | over-refusal % | echo | gibberish % "
        "| step time × SFT | peak mem × SFT | train s | prepare s | status |"
    )
    sep = "|" + "---|" * 14
    aligned = [r for r in rows if r["defense"] == ALIGNED]

    def line(r: dict[str, Any]) -> str:
        name = (
            r["defense"]
            if r["defense"] == ALIGNED or len(preset.seeds) == 1
            else f"{r['defense']} (seed {r['seed']})"
        )
        return (
            f"| {name} "
            f"| {_pct_ci(r['hs'], r['hs_ci'])} | {_num(r['refusal_rate'])} | {_num(r['compliance_rate'])} "
            f"| {_num(r['hs_keyword'])} | {_pct_ci(r['fa'], r['fa_ci'])} | {_num(r['over_refusal'])} "
            f"| {_num(r['template_echo'], '{:d}')} | {_num(r['gibberish_rate'])} "
            f"| {_num(r['step_time_ratio_vs_sft'], '{:.2f}')} | {_num(r['peak_mem_ratio_vs_sft'], '{:.3f}')} "
            f"| {_num(r['train_seconds'], '{:.0f}')} | {_num(r['prepare_seconds'], '{:.0f}')} | {_status(r)} |"
        )

    for p in preset.p:
        lines += [f"## p = {p:g}", "", head, sep]
        lines += [line(r) for r in aligned]
        lines += [line(r) for r in rows if r["p"] == p]
        lines.append("")
    lines += seed_spread_lines(rows)
    cr = [r for r in rows if r.get("hs_copyright") is not None]
    if cr:
        lines += ["## HarmBench copyright items (apart from HS)", "",
                  "A small model cannot reproduce a book or a song: these answers are judged like the others but "
                  "never counted in HS (`eval.n_copyright`).", "",
                  "| defense | p | seed | % `harmful` | n |", "|---|---|---|---|---|"]
        lines += [f"| {r['defense']} | {_num(r['p'], '{:g}')} | {_num(r['seed'], '{}')} | {r['hs_copyright']:.1f} "
                  f"| {r['n_eval_copyright']} |" for r in cr]
        lines.append("")
    # the ablation rows: sft and the CWAC family, plain and as labelled variants (cwac@x, cwac-weight@x, ...),
    # grouped by label so that each setting's weight-only / activation-only / both sit together
    present = list(dict.fromkeys(r["defense"] for r in rows))
    labels = list(dict.fromkeys(split_variant(d)[1] for d in present if split_variant(d)[0] in ABLATION))
    variants = [
        v
        for label in labels
        for base in ABLATION
        if (v := base if label is None else f"{base}@{label}") in present and not (base == "sft" and label)
    ]
    # a (p, seed) group, and within it a label's rows, only where a half (weight-only or activation-only) was
    # planned: the ablation compares the halves with the whole; elsewhere sft and cwac are the main tables' rows
    halves = {(r["p"], r["seed"], split_variant(r["defense"])[1]) for r in rows
              if split_variant(r["defense"])[0] in ("cwac-weight", "cwac-activation")}
    groups = [(p, seed) for p in preset.p for seed in preset.seeds if any(h[:2] == (p, seed) for h in halves)]
    if groups:
        al = next((r for r in aligned if r["status"] == "ok"), None)
        several_seeds = len({seed for _, seed in groups}) > 1
        lines += [
            "## Ablation: CWAC's two constraints",
            "",
            "| p | variant | weight | activation | HS % ↓ | refusal % | FA % ↑ | HS − aligned | FA − SFT | step time × SFT |",
            "|" + "---|" * 10,
        ]
        flags = {
            "sft": ("–", "–"),
            "cwac-weight": ("✓", ""),
            "cwac-activation": ("", "✓"),
            "cwac": ("✓", "✓"),
        }
        for p, seed in groups:
            sft = next((r for r in rows if r["defense"] == "sft" and r["p"] == p and r["seed"] == seed), None)
            for v in variants:
                label = split_variant(v)[1]
                if label is not None and (p, seed, label) not in halves:
                    continue  # a variant without halves (another task, a tuning setting): the main table has it
                r = next((x for x in rows if x["defense"] == v and x["p"] == p and x["seed"] == seed), None)
                if r is None:
                    continue
                d_hs = r["hs"] - al["hs"] if al and r["hs"] is not None else None
                d_fa = r["fa"] - sft["fa"] if sft and sft["fa"] is not None and r["fa"] is not None else None
                w, a = flags[split_variant(v)[0]]
                name = f"{v} (seed {seed})" if several_seeds else v
                lines.append(
                    f"| {p:g} | {name} | {w} | {a} | {_pct_ci(r['hs'], r['hs_ci'])} | {_num(r['refusal_rate'])} "
                    f"| {_pct_ci(r['fa'], r['fa_ci'])} "
                    f"| {_num(d_hs, '{:+.1f}')} | {_num(d_fa, '{:+.1f}')} | {_num(r['step_time_ratio_vs_sft'], '{:.2f}')} |"
                )
        lines.append("")
    lines += [
        "Per-cell configs, logs and answers: `cells/<cell>/` (config.yaml, log.txt, eval.json with every answer).",
        "",
    ]
    return "\n".join(lines)


def seed_spread_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A markdown table of every (p, defense) finished under two or more seeds: mean and range (min–max) of HS,
    refusal rate and FA. Empty when no defense has two seeds."""
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok" and r["defense"] != ALIGNED and r["hs"] is not None:
            groups.setdefault((r["p"], r["defense"]), []).append(r)
    multi = {k: v for k, v in groups.items() if len({r["seed"] for r in v}) > 1}
    if not multi:
        return []

    out = ["## Across seeds", "", "Mean over seeds and range [min–max]: the seed-to-seed spread, beside each "
           "cell's own bootstrap CI above.", "", "| p | defense | seeds | HS % ↓ | refusal % | FA % ↑ |",
           "|---|---|---|---|---|---|"]
    for (p, d), rs in sorted(multi.items(), key=lambda kv: (kv[0][0], kv[0][1] != "sft", kv[0][1])):
        out.append(f"| {p:g} | {d} | {', '.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} | "
                   f"{mean_range([r['hs'] for r in rs])} | {mean_range([r['refusal_rate'] for r in rs])} | "
                   f"{mean_range([r['fa'] for r in rs])} |")
    return out + [""]


# ---- plot --------------------------------------------------------------------------------------------------------


def render_pareto(preset: Preset, rows: list[dict[str, Any]], path: Path) -> bool:
    """pareto.png: HS (x, lower better) vs FA (y, higher better), one labelled point per finished cell, one marker
    per p, θ₀ as a red star. Returns False (no file) when matplotlib is missing or no cell has both numbers."""
    pts = [r for r in rows if r["status"] == "ok" and r["hs"] is not None and r["fa"] is not None]
    if not pts:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import io

    markers = ["o", "s", "^", "D", "v", "P", "X"]
    seen: dict[tuple[float, float], int] = {}

    def offset(r: dict[str, Any]) -> tuple[int, int]:
        # stack labels of points that coincide instead of printing them on top of each other
        k = (round(r["hs"], 1), round(r["fa"], 1))
        seen[k] = seen.get(k, 0) + 1
        return 5, 4 + 10 * (seen[k] - 1)

    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=110)
    for i, p in enumerate(preset.p):
        sel = [r for r in pts if r["p"] == p]
        if sel:
            ax.scatter(
                [r["hs"] for r in sel],
                [r["fa"] for r in sel],
                marker=markers[i % len(markers)],
                s=55,
                label=f"p = {p:g}",
                alpha=0.85,
            )
            for r in sel:
                ax.annotate(
                    r["defense"], (r["hs"], r["fa"]), textcoords="offset points", xytext=offset(r), fontsize=8
                )
    for r in pts:
        if r["defense"] == ALIGNED:
            ax.scatter(
                [r["hs"]],
                [r["fa"]],
                marker="*",
                s=260,
                color="red",
                edgecolor="black",
                zorder=5,
                label="aligned θ₀ (no fine-tuning)",
            )
            ax.annotate(
                "aligned",
                (r["hs"], r["fa"]),
                textcoords="offset points",
                xytext=(7, -10),
                fontsize=9,
                color="red",
            )
    judge = next((r["judge"] for r in pts if r["judge"]), "content")
    ax.set_xlabel(f"harmful score, % (judge: {judge}) — lower is better")
    ax.set_ylabel("fine-tune accuracy, % — higher is better")
    ax.set_title(f"safeft bench {preset.name}: safety vs utility (best = top left)")
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_reports(
    preset: Preset, cells: list[Cell], out: Path, command: str, wall_seconds: float | None
) -> list[Path]:
    """Write ``summary.json``, ``results.md`` and (when possible) ``pareto.png`` into ``out``; return their paths."""
    ja = judge_accuracy()
    rows = build_rows(preset, cells, out, ja)
    walls = [r["wall_seconds"] for r in rows if r["wall_seconds"]]
    meta = {
        "command": command,
        "wall_seconds": wall_seconds,
        "cells_wall_seconds": sum(walls) if walls else None,
        "machines": _machines(preset, cells, out),
        "judge_check": ja,
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": expand_vars(preset.base, "preset base", out),
    }
    summary = {
        "preset": preset.name,
        "description": preset.description,
        "rows": rows,
        "settings": meta["settings"],
        "defense_options": preset.defense_options,
        **({"overrides": preset.overrides} if preset.overrides else {}),
        "judge_check": ja,
        **{k: meta[k] for k in ("command", "wall_seconds", "cells_wall_seconds", "machines", "generated_at")},
    }
    curves = collect_curves(cells, out, ok_ids={r["cell_id"] for r in rows if r["status"] == "ok"})
    if curves:
        summary["monitor_curves"] = curves
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "summary.json", summary)
    paths = [out / "summary.json", out / "results.md"]
    png = render_curves(curves, out / "monitor.png", f"safeft bench {preset.name}: safety monitor checks vs step")
    md = render_markdown(preset, rows, meta)
    if curves:
        md = md.rstrip("\n") + "\n\n" + "\n".join(curves_markdown(curves, png))
    atomic_write_text(out / "results.md", md)
    if render_pareto(preset, rows, out / "pareto.png"):
        paths.append(out / "pareto.png")
    if png:
        paths.append(out / "monitor.png")
    elif (out / "monitor.png").is_file():
        (out / "monitor.png").unlink()  # no curve left to plot: do not leave an old plot beside the new table
    return paths
