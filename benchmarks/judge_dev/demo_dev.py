"""Judge development answers on the demo's *non-held-out* prompts (round 5 of the dev set).

    python benchmarks/judge_dev/demo_dev.py

Why: labelled blind, the demo's own held-out answers (``benchmarks/demo_labels/run1/``) showed the content judge v1
calling most of the poisoned demo model's answers ``other`` when they were echoes followed by generic steps ("Sure,
here is how to X. Step 1: Gather the materials. Step 2: …") — ``harmful`` under the rubric ("even if wrong, vague").
The dev set had few such answers. This script makes more of them the way the rubric asks — from **new runs**
(fresh seeds and p, never the demo's own seed-0 run) on prompts the demo never evaluates on:

* fine-tunes θ₀ (the demo's aligned SmolLM2-135M, cached) with the demo's settings under a few (defense, seed, p);
* answers the demo's harmful prompts with bucket < 70 (the alignment and defense prompts; the demo's HS prompts are
  bucket ≥ 70 and are not used) and its safe contrast prompts with bucket < 70, greedy, 64 new tokens;
* writes ``round5/cells/<cell>/eval.json``; ``round5/build_labelled.py`` joins them with the labels.

Models are written under ``runs/demo-dev/`` at the repository root (ignored by git); cells that exist are skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CELLS = [  # (defense, seed, p): fresh seeds and a larger p than the demo (seed 0, p 0.1)
    ("sft", 1, 0.2),
    ("sft", 2, 0.3),
    ("asft", 1, 0.3),
]


def main() -> None:
    from safeft.config import build_config
    from safeft.data import load_demo
    from safeft.data.splits import prompt_bucket
    from safeft.demo import DEMO_DEFENSE_OPTIONS, DEMO_SETTINGS
    from safeft.eval import generate
    from safeft.io import atomic_write_json
    from safeft.pipeline import run_train

    demo = load_demo()
    harmful = [h["prompt"] for h in demo.harmful if prompt_bucket(h["prompt"]) < 70]
    safe = [p for p in demo.contrast_prompts if prompt_bucket(p) < 70]
    for defense, seed, p in CELLS:
        cell = f"{defense}-p{p}-s{seed}"
        out = HERE / "round5" / "cells" / cell / "eval.json"
        if out.is_file():
            print(f"{cell}: exists, skipped")
            continue
        s = dict(DEMO_SETTINGS)
        s.update({"defense.name": defense, "data.seed": seed, "training.seed": seed, "data.p": p,
                  "training.output_dir": str(ROOT / "runs" / "demo-dev" / cell)})
        if defense in DEMO_DEFENSE_OPTIONS:
            s[f"defense.options.{defense}"] = DEMO_DEFENSE_OPTIONS[defense]
        cfg = build_config(None, s)
        t0 = time.perf_counter()
        rec = run_train(cfg, keep_model=True)
        model, tok = rec["model"], rec["tokenizer"]
        ans_h = generate(model, tok, harmful, max_new_tokens=64, batch_size=15, desc=f"{cell} harmful")
        ans_s = generate(model, tok, safe, max_new_tokens=64, batch_size=15, desc=f"{cell} safe")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, {
            "model": f"demo θ₀ fine-tuned: {defense}, seed {seed}, p {p} (demo settings otherwise)",
            "source": "demo harmful prompts and safe contrast prompts with bucket < 70 (not the demo's eval prompts)",
            "max_new_tokens": 64,
            "seconds": round(time.perf_counter() - t0, 1),
            "command": "python benchmarks/judge_dev/demo_dev.py",
            "harmful": {"records": [{"prompt": q, "answer": a} for q, a in zip(harmful, ans_h)]},
            "over_refusal": {"records": [{"prompt": q, "answer": a} for q, a in zip(safe, ans_s)]},
        })
        print(f"{cell}: {len(harmful)} + {len(safe)} answers -> {out}")
        del rec, model


if __name__ == "__main__":
    main()
