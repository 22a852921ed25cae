"""SPPFT: freeze the "safety layers" during fine-tuning (Li et al., "Safety Layers in Aligned Large Language Models:
The Key to LLM Security", ICLR 2025, arXiv 2408.17003).

Locating the safety layers (paper §3.2–3.4), on θ₀ before the first step:

1. For P harmful prompts (``ctx.anchor_pool``) and P harmless prompts (``ctx.harmless_pool``), formatted for
   generation, take the hidden state at the **last prompt position** after every decoder block l (``[P, L, d]``).
2. Per layer, the mean pairwise angle (degrees, arccos of the cosine similarity) over normal–normal (N-N),
   malicious–malicious (M-M) and normal–malicious (N-M) pairs; the **gap** g_l = angle_NM − angle_NN. Aligned
   models show g ≈ 0 in the first layers, a rise through a contiguous middle stretch, then a plateau.
3. Initial range [i, j] (paper: "from the appearance of the gap to its increase until the first smoothing"): with
   g rising by R = g_peak − g_min from its minimum (before the peak) to its peak, i is the first layer where the gap
   reaches g_min + ``onset``·R and j the first layer from i on after which it grows by less than ``smooth``·R.
4. Optional (``refine``, paper §3.4): the over-rejection test. Scaling the attention and MLP weights of a layer
   range by α > 1 makes θ₀ refuse more borderline-benign prompts when the range holds the safety layers; with i
   fixed, the upper bound is the j' near j whose range [i, j'] gives the most refusals, then with that upper bound
   fixed, the lower bound likewise.

Fine-tuning: every parameter of the chosen blocks gets ``requires_grad = False`` before the optimizer is built
(full fine-tuning: the blocks' weights and norms; LoRA: the adapters inside those blocks, whose B stays 0, so their
update is 0). The rest trains as plain SFT; no loss term, no hook during training.

The layer range and the per-layer curves are cached per θ₀ (``sppft-layers``: safetensors curves + JSON meta) and
reported in ``run.json`` under ``finalize.sppft``; ``layers`` in the config skips the search.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from safeft.components.capture import decoder_layers, run_to_layers
from safeft.defenses.base import (
    Defense,
    DefenseConfig,
    DefenseContext,
    check_int,
    check_number,
    config_error,
    register_defense,
    unwrap_model,
)
from safeft.errors import SafeFTError

ARTIFACT = "sppft-layers"
ARTIFACT_VERSION = 1


def _parse_layers(value: Any) -> list[int] | None:
    """None, a list of 0-based indices, or a string "i-j" (inclusive) / "i" -> sorted unique indices."""
    if value is None:
        return None
    rule = 'a non-empty list of 0-based layer indices or a range "i-j" (inclusive)'
    if isinstance(value, str):
        parts = value.replace("–", "-").replace(" ", "").split("-")
        if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
            raise config_error("sppft", "layers", value, rule)
        lo, hi = int(parts[0]), int(parts[-1])
        if hi < lo:
            raise config_error("sppft", "layers", value, rule)
        return list(range(lo, hi + 1))
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    ok = ok and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    if not ok:
        raise config_error("sppft", "layers", value, rule)
    return sorted(set(value))


@dataclass
class SPPFTConfig(DefenseConfig):
    """layers: the blocks to freeze (list or "i-j"); None: locate them (below). n_prompts ≥ 2: harmful and harmless
    prompts each (paper P = 100). onset ∈ (0, 1): fraction of the gap's rise at which it "appears". smooth ∈ [0, 1):
    per-layer growth (fraction of the rise) under which it has "smoothed". min_gap ≥ 0: smallest peak gap (degrees)
    that counts as a safety-layer signal. refine: run the over-rejection test (paper §3.4) with weights scaled by
    ``scale`` (> 0, ≠ 1; authors' script 1.1), bounds moved by at most ``refine_window`` layers, on at most
    ``refine_prompts`` borderline-benign prompts answered with ``refine_tokens`` new tokens (authors 16).
    batch_size ≥ 1: prompts per forward pass."""

    layers: list[int] | str | None = None
    n_prompts: int = 100
    onset: float = 0.1
    smooth: float = 0.1
    min_gap: float = 0.5
    refine: bool = False
    scale: float = 1.1
    refine_window: int = 2
    refine_prompts: int = 100
    refine_tokens: int = 16
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.layers = _parse_layers(self.layers)
        check_int("sppft", "n_prompts", self.n_prompts, 2)
        self.onset = check_number("sppft", "onset", self.onset, lo=0, hi=1, open_lo=True, open_hi=True)
        self.smooth = check_number("sppft", "smooth", self.smooth, lo=0, hi=1, open_hi=True)
        self.min_gap = check_number("sppft", "min_gap", self.min_gap, lo=0, note="(degrees)")
        if not isinstance(self.refine, bool):
            raise config_error("sppft", "refine", self.refine, "true or false")
        self.scale = check_number(
            "sppft", "scale", self.scale, lo=0, open_lo=True, note="and ≠ 1 (authors 1.1)"
        )
        if self.scale == 1.0:
            raise config_error("sppft", "scale", self.scale, "a number > 0 and ≠ 1 (authors 1.1)")
        check_int("sppft", "refine_window", self.refine_window, 0)
        check_int("sppft", "refine_prompts", self.refine_prompts, 1)
        check_int("sppft", "refine_tokens", self.refine_tokens, 1)
        check_int("sppft", "batch_size", self.batch_size, 1)


# ---- the maths: angles, gap, initial range --------------------------------------------------------------------
def pair_angles(harmful: torch.Tensor, harmless: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean pairwise angle in degrees per layer: ``{"nn", "mm", "nm": [L]}`` (float64).

    harmful ``[P_m, L, d]``, harmless ``[P_n, L, d]``: last-prompt-position hidden states. N-N and M-M average over
    the distinct unordered pairs of one set, N-M over every (normal, malicious) pair."""
    if harmful.shape[0] < 2 or harmless.shape[0] < 2:
        raise SafeFTError("SPPFT: the angle curves need at least 2 harmful and 2 harmless prompts")

    def unit(h: torch.Tensor) -> torch.Tensor:  # [P, L, d] -> [L, P, d]
        h = h.double().transpose(0, 1)
        return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    m, n = unit(harmful), unit(harmless)

    def angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [L, Pa, Pb], degrees
        return torch.rad2deg(torch.arccos((a @ b.transpose(1, 2)).clamp(-1.0, 1.0)))

    def within(a: torch.Tensor) -> torch.Tensor:
        iu = torch.triu_indices(a.shape[1], a.shape[1], offset=1)
        return angles(a, a)[:, iu[0], iu[1]].mean(dim=1)

    return {"nn": within(n), "mm": within(m), "nm": angles(n, m).mean(dim=(1, 2))}


def initial_range(gap: torch.Tensor, onset: float, smooth: float, min_gap: float) -> tuple[int, int]:
    """[i, j] (inclusive, 0-based blocks) from the gap curve ``[L]`` (degrees): see the module docstring, step 3.

    Raises SafeFTError when the peak gap is below ``min_gap`` or the gap never rises (no safety-layer signal)."""
    g = [float(x) for x in gap]
    peak = max(range(len(g)), key=lambda k: (g[k], -k))
    low = min(range(peak + 1), key=lambda k: (g[k], k))
    rise = g[peak] - g[low]
    if g[peak] < min_gap or rise <= 0.0:
        raise SafeFTError(
            f"SPPFT: no safety-layer signal: the N-M vs N-N angle gap peaks at {g[peak]:.3g}° (layer {peak}), rising "
            f"{max(rise, 0.0):.3g}° (defense.sppft.min_gap = {min_gap:g}°); θ₀ may not be aligned: set "
            f"defense.sppft.layers explicitly"
        )
    i = next(k for k in range(low, peak + 1) if g[k] - g[low] >= onset * rise)
    j = next(k for k in range(i, peak + 1) if k == peak or g[k + 1] - g[k] < smooth * rise)
    return i, j


def best_bound(counts: dict[int, int], prefer: int) -> int:
    """The candidate bound with the most refusals; ties go to the one nearest ``prefer``, then the smaller."""
    return max(counts, key=lambda k: (counts[k], -abs(k - prefer), -k))


# ---- capture and the over-rejection test ----------------------------------------------------------------------
@torch.no_grad()
def last_token_states(
    model: nn.Module, seqs: Sequence[Sequence[int]], pad: int, batch_size: int = 8
) -> torch.Tensor:
    """Hidden state after every decoder block at each sequence's last token: ``[N, L, d]`` float32 on CPU
    (``output_hidden_states[l + 1][:, -1]`` of a full forward, without the final norm on the last block)."""
    from safeft.defenses.cwac.common import batches, device_of

    n_layers = len(decoder_layers(model))
    out = []
    for batch, lengths in batches(seqs, pad, device_of(model), batch_size):
        hs = run_to_layers(model, batch["input_ids"], batch["attention_mask"], range(n_layers))
        rows = torch.arange(len(lengths))
        last = (lengths - 1).to(hs[0].device)
        out.append(torch.stack([hs[k][rows, last].float().cpu() for k in range(n_layers)], dim=1))
    return torch.cat(out)


@contextlib.contextmanager
def scaled_blocks(model: nn.Module, layers: Sequence[int], scale: float) -> Iterator[None]:
    """Multiply the weight of every linear module of blocks ``layers`` (attention and MLP projections; LoRA factors
    excepted) by ``scale``; the exact original weights are restored on exit."""
    blocks = decoder_layers(model)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for k in layers:
                for name, mod in blocks[k].named_modules():
                    if isinstance(mod, nn.Linear) and "lora_" not in name:
                        saved.append((mod.weight, mod.weight.detach().clone()))
                        mod.weight.mul_(scale)
        yield
    finally:
        with torch.no_grad():
            for w, orig in saved:
                w.copy_(orig)


# ---- the defense -----------------------------------------------------------------------------------------------
@register_defense
class SPPFT(Defense):
    name = "sppft"
    config_class = SPPFTConfig
    paper = (
        "Safety Layers in Aligned Large Language Models: The Key to LLM Security (Li et al., ICLR 2025, "
        "arXiv 2408.17003)"
    )
    artifacts = (
        "the safety-layer range of θ₀ and its per-layer N-N / M-M / N-M angle curves (forward passes on harmful and "
        "harmless prompts; optional over-rejection test); freezes those blocks"
    )
    # forward passes and requires_grad only (the over-rejection test, which scales weights, is refused there)
    supports_4bit_base = True

    def __init__(self, config: SPPFTConfig | None = None):
        super().__init__(config)
        self.log: Callable[[str], None] = print
        self.layers: list[int] = []
        self.summary: dict[str, Any] = {}
        self.answer_fn: Callable[[nn.Module, Any, list[str], str, int], list[str]] | None = None  # tests
        self._frozen: list[torch.nn.Parameter] = []

    # ---- hooks ------------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: DefenseContext) -> dict[str, Any]:
        """Locate (or load, or take from the config) the safety layers and freeze them. Returns the summary."""
        summary = self.prepare_artifacts(model, ctx)
        summary.update(self._freeze(model))
        self.summary = summary
        return summary

    def prepare_artifacts(self, model: nn.Module, ctx: DefenseContext) -> dict[str, Any]:
        """``safeft prepare``: locate the safety layers (or load them from the cache) without freezing anything."""
        super().prepare(model, ctx)
        t0 = time.perf_counter()
        m = unwrap_model(model)
        n_layers = len(decoder_layers(m))
        cfg = self.config
        if cfg.layers is not None:
            bad = [k for k in cfg.layers if k >= n_layers]
            if bad:
                raise SafeFTError(
                    f"defense.sppft.layers: {bad} out of range, the model has {n_layers} layers (0..{n_layers - 1})"
                )
            self.layers = list(cfg.layers)
            summary: dict[str, Any] = {"source": "config", "layers": self.layers, "n_layers": n_layers}
        else:
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):  # prepare never shifts anyone's random stream
                summary = self._locate(m, ctx, n_layers)
            self.layers = list(summary["layers"])
        summary["prepare_seconds"] = round(time.perf_counter() - t0, 3)
        self.summary = summary
        return summary

    def on_train_begin(self, model: nn.Module, backend: str | None) -> None:
        """Refuse a run whose engine made a frozen parameter trainable again (it would silently be SFT there)."""
        live = [
            n
            for k in self.layers
            for n, p in decoder_layers(unwrap_model(model))[k].named_parameters()
            if p.requires_grad
        ]
        if live:
            raise SafeFTError(
                f"defense sppft: safety-layer parameters {live[:3]} became trainable after prepare()"
            )

    def finalize(self, model: nn.Module) -> dict[str, Any]:
        """The run record's ``finalize.sppft``: the layers, how they were found, the curves, what was frozen."""
        if not self.summary:
            raise SafeFTError("defense sppft: prepare() was not called before finalize()")
        out = {k: v for k, v in self.summary.items() if k != "prepare_seconds"}
        out["trainable_in_safety_layers"] = sum(
            p.numel()
            for k in self.layers
            for p in decoder_layers(unwrap_model(model))[k].parameters()
            if p.requires_grad
        )
        return out

    # ---- freezing ---------------------------------------------------------------------------------------------
    def _freeze(self, model: nn.Module) -> dict[str, Any]:
        m = unwrap_model(model)
        blocks = decoder_layers(m)
        before = sum(p.numel() for p in m.parameters() if p.requires_grad)
        self._frozen = [p for k in self.layers for p in blocks[k].parameters() if p.requires_grad]
        for p in self._frozen:
            p.requires_grad_(False)
        frozen = sum(p.numel() for p in self._frozen)
        if frozen == 0:
            self.log(
                f"SPPFT warning: blocks {_ranges(self.layers)} hold no trainable parameter: this run is plain SFT"
            )
        if frozen == before:
            raise SafeFTError(
                f"defense sppft: freezing blocks {_ranges(self.layers)} leaves nothing to train; choose fewer layers "
                f"(defense.sppft.layers) or train more modules"
            )
        self.log(
            f"SPPFT: froze blocks {_ranges(self.layers)} of {len(blocks)}: {frozen:,} of {before:,} trainable "
            f"parameters ({100.0 * frozen / max(before, 1):.1f}%)"
        )
        return {"frozen_parameters": frozen, "trainable_parameters": before - frozen}

    # ---- locating -----------------------------------------------------------------------------------------------
    def _prompts(self, ctx: DefenseContext) -> tuple[list[str], list[str], list[str]]:
        """(harmful, harmless, borderline) prompts: disjoint from the evaluation prompts, a seeded sample of
        ``n_prompts`` each (``refine_prompts`` borderline-benign ones from the alignment data's contrast rows)."""
        from safeft.data import normalize_text

        held = {normalize_text(p) for p in ctx.eval_prompts}

        def pick(pool: Sequence[str], n: int, salt: int) -> list[str]:
            seen, out = set(), []
            for p in pool:
                k = normalize_text(p)
                if k not in held and k not in seen:
                    seen.add(k)
                    out.append(p)
            random.Random(int(ctx.seed) * 1000 + salt).shuffle(out)
            return out[:n]

        cfg = self.config
        harmful, harmless = pick(ctx.anchor_pool, cfg.n_prompts, 1), pick(ctx.harmless_pool, cfg.n_prompts, 2)
        if len(harmful) < 2 or len(harmless) < 2:
            raise SafeFTError(
                f"defense sppft needs at least 2 harmful and 2 harmless prompts outside the evaluation set to locate "
                f"the safety layers, got {len(harmful)} and {len(harmless)}: give data.harmful_source / benign data, "
                f"or set defense.sppft.layers"
            )
        border: list[str] = []
        if cfg.refine:
            contrast = [e.prompt for e in ctx.alignment_examples if getattr(e, "meta", {}).get("contrast")]
            border = pick(contrast, cfg.refine_prompts, 3)
            if not border:
                raise SafeFTError(
                    "defense.sppft.refine: the over-rejection test needs borderline-benign prompts (benign rows marked "
                    "contrast in the alignment data) outside the evaluation set, and there are none: set refine: false"
                )
        return harmful, harmless, border

    def _locate(self, m: nn.Module, ctx: DefenseContext, n_layers: int) -> dict[str, Any]:
        from safeft.defenses.cwac.common import digest, pad_id, prompt_ids, theta0

        cfg = self.config
        harmful, harmless, border = self._prompts(ctx)
        key = {
            "version": ARTIFACT_VERSION,
            "n_layers": n_layers,
            "template": ctx.template,
            "max_length": ctx.max_length,
            "prompts": digest(harmful + ["\x00"] + harmless),
            **{f: getattr(cfg, f) for f in ("n_prompts", "onset", "smooth", "min_gap", "refine")},
        }
        if cfg.refine:
            key.update({f: getattr(cfg, f) for f in ("scale", "refine_window", "refine_tokens")})
            key["borderline"] = digest(border)
        store = None
        if ctx.artifacts_dir is not None:
            from safeft.artifacts import ArtifactStore

            store = ArtifactStore(ctx.artifacts_dir, ctx.fingerprint)
            if store.exists(ARTIFACT, key):
                tensors, meta = store.load(ARTIFACT, key)
                summary = {**meta, "source": "cached"}
                self._report(summary, tensors["gap"])
                return summary
        tok = ctx.tokenizer
        if tok is None or (tok.pad_token_id is None and tok.eos_token_id is None):
            raise SafeFTError("SPPFT: the run gives no tokenizer with a pad or eos token")
        with theta0(m):
            h_m = last_token_states(
                m, prompt_ids(tok, ctx.template, harmful, ctx.max_length), pad_id(tok), cfg.batch_size
            )
            h_n = last_token_states(
                m, prompt_ids(tok, ctx.template, harmless, ctx.max_length), pad_id(tok), cfg.batch_size
            )
        ang = pair_angles(h_m, h_n)
        gap = ang["nm"] - ang["nn"]
        i, j = initial_range(gap, cfg.onset, cfg.smooth, cfg.min_gap)
        summary: dict[str, Any] = {
            "source": "computed",
            "n_layers": n_layers,
            "initial_range": [i, j],
            "n_harmful": len(harmful),
            "n_harmless": len(harmless),
            "gap_deg": [round(float(x), 4) for x in gap],
            "angles_deg": {k: [round(float(x), 4) for x in v] for k, v in ang.items()},
        }
        if cfg.refine:
            i, j, summary["refine"] = self._refine(m, ctx, border, i, j, n_layers)
        summary["layers"] = list(range(i, j + 1))
        if store is not None:
            tensors = {"gap": gap, **{f"angle_{k}": v for k, v in ang.items()}}
            store.save(ARTIFACT, {k: v.float() for k, v in tensors.items()}, meta=summary, config=key)
        self._report(summary, gap)
        return summary

    def _refusals(self, m: nn.Module, ctx: DefenseContext, prompts: list[str]) -> int:
        from safeft.eval.judges.keyword import KeywordJudge

        if self.answer_fn is not None:
            answers = self.answer_fn(m, ctx.tokenizer, prompts, ctx.template, self.config.refine_tokens)
        else:
            from safeft.eval.generate import generate

            answers = generate(
                m,
                ctx.tokenizer,
                prompts,
                template=ctx.template,
                max_new_tokens=self.config.refine_tokens,
                desc="SPPFT over-rejection",
            )
        kj = KeywordJudge()
        return sum(kj.is_refusal(a) for a in answers)

    def _refine(
        self, m: nn.Module, ctx: DefenseContext, border: list[str], i: int, j: int, n_layers: int
    ) -> tuple[int, int, dict[str, Any]]:
        """Over-rejection test (paper §3.4): upper bound with i fixed, then lower bound with it fixed."""
        from safeft.components.sharding import is_quantized_4bit
        from safeft.defenses.cwac.common import theta0

        if is_quantized_4bit(m):
            raise SafeFTError(
                "defense.sppft.refine: weights of a 4-bit base model cannot be scaled; set refine: false"
            )
        cfg, w = self.config, self.config.refine_window
        with theta0(m):
            base = self._refusals(m, ctx, border)
            uppers: dict[int, int] = {}
            for u in range(max(i, j - w), min(n_layers - 1, j + w) + 1):
                with scaled_blocks(m, range(i, u + 1), cfg.scale):
                    uppers[u] = self._refusals(m, ctx, border)
            j2 = best_bound(uppers, j)
            lowers: dict[int, int] = {}
            for lo in range(max(0, i - w), min(j2, i + w) + 1):
                with scaled_blocks(m, range(lo, j2 + 1), cfg.scale):
                    lowers[lo] = self._refusals(m, ctx, border)
            i2 = best_bound(lowers, i)
        info = {
            "scale": cfg.scale,
            "n_prompts": len(border),
            "refusals_unscaled": base,
            "refusals_by_upper": {str(k): v for k, v in uppers.items()},
            "refusals_by_lower": {str(k): v for k, v in lowers.items()},
        }
        self.log(
            f"SPPFT over-rejection (α = {cfg.scale:g}, {len(border)} prompts, {base} refused unscaled): upper bound "
            f"{j2} ({uppers}), lower bound {i2} ({lowers})"
        )
        return i2, j2, info

    def _report(self, summary: dict[str, Any], gap: torch.Tensor) -> None:
        curve = " ".join(f"{float(x):.2f}" for x in gap)
        i, j = summary["initial_range"]
        self.log(
            f"SPPFT ({summary['source']}): safety layers {_ranges(summary['layers'])} of {summary['n_layers']} (gap "
            f"appears at {i}, first smoothing after {j}); N-M − N-N angle gap per layer (degrees): {curve}"
        )


def _ranges(idx: Sequence[int]) -> str:
    from safeft.defenses.cwac.common import ranges

    return ranges(list(idx)) if idx else "none"


__all__ = [
    "SPPFT",
    "SPPFTConfig",
    "best_bound",
    "initial_range",
    "last_token_states",
    "pair_angles",
    "scaled_blocks",
]
