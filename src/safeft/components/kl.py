"""Token-distribution KL on a vocabulary subset, and the concentration index of a subset distribution.

Pure functions used by PACT (``safeft.defenses.pact``). Shapes: ``N`` rows (one per response token), ``k`` the
size of the token subset ``S``. KL values are in nats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def subset_kl(teacher_probs: Tensor, student_logits: Tensor, T: float) -> Tensor:
    """Mean over rows of ``KL(q ‖ softmax(student_logits / T))`` on a token subset, in nats.

    Args:
        teacher_probs: ``[N, k]`` target distributions ``q`` (entries ≥ 0, positive row sums; rows are
            renormalised to sum to 1; zeros contribute 0, the ``0·log 0 = 0`` convention). No gradient is taken through them by the callers.
        student_logits: ``[N, k]`` student logits restricted to the subset (differentiable).
        T: softmax temperature (> 0) applied to the student logits. The ``T²`` gradient rescaling of
            distillation is left to the caller.

    Returns:
        Scalar tensor: ``(1/N) Σ_n Σ_j q_nj (log q_nj − log softmax(s_n / T)_j)``; 0 when ``N == 0``.
    """
    if teacher_probs.shape != student_logits.shape or teacher_probs.dim() != 2:
        raise ValueError(
            f"subset_kl: teacher_probs {tuple(teacher_probs.shape)} and student_logits "
            f"{tuple(student_logits.shape)} must both be [N, k]"
        )
    if T <= 0:
        raise ValueError(f"subset_kl: T={T} must be > 0")
    if teacher_probs.shape[0] == 0:
        return student_logits.sum() * 0.0  # keeps the graph (and DDP) happy on an empty batch
    # float64 on the small [N, k] slice, and q renormalised there: near the optimum KL ≈ Σq − 1, so a float32
    # normalisation error (~1e-7) would otherwise show up as a spurious KL of that size
    q = teacher_probs.to(torch.float64)
    q = q / q.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    log_p = F.log_softmax(student_logits.to(torch.float64) / T, dim=-1)
    # xlogy gives 0·log 0 = 0 where q is exactly zero (w ⊙ softmax can zero out tokens)
    per_row = (torch.xlogy(q, q) - q * log_p).sum(dim=-1)
    return per_row.mean().to(torch.float32)


def cumulative_mass_fraction(probs: Tensor, mass: float = 0.9) -> Tensor:
    """Fraction of the ``k`` subset tokens needed to reach ``mass`` of the (renormalised) subset mass.

    Rows are renormalised to sum to 1 over the subset, sorted in decreasing order, and the smallest count ``m`` with
    cumulative mass ≥ ``mass`` is found; the result is ``m / k`` ∈ ``[1/k, 1]``. This is PACT's concentration index
    ``I``: small when a few tokens hold the mass (a confident distribution), 1 when the mass is spread out.

    Args:
        probs: ``[N, k]`` non-negative weights (probabilities over the vocabulary restricted to ``S``, or already
            renormalised); each row must have positive sum.
        mass: target cumulative mass in ``(0, 1]``.

    Returns:
        ``[N]`` float32 tensor, no gradient (it is a count).
    """
    if probs.dim() != 2:
        raise ValueError(f"cumulative_mass_fraction: probs must be [N, k], got {tuple(probs.shape)}")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"cumulative_mass_fraction: mass={mass} must be in (0, 1]")
    k = probs.shape[-1]
    with torch.no_grad():
        p = probs.detach().to(torch.float32)
        p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        cdf = p.sort(dim=-1, descending=True).values.cumsum(dim=-1)
        # tokens strictly below the target, plus the one that crosses it; clamp guards float round-off at mass=1
        count = ((cdf < mass).sum(dim=-1) + 1).clamp(max=k)
        return count.to(torch.float32) / k
