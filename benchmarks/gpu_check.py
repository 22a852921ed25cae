"""SFT vs CWAC on the `small` setting, side by side on one GPU in bf16: step time, peak memory, CWAC's one-off
preparation, and what ``safeft estimate`` predicted for the same setting. Run it through benchmarks/gpu_check.sh.

The `small` setting (benchmarks/presets/small.yaml): Qwen2.5-0.5B's dimensions, LoRA r 8 (α 16) on all seven
projections, batch 8, sequences of 128 tokens, lr 5e-4; CWAC with n_anchor 60, sae_steps 300, layers all (causal
check off). The weights are random (the device machine reaches no Hub and the GGUF is too big to carry): step time
and memory do not depend on the weights' values, safety does, and the benchmarks measure that elsewhere.

Writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.md``. ``--tiny``: a 2-layer hidden-64 model, a few steps, on
whatever device there is (CPU here): checks the script, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _cost_probe as probe  # noqa: E402

from safeft import estimate as est  # noqa: E402

TINY = est.ModelDims("tiny", 64, 128, 2, 4, 2, 256)
TINY_CWAC = dict(
    n_anchor=24, sae_steps=20, sae_width_factor=2, sae_k=8, n_features=8, layers="all", causal_check=False
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model, few steps, any device (tests the script)")
    p.add_argument(
        "--model", default="qwen2.5-0.5b", help="a safeft estimate preset or config.json (dimensions)"
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "gpu"))
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not a.tiny:
        print(
            "gpu_check: no CUDA device; run on a GPU machine, or pass --tiny to test the script",
            file=sys.stderr,
        )
        return 2
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    dims = TINY if a.tiny else est.resolve_model(a.model)
    options = TINY_CWAC if a.tiny else probe.SMALL_CWAC
    steps = min(a.steps, 4) if a.tiny else a.steps
    repeats = 1 if a.tiny else a.repeats
    batch, seq = (4, 32) if a.tiny else (8, 128)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = probe.ab(
            dims, options, steps=steps, repeats=repeats, batch=batch, seq_len=seq, work=Path(tmp), device=device,
            dtype=dtype,
        )  # fmt: skip
    s = est.Setting(
        batch_size=batch, seq_len=seq, cwac_rank=max(1, round(sum(res["v_ranks"]) / len(res["v_ranks"]))),
        anchor_len=round(res["anchor_len_mean"]), n_anchor=options["n_anchor"], hardware="h200" if cuda else "cpu",
    )  # fmt: skip
    e = est.estimate(dims, "cwac", s)
    report = {
        "command": "bash benchmarks/gpu_check.sh " + " ".join(sys.argv[1:]),
        "tiny": a.tiny,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "model_dims": dims.__dict__,
        "setting": {
            "batch": batch,
            "seq_len": seq,
            "steps": steps,
            "repeats": repeats,
            "lora_r": 8,
            "cwac": options,
        },
        "measured": res,
        "estimate": {
            "step_ratio": e.step_ratio,
            "train_extra_bytes": e.train_extra_bytes,
            "hardware": s.hardware,
        },
        "wall_seconds": time.perf_counter() - t0,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    extra_mb = res["cwac_peak_mb"] - res["sft_peak_mb"]
    md = [
        f"# SFT vs CWAC, {report['device']}, {report['dtype']}"
        + (" (tiny: script check only)" if a.tiny else ""),
        "",
        f"`{report['command']}` — {dims.name} dimensions, random weights, LoRA r 8 on all projections, batch "
        f"{batch}×{seq}, {steps} steps × {repeats} A/B pairs (first step of each run dropped, medians).",
        "",
        "| | SFT | CWAC | ratio | estimate |",
        "|---|---|---|---|---|",
        f"| step time | {res['sft_step_s'] * 1e3:.1f} ms | {res['cwac_step_s'] * 1e3:.1f} ms | "
        f"{res['step_ratio']:.3f}× | {e.step_ratio:.3f}× |",
        f"| peak memory | {res['sft_peak_mb']:.0f} MB | {res['cwac_peak_mb']:.0f} MB | {res['mem_ratio']:.3f}× | "
        f"+{e.train_extra_bytes / 2**20:.0f} MB (measured +{extra_mb:.0f} MB) |",
        "",
        f"CWAC prepare (one-off, artifacts computed): {res['prepare_seconds']:.1f} s; subspace ranks "
        f"{min(res['v_ranks'])}–{max(res['v_ranks'])} over {res['constrained_modules']} modules.",
    ]
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
