"""Check ``safeft estimate`` against measurement on models we can run (random-weight Llama configs, CPU).

For each model (benchmarks/_cost_probe.py): CWAC's artifacts from a real ``prepare`` (θ₀'s answers stubbed as
refusals), the tensors CWAC keeps resident during training, and the step time of SFT and of CWAC (A/B alternated,
first step of each run dropped, medians); then the same quantities from :mod:`safeft.estimate` on the CPU constants
fitted here. The first model (``calib``) fits the three CPU constants: SFT step times at two batch sizes give the
effective FLOP/s (slope) and the per-layer cost (intercept); CWAC's ``after_step`` gives the per-module cost. The
other models are held out: their errors are the ones quoted in docs/distributed.md.

What this cannot check on CPU: activation memory (RSS is dominated by the allocator at these sizes), GPU speeds
(benchmarks/gpu_check.sh), and CWAC's reworked layout (one V per distinct input, W₀V): the current CWAC stores one
V per module, so its V count is compared with the same count per module at the measured mean rank.

    python benchmarks/estimate_check.py            # ≈ 2 min; writes benchmarks/results/estimate_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _cost_probe as probe  # noqa: E402

from safeft import estimate as est  # noqa: E402

MODELS = {  # vocab 256: the tiny word-level tokenizer of the tests
    "calib": est.ModelDims("calib", 256, 704, 4, 4, 2, 256),
    "tiny": est.ModelDims("tiny", 64, 128, 2, 4, 2, 256),
    "mid": est.ModelDims("mid", 384, 1024, 6, 6, 2, 256),
}
OPTIONS = dict(
    sae_steps=100, sae_width_factor=8, sae_k=16, n_features=16, n_positions=4, anchor_batch=4,
    causal_check=False, layers="all", n_anchor=40,
)  # fmt: skip
BATCH, SEQ = 8, 32


def predicted(d: est.ModelDims, meas: dict, hw: est.Hardware) -> dict:
    est.HARDWARE[hw.name] = hw
    rank = sum(meas["v_ranks"]) / len(meas["v_ranks"])
    s = est.Setting(
        method="lora", batch_size=BATCH, seq_len=SEQ, cwac_rank=round(rank), cwac_layers="all",
        sae_width_factor=OPTIONS["sae_width_factor"], anchor_batch=OPTIONS["anchor_batch"],
        anchor_len=round(meas["anchor_len_mean"]), n_features=OPTIONS["n_features"],
        n_positions=OPTIONS["n_positions"], n_anchor=OPTIONS["n_anchor"], hardware=hw.name,
    )  # fmt: skip
    e = est.estimate(d, "cwac", s)
    # the current CWAC keeps one V per module (not per distinct input): count it that way, at the mean rank
    per_module_v = d.layers * sum(d_in for _, d_in in d.module_shapes().values()) * rank
    resident = 4 * (per_module_v + e.parts["SAE"] + e.parts["baselines"])
    return {
        "v_elements_per_module_layout": per_module_v,
        "v_elements_shared_layout": e.parts["V"],
        "sae_elements": e.parts["SAE"],
        "resident_bytes": resident,
        "sft_step_s": est.step_seconds(d, s, hw),
        "step_ratio": e.step_ratio,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "estimate_check.json"))
    a = p.parse_args()
    torch.manual_seed(0)
    meas = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, d in MODELS.items():
            print(f"measuring {name} ...", flush=True)
            kw = dict(steps=a.steps, batch=BATCH, seq_len=SEQ, device="cpu", dtype=torch.float32)
            meas[name] = probe.ab(d, OPTIONS, repeats=a.repeats, work=Path(tmp) / name, **kw)
            meas[name]["resident_bytes"] = 4 * (
                meas[name]["v_elements"] + meas[name]["sae_elements"] + meas[name]["z_base_elements"]
            )
        small_batch = probe.sft_step_only(
            MODELS["calib"],
            steps=a.steps,
            batch=2,
            seq_len=SEQ,
            work=Path(tmp) / "b2",
            device="cpu",
            dtype=torch.float32,
        )
    # fit: step = F·tokens / tput + L·c  at two batch sizes (calib model)
    c = MODELS["calib"]
    f = 4.0 * c.params
    t8, t2 = meas["calib"]["sft_step_s"], small_batch
    slope = (t8 - t2) / (f * SEQ * (BATCH - 2))  # seconds per FLOP
    tflops = 1.0 / slope / 1e12
    per_layer = max(0.0, (t2 - f * SEQ * 2 * slope) / c.layers)
    per_module = meas["calib"]["after_step_per_module_s"]
    hw = est.Hardware("cpu-fit", tflops, 8.0, 0.5, per_layer, per_module, "fit on calib")
    rows = []
    for name, d in MODELS.items():
        m = meas[name]
        pr = predicted(d, m, hw)
        err = {
            "v_elements": pr["v_elements_per_module_layout"] / m["v_elements"] - 1,
            "sae_elements": pr["sae_elements"] / m["sae_elements"] - 1,
            "resident_bytes": pr["resident_bytes"] / m["resident_bytes"] - 1,
            "sft_step_s": pr["sft_step_s"] / m["sft_step_s"] - 1,
            "step_ratio": (pr["step_ratio"] - m["step_ratio"]) / m["step_ratio"],
        }
        rows.append({"model": name, "dims": d.__dict__, "measured": m, "estimate": pr, "relative_error": err})
    held = [r for r in rows if r["model"] != "calib"]
    keys = ("v_elements", "sae_elements", "resident_bytes", "sft_step_s", "step_ratio")
    summary = {k: max(abs(r["relative_error"][k]) for r in held) for k in keys}
    report = {
        "command": "python benchmarks/estimate_check.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "fitted_cpu_constants": {
            "tflops": tflops,
            "per_layer_step_s": per_layer,
            "per_module_step_s": per_module,
        },
        "max_abs_relative_error_held_out": summary,
        "models": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2, default=str))
    print(
        json.dumps(
            {k: report[k] for k in ("fitted_cpu_constants", "max_abs_relative_error_held_out")}, indent=2
        )
    )
    for r in rows:
        m, e = r["measured"], r["estimate"]
        print(
            f"{r['model']:>6}: step ratio {m['step_ratio']:.3f} measured, {e['step_ratio']:.3f} estimated; SFT step "
            f"{m['sft_step_s'] * 1e3:.1f} vs {e['sft_step_s'] * 1e3:.1f} ms; V {m['v_elements']} vs "
            f"{e['v_elements_per_module_layout']:.0f}; SAE {m['sae_elements']} vs {e['sae_elements']}"
        )


if __name__ == "__main__":
    main()
