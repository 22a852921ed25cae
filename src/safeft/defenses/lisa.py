"""Lisa: lazy safety alignment by alternating alignment and user-data phases with a proximal term (Huang et al.,
"Lisa: Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning Attack", NeurIPS 2024,
arXiv 2405.18641).

Training alternates ``align_steps`` optimizer steps on alignment data (harmful prompt → refusal, benign
instructions: ``ctx.alignment_examples``) with ``user_steps`` steps on the user's data, starting with alignment.
Every step adds the proximal term

    ρ/2 · Σ_trainable ‖w − w_other‖²

where w_other is the snapshot of the trainable weights taken at the last phase switch (the end of the other phase;
before the first switch, the weights at the start). Right after a switch the term is 0; its gradient ρ(w − w_other)
pulls the weights back toward the other phase's state. As in the authors' code the term is off during a warm-up:
it is on at the 0-based optimizer step s only when s > ``proximal_warmup_fraction`` × (the run's total optimizer
steps), 10% by default (git-disl/Lisa ``trainer.py``, ``LisaTrainer.training_step``); the total is given by the
trainer at train begin (``set_total_steps``). ``transform_batch`` swaps in an alignment batch (cycled
through a seeded shuffle, reshuffled every pass) during alignment phases; ``after_step`` counts steps and switches.
The snapshot costs one copy of the trainable weights (small for LoRA, the model's size for full fine-tuning).

Sharded parameters: under FSDP2 the snapshot is kept as the same row shards as the parameters (taken again from the
wrapped model in ``on_train_begin``), the proximal term is a DTensor sum (one all-reduce of a scalar per tensor) and
checkpoints gather it. DeepSpeed ZeRO-3 is refused: the proximal term reads the trainable tensors outside any
module's forward, where ZeRO-3 holds only empty partitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from safeft.components.sharding import distribute_like, full_tensor, is_dtensor
from safeft.defenses.base import (
    Defense,
    DefenseConfig,
    DefenseContext,
    check_int,
    check_number,
    register_defense,
    unwrap_model,
)
from safeft.errors import SafeFTError

ALIGN, USER = "align", "user"
# The authors switch the proximal term on only after 10% of all steps (git-disl/Lisa trainer.py,
# LisaTrainer.training_step: `if self.steps > 0.1 * len(self.get_train_dataloader()) * self.args.num_train_epochs`;
# their comment: the term hurts convergence early on, seen on GSM8K).
DEFAULT_PROXIMAL_WARMUP_FRACTION = 0.1


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class LisaConfig(DefenseConfig):
    """align_steps ≥ 1 / user_steps ≥ 1: phase lengths in optimizer steps (authors 100 / 900; scale both down for
    short runs so that several cycles happen). rho ≥ 0: proximal weight ρ (authors 1). The proximal warm-up, one
    of: proximal_warmup_fraction ∈ [0, 1], the term is on at 0-based step s only when s > fraction × total optimizer
    steps (authors: 0.1, the default when neither is set); proximal_start_step ≥ 0, on from that step on (0 = from
    the start). batch_size ≥ 1: alignment batch size (None: the task micro-batch's size)."""

    align_steps: int = 100
    user_steps: int = 900
    rho: float = 1.0
    proximal_warmup_fraction: float | None = None
    proximal_start_step: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for f, lo in (("align_steps", 1), ("user_steps", 1)):
            check_int("lisa", f, getattr(self, f), lo)
        check_int("lisa", "batch_size", self.batch_size, 1, none_ok=True)
        self.rho = check_number("lisa", "rho", self.rho, lo=0, note="(authors use 1.0)")
        if self.proximal_warmup_fraction is not None and self.proximal_start_step is not None:
            raise SafeFTError(
                "defense.lisa: set one of proximal_warmup_fraction (a fraction of the run's steps, authors 0.1) or "
                "proximal_start_step (an optimizer step), not both"
            )
        if self.proximal_start_step is not None:
            check_int("lisa", "proximal_start_step", self.proximal_start_step, 0)
        else:
            if self.proximal_warmup_fraction is None:
                self.proximal_warmup_fraction = DEFAULT_PROXIMAL_WARMUP_FRACTION
            self.proximal_warmup_fraction = check_number(
                "lisa", "proximal_warmup_fraction", self.proximal_warmup_fraction, lo=0, hi=1
            )


@register_defense
class Lisa(Defense):

    # 2 (2026-12-01): the proximal term is off for the first 10% of steps by default (was: from step 0)
    defaults_revision = 2
    name = "lisa"
    config_class = LisaConfig
    paper = (
        "Lisa: Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning Attack "
        "(Huang et al., NeurIPS 2024, arXiv 2405.18641)"
    )
    artifacts = (
        "none cached; needs alignment examples (harmful prompt → refusal + benign) and keeps one snapshot of the "
        "trainable weights"
    )
    needs_full_params = True
    sharded_backends = ("fsdp2",)
    supports_4bit_base = True  # it reads and snapshots the trainable (LoRA) tensors only

    def __init__(self, config: LisaConfig | None = None):
        super().__init__(config)
        self.phase = ALIGN
        self.phase_step = 0  # optimizer steps done in the current phase
        self.global_step = 0  # optimizer steps done in all
        self.snapshot: dict[str, torch.Tensor] = {}  # w_other, by parameter name
        self._params: dict[str, torch.nn.Parameter] = {}
        self._examples: list[Any] = []
        self._collate = None
        self._seed = 0
        self._epoch = 0  # passes over the alignment data
        self._cursor = 0  # position in the current pass
        self._order: list[int] | None = None
        self._order_epoch = -1
        self._loaded = False
        self.total_steps: int | None = None  # the run's optimizer steps (set_total_steps), for the warm-up

    # ---- setup ---------------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, ctx: DefenseContext) -> None:
        super().prepare(model, ctx)
        if not ctx.alignment_examples:
            raise SafeFTError(
                "defense lisa needs alignment data (harmful prompt → refusal + benign pairs): give data.alignment "
                "or a refusal source in the run config"
            )
        if ctx.collate is None:
            raise SafeFTError("defense lisa: the run gives no collate function for alignment examples")
        self._examples = list(ctx.alignment_examples)
        self._collate = ctx.collate
        self._seed = int(ctx.seed)
        self._params = {n: p for n, p in unwrap_model(model).named_parameters() if p.requires_grad}
        if not self._params:
            raise SafeFTError("defense lisa: the model has no trainable parameters")
        if not self._loaded:
            self.snapshot = {n: p.detach().clone() for n, p in self._params.items()}
        else:
            missing = sorted(set(self._params) - set(self.snapshot))
            if missing:
                raise SafeFTError(
                    f"defense lisa: resumed state lacks a snapshot of {missing[:3]}; start afresh"
                )
            self.snapshot = {n: self.snapshot[n].to(p.device, p.dtype) for n, p in self._params.items()}

    def on_train_begin(self, model: torch.nn.Module, backend: str | None) -> None:
        """Take the trainable parameters again from the wrapped model (FSDP2 swaps in DTensors) and lay the
        snapshot out like them."""
        params = {n: p for n, p in unwrap_model(model).named_parameters() if p.requires_grad}
        missing = sorted(set(self.snapshot) ^ set(params))
        if missing:
            raise SafeFTError(f"defense lisa: trainable parameters changed after prepare(): {missing[:3]}")
        self._params = params
        self.snapshot = {
            n: (
                self.snapshot[n] if is_dtensor(self.snapshot[n]) else distribute_like(self.snapshot[n], p)
            ).to(p.dtype)
            for n, p in params.items()
        }

    # ---- alignment data --------------------------------------------------------------------------------------
    def _perm(self, epoch: int) -> list[int]:
        """Order of the alignment examples in pass ``epoch`` (seeded by the run's seed; cached per pass)."""
        if self._order is None or self._order_epoch != epoch:
            g = torch.Generator().manual_seed(self._seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self._examples), generator=g).tolist()
            self._order_epoch = epoch
        return self._order

    def _next_examples(self, k: int) -> list[Any]:
        out = []
        for _ in range(k):
            if self._cursor >= len(self._examples):
                self._epoch += 1
                self._cursor = 0
            out.append(self._examples[self._perm(self._epoch)[self._cursor]])
            self._cursor += 1
        return out

    def transform_batch(self, model: torch.nn.Module, inputs: dict, step: int) -> dict:
        """Alignment phase: a fresh alignment batch (same size as ``inputs`` unless ``batch_size`` is set) on the
        device of ``inputs["input_ids"]``; user phase: ``inputs`` unchanged."""
        if self.phase == USER:
            return inputs
        k = self.config.batch_size or int(inputs["input_ids"].shape[0])
        # DDP: every rank draws the whole global alignment batch (cursors stay equal) and keeps its own slice, as
        # the task batches are sharded; one process draws k
        rank, world = _rank_world()
        batch = self._collate(self._next_examples(k * world)[rank * k : (rank + 1) * k])
        device = inputs["input_ids"].device
        return {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in batch.items()}

    # ---- loss and schedule -------------------------------------------------------------------------------------
    def set_total_steps(self, total_steps: int) -> None:
        """The run's total optimizer steps (the trainer's ``max_steps``), which the warm-up fraction applies to."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise SafeFTError(f"lisa: the run's total optimizer steps (max_steps) must be an integer ≥ 1, got "
                              f"{total_steps!r}")
        self.total_steps = int(total_steps)

    def proximal_start(self) -> int:
        """First 0-based optimizer step at which the proximal term is on. With the warm-up fraction f and T total
        steps: the first s with s > f·T (the authors' strict comparison), i.e. ⌊f·T⌋ + 1."""
        if self.config.proximal_start_step is not None:
            return self.config.proximal_start_step
        if self.total_steps is None:
            raise SafeFTError(
                "defense lisa: proximal_warmup_fraction needs the run's total optimizer steps, which the trainer "
                "gives at train begin; outside SafeTrainer call set_total_steps(n) or set proximal_start_step"
            )
        return math.floor(self.config.proximal_warmup_fraction * self.total_steps) + 1

    def proximal(self) -> torch.Tensor:
        """Σ_trainable ‖w − w_other‖² (float32 scalar, differentiable in w)."""
        total: torch.Tensor | None = None
        for n, p in self._params.items():
            d = full_tensor((p.float() - self.snapshot[n].float()).pow(2).sum())  # FSDP2: an all-reduce
            total = d if total is None else total + d.to(total.device)
        assert total is not None
        return total

    def loss_terms(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> dict[str, torch.Tensor]:
        if not self._params:
            raise SafeFTError("defense lisa: prepare() was not called before training")
        if self.config.rho == 0.0 or self.global_step < self.proximal_start():
            device = next(iter(self._params.values())).device
            return {"lisa/proximal": torch.zeros((), device=device)}
        return {"lisa/proximal": 0.5 * self.config.rho * self.proximal()}

    @torch.no_grad()
    def after_step(self, model: torch.nn.Module) -> None:
        self.phase_step += 1
        self.global_step += 1
        length = self.config.align_steps if self.phase == ALIGN else self.config.user_steps
        if self.phase_step >= length:
            self.phase = USER if self.phase == ALIGN else ALIGN
            self.phase_step = 0
            for n, p in self._params.items():  # w_other for the new phase = where the old phase ended
                self.snapshot[n].copy_(p.detach())

    # ---- resume ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            "phase": torch.tensor(0 if self.phase == ALIGN else 1),
            "phase_step": torch.tensor(self.phase_step),
            "global_step": torch.tensor(self.global_step),
            "data_epoch": torch.tensor(self._epoch),
            "data_cursor": torch.tensor(self._cursor),
        }
        # FSDP2: gathered on every rank (the trainer calls state_dict on all of them)
        state.update(
            {f"snapshot.{n}": full_tensor(t.detach()).cpu().clone() for n, t in self.snapshot.items()}
        )
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.phase = ALIGN if int(state["phase"]) == 0 else USER
        self.phase_step = int(state["phase_step"])
        self.global_step = int(state["global_step"])
        self._epoch = int(state["data_epoch"])
        self._cursor = int(state["data_cursor"])
        self._order = None  # rebuilt from (seed, epoch) on the next draw
        snap = {k[len("snapshot.") :]: v for k, v in state.items() if k.startswith("snapshot.")}
        if self._params:
            for n, p in self._params.items():
                if n not in snap:
                    raise SafeFTError(f"defense lisa: resumed state lacks a snapshot of {n!r}; start afresh")
                self.snapshot[n] = distribute_like(snap[n], p).to(p.dtype)
        else:
            self.snapshot = snap
        self._loaded = True
