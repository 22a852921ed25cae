"""CWACConfig: every knob of CWAC, validated on construction (errors name ``defense.cwac.<field>``)."""

from __future__ import annotations

from dataclasses import dataclass

from safeft.defenses.base import DefenseConfig, check_int, check_number, config_error


@dataclass
class CWACConfig(DefenseConfig):
    """Coupled Weight and Activation Constraints (see docs/cwac.md).

    weight / activation: switch each constraint (both off = plain SFT). lam: λ of L_task + λ·L_safety.
    energy: fraction of trace(C_ℓ) the safety subspace V_ℓ keeps, in (0, 1).
    target_modules: leaf names of the constrained linear modules (None: the LoRA targets being trained in
    ``layers``, or ["down_proj"] for full fine-tuning). layers: 0-based decoder layers constrained (None: the middle
    half; "all": every layer). sae_layer: decoder block whose output (residual stream) the SAE reads (None: the middle layer).
    sae_path: a pretrained SAE folder in SAELens format (cfg.json + sae_weights.safetensors) instead of training one.
    sae_width_factor / sae_k / sae_steps: width = factor × hidden size, TopK k, Adam steps of our SAE.
    n_features: safety latents kept. n_positions: last prompt positions (generation header included) compared.
    anchor_batch: anchors per training step for L_safety. n_anchor: most anchors used (of the refused pool).
    benign_fraction: share of harmless-prompt tokens in the SAE training set. max_new_tokens_anchor_check: greedy
    tokens generated to judge whether θ₀ refuses a candidate anchor. causal_check: measure θ₀'s refusal rate with
    the safety latents ablated.
    """

    weight: bool = True
    activation: bool = True
    lam: float = 0.5
    energy: float = 0.9
    target_modules: list[str] | None = None
    layers: list[int] | str | None = None
    sae_layer: int | None = None
    sae_path: str | None = None
    sae_width_factor: int = 8
    sae_k: int = 32
    sae_steps: int = 300
    n_features: int = 100
    n_positions: int = 4
    anchor_batch: int = 4
    n_anchor: int = 200
    benign_fraction: float = 0.3
    max_new_tokens_anchor_check: int = 48
    causal_check: bool = True

    def __post_init__(self) -> None:
        for f in ("weight", "activation", "causal_check"):
            if not isinstance(getattr(self, f), bool):
                raise config_error("cwac", f, getattr(self, f), "true or false")
        self.lam = check_number("cwac", "lam", self.lam, lo=0)
        self.energy = check_number("cwac", "energy", self.energy, lo=0, hi=1, open_lo=True, open_hi=True)
        self.benign_fraction = check_number(
            "cwac", "benign_fraction", self.benign_fraction, lo=0, hi=1, open_hi=True
        )
        ints = {
            "sae_width_factor": 1,
            "sae_k": 1,
            "sae_steps": 1,
            "n_features": 1,
            "n_positions": 1,
            "anchor_batch": 1,
            "n_anchor": 4,
            "max_new_tokens_anchor_check": 1,
        }
        for f, lo in ints.items():
            check_int("cwac", f, getattr(self, f), lo)
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
                raise config_error(
                    "cwac",
                    "target_modules",
                    self.target_modules,
                    "a non-empty list of module names like ['down_proj']",
                )
            self.target_modules = list(self.target_modules)
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise config_error("cwac", "layers", self.layers, 'a list of 0-based layer indices or "all"')
        elif self.layers is not None:
            if not self.layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers
            ):
                raise config_error("cwac", "layers", self.layers, "a non-empty list of 0-based layer indices")
            self.layers = sorted(set(self.layers))
        if self.sae_layer is not None:
            check_int("cwac", "sae_layer", self.sae_layer, 0)
        if self.sae_path is not None and not isinstance(self.sae_path, str):
            raise config_error("cwac", "sae_path", self.sae_path, "a folder path (SAELens format)")


@dataclass
class CWACWeightConfig(CWACConfig):
    """Ablation preset ``cwac-weight``: the weight constraint only."""

    activation: bool = False


@dataclass
class CWACActivationConfig(CWACConfig):
    """Ablation preset ``cwac-activation``: the activation constraint only."""

    weight: bool = False
