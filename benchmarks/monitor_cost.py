"""What the safety monitor costs next to training: seconds per check vs seconds per optimizer step, in one run.

Runs ``safeft train --monitor`` once (the tiny preset's settings: θ₀ = the alignment stage's SmolLM2-135M, LoRA r8 on
all seven projections, SST-2 with hh-rlhf poison, batch 8, max length 128) for ``--steps`` steps with a check every
``--every``, then reads run.json: the mean optimizer-step time (first step excluded; the checks run outside the timed
steps), the time of each check split into generation / judging / saving last_safe (the baseline check also loads
the judge), and the smallest ``k`` that keeps the checks within 10% of training time, ``k ≥ 10 · check / step``.
Output: ``benchmarks/results/monitor_cost.json``.

    nice -n 10 python benchmarks/monitor_cost.py --model ~/.cache/safeft/aligned/<tiny preset θ₀ folder>
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="aligned:smollm2-135m", help="θ₀ (the tiny preset's: its cached folder)"
    )
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--judge", default="content")
    p.add_argument("--out", default=str(HERE / "results" / "monitor_cost.json"))
    p.add_argument("--set", action="append", default=[], help="extra safeft --set key=value (repeatable)")
    p.add_argument("--run-dir", default=None, help="keep the training run here (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="monitor-cost-") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "safeft.cli",
            "train",
            "--model",
            args.model,
            "--task",
            "sst2",
            "--n",
            "120",
            "--p",
            "0.1",
            "--harmful-source",
            "hh_rlhf",
            "--max-steps",
            str(args.steps),
            "--batch-size",
            "8",
            "--lr",
            "5e-4",
            "--output-dir",
            str(run_dir),
            "--monitor",
            "--monitor-every",
            str(args.every),
            "--set",
            f"monitor.judge={args.judge}",
            "--set",
            "data.max_length=128",
            "--set",
            "training.save_steps=100000",
            "--set",
            "training.progress=false",
        ]
        for s in args.set:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd)  # its output streams through: a slow machine shows where it is
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"safeft train failed (exit code {proc.returncode})")
        run = json.loads((run_dir / "run.json").read_text())
    mon = run["monitor"]
    step = run["step_seconds_mean"]
    checks = mon["checks"]
    later = [c["seconds"] for c in checks[1:]] or [checks[0]["seconds"]]
    check = statistics.mean(s["total"] for s in later)
    k10 = math.ceil(10 * check / step)
    res = {
        "command": " ".join(["python", "benchmarks/monitor_cost.py", *sys.argv[1:]]),
        "train_command": " ".join(c if " " not in c else repr(c) for c in cmd[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "model": args.model,
        "n_harmful": checks[0]["n_harmful"],
        "n_benign": checks[0]["n_benign"],
        "max_new_tokens": mon["config"]["max_new_tokens"],
        "judge": mon["judge"],
        "steps": run["global_steps"],
        "step_seconds_mean": round(step, 3),
        "baseline_check_seconds": checks[0]["seconds"],
        "check_seconds": later,
        "check_seconds_mean": round(check, 3),
        "check_over_step": round(check / step, 2),
        "k_for_10_percent": k10,
        "train_seconds": round(run["train_seconds"], 1),
        "wall_seconds": round(wall, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(
        f"one check ≈ {check:.1f} s = {check / step:.1f} optimizer steps ({step:.2f} s each): every k ≥ {k10} "
        f"steps keeps the monitor within 10% of training time"
    )


if __name__ == "__main__":
    main()
