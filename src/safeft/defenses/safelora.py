"""SafeLoRA: post-hoc projection of the LoRA layers that drift from the alignment direction (Hsu et al.,
"Safe LoRA: the Silver Lining of Reducing Safety Risks when Finetuning Large Language Models", NeurIPS 2024,
arXiv 2405.16833).

After training, per LoRA module: V = W(θ₀) − W(θ_b), Ĉ = V Vᵀ / ‖V‖_F (the paper's fast approximation of the
projection onto the alignment matrix; not an exact projector), ΔW = (α/r)·B A, and the similarity
cos(ĈΔW, ΔW) = ⟨ĈΔW, ΔW⟩_F / (‖ĈΔW‖_F ‖ΔW‖_F). The layers selected by the rule (the ``top_k`` least similar,
by default the authors' 10; or cos < ``threshold``) get ΔW ← ĈΔW, done by B ← Ĉ B (then (α/r)·(ĈB)A = ĈΔW
exactly); the others are untouched. A "layer" is one LoRA-targeted module (as in the authors' code), so a Llama
with q/v targets has two per transformer block.

No d_out × d_out or d_out × d_in matrix is built: with P = Ĉ B = V (Vᵀ B)/‖V‖_F (``[d_out, r]``) and G = A Aᵀ
(``[r, r]``), ⟨P A, B A⟩ = Σ (PᵀB ⊙ G), ‖P A‖² = Σ (PᵀP ⊙ G), ‖B A‖² = Σ (BᵀB ⊙ G); the α/r factor cancels.

Sharded parameters (``finalize`` runs on every rank): under FSDP2, B and A are DTensors sharded on rows; V's rows
are cut to match B's (V stays on CPU until then), Ĉ B is a DTensor op (an all-reduce of Vᵀ B, ``[d_in, r]``), the
Gram matrices are all-reduced, so every rank takes the same decision and writes its own rows of B. Under DeepSpeed
ZeRO-3 the LoRA factors are gathered (``GatheredParameters``, LoRA-sized) and rank 0's edit is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from safeft.components.sharding import full_tensor, gathered
from safeft.defenses._alignment_matrix import (
    AlignmentMatrix,
    compute_alignment_matrices,
    lora_factors,
    lora_modules,
)
from safeft.defenses.base import (
    Defense,
    DefenseConfig,
    DefenseContext,
    check_int,
    check_number,
    register_defense,
)
from safeft.errors import SafeFTError

# The authors' default rule (IBM/SafeLoRA config.py: select_layers_type="number", num_proj_layers=10): project the
# 10 least similar LoRA modules. Their threshold (0.5) applies only in threshold mode; with a low-rank V every
# cosine of an unrelated update is ~√(rank V / d_out) < 0.5, so a τ = 0.5 default projected every layer.
DEFAULT_TOP_K = 10


def projected_b_and_cosine(
    b: torch.Tensor, a: torch.Tensor, mat: AlignmentMatrix
) -> tuple[torch.Tensor, float | None]:
    """(Ĉ B ``[d_out, r]`` float32, cos(Ĉ B A, B A)) for LoRA factors b ``[d_out, r]``, a ``[r, d_in]``.

    The cosine is None when B A = 0 (nothing was learned: the similarity is undefined and projecting changes
    nothing), 0.0 when Ĉ B A = 0. Gram products in float64 so the rule's decision is stable near the threshold."""
    b32 = b.detach().float()
    a64 = a.detach().double()
    p = mat.c_hat_times(b32)
    # r × r Gram matrices; under FSDP2 each is an all-reduce, so every rank gets the same numbers
    g = full_tensor(a64 @ a64.T)
    bb = (full_tensor(b32.double().T @ b32.double()) * g).sum().item()
    if bb <= 0.0:
        return p, None
    pp = (full_tensor(p.double().T @ p.double()) * g).sum().item()
    if pp <= 0.0:
        return p, 0.0
    pb = (full_tensor(p.double().T @ b32.double()) * g).sum().item()
    return p, float(pb / math.sqrt(pp * bb))


def select_layers(cosines: dict[str, float | None], threshold: float | None, top_k: int | None) -> list[str]:
    """Names to project: cos < threshold, or the top_k smallest cosines (ties broken by name). Layers whose cosine
    is None (B A = 0) are never selected. Returned sorted by name."""
    known = {n: c for n, c in cosines.items() if c is not None}
    if top_k is not None:
        ranked = sorted(known, key=lambda n: (known[n], n))
        return sorted(ranked[:top_k])
    assert threshold is not None
    return sorted(n for n, c in known.items() if c < threshold)


@dataclass
class SafeLoRAConfig(DefenseConfig):
    """Exactly one rule: ``top_k`` ≥ 1 (project the k least similar layers; all of them when there are fewer) or
    ``threshold`` τ ∈ [-1, 1] (project layers with cos < τ). Neither given: top_k = 10, the authors' default
    (IBM/SafeLoRA ``config.py``, ``num_proj_layers``)."""

    threshold: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and self.top_k is not None:
            raise SafeFTError(
                "defense.safelora: set exactly one of threshold (cos < τ, τ in [-1, 1]) or top_k (k ≥ 1), not both"
            )
        if self.threshold is not None:
            self.threshold = check_number("safelora", "threshold", self.threshold, lo=-1, hi=1)
        else:
            if self.top_k is None:
                self.top_k = DEFAULT_TOP_K
            check_int("safelora", "top_k", self.top_k, 1)


@register_defense
class SafeLoRA(Defense):

    # 2 (2026-12-01): the default rule became the authors' 10 least-similar layers (was τ = 0.5)
    defaults_revision = 2
    name = "safelora"
    config_class = SafeLoRAConfig
    paper = (
        "Safe LoRA: the Silver Lining of Reducing Safety Risks when Finetuning Large Language Models "
        "(Hsu et al., NeurIPS 2024, arXiv 2405.16833)"
    )
    artifacts = (
        "V = W(θ₀) − W(θ_b) per LoRA-targeted module (float32, d_out × d_in, read from θ_b at prepare, kept on CPU "
        "until finalize); needs θ_b and LoRA; changes the adapters only after training"
    )
    needs_base_model = True
    requires_lora = True
    needs_full_params = True
    sharded_backends = ("fsdp2", "zero3")
    supports_4bit_base = True  # V is read from θ₀'s and θ_b's files; only LoRA B is rewritten

    def __init__(self, config: SafeLoRAConfig | None = None):
        super().__init__(config)
        self.matrices: dict[str, AlignmentMatrix] = {}

    def prepare(self, model: torch.nn.Module, ctx: DefenseContext) -> None:
        super().prepare(model, ctx)
        # CPU: V is needed only once, after training; it must not take accelerator memory meanwhile.
        self.matrices = compute_alignment_matrices(model, ctx, device="cpu")

    @torch.no_grad()
    def finalize(self, model: torch.nn.Module) -> dict[str, Any]:
        """Project the selected layers in place; returns {"projected": [names], "cosines": {name: cos or None}}."""
        if not self.matrices:
            raise SafeFTError("defense safelora: prepare() was not called before finalize()")
        mods = lora_modules(model)
        missing = sorted(set(self.matrices) - set(mods))
        if missing:
            raise SafeFTError(f"defense safelora: LoRA modules {missing[:3]} disappeared after prepare()")
        factors = [t for name in self.matrices for t in lora_factors(mods[name])[:2]]
        with gathered(
            factors, modifier_rank=0
        ):  # DeepSpeed ZeRO-3: whole LoRA factors; rank 0's edit is kept
            cosines: dict[str, float | None] = {}
            projected_b: dict[str, torch.Tensor] = {}
            for name, mat in self.matrices.items():
                b, a, _ = lora_factors(mods[name])
                mat.shard_like(b)  # FSDP2: this rank's rows of V, next to its rows of B
                projected_b[name], cosines[name] = projected_b_and_cosine(b, a, mat)
            chosen = select_layers(cosines, self.config.threshold, self.config.top_k)
            for name in chosen:
                b, _, _ = lora_factors(mods[name])
                b.copy_(projected_b[name].to(dtype=b.dtype))
        self.matrices = {}  # free V
        return {"projected": chosen, "cosines": cosines}
