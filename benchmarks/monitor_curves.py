"""Safety drift during fine-tuning, step by step: the monitor's curves for SFT and CWAC on the demo setting.

    python benchmarks/monitor_curves.py [--defenses sft,cwac] [--every 2]

Runs ``safeft demo``'s fine-tuning (θ₀ = the demo's aligned SmolLM2-135M, 64 samples with 10% harmful, LoRA r8,
16 steps, seed 0; CWAC with the demo's options of 2026-11-30: SAEs 8x wide, 300 steps) once per defense with the
safety monitor on (``monitor.every`` steps; its default prompts: 24 of the demo's held-out harmful prompts and 8
safe ones, 32 new tokens, the content judge), then writes every check to
``benchmarks/results/monitor_curves.json`` and plots harmful and refusal rate against the step
(``monitor_curves.png``). The content judge under-counts harm on the demo's short answers (docs/judges.md), so the
refusal curve is the one to read first. Models go to ``runs/monitor-curves/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The committed curves were made with the demo's CWAC SAEs of 2026-11-30 (8x wide, 300 steps; the demo now uses 2x
# and 200): pinned so that this command still reproduces them.
CWAC_SAE_2026_11_30 = {"cwac": {"sae_width_factor": 8, "sae_steps": 300}}
ROOT = HERE.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--defenses", default="sft,cwac")
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "monitor_curves.json"))
    args = ap.parse_args()

    from safeft.config import build_config
    from safeft.demo import DEMO_DEFENSE_OPTIONS, DEMO_SETTINGS
    from safeft.io import atomic_write_json
    from safeft.pipeline import run_train

    curves = {}
    for name in [d.strip() for d in args.defenses.split(",") if d.strip()]:
        s = dict(DEMO_SETTINGS)
        s.update({"defense.name": name, "training.output_dir": str(ROOT / "runs" / "monitor-curves" / name),
                  "monitor.enabled": True, "monitor.every": args.every})
        if name in DEMO_DEFENSE_OPTIONS:
            s[f"defense.options.{name}"] = {**DEMO_DEFENSE_OPTIONS[name], **CWAC_SAE_2026_11_30.get(name, {})}
        t0 = time.perf_counter()
        rec = run_train(build_config(None, s))
        mon = json.loads((Path(s["training.output_dir"]) / "monitor.json").read_text(encoding="utf-8"))
        checks = [{**{k: c.get(k) for k in ("step", "harmful_rate", "refusal_rate", "over_refusal", "sae_drift")},
                   "check_seconds": (c.get("seconds") or {}).get("total")} for c in mon["checks"]]
        curves[name] = {"checks": checks, "train_seconds": rec["train_seconds"],
                        "wall_seconds": round(time.perf_counter() - t0, 1)}
        print(name, [(c["step"], c["harmful_rate"], c["refusal_rate"]) for c in checks])
    out = Path(args.out)
    atomic_write_json(out, {
        "command": f"python benchmarks/monitor_curves.py --defenses {args.defenses} --every {args.every}",
        "setting": "safeft demo (seed 0, 64 samples, p 0.1, LoRA r8, 16 steps); monitor defaults, content judge",
        "curves": curves,
    })
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{out} written (matplotlib not installed: no plot)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for name, c in curves.items():
        steps = [x["step"] for x in c["checks"]]
        axes[0].plot(steps, [100 * x["harmful_rate"] for x in c["checks"]], marker="o", label=name)
        axes[1].plot(steps, [100 * x["refusal_rate"] for x in c["checks"]], marker="o", label=name)
    axes[0].set_title("harmful rate % (content judge)")
    axes[1].set_title("refusal rate %")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"{out} and {out.with_suffix('.png')} written")


if __name__ == "__main__":
    main()
