"""Distributed training: DDP on 2 CPU processes (gloo) equals one process with the same global batch, under
defenses that add loss terms and edit the weights after every step. Sharded parameters (FSDP2, ZeRO-3) are in
test_fsdp.py (2-process runs) and test_sharding.py (what is refused, per backend).

The DDP run is ``torch.distributed.run --nproc_per_node 2 tests/_ddp_worker.py`` with per-device batch 2; the
reference is the same worker in this process with batch 4. Accelerate shards the (seeded) sampler's batches
round-robin over the ranks, so global step k sees the same 4 examples in both runs; the task loss is normalised by
the token count of the whole global batch (``average_tokens_across_devices``) and DDP averages gradients, so the
updates agree up to float summation order. Tolerance: atol 1e-5 on every trainable parameter (measured: ~1e-7).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from helpers_dist import gloo, torchrun

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_ddp_worker.py"
ATOL = 1e-5



@gloo
def test_ddp_two_processes_equal_one_process_with_same_global_batch(tmp_path):
    from safetensors.torch import load_file

    ddp_out = tmp_path / "ddp"
    ddp_out.mkdir()
    proc = torchrun([str(WORKER), str(ddp_out), "--batch", "2", "--steps", "4"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # every rank ended with rank 0's parameters, bit for bit (after_step ran on every rank)
    reports = [json.loads((ddp_out / f"rank{r}_of2.json").read_text()) for r in (0, 1)]
    assert all(r["identical_to_rank0"] and r["max_abs_diff"] == 0.0 for r in reports), reports
    kind = reports[0]["defense"]

    # reference: one process, per-device batch 4 (same global batch, same sampler order)
    sys.path.insert(0, str(HERE))
    try:
        import _ddp_worker
    finally:
        sys.path.remove(str(HERE))
    single_out = tmp_path / "single"
    single_out.mkdir()
    single = _ddp_worker.train(single_out, batch=4, steps=4, defense=kind)
    ddp = load_file(str(ddp_out / "params.safetensors"))
    assert set(ddp) == set(single) and len(single) > 0
    worst = max(float((ddp[k] - single[k]).abs().max()) for k in single)
    assert worst <= ATOL, f"DDP vs single-process max |Δ| = {worst:.3g} > {ATOL}"
    # training moved the adapters (the comparison is not between two untouched initialisations)
    assert max(float(single[k].abs().max()) for k in single if "lora_B" in k) > 1e-3
    # the test defense's projection holds at the end on the DDP result: A V = 0 (V rebuilt from the same seed)
    g = torch.Generator().manual_seed(1234)
    for name in sorted(k for k in ddp if "lora_A" in k):
        q, _ = torch.linalg.qr(torch.randn(ddp[name].shape[1], 8, generator=g))
        assert float((ddp[name] @ q).abs().max()) < 1e-5, name


@gloo
def test_cli_under_torchrun_with_lisa_matches_one_process(tmp_path):
    """``torchrun -m safeft.cli train`` (2 ranks, batch 2) with Lisa (swapped alignment batches, proximal term,
    phase switches) writes final/ and run.json once and equals ``run_train`` in one process with batch 4."""
    from helpers_models import make_tiny_model_dir
    from safetensors.torch import load_file

    from safeft.config import build_config
    from safeft.pipeline import run_train

    model_dir = make_tiny_model_dir(tmp_path / "m", max_position_embeddings=256)
    sets = {
        "model.cache_dir": str(tmp_path / "cache"),
        "data.n": 16,
        "data.p": 0.25,
        "data.max_length": 96,
        "training.lora_r": 4,
        "training.lora_alpha": 8,
        "training.max_steps": 4,
        "training.lr": 1e-2,
        "training.save_steps": 100,
        "training.progress": False,
        "defense.name": "lisa",
        "defense.options": {"lisa": {"align_steps": 1, "user_steps": 2}},
    }
    flags = ["--set", "defense.options.lisa.align_steps=1", "--set", "defense.options.lisa.user_steps=2"]
    for k, v in sets.items():
        if k != "defense.options":
            flags += ["--set", f"{k}={v}"]
    # torchrun abbreviates its own options: pass safeft's as --set key=value (e.g. --n would be taken as --nnodes)
    args = [
        "-m",
        "safeft.cli",
        "train",
        "--model",
        str(model_dir),
        "--task",
        "demo",
        "--harmful-source",
        "demo",
        "--eval-source",
        "demo",
        "--batch-size",
        "2",
        "--output-dir",
        str(tmp_path / "ddp"),
        *flags,
    ]
    proc = torchrun(args, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["global_steps"] == 4
    assert not (tmp_path / "ddp" / ".final.tmp").exists()

    cfg = build_config(
        None,
        {
            **sets,
            "model.aligned": str(model_dir),
            "data.task": "demo",
            "data.harmful_source": "demo",
            "eval.harmful_source": "demo",
            "training.batch_size": 4,
            "training.output_dir": str(tmp_path / "one"),
        },
    )
    run_train(cfg, log=lambda *a: None)
    a = load_file(str(tmp_path / "ddp" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= ATOL, f"torchrun vs one process max |Δ| = {worst:.3g} > {ATOL}"
    assert max(float(b[k].abs().max()) for k in b if "lora_B" in k) > 1e-3


# ---- sharded parameters: which defenses touch parameter tensors ---------------------------------------------------


def test_defenses_that_need_full_params_are_declared():
    from safeft.defenses import get_defense_class

    for name in ("asft", "safelora", "lisa", "pact"):
        assert get_defense_class(name).needs_full_params, name
    for name in ("sft", "safeinstr"):
        assert not get_defense_class(name).needs_full_params, name


def test_cwac_declares_it_needs_full_params():
    from safeft.defenses.cwac import CWAC, CWACActivation, CWACWeight

    assert CWAC.needs_full_params and CWACWeight.needs_full_params and CWACActivation.needs_full_params
