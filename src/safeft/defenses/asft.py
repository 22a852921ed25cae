"""AsFT: anchoring LoRA updates in the narrow safety basin (Yang et al., arXiv 2506.08473, AAAI 2026).

Per LoRA module: V = W(θ₀) − W(θ_b) (the "alignment direction"), Ĉ = V Vᵀ / ‖V‖_F, and the task loss gets

    λ Σ_modules ‖(I − Ĉ) B A‖²_F          (λ = 1, no α/r scaling inside: as in the authors' code)

which penalises the part of the update ΔW = B A that leaves the span of the alignment direction.

Ĉ is kept as the authors' code builds it: V Vᵀ divided by ‖V‖_F is *not* a projector (Ĉ² ≠ Ĉ; its eigenvalues are
σᵢ²/‖V‖_F). We never build it (d_out × d_out) nor B A (d_out × d_in): with M = B − V (Vᵀ B) / ‖V‖_F
(``[d_out, r]``), (I − Ĉ) B A = M A and ‖M A‖²_F = trace((MᵀM)(A Aᵀ)), two r × r matrices, so the penalty costs
O(r·d_in·d_out) time (one Vᵀ B) and O(r·(d_in + d_out)) memory beyond V.

Sharded parameters: under FSDP2, LoRA B and A are DTensors sharded on rows; each rank keeps the rows of V that
match its rows of B, and the penalty runs as DTensor ops (Vᵀ B is an all-reduce of ``[d_in, r]``, the Gram matrices
``[r, r]``; V is never gathered). Every rank computes the same penalty, and its gradient reaches each rank's rows
once, as under DDP. DeepSpeed ZeRO-3 is refused: outside a module's forward its LoRA factors are empty partitions
(even "persistent" ones, between steps), and a gathered copy would not carry the penalty's gradient back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from safeft.components.sharding import full_tensor, is_dtensor
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
    check_number,
    register_defense,
)
from safeft.errors import SafeFTError


def asft_module_penalty(b: torch.Tensor, a: torch.Tensor, v: torch.Tensor, v_norm: float) -> torch.Tensor:
    """‖(I − Ĉ) B A‖²_F with Ĉ = V Vᵀ / ‖V‖_F, without any d_out × d_out or d_out × d_in matrix.

    b: LoRA B ``[d_out, r]``; a: LoRA A ``[r, d_in]``; v: V = W(θ₀) − W(θ_b) ``[d_out, d_in]``; v_norm = ‖V‖_F
    (0 means Ĉ = 0). Returns a scalar in float32 (float64 if b is float64), differentiable in a and b.
    Memory O(r·(d_in + d_out)) beyond V."""
    dtype = torch.promote_types(b.dtype, torch.float32)
    b32, a32 = b.to(dtype), a.to(dtype)
    if v_norm > 0.0:
        v = v.to(dtype=dtype) if is_dtensor(v) else v.to(device=b32.device, dtype=dtype)
        m = b32 - (v @ (v.T @ b32)) / v_norm  # (I − Ĉ) B, [d_out, r]
    else:
        m = b32
    # ‖M A‖²_F = trace(Mᵀ M · A Aᵀ); both r × r Gram matrices are symmetric, so the trace is their inner product.
    # FSDP2 (b, a, v DTensors sharded on rows): each Gram matrix is an all-reduce of r × r; the scalar is gathered.
    return (full_tensor(m.T @ m) * full_tensor(a32 @ a32.T)).sum()


@dataclass
class AsFTConfig(DefenseConfig):
    """lam: weight λ of the penalty (authors: 1.0), ≥ 0."""

    lam: float = 1.0

    def __post_init__(self) -> None:
        self.lam = check_number("asft", "lam", self.lam, lo=0, note="(authors use 1.0)")


@register_defense
class AsFT(Defense):
    name = "asft"
    config_class = AsFTConfig
    paper = (
        "AsFT: Anchoring Safety During LLM Fine-Tuning Within Narrow Safety Basin (Yang et al., arXiv 2506.08473, "
        "AAAI 2026)"
    )
    artifacts = (
        "V = W(θ₀) − W(θ_b) per LoRA-targeted module (float32, d_out × d_in, read from θ_b once at prepare, kept on "
        "the weights' device); needs θ_b and LoRA"
    )
    needs_base_model = True
    requires_lora = True
    needs_full_params = True
    sharded_backends = ("fsdp2",)
    supports_4bit_base = True  # V is read from θ₀'s and θ_b's files; the penalty reads LoRA factors only

    def __init__(self, config: AsFTConfig | None = None):
        super().__init__(config)
        self.matrices: dict[str, AlignmentMatrix] = {}
        self._modules: dict[str, torch.nn.Module] = {}  # the LoRA layers, found once (named_modules is slow)

    def prepare(self, model: torch.nn.Module, ctx: DefenseContext) -> None:
        super().prepare(model, ctx)
        self.matrices = compute_alignment_matrices(model, ctx)
        self._modules = lora_modules(model)

    def on_train_begin(self, model: torch.nn.Module, backend: str | None) -> None:
        """Find the LoRA layers again in the wrapped model; FSDP2: keep only this rank's rows of each V."""
        self._modules = lora_modules(model)
        for name, mat in self.matrices.items():
            if name not in self._modules:
                raise SafeFTError(f"defense asft: LoRA module {name!r} disappeared after prepare()")
            mat.shard_like(lora_factors(self._modules[name])[0])

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """Σ_modules ‖(I − Ĉ) B A‖²_F over the prepared modules (unweighted float32 scalar)."""
        if not self.matrices:
            raise SafeFTError("defense asft: prepare() was not called before training")
        mods = self._modules or lora_modules(model)
        total: torch.Tensor | None = None
        for name, mat in self.matrices.items():
            if name not in mods:
                raise SafeFTError(f"defense asft: LoRA module {name!r} disappeared after prepare()")
            b, a, _ = lora_factors(mods[name])
            p = asft_module_penalty(b, a, mat.v, mat.norm)
            total = p if total is None else total + p.to(total.device)
        assert total is not None
        return total

    def loss_terms(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> dict[str, torch.Tensor]:
        return {"asft/penalty": self.config.lam * self.penalty(model)}
