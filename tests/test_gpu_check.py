"""benchmarks/gpu_check.sh on CPU: the tiny switch runs the whole script (SFT and CWAC side by side) and writes its
JSON and markdown; without it and without a GPU the script refuses in one line (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from safeft.data import shared_data_dir

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the real check runs instead")
@pytest.mark.skipif(shared_data_dir() is None, reason="the shared data (../shared/data) is absent: the check's CWAC "
                    "takes its anchors from its default sources there")
def test_gpu_check_tiny_on_cpu_writes_ratios_and_refuses_without_gpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAFEFT_GPU_CHECK_TINY": "1"}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["tiny"] is True and rep["model_dims"]["hidden"] == 64
    m = rep["measured"]
    assert (
        m["sft_step_s"] > 0
        and m["cwac_step_s"] > 0
        and m["step_ratio"] == pytest.approx(m["cwac_step_s"] / m["sft_step_s"])
    )
    assert m["prepare_seconds"] > 0 and m["constrained_modules"] == 14  # 7 projections × 2 layers
    assert rep["estimate"]["step_ratio"] > 1.0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| step time |" in md and "| peak memory |" in md and "script check only" in md

    env["SAFEFT_GPU_CHECK_TINY"] = "0"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path / "x")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_check: no CUDA device")
    assert not (tmp_path / "x").exists()
