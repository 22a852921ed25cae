"""CWACConfig: every knob of CWAC, validated on construction (errors name ``defense.cwac.<field>``).

Every field, its default and the reason for it is in docs/cwac.md (section "Config").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safeft.defenses.base import DefenseConfig, check_int, check_number, config_error

DEFAULT_ANCHOR_SOURCES = ["pool", "safety_tuned_llamas", "strongreject", "advbench"]
DEFAULT_GENERAL_SOURCES = ["harmless", "gsm8k", "agnews", "sst2"]
GENERAL_SOURCES = ("harmless", "gsm8k", "agnews", "sst2")


def _str_list(name: str, value: object, example: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise config_error("cwac", name, value, f"a non-empty list of names like {example}")
    out = list(dict.fromkeys(value))
    return out


def _layer_list(name: str, value: object) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise config_error("cwac", name, value, "a non-empty list of 0-based layer indices")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise config_error("cwac", name, value, "a non-empty list of 0-based layer indices")
    return sorted(set(value))


@dataclass
class CWACConfig(DefenseConfig):
    """Coupled Weight and Activation Constraints (see docs/cwac.md for every field).

    Switches: weight / activation (both off = plain SFT); lam: λ of L_task + λ·L_safety (L_safety is normalised
    by the baselines' norm); hold_residual: μ of + μ·L_residual (the whole residual at the same anchors, off).
    Weight subspace: energy, target_modules, layers, subspace_prompt_tokens / subspace_refusal_tokens (the
    decision positions), subspace_center, master_weights. Anchors: n_anchor, anchor_sources, anchor_judge,
    near_dup_threshold, max_new_tokens_anchor_check, anchor_margin_token / anchor_margin_pool (thin refusals).
    SAE: sae_layers (or the old single sae_layer), n_sae_layers, sae_path, sae_width_factor, sae_k,
    sae_tokens, sae_steps, sae_batch_size, sae_lr, sae_aux_coef, benign_fraction, sae_general_sources,
    keep_activations.
    Features: n_features, n_positions, causal_check, causal_min_drop, require_causal. Training: anchor_batch,
    packed_anchors, activation_every.
    """

    weight: bool = True
    activation: bool = True
    lam: float = 0.5
    # μ of + μ·L_residual: also hold θ₀'s whole residual at the same anchors / layers / positions (beyond the paper)
    hold_residual: float = 0.0
    # -- weight constraint
    energy: float = 0.9
    target_modules: list[str] | None = None
    layers: list[int] | str | None = None
    subspace_prompt_tokens: int = 8
    subspace_refusal_tokens: int = 8
    subspace_center: bool = True
    master_weights: bool | None = None
    # -- anchors
    n_anchor: int = 240
    anchor_sources: list[str] = field(default_factory=lambda: list(DEFAULT_ANCHOR_SOURCES))
    anchor_judge: str = "content"
    near_dup_threshold: float = 0.5
    max_new_tokens_anchor_check: int = 48
    # beyond the paper: when set (e.g. "Sure", a compliant answer's first token), gather anchor_margin_pool ×
    # n_anchor refusals and keep the n_anchor whose θ₀ first-token gap to this token is smallest (thin refusals)
    anchor_margin_token: str = ""
    anchor_margin_pool: float = 2.0
    # -- SAE
    sae_layer: int | None = None
    sae_layers: list[int] | None = None
    n_sae_layers: int = 3
    sae_path: str | None = None
    sae_width_factor: int = 8
    sae_k: int = 32
    sae_tokens: int = 1_000_000
    sae_steps: int | None = None
    sae_batch_size: int = 4096
    sae_lr: float = 5e-4
    sae_aux_coef: float = 1 / 32
    benign_fraction: float = 0.3
    sae_general_sources: list[str] = field(default_factory=lambda: list(DEFAULT_GENERAL_SOURCES))
    keep_activations: bool = False
    # -- safety features
    n_features: int = 100
    n_positions: int = 4
    causal_check: bool = True
    causal_min_drop: float = 0.1
    require_causal: bool = True
    # -- training
    anchor_batch: int = 4
    packed_anchors: bool = True
    # L_safety on every k-th micro-batch, weighted k (the same regulariser in expectation at 1/k of its cost)
    activation_every: int = 1

    def __post_init__(self) -> None:
        for f in (
            "weight",
            "activation",
            "causal_check",
            "subspace_center",
            "keep_activations",
            "require_causal",
            "packed_anchors",
        ):
            if not isinstance(getattr(self, f), bool):
                raise config_error("cwac", f, getattr(self, f), "true or false")
        if self.master_weights is not None and not isinstance(self.master_weights, bool):
            raise config_error(
                "cwac",
                "master_weights",
                self.master_weights,
                "true, false or null (auto: on for 16-bit weights)",
            )
        self.lam = check_number("cwac", "lam", self.lam, lo=0)
        self.hold_residual = check_number("cwac", "hold_residual", self.hold_residual, lo=0)
        if not isinstance(self.anchor_margin_token, str) or (
            self.anchor_margin_token and not self.anchor_margin_token.strip()
        ):
            raise config_error(
                "cwac", "anchor_margin_token", self.anchor_margin_token, 'a word such as "Sure", or "" (off)'
            )
        self.anchor_margin_pool = check_number(
            "cwac", "anchor_margin_pool", self.anchor_margin_pool, lo=1, open_lo=True, note=" (1 keeps every refusal)"
        )
        if self.hold_residual > 0 and not self.activation:
            raise config_error(
                "cwac", "hold_residual", self.hold_residual, "0 when activation is false (it rides on its anchors)"
            )
        self.energy = check_number("cwac", "energy", self.energy, lo=0, hi=1, open_lo=True, open_hi=True)
        self.benign_fraction = check_number(
            "cwac", "benign_fraction", self.benign_fraction, lo=0, hi=1, open_hi=True
        )
        self.near_dup_threshold = check_number(
            "cwac", "near_dup_threshold", self.near_dup_threshold, lo=0, hi=1, open_lo=True
        )
        self.sae_lr = check_number("cwac", "sae_lr", self.sae_lr, lo=0, open_lo=True)
        self.sae_aux_coef = check_number("cwac", "sae_aux_coef", self.sae_aux_coef, lo=0)
        self.causal_min_drop = check_number("cwac", "causal_min_drop", self.causal_min_drop, lo=0, hi=1)
        ints = {
            "sae_width_factor": 1,
            "sae_k": 1,
            "sae_tokens": 1,
            "sae_batch_size": 1,
            "n_sae_layers": 1,
            "n_features": 1,
            "n_positions": 1,
            "anchor_batch": 1,
            "activation_every": 1,
            "n_anchor": 4,
            "max_new_tokens_anchor_check": 1,
            "subspace_prompt_tokens": 0,
            "subspace_refusal_tokens": 0,
        }
        for f, lo in ints.items():
            check_int("cwac", f, getattr(self, f), lo)
        if self.subspace_prompt_tokens + self.subspace_refusal_tokens == 0:
            raise config_error(
                "cwac",
                "subspace_prompt_tokens",
                self.subspace_prompt_tokens,
                "≥ 1 when subspace_refusal_tokens is 0 (the subspace needs some positions)",
            )
        check_int("cwac", "sae_steps", self.sae_steps, 1, none_ok=True)
        if self.target_modules is not None:
            self.target_modules = _str_list("target_modules", self.target_modules, "['down_proj']")
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise config_error("cwac", "layers", self.layers, 'a list of 0-based layer indices or "all"')
        elif self.layers is not None:
            self.layers = _layer_list("layers", self.layers)
        if self.sae_layer is not None:
            check_int("cwac", "sae_layer", self.sae_layer, 0)
            if self.sae_layers is not None:
                raise config_error(
                    "cwac",
                    "sae_layer",
                    self.sae_layer,
                    "null when sae_layers is set (sae_layer is the one-layer form)",
                )
        if self.sae_layers is not None:
            self.sae_layers = _layer_list("sae_layers", self.sae_layers)
        if self.sae_path is not None and not isinstance(self.sae_path, str):
            raise config_error("cwac", "sae_path", self.sae_path, "a folder path (SAELens format)")
        self.anchor_sources = _str_list("anchor_sources", self.anchor_sources, "['pool', 'strongreject']")
        self.sae_general_sources = _str_list(
            "sae_general_sources", self.sae_general_sources, "['harmless', 'gsm8k']"
        )
        bad = [s for s in self.sae_general_sources if s not in GENERAL_SOURCES]
        if bad:
            raise config_error(
                "cwac", "sae_general_sources", self.sae_general_sources, f"names from {list(GENERAL_SOURCES)}"
            )
        if not isinstance(self.anchor_judge, str) or not self.anchor_judge.strip():
            raise config_error(
                "cwac", "anchor_judge", self.anchor_judge, "a judge spec such as content or keyword"
            )

    def requested_sae_layers(self) -> list[int] | None:
        """The SAE layers named in the config (``sae_layers``, or ``[sae_layer]``), or None for the default."""
        if self.sae_layers is not None:
            return list(self.sae_layers)
        if self.sae_layer is not None:
            return [self.sae_layer]
        return None


@dataclass
class CWACWeightConfig(CWACConfig):
    """Ablation preset ``cwac-weight``: the weight constraint only."""

    activation: bool = False


@dataclass
class CWACActivationConfig(CWACConfig):
    """Ablation preset ``cwac-activation``: the activation constraint only."""

    weight: bool = False
