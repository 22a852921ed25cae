"""CWAC: Coupled Weight and Activation Constraints (Peng et al., Findings of ACL 2026, arXiv 2604.12384).

The Defense composes the parts, each in its own file:

  anchors.py     harmful prompts θ₀ refuses (several sources, disjoint from poison and evaluation prompts incl.
                 near-duplicates, judged on θ₀'s greedy answers), split into subspace / scoring / baseline / causal
  subspace.py    one safety subspace V per distinct module input, from the decision positions of the anchors
  weights.py     ΔW·V = 0 after every optimizer step (LoRA A rows / full-FT update, fp32 masters for 16-bit)
  features.py    SAE data, SAEs at several layers, safety latents S, baselines, causal check
  activation.py  L_safety on packed baseline anchors, sharded across DDP ranks

``prepare`` computes or loads every artifact (cached per θ₀ fingerprint, keyed by everything that changes it and
by ``ARTIFACT_VERSION``) without touching the global RNG; ``loss_terms`` returns λ·L_safety; ``after_step``
projects; ``finalize`` reports the largest leak. With ``hold_residual`` μ > 0 (beyond the paper) ``loss_terms``
also returns μ·L_residual, the anchors' whole residual held at θ₀'s. See docs/cwac.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safeft.components.capture import decoder_layers
from safeft.components.sae import TopKSAE, check_sae_fits, save_sae
from safeft.defenses.base import Defense, DefenseContext, register_defense, unwrap_model
from safeft.defenses.cwac import anchors as A
from safeft.defenses.cwac import features as F
from safeft.defenses.cwac import subspace as S
from safeft.defenses.cwac.activation import ActivationTerm
from safeft.defenses.cwac.common import (
    ARTIFACT_VERSION,
    device_of,
    digest,
    environment,
    first_token_gaps,
    norm_text,
    pad_id,
    prompt_ids,
    ranges,
    template_prefix_len,
    theta0,
)
from safeft.defenses.cwac.config import CWACActivationConfig, CWACConfig, CWACWeightConfig
from safeft.defenses.cwac.report import summary_lines
from safeft.defenses.cwac.weights import WeightConstraint
from safeft.errors import SafeFTError

ANCHORS, SUBSPACE, SAE, FEATURES = "cwac-anchors", "cwac-subspace", "cwac-sae", "cwac-features"
ACTIVATIONS = "cwac-activations"  # resumable SAE-capture shards (not an artifact; removed after training)


def _key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@register_defense
class CWAC(Defense):
    """Coupled weight (exact safety-subspace projection) and activation (SAE safety-latent anchoring) constraints."""

    name = "cwac"
    config_class = CWACConfig
    paper = "Peng et al., Coupled Weight and Activation Constraints, Findings of ACL 2026 (arXiv 2604.12384)"
    artifacts = "anchors, safety subspaces V (one per module input), SAEs, safety latents, baselines (per θ₀)"
    needs_full_params = True  # its hooks read and write parameter tensors
    # FSDP2: each rank projects its own rows (no gather) and the activation term runs through the sharded model;
    # ZeRO-3: LoRA only (each A gathered for its edit, LoRA-sized). See on_train_begin / sharding_refusal.
    sharded_backends = ("fsdp2", "zero3")
    incompatible_with = ("cwac", "cwac-weight", "cwac-activation")

    @classmethod
    def incompatible_with_reason(cls, other: str) -> str:
        return f"and {other} are variants of one method; choose one (cwac = both constraints)"

    def __init__(self, config: CWACConfig | None = None):
        super().__init__(config)
        self.config: CWACConfig
        # Test/extension hooks; None = the real path (safeft.eval.generate, the anchor_judge).
        self.answer_fn: Callable[[nn.Module, Any, list[str], str, int], list[str]] | None = None
        self.refusal_fn: Callable[[str], bool] | None = None
        self.outcome_fn: Callable[[list[str], list[str]], list[str]] | None = None
        self.log: Callable[[str], None] = print
        self.progress = True  # progress bars of the SAE capture / training
        self.stats: dict[str, list[str]] = {"computed": [], "loaded": []}
        self.timings: dict[str, float] = {}
        self.summary: dict[str, Any] = {}
        self.weights = WeightConstraint()
        self.activation_term: ActivationTerm | None = None
        self.anchors: list[str] = []
        self.answers: list[str] = []
        self.splits: dict[str, list[int]] = {}
        self.sae_layers: list[int] = []
        self._resolved_judge: tuple[Callable[[list[str], list[str]], list[str]], str] | None = None

    # ---- public hooks --------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: DefenseContext) -> dict[str, Any]:
        """Load or compute the artifacts, install the projections (LoRA A projected now; full FT keeps W₀V) and
        the activation term. Returns the summary (also in ``self.summary``)."""
        return self._prepare(model, ctx, install=True)

    def prepare_artifacts(self, model: nn.Module, ctx: DefenseContext) -> dict[str, Any]:
        """``safeft prepare``: compute or load the cached artifacts only; returns the summary."""
        return self._prepare(model, ctx, install=False)

    def loss_terms(self, model: nn.Module, inputs: dict, outputs: Any) -> dict[str, torch.Tensor]:
        if not self.config.activation or self.activation_term is None:
            return {}
        terms = self.activation_term.terms(unwrap_model(model))
        out = {"cwac/safety": self.config.lam * terms["safety"]}
        if "residual" in terms:
            out["cwac/residual"] = self.config.hold_residual * terms["residual"]
        return out

    def sharding_refusal(self, backend: str) -> str | None:
        if backend == "zero3" and any(e.kind == "full" for e in self.weights.entries):
            return (
                "with full fine-tuning its projection would gather every constrained weight after each step: use "
                "FSDP2 (fsdp_version: 2), where each rank projects its own rows, or LoRA"
            )
        return super().sharding_refusal(backend)

    def on_train_begin(self, model: nn.Module, backend: str | None) -> None:
        """Take the constrained parameters again from the wrapped model (FSDP2 swaps in ``Shard(0)`` DTensors):
        W₀V and the fp32 masters keep this rank's rows, V stays replicated. The activation term (SAEs, baselines)
        follows the model to the device the trainer put it on (``prepare`` runs where the model was loaded)."""
        if self.weights:
            self.weights.rebind(decoder_layers(unwrap_model(model)), backend)
        if self.activation_term is not None:
            self.activation_term.to(device_of(unwrap_model(model)))

    def after_step(self, model: nn.Module) -> None:
        self.weights.apply()

    def finalize(self, model: nn.Module) -> dict[str, Any]:
        """Largest relative leak over the constrained tensors (≈ 0 up to float rounding); see WeightConstraint.leak."""
        return self.weights.leak()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.activation_term.state_dict() if self.activation_term is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.activation_term is not None:
            self.activation_term.load_state_dict(state)

    # ---- prepare ------------------------------------------------------------------------------------------
    def _prepare(self, model: nn.Module, ctx: DefenseContext, install: bool) -> dict[str, Any]:
        super().prepare(model, ctx)
        if not self.config.weight and not self.config.activation:
            self.summary = {
                "mode": "sft (weight and activation constraints both off)",
                "prepare_seconds": 0.0,
            }
            self.log("CWAC: both constraints are off: this run is plain SFT")
            return self.summary
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # prepare never shifts anyone's random stream
            return self._prepare_inner(model, ctx, install)

    def _prepare_inner(self, model: nn.Module, ctx: DefenseContext, install: bool) -> dict[str, Any]:
        cfg = self.config
        self._resolved_judge = None
        t0 = time.perf_counter()
        m = unwrap_model(model)
        blocks = decoder_layers(m)
        n_layers = len(blocks)
        chosen = S.resolve_layers(cfg.layers, n_layers)
        sae_layers = cfg.requested_sae_layers() or F.default_sae_layers(n_layers, cfg.n_sae_layers)
        bad = [L for L in sae_layers if L >= n_layers]
        if bad:
            field = "sae_layer" if cfg.sae_layer is not None else "sae_layers"
            raise SafeFTError(
                f"defense.cwac.{field}={bad} is out of range: the model has {n_layers} layers (0..{n_layers - 1})"
            )
        self.sae_layers = sae_layers
        modules = (
            S.resolve_modules(blocks, chosen, ctx.use_lora, cfg.target_modules, self.log)
            if cfg.weight
            else {}
        )
        self._warn_free(m, blocks, chosen, sae_layers, modules, ctx.use_lora)
        tok = ctx.tokenizer
        if tok.pad_token_id is None and tok.eos_token_id is None:
            raise SafeFTError("CWAC: the tokenizer has neither a pad nor an eos token; set one")
        store = None
        if ctx.artifacts_dir is not None:
            from safeft.artifacts import ArtifactStore

            store = ArtifactStore(ctx.artifacts_dir, ctx.fingerprint)

        anchors, answers, akey, ameta = self._anchors(m, ctx, store)
        self.anchors, self.answers = anchors, answers
        self.splits = A.split_anchors(len(anchors), int(ctx.seed))
        sizes = {k: len(v) for k, v in self.splits.items()}
        summary: dict[str, Any] = {"anchors": len(anchors), "splits": sizes, "anchor_info": ameta}
        if cfg.activation and (sizes["baseline"] < A.MIN_BASELINE or sizes["causal"] < A.MIN_CAUSAL):
            self.log(
                f"CWAC warning: {sizes['baseline']} baseline anchors (want ≥ {A.MIN_BASELINE}) and "
                f"{sizes['causal']} causal-check anchors (want ≥ {A.MIN_CAUSAL}): raise n_anchor or add anchor_sources"
            )
        Vs: dict[str, torch.Tensor] = {}
        if cfg.weight:
            Vs, summary["subspace"] = self._subspace(m, modules, ctx, store, akey)
        act = None
        if cfg.activation:
            act, summary["sae"], summary["features"] = self._activation(
                m, blocks, sae_layers, ctx, store, akey
            )
        if install:
            self.weights.install(modules, Vs, ctx.use_lora, cfg.master_weights)
            if act is not None:
                act.to(device_of(m))
                if cfg.packed_anchors:
                    with theta0(m):
                        act.check_packing(m)
                summary["packed_anchors"] = act.packed
                if cfg.hold_residual > 0:
                    with theta0(m):
                        norms = act.take_residual_baseline(m)
                    summary["residual_norms"] = {str(L): round(v, 6) for L, v in norms.items()}
            self.activation_term = act
        summary["prepare_seconds"] = round(time.perf_counter() - t0, 3)
        summary["cache"] = {k: list(v) for k, v in self.stats.items()}
        self.timings["prepare_seconds"] = summary["prepare_seconds"]
        self.summary = summary
        self._print_summary(summary)
        return summary

    def unconstrained_layers(
        self, blocks: nn.ModuleList, chosen: list[int], sae_layers: list[int], use_lora: bool
    ) -> list[int]:
        """Layers with trained parameters that neither constraint touches: outside the weight constraint's layers
        and (activation term on) above the deepest SAE layer, whose output the activation term cannot see."""
        cfg = self.config
        covered = set(chosen) if cfg.weight else set()
        if cfg.activation:
            covered |= set(range(max(sae_layers) + 1))
        return [
            i
            for i, block in enumerate(blocks)
            if i not in covered
            and any(S.is_trained(mod, use_lora) for mod in S.linear_children(block).values())
        ]

    def _warn_free(self, m, blocks, chosen, sae_layers, modules, use_lora) -> None:
        free = self.unconstrained_layers(blocks, chosen, sae_layers, use_lora)
        if free:
            self.log(
                f"CWAC warning: layers {ranges(free)} are trained but under neither constraint (weight constraint: "
                f"layers {ranges(chosen) if self.config.weight else 'none'}; the activation term reaches layers "
                f"0–{max(sae_layers)}" + (")" if self.config.activation else ", but it is off)") + "; set "
                "defense.cwac.layers: all to cover them (on the tiny benchmark at p = 0.2 free layers let HS reach 96%)"
            )
        if self.config.weight:
            names = S.free_trained_tensors(m, modules, use_lora)
            if (
                use_lora
            ):  # LoRA: the layer warning above covers other layers; name free modules of chosen ones
                inside = {n for i in chosen for n in (f".layers.{i}.",)}
                names = [n for n in names if any(x in n for x in inside)]
            if names:
                self.log(
                    f"CWAC warning: {len(names)} trained tensor(s) are outside the weight constraint: "
                    f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                )

    # -- θ₀'s answers and the judge
    def _answers(self, m: nn.Module, ctx: DefenseContext, prompts: list[str], n_tokens: int) -> list[str]:
        if self.answer_fn is not None:
            return list(self.answer_fn(m, ctx.tokenizer, prompts, ctx.template, n_tokens))
        from safeft.eval import generate

        return generate(
            m,
            ctx.tokenizer,
            prompts,
            template=ctx.template,
            max_new_tokens=n_tokens,
            batch_size=16,
            desc="CWAC anchor check",
        )

    def _judge(self) -> tuple[Callable[[list[str], list[str]], list[str]], str]:
        """The anchor judge's ``outcomes`` and its name, resolved once per ``prepare``."""
        if self._resolved_judge is None:
            self._resolved_judge = self._resolve_judge()
        return self._resolved_judge

    def _resolve_judge(self) -> tuple[Callable[[list[str], list[str]], list[str]], str]:
        if self.outcome_fn is not None:
            return self.outcome_fn, "custom"
        if self.refusal_fn is not None:
            fn = self.refusal_fn
            return (lambda _p, answers: ["refusal" if fn(a) else "other" for a in answers]), "custom"
        return A.resolve_judge(self.config.anchor_judge, self.log)

    # -- anchors
    def _exclusions(self, ctx: DefenseContext) -> list[str]:
        return list(ctx.eval_prompts) + list(getattr(ctx, "poison_prompts", []) or [])

    def _anchors(self, m, ctx, store) -> tuple[list[str], list[str], dict[str, Any], dict[str, Any]]:
        cfg = self.config
        outcomes, judge_name = self._judge()
        exclude = self._exclusions(ctx)
        key = {
            "version": ARTIFACT_VERSION,
            "sources": list(cfg.anchor_sources),
            "pool": digest(list(ctx.anchor_pool)),
            "exclude": digest(sorted({norm_text(p) for p in exclude})),
            "near_dup_threshold": cfg.near_dup_threshold,
            "seed": int(ctx.seed),
            "n_anchor": cfg.n_anchor,
            "max_new_tokens_anchor_check": cfg.max_new_tokens_anchor_check,
            "template": ctx.template,
            "max_length": int(ctx.max_length),
            "judge": judge_name,
        }
        if cfg.anchor_margin_token:  # only when on, so the caches of the paper's rule keep their keys
            key["margin"] = {"token": cfg.anchor_margin_token, "pool": cfg.anchor_margin_pool}
        if store is not None and store.exists(ANCHORS, key):
            _, meta = store.load(ANCHORS, key)
            self.stats["loaded"].append(ANCHORS)
            return list(meta["anchors"]), list(meta["answers"]), key, meta["info"]
        t0 = time.perf_counter()
        candidates, cstats = self._candidates(ctx)
        if not candidates:
            raise SafeFTError(
                "CWAC: no anchor candidates left after removing poison / evaluation prompts and near-duplicates; "
                "add defense.cwac.anchor_sources"
            )
        n_tok = cfg.max_new_tokens_anchor_check
        want = cfg.n_anchor
        if cfg.anchor_margin_token:  # round first: 100 × 1.1 is 110.00000000000001 in floats
            want = math.ceil(round(cfg.n_anchor * cfg.anchor_margin_pool, 6))
        with theta0(m):
            picked, answers, sel = A.select_anchors(
                candidates, lambda ps: self._answers(m, ctx, ps, n_tok), outcomes, want
            )
            if cfg.anchor_margin_token and picked:
                if len(picked) < want:
                    self.log(
                        f"CWAC warning: θ₀ refused {len(picked)} of the {sel['checked']} anchor candidates, fewer "
                        f"than the {want} anchor_margin_pool asks for; thinning {len(picked)} to "
                        f"{min(cfg.n_anchor, len(picked))}: add defense.cwac.anchor_sources for a wider choice"
                    )
                picked, answers, sel["margin"] = self._thin(m, ctx, candidates, picked, answers)
        if not picked:
            raise SafeFTError(
                f"CWAC: θ₀ refused none of the {sel['checked']} anchor candidates ({judge_name} judge on its greedy "
                f"answers); this model is not safety-aligned enough to anchor: align it first (`safeft align`) or "
                f"pass another model"
            )
        if len(picked) < 4:
            raise SafeFTError(
                f"CWAC: θ₀ refused only {len(picked)} of {sel['checked']} anchor candidates; at least 4 are needed "
                f"(subspace / scoring / baseline / causal-check sets): add defense.cwac.anchor_sources"
            )
        anchors = [candidates[i][1] for i in picked]
        info = {
            **cstats,
            **sel,
            "judge": judge_name,
            "candidates": len(candidates),
            "env": environment(device_of(m)),
        }
        info["anchor_sources"] = {
            s: sum(1 for i in picked if candidates[i][0] == s) for s in cfg.anchor_sources
        }
        self.timings["anchor_seconds"] = time.perf_counter() - t0
        self.stats["computed"].append(ANCHORS)
        if store is not None:
            meta = {"anchors": anchors, "answers": answers, "info": info}
            store.save(ANCHORS, {"refused": torch.tensor([len(anchors)])}, meta=meta, config=key)
        return anchors, answers, key, info

    def _thin(self, m, ctx, candidates, picked, answers) -> tuple[list[int], list[str], dict[str, Any]]:
        """Keep the ``n_anchor`` refusals whose θ₀ first-token gap to ``anchor_margin_token`` is smallest (the
        token's first id when it splits into several, with a warning)."""
        cfg = self.config
        tok = ctx.tokenizer
        word = cfg.anchor_margin_token
        ids = tok.encode(word, add_special_tokens=False)
        if not ids:
            raise SafeFTError(f"defense.cwac.anchor_margin_token={word!r}: the tokenizer gives no token for it")
        if len(ids) > 1:
            self.log(
                f"CWAC warning: defense.cwac.anchor_margin_token={word!r} is {len(ids)} tokens; the gap is read "
                f"against the first, {tok.decode(ids[:1])!r}"
            )
        seqs = prompt_ids(tok, ctx.template, [candidates[i][1] for i in picked], int(ctx.max_length))
        gaps = first_token_gaps(m, seqs, ids[0], "CWAC anchor margins" if self.progress else None)[0]
        keep = A.thinnest(gaps, cfg.n_anchor)
        kept = [gaps[k] for k in keep]
        info = {
            "token": word,
            "token_id": int(ids[0]),
            "refusals_gathered": len(picked),
            "kept": len(keep),
            "median_gap_gathered": round(statistics.median(gaps), 4),
            "median_gap_kept": round(statistics.median(kept), 4),
            "max_gap_kept": round(max(kept), 4),
        }
        what = (
            f"kept the {len(keep)} thinnest of {len(picked)} refusals"
            if len(keep) < len(picked)
            else f"kept all {len(picked)} refusals (no thinning: no more than n_anchor were found)"
        )
        self.log(
            f"CWAC: {what} (first-token gap to {word!r}: median {info['median_gap_kept']:.2f} nats kept, "
            f"{info['median_gap_gathered']:.2f} gathered)"
        )
        return [picked[k] for k in keep], [answers[k] for k in keep], info

    def _candidates(self, ctx) -> tuple[list[tuple[str, str]], dict[str, Any]]:
        cfg = self.config
        by_source = A.load_sources(cfg.anchor_sources, ctx.anchor_pool, self.log)
        return A.build_candidates(by_source, self._exclusions(ctx), cfg.near_dup_threshold, int(ctx.seed))

    # -- weight constraint
    def _subspace(self, m, modules, ctx, store, akey) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        cfg = self.config
        key = {
            "version": ARTIFACT_VERSION,
            "anchors": _key_digest(akey),
            "part": "subspace",
            "modules": sorted(modules),
            "energy": cfg.energy,
            "center": cfg.subspace_center,
            "prompt_tokens": cfg.subspace_prompt_tokens,
            "refusal_tokens": cfg.subspace_refusal_tokens,
            "split": A.SPLIT,
        }
        if store is not None and store.exists(SUBSPACE, key):
            tensors, meta = store.load(SUBSPACE, key)
            self.stats["loaded"].append(SUBSPACE)
        else:
            t0 = time.perf_counter()
            tok, tpl, ml = ctx.tokenizer, ctx.template, int(ctx.max_length)
            sub, held = self.splits["subspace"], self.splits["causal"]
            seqs = S.anchor_sequences(
                tok, tpl, [self.anchors[i] for i in sub], [self.answers[i] for i in sub], ml
            )
            hseqs = S.anchor_sequences(
                tok, tpl, [self.anchors[i] for i in held], [self.answers[i] for i in held], ml
            )
            start = S.decision_start([s[:pl] for s, pl in seqs + hseqs], template_prefix_len(tok, tpl))
            with theta0(m):
                probe = torch.tensor([seqs[0][0][: min(8, len(seqs[0][0]))]], device=device_of(m))
                groups = S.module_groups(m, modules, probe)
                Vg, meta = S.compute_subspaces(
                    m,
                    modules,
                    groups,
                    seqs,
                    hseqs,
                    k=cfg.subspace_prompt_tokens,
                    m=cfg.subspace_refusal_tokens,
                    start=start,
                    energy=cfg.energy,
                    center=cfg.subspace_center,
                    pad=pad_id(tok),
                    progress=self.log,
                )
            meta.update({"start": start, "energy": cfg.energy, "seconds": round(time.perf_counter() - t0, 3)})
            tensors = {f"V.{g}": v for g, v in Vg.items()}
            self.stats["computed"].append(SUBSPACE)
            if store is not None:
                store.save(SUBSPACE, tensors, meta=meta, config=key)
        by_module = {n: tensors[f"V.{g}"] for g, names in meta["groups"].items() for n in names}
        return by_module, meta

    # -- activation constraint
    def _activation(self, m, blocks, layers, ctx, store, akey) -> tuple[ActivationTerm, dict, dict]:
        cfg = self.config
        harmless = list(dict.fromkeys(p for p in ctx.harmless_pool if norm_text(p)))
        if not harmless:
            raise SafeFTError(
                "CWAC activation constraint: ctx.harmless_pool is empty; it needs harmless prompts to rank the "
                "safety latents (and as SAE training text)"
            )
        hidden = int(m.get_input_embeddings().weight.shape[1])
        saes, sae_meta, sae_stamp = self._saes(m, layers, ctx, store, akey, harmless, hidden)
        dev = device_of(m)
        saes = {L: sae.to(dev).eval().requires_grad_(False) for L, sae in saes.items()}
        layers = self.sae_layers = sorted(saes)  # a pretrained sae_path brings its own layers
        key = {
            "version": ARTIFACT_VERSION,
            "anchors": _key_digest(akey),
            "sae": sae_stamp,
            "n_features": cfg.n_features,
            "n_positions": cfg.n_positions,
            "harmless": digest(harmless),
            "causal_check": cfg.causal_check,
            "split": A.SPLIT,
        }
        tok, tpl, ml, pad = ctx.tokenizer, ctx.template, int(ctx.max_length), pad_id(ctx.tokenizer)
        base_prompts = [self.anchors[i] for i in self.splits["baseline"]]
        base_seqs = prompt_ids(tok, tpl, base_prompts, ml)
        if store is not None and store.exists(FEATURES, key):
            tensors, meta = store.load(FEATURES, key)
            self.stats["loaded"].append(FEATURES)
            feats = {L: tensors[f"features.{L}"] for L in layers}
            z_base = {L: tensors[f"z_base.{L}"] for L in layers}
        else:
            t0 = time.perf_counter()
            score_seqs = prompt_ids(tok, tpl, [self.anchors[i] for i in self.splits["score"]], ml)
            with theta0(m):
                feats, z_base, meta = F.safety_features(
                    m, saes, score_seqs, prompt_ids(tok, tpl, harmless, ml), base_seqs, cfg.n_features,
                    cfg.n_positions, pad,
                )  # fmt: skip
                if cfg.causal_check:
                    outcomes, _ = self._judge()
                    n_tok = cfg.max_new_tokens_anchor_check
                    meta["causal_check"] = F.causal_check(
                        blocks,
                        saes,
                        feats,
                        [self.anchors[i] for i in self.splits["causal"]],
                        lambda ps: self._answers(m, ctx, ps, n_tok),
                        outcomes,
                    )
            meta["norms"] = {str(L): v for L, v in F.baseline_norms(z_base).items()}
            meta["baselines"] = len(base_seqs)
            meta["seconds"] = round(time.perf_counter() - t0, 3)
            self.stats["computed"].append(FEATURES)
            if store is not None:
                tensors = {f"features.{L}": feats[L] for L in layers}
                tensors.update({f"z_base.{L}": z_base[L] for L in layers})
                store.save(FEATURES, tensors, meta=meta, config=key)
        empty = [L for L in layers if feats[L].numel() == 0]
        if empty:
            raise SafeFTError(
                f"CWAC: no SAE latent is more active on anchors than on harmless prompts at SAE layer(s) {empty}; "
                f"the SAE has not learned safety features there: train on more tokens (sae_tokens) or pick other "
                f"defense.cwac.sae_layers"
            )
        self._enforce_causal(meta.get("causal_check"), layers)
        norms = {int(L): float(v) for L, v in meta["norms"].items()}
        act = ActivationTerm(
            saes, feats, z_base, norms, base_seqs, cfg.n_positions, cfg.anchor_batch, pad, int(ctx.seed),
            packed=cfg.packed_anchors, log=self.log, every=cfg.activation_every,
        )  # fmt: skip
        return act, sae_meta, meta

    def _enforce_causal(self, res: dict[str, Any] | None, layers: list[int]) -> None:
        cfg = self.config
        if res is None:
            return
        ok, msg = F.causal_verdict(res, cfg.causal_min_drop)
        self.log(f"CWAC causal check: {msg}")
        if ok:
            return
        text = (
            f"CWAC: {msg}: the safety latents at layers {layers} are not causal for this model's refusals, so the "
            f"activation term would anchor features that do not carry safety. Train the SAE on more tokens "
            f"(sae_tokens), try other sae_layers or more n_features, or use a pretrained SAE (sae_path); "
            f"defense.cwac.require_causal: false trains anyway"
        )
        if cfg.require_causal:
            raise SafeFTError(text)
        self.log("CWAC warning: " + text.removeprefix("CWAC: "))

    def _saes(self, m, layers, ctx, store, akey, harmless, hidden) -> tuple[dict[int, TopKSAE], dict, str]:
        cfg = self.config
        if cfg.sae_path:
            saes = F.load_pretrained(cfg.sae_path, cfg.requested_sae_layers(), len(decoder_layers(m)))
            for L, sae in saes.items():
                check_sae_fits(sae, hidden, source=f"defense.cwac.sae_path={cfg.sae_path} (layer {L})")
            stamp = _key_digest(F.pretrained_stamp(cfg.sae_path, sorted(saes)))
            return saes, {"sae_source": cfg.sae_path, "sae_layers": sorted(saes)}, stamp
        key = {
            "version": ARTIFACT_VERSION,
            "anchors": _key_digest(akey),
            "layers": layers,
            "width_factor": cfg.sae_width_factor,
            "k": cfg.sae_k,
            "tokens": cfg.sae_tokens,
            "steps": cfg.sae_steps,
            "batch_size": cfg.sae_batch_size,
            "lr": cfg.sae_lr,
            "aux_coef": cfg.sae_aux_coef,
            "benign_fraction": cfg.benign_fraction,
            "general_sources": list(cfg.sae_general_sources),
            "harmless": digest(harmless),
            "template": ctx.template,
            "max_length": int(ctx.max_length),
            "seed": int(ctx.seed),
            "heldout": F.HELDOUT_FRACTION,
        }
        stamp = _key_digest(key)
        if store is not None and store.exists(SAE, key):
            tensors, meta = store.load(SAE, key)
            self.stats["loaded"].append(SAE)
            saes = {}
            for L in layers:
                lm = meta["layers"][str(L)]
                sae = TopKSAE(lm["d_in"], lm["d_sae"], lm["k"])
                prefix = f"sae.{L}."
                sae.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
                saes[L] = sae.eval()
            return saes, meta, stamp
        t0 = time.perf_counter()
        tok, tpl = ctx.tokenizer, ctx.template
        anchor_set = {norm_text(a) for a in self.anchors}
        candidates, _ = self._candidates(ctx)
        harmful = [p for _, p in candidates if norm_text(p) not in anchor_set]
        refusals = {norm_text(p): r for p, r in ctx.refusal_pairs}
        start = max(1, template_prefix_len(tok, tpl))
        docs, dstats = F.sae_documents(
            tok, tpl, int(ctx.max_length), harmful, refusals, cfg.sae_general_sources, harmless,
            cfg.sae_tokens, cfg.benign_fraction, start, int(ctx.seed), self.log,
        )  # fmt: skip
        if not docs:
            raise SafeFTError("CWAC: no SAE training text (no harmful or general documents)")
        tmp = None
        if ctx.artifacts_dir is not None:
            acts_dir = Path(ctx.artifacts_dir) / ACTIVATIONS / stamp
        else:
            tmp = tempfile.mkdtemp(prefix="cwac-acts-")
            acts_dir = Path(tmp)
        dev = device_of(m)
        with theta0(m):
            reader = F.capture_to_store(
                m, docs, layers, acts_dir, {"sae": stamp, "docs": dstats}, start, pad_id(tok), self.progress
            )
        saes, layer_meta = F.train_saes(
            reader, layers, width=cfg.sae_width_factor * hidden, k=cfg.sae_k, steps=cfg.sae_steps,
            batch_size=cfg.sae_batch_size, lr=cfg.sae_lr, aux_coef=cfg.sae_aux_coef, seed=int(ctx.seed),
            device=dev, progress=self.progress,
        )  # fmt: skip
        meta = {"data": dstats, "layers": layer_meta}
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        meta["env"] = environment(dev)
        self.stats["computed"].append(SAE)
        if store is not None:
            tensors = {f"sae.{L}.{k}": v for L, s in saes.items() for k, v in s.state_dict().items()}
            path = store.save(SAE, tensors, meta=meta, config=key)
            for L, s in saes.items():  # reusable as defense.cwac.sae_path
                save_sae(s, path / "sae_lens" / f"layer_{L}", hook_layer=L)
        if not cfg.keep_activations or tmp is not None:
            F.remove_store(acts_dir)
        return saes, meta, stamp

    def _print_summary(self, s: dict[str, Any]) -> None:
        for line in summary_lines(s, self.config.energy, self.config.subspace_center, self.stats):
            self.log(line)


@register_defense
class CWACWeight(CWAC):
    """Ablation: the weight constraint only (``activation=False``)."""

    name = "cwac-weight"
    config_class = CWACWeightConfig


@register_defense
class CWACActivation(CWAC):
    """Ablation: the activation constraint only (``weight=False``)."""

    name = "cwac-activation"
    config_class = CWACActivationConfig
