"""Subspace projections for CWAC's weight constraint, and the streaming covariance they are built from.

Shapes: a linear module ``y = W x`` has ``W: [d_out, d_in]`` and inputs ``x: [..., d_in]``. A safety subspace is an
orthonormal basis ``V: [d_in, k]`` of the inputs' dominant directions. Keeping ``ΔW V = 0`` means the module's
response to inputs inside span(V) never moves. All maths runs in float32 (float64 for float64 inputs) and the
result is cast back to the parameter's dtype, so bf16 weights are handled (up to one bf16 rounding).
"""

from __future__ import annotations

import torch

from safeft.errors import SafeFTError


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def project_rows_out(A: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Remove span(V) from every row of ``A``: ``A − (A V) Vᵀ``.

    A: ``[r, d_in]`` (e.g. a LoRA A matrix), V: ``[d_in, k]`` with orthonormal columns. Returns ``[r, d_in]`` in
    A's dtype and device. Afterwards ``A V = 0`` (to float precision), so for LoRA ``ΔW V = B A V = 0``."""
    if A.shape[-1] != V.shape[0]:
        raise SafeFTError(f"projection: A has d_in={A.shape[-1]} but the subspace V has d_in={V.shape[0]}")
    wd = _work_dtype(A)
    a = A.to(wd)
    v = V.to(device=A.device, dtype=wd)
    return (a - (a @ v) @ v.T).to(A.dtype)


def project_update_out(W: torch.Tensor, W0: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Full fine-tuning form: ``W − ((W − W0) V) Vᵀ``, i.e. ``W0 + ΔW Π`` with ``Π = I − V Vᵀ``.

    W, W0: ``[d_out, d_in]``; V: ``[d_in, k]`` orthonormal. Returns ``[d_out, d_in]`` in W's dtype; afterwards
    ``(W − W0) V = 0`` (to float precision)."""
    if W.shape != W0.shape:
        raise SafeFTError(f"projection: W {tuple(W.shape)} and W0 {tuple(W0.shape)} differ in shape")
    wd = _work_dtype(W)
    w = W.to(wd)
    delta = w - W0.to(device=W.device, dtype=wd)
    v = V.to(device=W.device, dtype=wd)
    return (w - (delta @ v) @ v.T).to(W.dtype)


def top_energy_basis(C: torch.Tensor, energy: float) -> torch.Tensor:
    """Top eigenvectors of a PSD matrix that together hold a fraction ``energy`` of its trace.

    C: ``[d, d]`` symmetric PSD (float64 recommended). Returns ``V: [d, k]`` (same dtype as C, columns orthonormal,
    ordered by descending eigenvalue) with ``k`` the smallest count whose eigenvalues sum to ≥ ``energy · trace(C)``
    (at least 1). ``energy`` must be in (0, 1]."""
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise SafeFTError(f"top_energy_basis: C must be square, got shape {tuple(C.shape)}")
    if not 0.0 < energy <= 1.0:
        raise SafeFTError(f"top_energy_basis: energy={energy} must be in (0, 1]")
    c = C.to(torch.float64)
    c = 0.5 * (c + c.T)  # symmetrise accumulated round-off before eigh
    evals, evecs = torch.linalg.eigh(c)  # ascending
    evals = evals.flip(0).clamp_min(0.0)
    evecs = evecs.flip(1)
    total = evals.sum()
    if total <= 0:
        raise SafeFTError("top_energy_basis: the covariance is zero (no inputs were captured)")
    cum = torch.cumsum(evals, 0)
    # small tolerance so that an exact split (e.g. energy = 0.5 of [1, 1]) picks the smaller k
    k = int(torch.searchsorted(cum, energy * total * (1 - 1e-12)).item()) + 1
    k = max(1, min(k, c.shape[0]))
    return evecs[:, :k].to(C.dtype).contiguous()


class CovarianceAccumulator:
    """Streaming uncentred second moment ``C = Σ x xᵀ`` over rows ``x ∈ R^d`` in float64 (never holds all X).

    ``update(x)`` takes ``x: [..., d]`` (any leading shape, any float dtype, any device); ``cov`` is ``[d, d]``
    float64 on the device of the first update; ``count`` is the number of rows seen."""

    def __init__(self, d: int):
        self.d = int(d)
        self._cov: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d:
            raise SafeFTError(f"CovarianceAccumulator: expected last dim {self.d}, got {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.d).to(torch.float64)
        if rows.shape[0] == 0:
            return
        if self._cov is None:
            self._cov = torch.zeros(self.d, self.d, dtype=torch.float64, device=rows.device)
        self._cov.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    @property
    def cov(self) -> torch.Tensor:
        if self._cov is None:
            return torch.zeros(self.d, self.d, dtype=torch.float64)
        return self._cov
