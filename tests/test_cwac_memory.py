"""Peak memory of CWAC's ``prepare`` at d_in = 8192 stays under a bound derived from its design.

The worker (``tests/_cwac_memory_worker.py``, a subprocess so that its high-water RSS is its own) builds a random
1-layer Llama with hidden = intermediate = D = 8192 in bf16 (0.43 GB; LoRA r 8 on all seven projections), then
runs the real ``CWAC.prepare``: 16 anchors (θ₀'s refusals stubbed), both constraints, the weight constraint on the
layer's four module inputs (q/k/v, o, gate/up, down: three of width D), one SAE of width D trained for 2 steps on
≈ 650 captured rows. It reports its RSS after building the model, the high-water RSS of the whole run and of each
phase, every ``[D, D]`` tensor allocated during prepare (with the source that made it) and every saved tensor.

What CWAC keeps is O(d_in · rows) per module input (float32 decision rows; the Gram route's N × N float64 matrix,
N = rows < d_in; V: d_in × r with r ≤ N + 1) plus the SAE (d_in · d_sae per matrix), with the SAE's training rows
streamed from disk. The bound below is that, term by term, over the model's own forward transient (measured on a
plain no-grad forward of θ₀, the largest batch prepare feeds it), plus ``MARGIN``. The design this replaced kept
one float64 d_in × d_in covariance per constrained module (``CovarianceAccumulator``, 512 MiB each at 8192; six
such modules here: 3 GiB at once, plus ``eigh``'s copies), which the subspace phase must stay far below.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safeft.components.sae import BUFFER_BYTES, rows_within

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_cwac_memory_worker.py"
D = 8192
MIB = 2**20
# Allocator and interpreter slack: freed blocks below glibc's mmap threshold (≤ 32 MiB) stay resident, the
# Python heap, tokenizer and safetensors' mmapped shard pages. Stated, not fitted: the terms below are exact counts.
MARGIN = 256 * MIB
GRAM_CHUNK = 2048  # safeft.components.projection.basis_from_rows' default chunk


def subspace_bytes(r: dict) -> int:
    """What CWAC's subspace step adds: float32 decision rows of every module input (one capture pass here), the
    concatenated copy of one group, the Gram route's float64 N × N matrices (G, its symmetrised copy, eigh's
    eigenvectors and workspace), its float64 column blocks, and V in float64 (V, its QR factor, the copy with the
    mean direction; r ≤ N + 1 columns)."""
    n, nh = r["rows"], r["heldout_rows"]
    widths = list(r["group_d_in"].values())
    d_max = max(widths)
    rows = 4 * (n + nh) * sum(widths) + 4 * n * d_max
    gram = 4 * 8 * n * n + 2 * 8 * n * GRAM_CHUNK
    basis = 3 * 8 * d_max * (n + 1)
    return rows + gram + basis


def sae_training_bytes(r: dict) -> int:
    """What training one SAE holds at its peak (Adam's first step): W_enc and W_dec (d_in · d_sae float32 each),
    their gradients, Adam's two moments, and Adam's two temporaries of one matrix (sqrt, division): 10 matrices;
    the shuffle buffer of streamed rows (loaded, concatenated, permuted: 3 copies of min(rows, buffer) rows); the
    batch's activations (16 float32 [B, d_in + d_sae] tensors: pre-activations, ReLU, TopK, codes, AuxK, grads)."""
    d, w, b = r["d"], r["d_sae"], r["sae_batch"]
    weights = 10 * 4 * d * w
    shuffle = 3 * 4 * min(r["sae_rows"], rows_within(BUFFER_BYTES, d, 262144)) * d
    batch = 16 * 4 * b * (d + w)
    return weights + shuffle + batch


def old_covariance_bytes(r: dict) -> int:
    """The replaced design: one float64 d_in × d_in covariance per constrained module, all alive during capture."""
    per_group = {"q_proj+k_proj+v_proj": 3, "gate_proj+up_proj": 2}
    n = 0
    for g, d_in in r["group_d_in"].items():
        n_mod = per_group.get(g.split(".")[-1], 1)
        n += n_mod * 8 * d_in * d_in
    return n


def _can_reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux /proc/self/clear_refs (per-phase peak RSS)")
def test_cwac_prepare_peak_memory_at_d_in_8192(tmp_path):
    out = tmp_path / "mem.json"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), "--d", str(D), "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    child_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # ≤ true peak (marks reset)
    kib = 1024
    assert r["hwm_reset"]
    model_rss, peak = r["rss_model_kib"] * kib, r["peak_kib"] * kib
    extra = peak - model_rss
    fwd = r["forward_extra_kib"] * kib
    ph = {k: (v["peak_kib"] - v["start_kib"]) * kib for k, v in r["phases"].items()}

    # no [d_in, d_in] tensor outside the SAE (whose W_enc / W_dec are d_in × d_sae, square at width factor 1);
    # no float64 square at all (the covariance route); the subspace took the Gram route (N < d_in) everywhere
    outside = {k: n for k, n in r["square"].items() if not k.startswith("sae.py:")}
    assert not outside, f"[{D}, {D}] tensors allocated outside the SAE: {outside}"
    assert not [k for k in r["square"] if "float64" in k]
    assert set(r["methods"].values()) == {"gram"}, r["methods"]
    assert r["rows"] + r["heldout_rows"] < D and r["passes"] == 1
    # saved artifacts: every V is [d_in, r] with r ≤ rows + 1; only the SAE's matrices are D × D
    for t in r["saved"]:
        if t["file"].startswith("cwac-sae"):
            continue
        numel = 1
        for s in t["shape"]:
            numel *= s
        assert numel <= D * (r["rows"] + 1), t
    v_bytes = sum(4 * r["group_d_in"][g] * k for g, k in r["ranks"].items())
    assert r["files"]["cwac-subspace/tensors.safetensors"] <= v_bytes + 64 * 1024

    old = old_covariance_bytes(r)
    b_sub = subspace_bytes(r)
    b_sae = sae_training_bytes(r)
    bound = max(b_sub + fwd, b_sae) + v_bytes + fwd + MARGIN
    report = (
        f"d_in {D}: model RSS {model_rss / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, extra {extra / MIB:.0f} MiB "
        f"(bound {bound / MIB:.0f}); subspace +{ph['subspace'] / MIB:.0f} MiB (bound "
        f"{(b_sub + fwd + MARGIN) / MIB:.0f}; old covariances {old / MIB:.0f}); SAE training "
        f"+{ph['sae_training'] / MIB:.0f} MiB (bound {(b_sae + MARGIN) / MIB:.0f}); θ₀ forward "
        f"+{fwd / MIB:.0f} MiB; child ru_maxrss {child_maxrss / MIB:.0f} MiB; prepare {r['seconds']:.0f} s, "
        f"subprocess {wall:.0f} s; phases {r['phases']}"
    )
    print(report)
    assert ph["subspace"] <= b_sub + fwd + MARGIN, report
    assert ph["subspace"] < 8 * D * D, report  # below even ONE float64 covariance of the old design
    assert ph["sae_training"] <= b_sae + MARGIN, report
    assert extra <= bound, report
    assert bound < old + b_sae, report  # the bound tells the designs apart
