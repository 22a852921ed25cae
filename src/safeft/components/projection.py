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


def _energy_rank(evals: torch.Tensor, energy: float) -> int:
    """Smallest k whose top-k eigenvalues (descending, ≥ 0) hold ``energy`` of their sum (at least 1)."""
    total = evals.sum()
    if total <= 0:
        raise SafeFTError("subspace basis: the rows are all zero (no inputs were captured)")
    cum = torch.cumsum(evals, 0)
    k = int(torch.searchsorted(cum, energy * total * (1 - 1e-12)).item()) + 1
    return max(1, min(k, evals.shape[0]))


def basis_from_rows(
    X: torch.Tensor, energy: float, center: bool = False, chunk: int = 2048
) -> tuple[torch.Tensor, dict[str, float]]:
    """Orthonormal basis ``V: [d, r]`` (float32) of the directions that hold ``energy`` of the rows' energy.

    X: ``[N, d]`` rows (any float dtype, cpu). Uncentred: the top eigenvectors of XᵀX holding ``energy`` of its
    trace. ``center``: the same on the centred rows X − x̄, **plus the mean direction** x̄/‖x̄‖ (r = k + 1 unless it is
    already in the span): the
    energy split then ranks the directions along which the rows differ, while a shift common to all of them stays
    blocked too. The eigenproblem is solved on the smaller side, min(N, d): for N ≤ d the N × N Gram matrix
    G = X Xᵀ (V = Xᵀ U Σ⁻¹), else the d × d covariance; both float64, accumulated over column / row chunks of
    ``chunk`` so that no float64 copy of X is made. Returns ``(V, info)`` with ``rank``, ``rows``, ``method``
    ("gram" or "cov") and ``energy_kept`` (the fraction of the rows' uncentred energy inside span(V))."""
    if not 0.0 < energy <= 1.0:
        raise SafeFTError(f"basis_from_rows: energy={energy} must be in (0, 1]")
    N, d = X.shape
    if N == 0:
        raise SafeFTError("basis_from_rows: no rows")
    mu = torch.zeros(d, dtype=torch.float64)
    for i in range(0, N, chunk):
        mu += X[i : i + chunk].double().sum(0)
    mu /= N
    sub = mu if center else torch.zeros_like(mu)

    def cols(a: int, b: int) -> torch.Tensor:  # centred column block [N, b − a], float64
        return X[:, a:b].double() - sub[a:b]

    if N <= d:
        G = torch.zeros(N, N, dtype=torch.float64)
        for a in range(0, d, chunk):
            c = cols(a, a + chunk)
            G.addmm_(c, c.T)
        evals, U = torch.linalg.eigh(0.5 * (G + G.T))
        evals, U = evals.flip(0).clamp_min(0.0), U.flip(1)
        tol = float(evals[0]) * 1e-12
        k = min(_energy_rank(evals, energy), int((evals > tol).sum()))
        W = U[:, :k] / evals[:k].sqrt()  # [N, k]
        V = torch.empty(d, k, dtype=torch.float64)
        for a in range(0, d, chunk):
            V[a : a + chunk] = cols(a, a + chunk).T @ W
        method = "gram"
    else:
        C = torch.zeros(d, d, dtype=torch.float64)
        for i in range(0, N, chunk):
            r = X[i : i + chunk].double() - sub
            C.addmm_(r.T, r)
        evals, U = torch.linalg.eigh(0.5 * (C + C.T))
        evals, U = evals.flip(0).clamp_min(0.0), U.flip(1)
        k = _energy_rank(evals, energy)
        V = U[:, :k]
        method = "cov"
    V, _ = torch.linalg.qr(V)  # re-orthonormalise (the Gram route divides by small σ); keeps the span
    if center and float(mu.norm()) > 0:
        u = mu / mu.norm()
        r = u - V @ (V.T @ u)  # the part of the mean direction not already in span(V)
        if float(r.norm()) > 1e-6:
            V = torch.cat([V, (r / r.norm())[:, None]], dim=1)
    kept = 0.0
    total = 0.0
    for i in range(0, N, chunk):
        r = X[i : i + chunk].double()
        kept += float((r @ V).pow(2).sum())
        total += float(r.pow(2).sum())
    info = {
        "rank": int(V.shape[1]),
        "rows": int(N),
        "method": method,
        "energy_kept": kept / max(total, 1e-300),
    }
    return V.float().contiguous(), info


def energy_inside(X: torch.Tensor, V: torch.Tensor, chunk: int = 4096) -> float:
    """Fraction of the rows' (uncentred) energy Σ‖x‖² that lies in span(V): Σ‖x V‖² / Σ‖x‖². X: ``[N, d]``."""
    kept = total = 0.0
    v = V.double()
    for i in range(0, X.shape[0], chunk):
        r = X[i : i + chunk].double()
        kept += float((r @ v).pow(2).sum())
        total += float(r.pow(2).sum())
    return kept / max(total, 1e-300)


