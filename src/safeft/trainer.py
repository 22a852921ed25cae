"""SafeTrainer: one ``transformers.Trainer`` for every defense.

Every defense is SFT plus terms, so the trainer is the plain Trainer with these additions, all in
:class:`DefenseTrainerMixin` (which ``safeft.trl.SafeSFTTrainer`` shares with :class:`SafeTrainer`):

* ``compute_loss`` adds each defense's named loss terms to the task loss and logs each one;
* a callback runs each defense's ``after_step`` right after every optimizer step (on every rank under DDP, where
  parameters are identical, so projections keep them identical);
* checkpoints also hold each defense's state (``defense_state.safetensors``), restored on resume;
* before the first step it refuses what cannot run: a defense whose hooks do not handle the way the engine shards
  parameters (FSDP1, FSDP2, DeepSpeed ZeRO-3: see each defense's ``sharding_refusal``) or a 4-bit base model; once
  the engine has wrapped the model it calls each defense's ``on_train_begin`` (FSDP2 swaps in sharded parameters).

With no terms (plain SFT) ``compute_loss`` *is* the parent's ``compute_loss``: the null defense's loss equals the
plain Trainer's loss exactly.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from safeft.defenses.base import Defense
from safeft.errors import SafeFTError

DEFENSE_STATE = "defense_state.safetensors"


SHARDING_LABELS = {"fsdp1": "FSDP (version 1)", "fsdp2": "FSDP2", "zero3": "DeepSpeed ZeRO-3"}


class _DefenseCallback(TrainerCallback):
    def __init__(self, trainer: DefenseTrainerMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # after accelerate/DeepSpeed wrapped the model and before the first step, on every process
        backend = self.trainer.sharding_backend()
        for d in self.trainer.defenses:
            if state.max_steps and state.max_steps > 0:  # the run's optimizer steps (also on resume)
                d.set_total_steps(int(state.max_steps))
            d.on_train_begin(self.trainer.model, backend)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Called right after optimizer.step(), before zero_grad and the scheduler, on every process.
        m = self.trainer.model
        with torch.no_grad():
            for d in self.trainer.defenses:
                d.after_step(m)

    def on_save(self, args, state, control, **kwargs):
        if not self.trainer.defenses:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        tensors = self.trainer.defense_state()  # every rank: sharded state is gathered (a collective)
        if ckpt.is_dir() and self.trainer.is_world_process_zero():
            if tensors:
                save_file(tensors, str(ckpt / DEFENSE_STATE))


class DefenseTrainerMixin:
    """The defense machinery of a ``transformers.Trainer`` subclass: put it first in the bases
    (``class X(DefenseTrainerMixin, SomeTrainer)``) so that its ``compute_loss``, ``log`` and ``train`` wrap the
    parent's. Holds a list of :class:`~safeft.defenses.base.Defense` objects in ``self.defenses``; the task loss is
    whatever the parent's ``compute_loss`` returns (see :meth:`task_loss`)."""

    def __init__(self, *args: Any, defenses: list[Defense] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.defenses: list[Defense] = list(defenses or [])
        self._term_sums: dict[str, Any] = defaultdict(float)  # float 0.0 or a device tensor
        self._term_counts: dict[str, int] = defaultdict(int)
        self.add_callback(_DefenseCallback(self))

    # ---- loss ------------------------------------------------------------------------------------------------
    def task_loss(self, model, inputs, num_items_in_batch, return_outputs: bool) -> tuple[torch.Tensor, Any]:
        """(task loss, model outputs passed to ``loss_terms``): the parent trainer's ``compute_loss``."""
        return super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # the rule Trainer.training_step uses to decide whether it still divides the loss by the GA steps
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return bool(fixed)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            # evaluation (eval_dataset, evaluate()): the task loss alone — no batch swap, no defense term, nothing
            # drawn from a defense's training streams, nothing added to the training log
            loss, outputs = self.task_loss(model, inputs, num_items_in_batch, return_outputs)
            return (loss, outputs) if return_outputs else loss
        step = self.state.global_step
        orig = inputs
        for d in self.defenses:
            inputs = d.transform_batch(model, inputs, step)
        if inputs is not orig and num_items_in_batch is not None:
            # a defense swapped the batch (Lisa's alignment phase): normalise by the new batch's label count
            # (assumes the accumulated micro-batches are alike, as the task batches are)
            n = (inputs["labels"][..., 1:] != -100).sum() * self.current_gradient_accumulation_steps
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # the Trainer multiplies the loss by the number of processes, expecting the global count
                n = self.accelerator.gather(n.reshape(1).to(self.accelerator.device)).sum()
            num_items_in_batch = (
                n.to(num_items_in_batch.device) if torch.is_tensor(num_items_in_batch) else int(n)
            )
        loss, outputs = self.task_loss(model, inputs, num_items_in_batch, return_outputs)
        terms: dict[str, torch.Tensor] = {}
        for d in self.defenses:
            for name, value in d.loss_terms(model, inputs, outputs).items():
                if name in terms:
                    raise RuntimeError(f"two defenses return a loss term named {name!r}")
                terms[name] = value
        if terms:
            self._log_term("task_loss", loss)
            # The task loss is already normalised over the whole accumulated batch when the model takes
            # num_items_in_batch; per-micro-batch terms then need the 1/GA factor themselves (the trainer only
            # divides losses that were not normalised that way).
            ga = (
                self.current_gradient_accumulation_steps
                if self._loss_is_scaled_for_ga(num_items_in_batch)
                else 1
            )
            for name, value in terms.items():
                self._log_term(name, value)
                loss = loss + value.to(loss.dtype) / ga
        return (loss, outputs) if return_outputs else loss

    def _log_term(self, name: str, value: torch.Tensor) -> None:
        # summed as a tensor on its device: a float() here would synchronise with the device every micro-batch;
        # the sums are read only when a log line is written
        self._term_sums[name] = self._term_sums[name] + value.detach().float()
        self._term_counts[name] += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._term_counts and "loss" in logs:
            for name, total in self._term_sums.items():
                logs[name] = round(float(total) / max(1, self._term_counts[name]), 6)
            self._term_sums.clear()
            self._term_counts.clear()
        super().log(logs, *args, **kwargs)

    # ---- defense state for resume ----------------------------------------------------------------------------
    def defense_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for d in self.defenses:
            for k, v in d.state_dict().items():
                out[f"{d.name}.{k}"] = v.detach().contiguous().cpu()
        return out

    def load_defense_state(self, checkpoint: str | os.PathLike) -> None:
        path = Path(checkpoint) / DEFENSE_STATE
        if not path.is_file():
            return
        state = load_file(str(path))
        for d in self.defenses:
            prefix = f"{d.name}."
            d.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    # ---- sharded parameters, quantized bases ---------------------------------------------------------------------
    def _deepspeed_zero_stage(self) -> int:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0

    def sharding_backend(self) -> str | None:
        """How the engine holds parameters: "fsdp2" (DTensors sharded on rows), "fsdp1" (flattened shards), "zero3"
        (DeepSpeed partitions) or None (whole on every rank: one process, DDP, ZeRO-1/2)."""
        if self.is_fsdp_enabled:
            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            return "fsdp2" if int(getattr(plugin, "fsdp_version", 1) or 1) == 2 else "fsdp1"
        if self.is_deepspeed_enabled and self._deepspeed_zero_stage() >= 3:
            return "zero3"
        return None

    def check_parameter_sharding(self) -> None:
        """Refuse, before the first step, a defense whose hooks cannot handle how parameters are sharded (each
        defense says why and what to use instead: ``Defense.sharding_refusal``), and a defense whose hooks are not
        right on a 4-bit (QLoRA) base. DDP and ZeRO-1/2 keep parameters whole and identical on every rank."""
        backend = self.sharding_backend()
        if backend is not None:
            for d in self.defenses:
                why = d.sharding_refusal(backend)
                if why:
                    raise SafeFTError(
                        f"defense {d.name!r} does not run under {SHARDING_LABELS[backend]}: {why} "
                        f"(see docs/distributed.md)"
                    )
        from safeft.components.sharding import is_quantized_4bit

        if any(d.needs_full_params and not d.supports_4bit_base for d in self.defenses) and is_quantized_4bit(
            self.model
        ):
            d = next(d for d in self.defenses if d.needs_full_params and not d.supports_4bit_base)
            raise SafeFTError(
                f"defense {d.name!r} does not run on a 4-bit (QLoRA) base model: train LoRA on a bf16/fp16 base, "
                f"sharded with FSDP2 or ZeRO-2 if it does not fit one GPU (see docs/distributed.md)"
            )

    def finalize_defenses(self) -> dict[str, Any]:
        """Run each defense's ``finalize`` on the trained model (every rank); ``{name: summary}`` of the non-empty
        summaries. Call once, after ``train`` and before saving the model (SafeLoRA projects here)."""
        out = {}
        for d in self.defenses:
            summary = d.finalize(self.model)
            if summary:
                out[d.name] = summary
        return out

    def train(self, resume_from_checkpoint=None, **kwargs):
        self.check_parameter_sharding()
        if resume_from_checkpoint is True:
            # the Trainer's own rule for "the last checkpoint of output_dir"; None leaves its error to the Trainer
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if last is None:
                raise SafeFTError(
                    f"resume_from_checkpoint=True: {self.args.output_dir} holds no checkpoint-* folder to resume "
                    "from; pass a checkpoint path, or start without resuming"
                )
            resume_from_checkpoint = last
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self.load_defense_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class SafeTrainer(DefenseTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that holds a list of :class:`~safeft.defenses.base.Defense` objects
    (``defenses=[...]``, prepared by the caller: see ``safeft.pipeline.run_train``)."""
