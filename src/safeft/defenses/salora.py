"""SaLoRA: a fixed safety module on the LoRA branch plus a task-specific LoRA initialisation (Li et al.,
"SaLoRA: Safety-Alignment Preserved Low-Rank Adaptation", ICLR 2025, arXiv 2501.01765; authors' code
homles11/SaLoRA, ``lora_train_act.py`` and the ``lora_C`` of its peft fork's ``tuners/lora/layer.py``).

Per LoRA-targeted module y = W₀ x (``W₀ [d_out, d_in]``, scaling s = α/r):

1. Safety module. V_s ``[d_out, r_s]`` = top-r_s right singular vectors of θ₀'s output features X W₀ᵀ on the
   response tokens of (harmful prompt, safety response) pairs; C = I − V_s V_sᵀ, fixed for the whole run.
2. Task-specific initialisation. V_t ``[d_out, r_t]`` = the same on the task data; W₀ ≈ U S Qᵀ (top-r SVD);
   B₀ = V_t V_tᵀ U √(S/s), A₀ = √(S/s) Qᵀ; the LoRA starts at B = B₀, A = A₀.
3. Forward: y = W₀ x + s·C(B A x) − s·C B₀ A₀ x. At the start y = W₀ x exactly (θ₀), and every LoRA-branch output
   lies in range(C): it has no component along the safety features, whatever B and A become.

The authors subtract s·C B₀ A₀ from the base weight (W_res); we keep W₀ untouched and subtract the same frozen term
in a forward hook on the LoRA layer, so ``disable_adapter()`` is still exactly θ₀ (PACT's teacher, CWAC's capture,
the monitor rely on that). C is applied by a forward hook on ``lora_B`` (u ↦ u − V_s(V_sᵀu): never a d_out² matrix).

``finalize`` folds everything into a plain peft LoRA on θ₀ of rank 2r (r without the task initialisation):
B' = (s/s')·C[B, −B₀], A' = [A; A₀], so (α/r')·B'A' = s·C(BA − B₀A₀) exactly and the saved adapter, loaded on θ₀
with ``PeftModel.from_pretrained``, reproduces the trained model. Checkpoints written during training hold the raw
A and B (resume recomputes nothing: the fixed tensors travel in the defense state).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from safeft.defenses._alignment_matrix import active_adapter, base_weight, lora_factors, lora_modules
from safeft.defenses._salora_features import module_output_subspaces, response_batches, seeded_svd_lowrank
from safeft.defenses.base import (
    Defense,
    DefenseConfig,
    DefenseContext,
    check_int,
    config_error,
    register_defense,
    unwrap_model,
)
from safeft.errors import SafeFTError

log = logging.getLogger(__name__)

ARTIFACT = "salora-safety"
ARTIFACT_VERSION = 1
# the authors' get_loaders(seed=0); fixed, so the cached safety module is shared across run seeds
SAFETY_SAMPLE_SEED = 0


@dataclass
class SaLoRAConfig(DefenseConfig):
    """safety_rank r_s ≥ 1 (authors ``--rs 32``), below every targeted module's output width; task_rank r_t ≥ 1
    (authors ``--ds 32``; clipped to d_out); n_safety / n_task ≥ 1: (harmful prompt, safety response) pairs and task
    examples whose response tokens give the features (authors 128 each); task_init: the task-specific
    initialisation (false: peft's default init, the safety module only); niter ≥ 0: power iterations of
    ``svd_lowrank`` (authors 30); batch_size ≥ 1: examples per capture forward."""

    safety_rank: int = 32
    task_rank: int = 32
    n_safety: int = 128
    n_task: int = 128
    task_init: bool = True
    niter: int = 30
    batch_size: int = 8

    def __post_init__(self) -> None:
        for f in ("safety_rank", "task_rank", "n_safety", "n_task", "batch_size"):
            check_int("salora", f, getattr(self, f), 1)
        check_int("salora", "niter", self.niter, 0)
        if not isinstance(self.task_init, bool):
            raise config_error("salora", "task_init", self.task_init, "true or false")


@dataclass
class _Fixed:
    """The frozen parts of one module (float32, on the module's device): V_s ``[d_out, r_s]``; A₀ ``[r, d_in]`` and
    C B₀ ``[d_out, r]`` (None without the task initialisation)."""

    v: torch.Tensor
    a0: torch.Tensor | None = None
    b0c: torch.Tensor | None = None


def project_out(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """C u = u − V(Vᵀu) along the last dimension of ``u`` (``[..., d_out]``), V ``[d_out, k]`` orthonormal; maths in
    float32 (float64 for float64 u), returned in u's dtype."""
    wd = torch.float64 if u.dtype == torch.float64 else torch.float32
    x = u.to(wd)
    vv = v.to(device=u.device, dtype=wd)
    return (x - (x @ vv) @ vv.T).to(u.dtype)


@register_defense
class SaLoRA(Defense):
    name = "salora"
    config_class = SaLoRAConfig
    paper = "SaLoRA: Safety-Alignment Preserved Low-Rank Adaptation (Li et al., ICLR 2025, arXiv 2501.01765)"
    artifacts = (
        "V_s per LoRA-targeted module (float32, d_out × safety_rank), from θ₀'s output features on the response "
        "tokens of refusal pairs; cached as 'salora-safety'. The task initialisation is computed per run"
    )
    requires_lora = True
    needs_full_params = True  # finalize rewrites the LoRA factors whole (rank 2r): no sharded backend
    incompatible_with = ("safelora", "asft", "cwac", "cwac-weight")

    @classmethod
    def incompatible_with_reason(cls, other: str) -> str:
        return f"changes the LoRA update to (α/r)·C(BA − B₀A₀), which {other} would read or rewrite as B A"

    def __init__(self, config: SaLoRAConfig | None = None):
        super().__init__(config)
        self.fixed: dict[str, _Fixed] = {}
        self._modules: dict[str, nn.Module] = {}
        self._handles: list[Any] = []
        self._task_examples: Any = []  # Examples (pipeline) or tokenised rows (TRL)
        self._task_collate: Any = None  # None: ctx.collate (Examples)
        self._pending_state: dict[str, torch.Tensor] = {}
        self.folded = False

    # ---- data --------------------------------------------------------------------------------------------------
    def modify_dataset(self, examples: list[Any], ctx: DefenseContext) -> list[Any]:
        """Keep the user's training data (unchanged) for the task-specific initialisation."""
        self._task_examples = list(examples)
        self._task_collate = None
        return examples

    def use_tokenised_data(self, rows: Any, collate: Any) -> None:
        """Under TRL: its tokenised training rows and collator, for the task-specific initialisation."""
        if self.config.task_init and not hasattr(rows, "__len__"):
            raise SafeFTError("defense 'salora': its task-aware initialisation samples rows from the training "
                              "dataset, which has no length (a streaming / IterableDataset); pass a map-style "
                              "dataset or set defense.salora.task_init: false")
        self._task_examples = rows
        self._task_collate = collate

    def _safety_pairs(self, ctx: DefenseContext) -> list[tuple[str, str]]:
        from safeft.data import normalize_text

        held = {normalize_text(p) for p in list(ctx.eval_prompts) + list(ctx.poison_prompts)}
        pairs = [(str(p), str(r)) for p, r in ctx.refusal_pairs if normalize_text(str(p)) not in held]
        if not pairs:
            raise SafeFTError(
                "defense 'salora' needs (harmful prompt, safety response) pairs for its safety module; none were "
                "given (DefenseContext.refusal_pairs)"
            )
        n = min(self.config.n_safety, len(pairs))
        return random.Random(SAFETY_SAMPLE_SEED).sample(pairs, n)

    # ---- prepare -----------------------------------------------------------------------------------------------
    def _check_model(self, model: nn.Module, ctx: DefenseContext) -> tuple[nn.Module, dict[str, nn.Module]]:
        Defense.prepare(self, model, ctx)  # LoRA only
        m = unwrap_model(model)
        if not hasattr(m, "peft_config"):
            raise SafeFTError("defense 'salora' needs the peft-wrapped LoRA model (training.method: lora)")
        mods = lora_modules(m)
        if not mods:
            raise SafeFTError("defense 'salora': the model has no LoRA layers; set training.lora_targets")
        pc = m.peft_config[active_adapter(next(iter(mods.values())))]
        if getattr(pc, "rank_pattern", None) or getattr(pc, "alpha_pattern", None):
            raise SafeFTError(
                "defense 'salora' needs one LoRA rank and alpha for every module (no rank_pattern)"
            )
        for name, mod in mods.items():
            a = active_adapter(mod)
            if getattr(mod, "use_dora", {}).get(a) or a in getattr(mod, "lora_variant", {}):
                raise SafeFTError(
                    f"defense 'salora' works on plain LoRA only; {name} uses a LoRA variant (DoRA)"
                )
            d_out, d_in = base_weight(mod).shape
            if self.config.safety_rank >= d_out:
                raise config_error(
                    "salora",
                    "safety_rank",
                    self.config.safety_rank,
                    f"below the output width of every LoRA module ({d_out} for {name})",
                )
            r = lora_factors(mod)[1].shape[0]
            if self.config.task_init and r > min(d_out, d_in):
                raise SafeFTError(
                    f"defense 'salora': LoRA rank {r} exceeds min(d_out, d_in) = {min(d_out, d_in)} of {name}; "
                    f"lower training.lora_r"
                )
        return m, mods

    def _artifact_key(self, ctx: DefenseContext, pairs: list, mods: dict[str, nn.Module]) -> dict[str, Any]:
        from safeft.defenses.pact import _tokenizer_id

        c = self.config
        return {
            "version": ARTIFACT_VERSION,
            "safety_rank": c.safety_rank,
            "niter": c.niter,
            "template": ctx.template,
            "max_length": ctx.max_length,
            "pairs_sha256": hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest(),
            "tokenizer": _tokenizer_id(ctx.tokenizer) if ctx.tokenizer is not None else None,
            "modules": {n: list(base_weight(m).shape) for n, m in sorted(mods.items())},
        }

    def _safety_subspaces(
        self, m: nn.Module, mods: dict[str, nn.Module], ctx: DefenseContext
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Load or compute V_s for every module (float32, cpu)."""
        from safeft.data import Example

        if ctx.collate is None:
            raise SafeFTError(
                "defense 'salora': the pipeline gave no collate function (DefenseContext.collate)"
            )
        pairs = self._safety_pairs(ctx)
        key = self._artifact_key(ctx, pairs, mods)
        store = None
        if ctx.artifacts_dir is not None:
            from safeft.artifacts import ArtifactStore

            store = ArtifactStore(ctx.artifacts_dir, ctx.fingerprint)
        if store is not None and store.exists(ARTIFACT, key):
            tensors, meta = store.load(ARTIFACT, key)
            return {n: tensors[n] for n in mods}, {**meta, "cached": True}
        batches = response_batches(
            ctx.collate, [Example(p, r, kind="refusal") for p, r in pairs], self.config.batch_size
        )
        weights = {n: base_weight(mod) for n, mod in mods.items()}
        vs, rows = module_output_subspaces(
            m,
            mods,
            weights,
            batches,
            {n: self.config.safety_rank for n in mods},
            niter=self.config.niter,
            seed=SAFETY_SAMPLE_SEED,
            what="safety pairs",
        )
        vs = {n: v.cpu() for n, v in vs.items()}
        meta = {"pairs": len(pairs), "rows": rows}
        if store is not None:
            store.save(ARTIFACT, vs, meta=meta, config=key)
        return vs, {**meta, "cached": False}

    def prepare_artifacts(self, model: nn.Module, ctx: DefenseContext) -> dict[str, Any]:
        """``safeft prepare``: compute and cache the safety module only (the task initialisation needs the run's
        data)."""
        m, mods = self._check_model(model, ctx)
        vs, meta = self._safety_subspaces(m, mods, ctx)
        return {"modules": len(vs), **meta}

    @torch.no_grad()
    def _task_init(self, m: nn.Module, mods: dict[str, nn.Module], ctx: DefenseContext) -> dict[str, Any]:
        """Set every LoRA's A, B to the task-specific A₀, B₀ and keep A₀ and C B₀ frozen."""
        if not len(self._task_examples):
            raise SafeFTError(
                "defense 'salora' needs the task data for its task-specific initialisation (passed through "
                "modify_dataset by the pipeline); set defense.salora.task_init: false to train without it"
            )
        data, n = self._task_examples, len(self._task_examples)
        idx = range(n) if n <= self.config.n_task else random.Random(ctx.seed).sample(range(n), self.config.n_task)
        exs = [data[i] for i in idx]
        batches = response_batches(self._task_collate or ctx.collate, exs, self.config.batch_size)
        weights = {n: base_weight(mod) for n, mod in mods.items()}
        n_rows = int(sum(int(b["select"].sum()) for b in batches))
        ranks = {n: min(self.config.task_rank, int(w.shape[0]), n_rows) for n, w in weights.items()}
        vt, _ = module_output_subspaces(
            m, mods, weights, batches, ranks, niter=self.config.niter, seed=ctx.seed, what="task examples"
        )
        for i, (name, mod) in enumerate(sorted(mods.items())):
            b, a, s = lora_factors(mod)
            w = weights[name].detach().float()
            u, sv, q = seeded_svd_lowrank(w, a.shape[0], self.config.niter, ctx.seed + i)
            root = (sv / s).clamp_min(0).sqrt()
            v = vt[name]
            b0 = u * root  # U √(S/s)   [d_out, r]
            b0 = v @ (v.T @ b0)  # onto the task features
            a0 = root[:, None] * q.T  # √(S/s) Qᵀ   [r, d_in]
            b.copy_(b0.to(device=b.device, dtype=b.dtype))
            a.copy_(a0.to(device=a.device, dtype=a.dtype))
            f = self.fixed[name]
            f.a0 = a.detach().float().clone()  # the values the parameters hold (after any dtype rounding)
            f.b0c = project_out(b.detach().float().T, f.v).T.contiguous()  # C B₀
        return {"task_examples": len(exs), "task_rows": n_rows, "task_rank": max(ranks.values())}

    def prepare(self, model: nn.Module, ctx: DefenseContext) -> dict[str, Any]:
        """Safety module (cached), task-specific init, forward hooks. Fails before any work on full fine-tuning, a
        model without plain LoRA layers, or a safety_rank ≥ some module's output width."""
        self._remove_hooks()
        m, mods = self._check_model(model, ctx)
        vs, meta = self._safety_subspaces(m, mods, ctx)
        self._modules = mods
        self.fixed = {n: _Fixed(v=vs[n].to(lora_factors(mods[n])[0].device)) for n in sorted(mods)}
        summary: dict[str, Any] = {"modules": len(mods), "safety_rank": self.config.safety_rank, **meta}
        if self.config.task_init:
            summary.update(self._task_init(m, mods, ctx))
        if self._pending_state:
            self.load_state_dict(self._pending_state)
        self._install_hooks()
        return summary

    def on_train_begin(self, model: nn.Module, backend: str | None) -> None:
        """Multi-process (DDP): every rank takes rank 0's fixed tensors, as DDP gives every rank rank 0's A and B,
        so that the ranks train one function even if their decompositions differed in the last bits."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for f in self.fixed.values():
            for t in (f.v, f.a0, f.b0c):
                if t is not None:
                    dist.broadcast(t, src=0)

    # ---- forward -----------------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        for name, mod in self._modules.items():
            adapter = active_adapter(mod)
            self._handles.append(mod.lora_B[adapter].register_forward_hook(self._project_hook(name)))
            if self.fixed[name].a0 is not None:
                hook = self._init_term_hook(name, adapter)
                self._handles.append(mod.register_forward_hook(hook, with_kwargs=True))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _project_hook(self, name: str):
        def hook(_mod: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
            return project_out(out, self.fixed[name].v)  # C (B A x): the LoRA branch loses its V_s part

        return hook

    def _init_term_hook(self, name: str, adapter: str):
        def hook(mod: nn.Module, args: Any, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
            if mod.disable_adapters or mod.merged or adapter not in mod.active_adapters:
                return out
            f = self.fixed[name]
            x = (args[0] if args else kwargs["x"]).to(f.a0.dtype)
            term = ((x @ f.a0.T) @ f.b0c.T) * mod.scaling[adapter]  # s · C B₀ A₀ x
            return out - term.to(out.dtype)

        return hook

    # ---- after training ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self, model: nn.Module) -> dict[str, Any]:
        """Fold C and the frozen init term into a plain LoRA on θ₀ (rank 2r with the task init, r without); remove
        the hooks. Returns the new rank and the largest relative leak ‖V_sᵀB'‖/‖B'‖ over modules (≈ 0)."""
        if not self.fixed:
            raise SafeFTError("defense salora: prepare() was not called before finalize()")
        if self.folded:
            return {}
        self._remove_hooks()
        m = unwrap_model(model)
        mods = lora_modules(m)
        leak = 0.0
        new_r = None
        for name, f in self.fixed.items():
            if name not in mods:
                raise SafeFTError(f"defense salora: LoRA module {name!r} disappeared after prepare()")
            mod = mods[name]
            adapter = active_adapter(mod)
            b, a, s = lora_factors(mod)
            if f.a0 is None:
                new_b, new_a, r2 = project_out(b.float().T, f.v).T, a.float(), a.shape[0]
            else:
                new_b = torch.cat([project_out(b.float().T, f.v).T, -f.b0c.to(b.device)], dim=1)
                new_a = torch.cat([a.float(), f.a0.to(a.device)], dim=0)
                r2 = 2 * a.shape[0]
            pc = m.peft_config[adapter]
            alpha = mod.lora_alpha[adapter]
            s2 = alpha / (r2**0.5) if getattr(pc, "use_rslora", False) else alpha / r2
            new_b = new_b * (s / s2)
            if r2 != a.shape[0]:
                lin_a = nn.Linear(new_a.shape[1], r2, bias=False, device=a.device, dtype=a.dtype)
                lin_b = nn.Linear(r2, new_b.shape[0], bias=False, device=b.device, dtype=b.dtype)
                mod.lora_A[adapter] = lin_a
                mod.lora_B[adapter] = lin_b
                mod.r[adapter] = r2
                mod.scaling[adapter] = s2
            b, a, _ = lora_factors(mod)
            a.copy_(new_a.to(a.dtype))
            b.copy_(new_b.to(b.dtype))
            leak = max(leak, float((f.v.T @ b.float()).norm() / b.float().norm().clamp_min(1e-30)))
            new_r = r2
        m.peft_config[adapter].r = new_r  # one adapter, one rank (checked at prepare)
        self.folded = True
        return {"lora_rank_saved": new_r, "salora_max_relative_leak": leak, "modules": len(self.fixed)}

    # ---- resume ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fixed tensors (V_s, A₀, C B₀) per module: a resumed run uses exactly the same ones."""
        out = {}
        for n, f in self.fixed.items():
            out[f"{n}.v"] = f.v
            if f.a0 is not None:
                out[f"{n}.a0"] = f.a0
                out[f"{n}.b0c"] = f.b0c
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        if not self.fixed:  # before prepare: applied at the end of prepare
            self._pending_state = dict(state)
            return
        for n, f in self.fixed.items():
            if f"{n}.v" not in state:
                raise SafeFTError(
                    f"defense salora: the checkpoint's defense state has no safety module for {n}"
                )
            if (f.a0 is None) != (f"{n}.a0" not in state):
                raise SafeFTError(
                    "defense salora: the checkpoint was trained with another task_init setting; resume with the "
                    "run's own settings"
                )
            dev = f.v.device
            f.v = state[f"{n}.v"].to(dev)
            if f"{n}.a0" in state:
                f.a0 = state[f"{n}.a0"].to(dev)
                f.b0c = state[f"{n}.b0c"].to(dev)
        self._pending_state = {}
