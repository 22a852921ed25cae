"""CWAC's cost next to plain SFT, measured side by side in one run.

Runs ``safeft train`` for SFT and CWAC alternately (A B A B …) in fresh subprocesses with identical settings, so a
drift in machine speed hits both alike, and reports per pair the ratio of mean optimizer-step time (first step
excluded) and of peak memory (the training process's max RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU),
then the medians. The first CWAC run computes the artifacts into a fresh folder: its ``prepare_seconds`` over one
SFT run's training time is the one-off cost (``--artifacts DIR`` reuses a folder that has them instead, e.g. the
default cache a benchmark filled). Several ``--options`` compare CWAC settings in the same run (A B C A B C …),
each against the SFT run of its repeat. Output: ``benchmarks/results/cwac_overhead.json``.

    python benchmarks/cwac_overhead.py --repeats 3 --steps 12
    python benchmarks/cwac_overhead.py --repeats 6 --artifacts ~/.cache/safeft/artifacts \
        --options '{activation_every: 1}' --options '{activation_every: 4}'

The exact commands of each committed measurement are in its JSON (``command``).
"""

from __future__ import annotations

import argparse
import json
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


def _train(defense: str, out: Path, args: argparse.Namespace, artifacts: Path, options: str | None = None) -> dict:
    cmd = [
        sys.executable, "-m", "safeft.cli", "train", "--defense", defense, "--model", args.model,
        *(["--base-model", args.base_model] if args.base_model != "none" else []),
        "--task", args.task, "--harmful-source", args.harmful_source,
        "--eval-source", args.eval_source, "--n", str(args.n), "--p", str(args.p),
        "--max-steps", str(args.steps), "--batch-size", "8", "--lr", "5e-4", "--output-dir", str(out),
        "--artifacts-dir", str(artifacts), "--set", "training.save_steps=100000", "--set", "training.progress=false",
        "--set", "data.max_length=128",
    ]
    for kv in args.set or []:
        cmd += ["--set", kv]
    if options is not None:
        cmd += ["--set", f"defense.options.{defense}={options}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{defense} run failed:\n{proc.stderr[-3000:]}")
    rec = json.loads((out / "run.json").read_text())
    rec["wall"] = time.perf_counter() - t0
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="aligned:smollm2-135m")
    p.add_argument("--base-model", default="smollm2-135m", help="θ_b, or 'none' where the preset has none (small)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--harmful-source", default="hh_rlhf")
    p.add_argument("--eval-source", default="harmbench")
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--p", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--defense", default="cwac", help="the defense to compare with sft")
    p.add_argument(
        "--options",
        action="append",
        help="the CWAC options (YAML mapping), e.g. '{n_anchor: 60, sae_steps: 300, layers: all}'; repeat it to "
             "compare settings (default: '{n_anchor: 60, sae_steps: 300}')",
    )
    p.add_argument("--artifacts", default=None, help="an artifacts folder to reuse (default: a fresh one)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="more config for every run, e.g. align.n_refusal=400 (the tiny preset's θ₀)")
    p.add_argument("--out", default=str(HERE / "results" / "cwac_overhead.json"))
    args = p.parse_args()
    variants = args.options or ["{n_anchor: 60, sae_steps: 300}"]
    pairs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        # fresh unless given: the first CWAC run then pays the one-off preparation
        artifacts = Path(args.artifacts).expanduser() if args.artifacts else Path(tmp) / "artifacts"
        for i in range(args.repeats):
            sft = _train("sft", Path(tmp) / f"sft{i}", args, artifacts)
            for j, v in enumerate(variants):
                cw = _train(args.defense, Path(tmp) / f"cwac{i}-{j}", args, artifacts, options=v)
                pairs[v].append({
                    "sft_step_s": sft["step_seconds_mean"], "cwac_step_s": cw["step_seconds_mean"],
                    "step_ratio": cw["step_seconds_mean"] / sft["step_seconds_mean"],
                    "sft_peak_mb": sft["peak_memory_mb"], "cwac_peak_mb": cw["peak_memory_mb"],
                    "mem_ratio": cw["peak_memory_mb"] / sft["peak_memory_mb"],
                    "cwac_prepare_s": cw["prepare_seconds"], "sft_train_s": sft["train_seconds"],
                })
                print(json.dumps({"options": v, **pairs[v][-1]}), flush=True)

    def summary(ps: list[dict]) -> dict:
        steps, mems = [x["step_ratio"] for x in ps], [x["mem_ratio"] for x in ps]
        return {
            "pairs": ps,
            "step_time_ratio_median": statistics.median(steps),
            "step_time_ratio_range": [min(steps), max(steps)],
            "peak_mem_ratio_median": statistics.median(mems),
            "peak_mem_ratio_range": [min(mems), max(mems)],
            "prepare_seconds_first": ps[0]["cwac_prepare_s"],
            "prepare_fraction_of_sft_run": ps[0]["cwac_prepare_s"] / ps[0]["sft_train_s"],
        }

    result = {
        "command": "python benchmarks/cwac_overhead.py " + " ".join(sys.argv[1:]),
        "model": args.model, "task": args.task, "n": args.n, "p": args.p, "steps": args.steps,
        "defense": args.defense, "artifacts": "reused" if args.artifacts else "fresh",
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
        "note": "ratios per A/B pair, medians and ranges quoted; peak memory = max RSS of the training process on CPU",
        **({"options": variants[0], **summary(pairs[variants[0]])} if len(variants) == 1 else
           {"variants": {v: summary(ps) for v, ps in pairs.items()}}),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
