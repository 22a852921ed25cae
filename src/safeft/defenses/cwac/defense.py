"""CWAC: Coupled Weight and Activation Constraints (Peng et al., Findings of ACL 2026, arXiv 2604.12384).

prepare (once, cached per θ₀ fingerprint):
  anchors   harmful prompts θ₀ refuses on its own greedy answers, disjoint from the eval prompts, split into
            subspace / SAE / feature-scoring / baseline sets.
  subspace  for every constrained linear module ℓ: C_ℓ = Σ x xᵀ over its inputs on anchor prompt + θ₀ refusal
            (teacher-forced), V_ℓ = top eigenvectors holding ``energy`` of trace(C_ℓ).
  SAE       TopK SAE on the residual stream after block ``sae_layer`` (anchor + harmless prompt tokens), safety
            latents S by mean activation on anchors − on harmless prompts, baselines z_base on held-out anchors.
training:
  loss_terms  λ · mean_b ‖SAE(h(θ, anchor_b))[S] − z_base_b‖² at the last ``n_positions`` prompt positions,
              running θ only up to ``sae_layer``.
  after_step  LoRA: A ← A − (A V)Vᵀ; full FT: W ← W − ((W − W₀)V)Vᵀ. Exact under AdamW: ΔW V = 0 after every step.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from safeft.components.capture import capture_module_inputs, decoder_layers, run_to_layer
from safeft.components.projection import project_rows_out, project_update_out, top_energy_basis
from safeft.components.sae import TopKSAE, ablate_latents_hook, check_sae_fits, load_sae, save_sae, train_sae
from safeft.defenses.base import Defense, DefenseContext, register_defense, unwrap_model
from safeft.defenses.cwac.config import CWACActivationConfig, CWACConfig, CWACWeightConfig
from safeft.errors import SafeFTError

ANCHORS = "cwac-anchors"
SUBSPACE = "cwac-subspace"
SAE = "cwac-sae"
_SPLIT = (0.3, 0.3, 0.2, 0.2)  # subspace, SAE training, feature scoring, baselines
_COV_BUDGET_BYTES = 4 * 2**30  # float64 covariances held at once while capturing module inputs


# ---- small helpers ----------------------------------------------------------------------------------------------
def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → "0–2, 5, 7–8"."""
    out, start = [], None
    for k, i in enumerate(idx):
        if start is None:
            start = i
        if k + 1 == len(idx) or idx[k + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}–{i}")
            start = None
    return ", ".join(out)


def _norm(text: str) -> str:
    try:
        from safeft.data import normalize_text
    except ImportError:  # pragma: no cover
        return " ".join(text.lower().split())
    return normalize_text(text)


def _digest(items: list[str]) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def _theta0(model: nn.Module) -> Iterator[None]:
    """θ₀ in eval mode: adapters disabled for peft models (full FT: the model is θ₀ at step 0)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    ctx = model.disable_adapter() if _is_peft(model) else contextlib.nullcontext()
    try:
        with ctx, torch.no_grad():
            yield
    finally:
        for m, t in modes:
            m.train(t)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists → ``input_ids [N, T]`` and ``lengths [N]`` (real tokens start at position 0, so
    positions and activations equal the unpadded ones)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def _mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < lengths[:, None]).long()


def _last_positions(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Indices ``[N, n]`` of the last ``n`` real tokens of right-padded rows (clamped at 0 for short rows)."""
    return (lengths[:, None] - n + torch.arange(n)[None, :]).clamp_min(0)


@register_defense
class CWAC(Defense):
    """Coupled weight (exact safety-subspace projection) and activation (SAE safety-latent anchoring) constraints."""

    name = "cwac"
    config_class = CWACConfig
    paper = "Peng et al., Coupled Weight and Activation Constraints, Findings of ACL 2026 (arXiv 2604.12384)"
    artifacts = "safety subspaces V_ℓ, TopK SAE, safety latents, baselines (cached per θ₀)"
    needs_full_params = True  # the projection rewrites whole weight/LoRA tensors: refused under FSDP / ZeRO-3
    incompatible_with = ("cwac", "cwac-weight", "cwac-activation")

    @classmethod
    def incompatible_with_reason(cls, other: str) -> str:
        return f"and {other} are variants of one method; choose one (cwac = both constraints)"

    def __init__(self, config: CWACConfig | None = None):
        super().__init__(config)
        self.config: CWACConfig
        # Test/extension hooks; None = the real path (safeft.eval.generate + KeywordJudge).
        self.answer_fn: Callable[[nn.Module, Any, list[str], str, int], list[str]] | None = None
        self.refusal_fn: Callable[[str], bool] | None = None
        self.log: Callable[[str], None] = print
        self.stats: dict[str, list[str]] = {"computed": [], "loaded": []}
        self.timings: dict[str, float] = {}
        self.summary: dict[str, Any] = {}
        self._lora: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        self._full: list[tuple[str, nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._lora_modules: dict[str, nn.Module] = {}
        self._last_anchors: list[str] = []
        self._sae: TopKSAE | None = None
        self._features: torch.Tensor | None = None
        self._base_ids: torch.Tensor | None = None
        self._base_len: torch.Tensor | None = None
        self._z_base: torch.Tensor | None = None
        self._sae_layer = 0
        self._gen = torch.Generator()

    # ---- public hooks --------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: DefenseContext) -> dict[str, Any]:
        """Load or compute the artifacts, project the constrained LoRA A matrices (or keep W₀ for full FT), and
        set up the activation term. Returns the summary (also in ``self.summary``)."""
        return self._prepare(model, ctx, install=True)

    def prepare_artifacts(self, model: nn.Module, ctx: DefenseContext) -> dict[str, Any]:
        """``safeft prepare``: compute or load the cached artifacts only; returns the summary."""
        return self._prepare(model, ctx, install=False)

    def loss_terms(self, model: nn.Module, inputs: dict, outputs: Any) -> dict[str, torch.Tensor]:
        if not self.config.activation or self._sae is None:
            return {}
        cfg = self.config
        m = unwrap_model(model)
        n = self._base_ids.shape[0]
        idx = torch.randperm(n, generator=self._gen)[: min(cfg.anchor_batch, n)]
        lengths = self._base_len[idx]
        width = int(lengths.max())
        ids = self._base_ids[idx, :width]
        dev = _device(m)
        h = run_to_layer(m, ids.to(dev), _mask(lengths, width).to(dev), self._sae_layer)  # [B, T, d]
        pos = _last_positions(lengths, cfg.n_positions).to(dev)  # [B, P]
        h_sel = torch.gather(h, 1, pos[..., None].expand(-1, -1, h.shape[-1]))  # [B, P, d]
        pre = self._sae.pre_acts(h_sel.float())  # [B, P, d_sae]
        z = self._sae.encode(h_sel.float())[..., self._features]  # [B, P, F], the TopK codes (the loss value)
        # Straight-through gradient: a safety latent that fell out of the top-k (or below 0) has zero gradient
        # under TopK, so the loss could never bring it back; route the gradient through its pre-activation.
        pre_s = pre[..., self._features]
        z = pre_s + (z - pre_s).detach()
        diff = z - self._z_base[idx.to(self._z_base.device)].to(z.device)
        loss = diff.pow(2).sum(dim=(1, 2)).mean()
        return {"cwac/safety": cfg.lam * loss}

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for _name, A, V in self._lora:
            A.copy_(project_rows_out(A, V))
        for _name, W, W0, V in self._full:
            W.copy_(project_update_out(W, W0, V))

    @torch.no_grad()
    def finalize(self, model: nn.Module) -> dict[str, Any]:
        """Largest relative leak ‖ΔW V‖ / ‖ΔW‖ over constrained modules (≈ 0 up to float rounding)."""
        leak = 0.0
        for name, A, V in self._lora:
            mod = self._lora_modules.get(name)
            if mod is None:
                continue
            for adapter in mod.lora_A:
                if mod.lora_A[adapter].weight is not A:
                    continue
                B = mod.lora_B[adapter].weight.float()
                dw = B @ A.float()
                leak = max(leak, float((dw @ V.float()).norm() / dw.norm().clamp_min(1e-30)))
        for _name, W, W0, V in self._full:
            dw = W.float() - W0.float()
            leak = max(leak, float((dw @ V.float()).norm() / dw.norm().clamp_min(1e-30)))
        return {"cwac_max_relative_leak": leak} if (self._lora or self._full) else {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"anchor_rng": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "anchor_rng" in state:
            self._gen.set_state(state["anchor_rng"].to(torch.uint8).cpu())

    # ---- prepare ------------------------------------------------------------------------------------------
    def _prepare(self, model: nn.Module, ctx: DefenseContext, install: bool) -> dict[str, Any]:
        super().prepare(model, ctx)
        cfg = self.config
        t0 = time.perf_counter()
        self._gen.manual_seed(int(ctx.seed))
        if not cfg.weight and not cfg.activation:
            self.summary = {
                "mode": "sft (weight and activation constraints both off)",
                "prepare_seconds": 0.0,
            }
            self.log("CWAC: both constraints are off: this run is plain SFT")
            return self.summary
        m = unwrap_model(model)
        layers = decoder_layers(m)
        n_layers = len(layers)
        chosen = self._resolve_layers(n_layers)
        sae_layer = cfg.sae_layer if cfg.sae_layer is not None else n_layers // 2
        if not 0 <= sae_layer < n_layers:
            raise SafeFTError(
                f"defense.cwac.sae_layer={sae_layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})"
            )
        modules = self._resolve_modules(m, layers, chosen, ctx.use_lora) if cfg.weight else {}
        free = self.unconstrained_layers(layers, chosen, sae_layer, ctx.use_lora)
        if free:
            self.log(
                f"CWAC warning: layers {_ranges(free)} are trained but under neither constraint (weight constraint: "
                f"layers {_ranges(chosen) if cfg.weight else 'none'}; the activation term reads layer "
                f"{sae_layer if cfg.activation else '(off)'} and only reaches the layers before it). On the tiny "
                f"benchmark at p = 0.2 this let HS reach 96%; set defense.cwac.layers: all to cover them"
            )
        store = None
        if ctx.artifacts_dir is not None:
            from safeft.artifacts import ArtifactStore

            store = ArtifactStore(ctx.artifacts_dir, ctx.fingerprint)
        tok = ctx.tokenizer
        if tok.pad_token_id is None and tok.eos_token_id is None:
            raise SafeFTError("CWAC: the tokenizer has neither a pad nor an eos token; set one")

        anchors, answers, akey = self._anchors(m, ctx, store)
        self._last_anchors = anchors
        n = len(anchors)
        b1 = max(1, round(_SPLIT[0] * n))
        b2 = max(b1 + 1, round((_SPLIT[0] + _SPLIT[1]) * n))
        b3 = max(b2 + 1, round((1 - _SPLIT[3]) * n))
        splits = {
            "subspace": list(range(0, b1)),
            "sae": list(range(b1, b2)),
            "score": list(range(b2, b3)),
            "baseline": list(range(b3, n)),
        }
        summary: dict[str, Any] = {"anchors": n, "splits": {k: len(v) for k, v in splits.items()}}
        if cfg.weight:
            Vs, sub_meta = self._subspace(
                m, layers, modules, anchors, answers, splits["subspace"], ctx, store, akey
            )
            summary["subspace"] = sub_meta
        if cfg.activation:
            sae_meta = self._sae_artifacts(m, layers, sae_layer, anchors, splits, ctx, store, akey)
            summary["sae"] = sae_meta
            self._sae_layer = sae_layer
        if install:
            self._install(m, modules, Vs if cfg.weight else {}, ctx.use_lora)
        summary["prepare_seconds"] = round(time.perf_counter() - t0, 3)
        summary["cache"] = {k: list(v) for k, v in self.stats.items()}
        self.timings["prepare_seconds"] = summary["prepare_seconds"]
        self.summary = summary
        self._print_summary(summary)
        return summary

    def unconstrained_layers(
        self, layers: nn.ModuleList, chosen: list[int], sae_layer: int, use_lora: bool
    ) -> list[int]:
        """Layers with trained parameters that neither constraint touches: outside the weight constraint's layers
        and (activation term on) above the SAE layer, whose output the activation term cannot see."""
        cfg = self.config
        covered = set(chosen) if cfg.weight else set()
        if cfg.activation:
            covered |= set(range(sae_layer + 1))
        out = []
        for i, block in enumerate(layers):
            if i in covered:
                continue
            if any(self._trained(mod, use_lora) for mod in self._linear_children(block).values()):
                out.append(i)
        return out

    def _resolve_layers(self, n_layers: int) -> list[int]:
        cfg = self.config
        if cfg.layers is None:
            width = max(1, n_layers // 2)
            start = (n_layers - width) // 2
            return list(range(start, start + width))
        if cfg.layers == "all":
            return list(range(n_layers))
        bad = [i for i in cfg.layers if i >= n_layers]
        if bad:
            raise SafeFTError(
                f"defense.cwac.layers={cfg.layers}: {bad} out of range, the model has {n_layers} layers (0..{n_layers - 1})"
            )
        return list(cfg.layers)

    @staticmethod
    def _linear_children(block: nn.Module) -> dict[str, nn.Module]:
        """``{qualified name in block: module}`` for linear modules (peft LoRA layers count as one module)."""
        out: dict[str, nn.Module] = {}
        for name, mod in block.named_modules():
            if not name:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("base_layer",) or ".lora_" in f".{name}" or "base_layer" in name.split("."):
                continue
            if hasattr(mod, "lora_A") or isinstance(mod, nn.Linear):
                out[name] = mod
        return out

    @staticmethod
    def _trained(mod: nn.Module, use_lora: bool) -> bool:
        if use_lora:
            return hasattr(mod, "lora_A") and any(p.requires_grad for p in mod.lora_A.parameters())
        w = getattr(mod, "weight", None)
        return isinstance(w, torch.Tensor) and w.requires_grad

    def _resolve_modules(
        self, m: nn.Module, layers: nn.ModuleList, chosen: list[int], use_lora: bool
    ) -> dict[str, nn.Module]:
        """``{"<layer>.<path>": module}`` of the constrained modules; refuses unknown or never-trained ones."""
        cfg = self.config
        out: dict[str, nn.Module] = {}
        available: set[str] = set()
        for i in chosen:
            for name, mod in self._linear_children(layers[i]).items():
                leaf = name.rsplit(".", 1)[-1]
                available.add(leaf)
                if cfg.target_modules is None:
                    wanted = self._trained(mod, use_lora) if use_lora else leaf == "down_proj"
                else:
                    wanted = leaf in cfg.target_modules
                if wanted:
                    out[f"{i}.{name}"] = mod
        if cfg.target_modules is not None:
            unknown = [t for t in cfg.target_modules if t not in available]
            if unknown:
                raise SafeFTError(
                    f"defense.cwac.target_modules: {unknown} not found in layers {chosen}; "
                    f"available linear modules: {', '.join(sorted(available))}"
                )
        if not out:
            raise SafeFTError(
                f"defense.cwac: no trained module in layers {chosen} to constrain (LoRA targets none of them); "
                f"weight-only CWAC would silently be plain SFT: add LoRA targets in these layers or set defense.cwac.layers"
            )
        untrained = [k for k, mod in out.items() if not self._trained(mod, use_lora)]
        if untrained:
            raise SafeFTError(
                f"defense.cwac.target_modules: {untrained[:4]}{' ...' if len(untrained) > 4 else ''} are never "
                f"trained in this run (e.g. LoRA on q/v while target_modules=['down_proj']): weight-only CWAC would "
                f"silently be plain SFT; constrain the trained modules (leave target_modules unset) or train these"
            )
        if use_lora and cfg.target_modules is not None:
            free = [
                f"{i}.{n}"
                for i in chosen
                for n, mod in self._linear_children(layers[i]).items()
                if self._trained(mod, True) and f"{i}.{n}" not in out
            ]
            if free:
                self.log(f"CWAC warning: trained but unconstrained in the chosen layers: {free[:6]}")
        return out

    # -- anchors
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

    def _is_refusal(self, text: str) -> bool:
        if self.refusal_fn is not None:
            return bool(self.refusal_fn(text))
        if not hasattr(self, "_judge"):
            from safeft.eval import KeywordJudge

            self._judge = KeywordJudge()
        return self._judge.is_refusal(text)

    def _anchors(self, m: nn.Module, ctx: DefenseContext, store: Any) -> tuple[list[str], list[str], dict]:
        cfg = self.config
        eval_norm = {_norm(p) for p in ctx.eval_prompts}
        pool: list[str] = []
        seen: set[str] = set()
        for p in ctx.anchor_pool:
            k = _norm(p)
            if k and k not in seen and k not in eval_norm:
                seen.add(k)
                pool.append(p)
        dropped = len({_norm(p) for p in ctx.anchor_pool} & eval_norm)
        key = {
            "pool": _digest(pool),
            "eval": _digest(sorted(eval_norm)),
            "template": ctx.template,
            "seed": int(ctx.seed),
            "n_anchor": cfg.n_anchor,
            "max_new_tokens_anchor_check": cfg.max_new_tokens_anchor_check,
            "max_length": int(ctx.max_length),
            "judge": "keyword" if self.refusal_fn is None else "custom",
        }
        if store is not None and store.exists(ANCHORS, key):
            _, meta = store.load(ANCHORS, key)
            self.stats["loaded"].append(ANCHORS)
            return list(meta["anchors"]), list(meta["answers"]), key
        if not pool:
            raise SafeFTError(
                "CWAC: the anchor pool is empty (no harmful prompts outside the evaluation set); "
                "provide refusal pairs / harmful prompts for anchors"
            )
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(ctx.seed))).tolist()
        pool = [pool[i] for i in order]
        anchors: list[str] = []
        answers: list[str] = []
        checked = 0
        t0 = time.perf_counter()
        with _theta0(m):
            for start in range(0, len(pool), 64):
                chunk = pool[start : start + 64]
                outs = self._answers(m, ctx, chunk, cfg.max_new_tokens_anchor_check)
                checked += len(chunk)
                for p, a in zip(chunk, outs):
                    if self._is_refusal(a) and len(anchors) < cfg.n_anchor:
                        anchors.append(p)
                        answers.append(a)
                if len(anchors) >= cfg.n_anchor:
                    break
        self.timings["anchor_seconds"] = time.perf_counter() - t0
        if not anchors:
            raise SafeFTError(
                f"CWAC: θ₀ refused none of the {checked} anchor candidates (keyword judge on its greedy answers); "
                f"this model is not safety-aligned enough to anchor: align it first (`safeft align`) or pass another model"
            )
        if len(anchors) < 4:
            raise SafeFTError(
                f"CWAC: θ₀ refused only {len(anchors)} of {checked} anchor candidates; at least 4 are needed "
                f"(subspace / SAE / scoring / baseline sets): give a larger anchor pool"
            )
        meta = {
            "anchors": anchors,
            "answers": answers,
            "checked": checked,
            "refused": len(anchors),
            "refusal_rate": len(anchors) / max(1, checked),
            "dropped_eval_overlap": dropped,
        }
        self.stats["computed"].append(ANCHORS)
        if store is not None:
            store.save(ANCHORS, {"refused": torch.tensor([len(anchors)])}, meta=meta, config=key)
        return anchors, answers, key

    # -- tokenisation
    def _prompt_ids(self, ctx: DefenseContext, prompts: list[str]) -> list[list[int]]:
        from safeft.data import format_prompt

        out = []
        for p in prompts:
            text = format_prompt(ctx.tokenizer, p, ctx.template)
            out.append(list(ctx.tokenizer(text, add_special_tokens=False)["input_ids"])[: ctx.max_length])
        return out

    def _batches(self, seqs: list[list[int]], pad_id: int, dev: torch.device, bs: int = 8):
        for i in range(0, len(seqs), bs):
            ids, lengths = _pad_right(seqs[i : i + bs], pad_id)
            yield {"input_ids": ids.to(dev), "attention_mask": _mask(lengths, ids.shape[1]).to(dev)}, lengths

    def _pad_id(self, ctx: DefenseContext) -> int:
        t = ctx.tokenizer
        return int(t.pad_token_id if t.pad_token_id is not None else t.eos_token_id)

    # -- weight constraint
    def _subspace(self, m, layers, modules, anchors, answers, idx, ctx, store, akey):
        cfg = self.config
        key = {
            **akey,
            "part": "subspace",
            "modules": sorted(modules),
            "energy": cfg.energy,
            "split": list(_SPLIT),
        }
        if store is not None and store.exists(SUBSPACE, key):
            tensors, meta = store.load(SUBSPACE, key)
            self.stats["loaded"].append(SUBSPACE)
            return {k[2:]: v for k, v in tensors.items() if k.startswith("V.")}, meta
        from safeft.data import Example, tokenize_example

        t0 = time.perf_counter()
        seqs = [
            tokenize_example(
                ctx.tokenizer, Example(anchors[i], answers[i], kind="refusal"), ctx.template, ctx.max_length
            )["input_ids"]
            for i in idx
        ]
        dev = _device(m)
        pad = self._pad_id(ctx)
        deepest = max(int(k.split(".", 1)[0]) for k in modules)
        names = sorted(modules)
        Vs: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        # group modules so that their float64 covariances fit the budget; one pass over the data per group
        groups: list[list[str]] = [[]]
        used = 0
        for nme in names:
            d_in = self._d_in(modules[nme])
            size = d_in * d_in * 8
            if groups[-1] and used + size > _COV_BUDGET_BYTES:
                groups.append([])
                used = 0
            groups[-1].append(nme)
            used += size
        tokens = 0
        with _theta0(m):
            for group in groups:
                batches = (b for b, _ in self._batches(seqs, pad, dev))
                accs = capture_module_inputs(
                    m, {k: modules[k] for k in group}, batches, stop_after_layer=deepest
                )
                for k in group:
                    acc = accs.get(k)
                    if acc is None or acc.count == 0:
                        raise SafeFTError(f"CWAC: module {k} received no inputs while capturing the subspace")
                    V = top_energy_basis(acc.cov, cfg.energy).float().cpu()
                    Vs[k] = V
                    ranks[k] = int(V.shape[1])
                    tokens = acc.count
                del accs
        meta = {
            "ranks": ranks,
            "d_in": {k: int(v.shape[0]) for k, v in Vs.items()},
            "tokens": tokens,
            "seconds": round(time.perf_counter() - t0, 3),
            "energy": cfg.energy,
        }
        self.stats["computed"].append(SUBSPACE)
        if store is not None:
            store.save(SUBSPACE, {f"V.{k}": v for k, v in Vs.items()}, meta=meta, config=key)
        return Vs, meta

    @staticmethod
    def _d_in(mod: nn.Module) -> int:
        base = getattr(mod, "base_layer", mod)
        if hasattr(base, "in_features"):
            return int(base.in_features)
        return int(base.weight.shape[1])

    # -- activation constraint
    def _residual_rows(self, m, seqs, layer, pad, dev, skip_first: bool = True) -> torch.Tensor:
        """Residual-stream rows ``[N_tokens, d]`` (float32, cpu) at every real token (minus position 0)."""
        rows = []
        for batch, _ in self._batches(seqs, pad, dev):
            h = run_to_layer(m, batch["input_ids"], batch["attention_mask"], layer).float()
            keep = batch["attention_mask"].bool().clone()
            if skip_first:
                keep[:, 0] = False  # the first token's residual is an outlier (attention sink): leave it out
            rows.append(h[keep].cpu())
        return torch.cat(rows) if rows else torch.zeros(0, 0)

    def _sae_artifacts(self, m, layers, sae_layer, anchors, splits, ctx, store, akey) -> dict[str, Any]:
        cfg = self.config
        harmless = list(dict.fromkeys(p for p in ctx.harmless_pool if _norm(p)))
        if not harmless:
            raise SafeFTError(
                "CWAC activation constraint: ctx.harmless_pool is empty; it needs harmless prompts "
                "to train the SAE and rank safety latents"
            )
        half = max(1, len(harmless) // 2)
        harm_sae, harm_score = harmless[:half], (harmless[half:] or harmless[:half])
        key = {
            **akey,
            "part": "sae",
            "sae_layer": sae_layer,
            "sae_path": cfg.sae_path,
            "sae_width_factor": cfg.sae_width_factor,
            "sae_k": cfg.sae_k,
            "sae_steps": cfg.sae_steps,
            "n_features": cfg.n_features,
            "n_positions": cfg.n_positions,
            "benign_fraction": cfg.benign_fraction,
            "harmless": _digest(harmless),
            "causal_check": cfg.causal_check,
            "split": list(_SPLIT),
        }
        dev = _device(m)
        hidden = int(getattr(getattr(m, "config", None), "hidden_size", 0) or 0)
        if store is not None and store.exists(SAE, key):
            tensors, meta = store.load(SAE, key)
            self.stats["loaded"].append(SAE)
            sae = TopKSAE(meta["d_in"], meta["d_sae"], meta["k"], architecture=meta["architecture"])
            sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
            self._set_activation_state(
                sae,
                tensors["features"],
                tensors["baseline_ids"],
                tensors["baseline_lengths"],
                tensors["z_base"],
                dev,
            )
            return meta
        t0 = time.perf_counter()
        pad = self._pad_id(ctx)
        meta: dict[str, Any] = {}
        with _theta0(m):
            if cfg.sae_path:
                sae = load_sae(cfg.sae_path)
                if hidden:
                    check_sae_fits(sae, hidden, source=f"defense.cwac.sae_path={cfg.sae_path}")
                meta["sae_source"] = cfg.sae_path
                sae = sae.to(dev)
            else:
                x_anchor = self._residual_rows(
                    m, self._prompt_ids(ctx, [anchors[i] for i in splits["sae"]]), sae_layer, pad, dev
                )
                x_benign = self._residual_rows(m, self._prompt_ids(ctx, harm_sae), sae_layer, pad, dev)
                bf = cfg.benign_fraction
                want = round(x_anchor.shape[0] * bf / (1 - bf)) if bf > 0 else 0
                if want < x_benign.shape[0]:
                    sel = torch.randperm(
                        x_benign.shape[0], generator=torch.Generator().manual_seed(int(ctx.seed))
                    )
                    x_benign = x_benign[sel[:want]]
                x = torch.cat([x_anchor, x_benign])
                d = x.shape[1]
                if hidden:
                    check_sae_fits(TopKSAE(d, 1, 1), hidden, source="residual capture")
                sae, st = train_sae(
                    x,
                    d_sae=cfg.sae_width_factor * d,
                    k=min(cfg.sae_k, cfg.sae_width_factor * d),
                    steps=cfg.sae_steps,
                    lr=1e-3,
                    batch_size=1024,
                    seed=int(ctx.seed),
                    device=dev,
                )
                meta.update(
                    {
                        "sae_source": "trained",
                        "sae_tokens": int(x.shape[0]),
                        "sae_tokens_anchor": int(x_anchor.shape[0]),
                        "sae_tokens_benign": int(x_benign.shape[0]),
                        **{f"sae_{k}": float(v) for k, v in st.items()},
                    }
                )
            sae.eval().requires_grad_(False)
            # safety latents: mean activation on anchors − on harmless prompts, over prompt positions
            za = self._mean_code(
                m, sae, self._prompt_ids(ctx, [anchors[i] for i in splits["score"]]), sae_layer, pad, dev
            )
            zh = self._mean_code(m, sae, self._prompt_ids(ctx, harm_score), sae_layer, pad, dev)
            diff = za - zh
            n_feat = min(cfg.n_features, sae.d_sae)
            features = diff.topk(n_feat).indices.sort().values.cpu()
            # baselines at the last n_positions prompt positions of held-out anchors
            base_seqs = self._prompt_ids(ctx, [anchors[i] for i in splits["baseline"]])
            base_ids, base_len = _pad_right(base_seqs, pad)
            zb = []
            for i in range(0, base_ids.shape[0], 8):
                ids, lengths = base_ids[i : i + 8], base_len[i : i + 8]
                width = int(lengths.max())
                h = run_to_layer(m, ids[:, :width].to(dev), _mask(lengths, width).to(dev), sae_layer)
                pos = _last_positions(lengths, cfg.n_positions).to(dev)
                hs = torch.gather(h, 1, pos[..., None].expand(-1, -1, h.shape[-1])).float()
                zb.append(sae.encode(hs)[..., features.to(dev)].cpu())
            z_base = torch.cat(zb)
            meta.update(
                {
                    "d_in": sae.d_in,
                    "d_sae": sae.d_sae,
                    "k": sae.k,
                    "architecture": sae.architecture,
                    "sae_layer": sae_layer,
                    "n_features": n_feat,
                    "baselines": int(base_ids.shape[0]),
                    "feature_score_top": float(diff[features.to(diff.device)].max()),
                    "feature_score_mean": float(diff[features.to(diff.device)].mean()),
                    "z_base_mean_norm": float(z_base.flatten(1).norm(dim=1).mean()),
                }
            )
        if cfg.causal_check:
            meta["causal_check"] = self._causal_check(
                m, layers, sae_layer, sae, features, [anchors[i] for i in splits["score"]], ctx
            )
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        self.stats["computed"].append(SAE)
        if store is not None:
            tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
            tensors.update(
                {
                    "features": features,
                    "baseline_ids": base_ids,
                    "baseline_lengths": base_len,
                    "z_base": z_base,
                }
            )
            path = store.save(SAE, tensors, meta=meta, config=key)
            save_sae(sae, path / "sae_lens", hook_layer=sae_layer)  # reusable as defense.cwac.sae_path
        self._set_activation_state(sae, features, base_ids, base_len, z_base, dev)
        return meta

    @torch.no_grad()
    def _mean_code(self, m, sae, seqs, layer, pad, dev) -> torch.Tensor:
        total = torch.zeros(sae.d_sae, dtype=torch.float64, device=dev)
        count = 0
        for batch, _ in self._batches(seqs, pad, dev):
            h = run_to_layer(m, batch["input_ids"], batch["attention_mask"], layer).float()
            keep = batch["attention_mask"].bool().clone()
            keep[:, 0] = False
            z = sae.encode(h[keep])
            total += z.double().sum(0)
            count += z.shape[0]
        return (total / max(1, count)).float()

    def _causal_check(self, m, layers, sae_layer, sae, features, prompts, ctx) -> dict[str, Any]:
        prompts = prompts[:64]
        n_tok = self.config.max_new_tokens_anchor_check
        with _theta0(m):
            plain = [self._is_refusal(a) for a in self._answers(m, ctx, prompts, n_tok)]
            handle = layers[sae_layer].register_forward_hook(
                ablate_latents_hook(sae, features.to(_device(m)))
            )
            try:
                ablated = [self._is_refusal(a) for a in self._answers(m, ctx, prompts, n_tok)]
            finally:
                handle.remove()
        out = {
            "prompts": len(prompts),
            "refusal_rate": sum(plain) / max(1, len(plain)),
            "refusal_rate_ablated": sum(ablated) / max(1, len(ablated)),
        }
        self.log(
            f"CWAC causal check on {len(prompts)} held-out anchors: θ₀ refusal rate {out['refusal_rate']:.2%}, "
            f"with the {len(features)} safety latents ablated {out['refusal_rate_ablated']:.2%}"
        )
        return out

    def _set_activation_state(self, sae, features, base_ids, base_len, z_base, dev) -> None:
        self._sae = sae.to(dev).eval().requires_grad_(False)
        self._features = features.long().to(dev)
        self._base_ids = base_ids.long().cpu()
        self._base_len = base_len.long().cpu()
        self._z_base = z_base.float().to(dev)

    # -- install the weight constraint
    @torch.no_grad()
    def _install(
        self, m: nn.Module, modules: dict[str, nn.Module], Vs: dict[str, torch.Tensor], use_lora: bool
    ):
        self._lora, self._full, self._lora_modules = [], [], {}
        for name, mod in modules.items():
            V = Vs[name]
            if use_lora:
                self._lora_modules[name] = mod
                for adapter in mod.lora_A:
                    A = mod.lora_A[adapter].weight  # [r, d_in]
                    Vd = V.to(device=A.device, dtype=torch.float32)
                    self._lora.append((name, A, Vd))
            else:
                W = mod.weight  # [d_out, d_in]
                self._full.append((name, W, W.detach().clone(), V.to(device=W.device, dtype=torch.float32)))
        self.after_step(m)  # LoRA: project A once now (B = 0, so θ is unchanged); full FT: a no-op at step 0

    def _print_summary(self, s: dict[str, Any]) -> None:
        parts = [f"CWAC: {s['anchors']} anchors (splits {s['splits']})"]
        if "subspace" in s:
            ranks = s["subspace"]["ranks"]
            dims = s["subspace"]["d_in"]
            shown = ", ".join(f"{k}: {ranks[k]}/{dims[k]}" for k in list(ranks)[:6])
            parts.append(
                f"subspace ranks kept ({len(ranks)} modules, energy {self.config.energy}): {shown}"
                f"{' ...' if len(ranks) > 6 else ''}"
            )
        if "sae" in s:
            sm = s["sae"]
            ev = sm.get("sae_explained_variance")
            parts.append(
                f"SAE layer {sm['sae_layer']} ({sm['d_in']}→{sm['d_sae']}, k={sm['k']}, {sm.get('sae_source')})"
                + (
                    f", explained variance {ev:.3f}, dead {sm['sae_dead_fraction']:.1%}"
                    if ev is not None
                    else ""
                )
                + f"; {sm['n_features']} safety latents, {sm['baselines']} baselines"
            )
        parts.append(
            f"cache: computed {self.stats['computed']}, loaded {self.stats['loaded']}; "
            f"{s['prepare_seconds']:.1f}s"
        )
        for p in parts:
            self.log(p)


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
