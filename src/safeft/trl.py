"""TRL integration: ``SafeSFTTrainer`` is TRL's ``SFTTrainer`` with safeft's defenses.

A TRL script gains a defense with a few keyword arguments; the dataset formatting, packing, ``peft_config`` and
every ``SFTConfig`` setting stay TRL's::

    from safeft.trl import SafeSFTTrainer

    trainer = SafeSFTTrainer(
        model, args=SFTConfig(...), train_dataset=ds, processing_class=tok, peft_config=LoraConfig(...),
        defense="asft", defense_config={"lam": 1.0},
        defense_context={"model.aligned": "path/to/θ₀", "model.base": "path/to/θ_b"},
    )
    trainer.train()                  # resume_from_checkpoint=True also restores the defense state
    trainer.finalize_defenses()      # SafeLoRA projects here; call before save_model
    trainer.save_model()

The defense machinery (loss terms, after-step hooks, sharding refusals, defense state in checkpoints, resume) is
:class:`safeft.trainer.DefenseTrainerMixin`, the same code :class:`safeft.trainer.SafeTrainer` runs.

``defense`` is a name or composition (``"cwac"``, ``"cwac+pact"``, default ``"sft"``), or one or more
:class:`~safeft.defenses.base.Defense` objects, used as given (prepare them yourself with the model the trainer
trains). Named defenses are built from ``defense_config`` (that defense's options, or ``{name: options}`` for a
composition) and prepared here, once the trainer has built the model (peft-wrapped when ``peft_config`` is given),
with ``defense_context``: a :class:`~safeft.defenses.base.DefenseContext`, or a dict of run-config keys from which
it is built as ``safeft train`` builds it (see :func:`defense_context`). Defenses that compute artifacts from the
aligned model θ₀ (cwac, pact, asft, safelora, salora, sppft) or need alignment data (lisa) need it; sft does not.

``trl`` is imported only here, when ``SafeSFTTrainer`` is first used.
"""

from __future__ import annotations

from typing import Any

import torch

from safeft.defenses.base import Defense, DefenseContext
from safeft.errors import SafeFTError

__all__ = ["SafeSFTTrainer", "defense_context", "resolve_defenses"]  # noqa: F822 (SafeSFTTrainer: __getattr__)


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _overrides(d: Defense, hook: str) -> bool:
    return getattr(type(d), hook) is not getattr(Defense, hook)


def resolve_defenses(defense: Any, defense_config: dict[str, Any] | None = None) -> list[Defense]:
    """Defense objects from a name / composition string (built with ``defense_config``), a Defense, or a list of
    Defenses (returned as given). Bad names, keys and values raise :class:`SafeFTError` naming them."""
    from safeft.defenses.base import build_defenses, parse_defense_spec

    if isinstance(defense, Defense):
        defense = [defense]
    if isinstance(defense, (list, tuple)):
        if not all(isinstance(d, Defense) for d in defense):
            raise SafeFTError("defense: give a name such as 'cwac', or Defense objects, not a mix")
        if defense_config:
            raise SafeFTError(
                "defense_config applies to defenses given by name; configure a Defense object with its config"
            )
        names = [d.name for d in defense]
        if len(set(names)) != len(names):
            raise SafeFTError(
                f"defense: {names} lists a defense twice (their checkpoint state would collide)"
            )
        for a in defense:
            for b in defense:
                if a is not b and b.name in a.incompatible_with:
                    raise SafeFTError(
                        f"defenses {a.name!r} and {b.name!r} cannot be combined: "
                        f"{a.name} {a.incompatible_with_reason(b.name)}"
                    )
        return list(defense)
    if not isinstance(defense, str):
        raise SafeFTError(
            f"defense: must be a name such as 'cwac' or Defense objects, got {type(defense).__name__}"
        )
    names = parse_defense_spec(defense)  # unknown names, duplicates, incompatible pairs
    values = dict(defense_config or {})
    if values and all(k in names and isinstance(v, dict) for k, v in values.items()):
        per_name = values  # {name: options}
    elif len(names) == 1:
        per_name = {names[0]: values}
    elif values:
        raise SafeFTError(
            f"defense_config for the composition {defense!r}: give {{name: options}} with names from {names}, "
            f"got keys {sorted(values)}"
        )
    else:
        per_name = {}
    unknown = sorted(set(per_name) - set(names))
    if unknown:
        raise SafeFTError(f"defense_config names {unknown}, which are not in defense {defense!r}")
    return build_defenses(defense, per_name)


def defense_context(
    model: torch.nn.Module, tokenizer: Any, settings: dict[str, Any] | None = None
) -> DefenseContext:
    """The :class:`DefenseContext` ``safeft train`` would give the defenses, for ``model`` (the trainable model:
    peft-wrapped for LoRA) and ``tokenizer``, from run-config keys (``docs/trl.md``; any key of ``safeft train
    --config``):

    * ``model.aligned`` (required unless ``model`` remembers a local dir or hub id as ``name_or_path``): θ₀, the
      model being fine-tuned, as it was before fine-tuning — its weights are fingerprinted and artifacts cached
      under that fingerprint;
    * ``model.base``: the unaligned base θ_b (asft, safelora, pact);
    * ``data.harmful_source`` / ``eval.harmful_source`` (``"demo"`` works offline): where anchor prompts,
      refusal pairs (pact, lisa) and the held-out evaluation prompts (kept out of every artifact) come from;
    * ``data.template``, ``data.max_length``, ``artifacts_dir``, ``model.cache_dir``, ``training.seed``.

    ``training.method`` and ``model.dtype`` default to the model's (LoRA when peft-wrapped; float32/bfloat16).
    Your own training data is unknown here: anchors are kept disjoint from the evaluation prompts only."""
    from safeft.config import build_config
    from safeft.models import fingerprint
    from safeft.pipeline import build_context, build_splits, resolve

    values = dict(settings or {})
    if not values.get("model.aligned"):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        name = getattr(getattr(inner, "config", None), "_name_or_path", "") or getattr(
            inner, "name_or_path", ""
        )
        if not name:
            raise SafeFTError(
                "defense_context: give 'model.aligned', θ₀'s local dir or hub id (the model you fine-tune, before "
                "fine-tuning); the model in memory does not say where it was loaded from"
            )
        values["model.aligned"] = str(name)
    values.setdefault("training.method", "lora" if _is_peft(model) else "full")
    dtype = next(model.parameters()).dtype
    if dtype in (torch.float32, torch.bfloat16):
        values.setdefault("model.dtype", str(dtype).replace("torch.", ""))
    cfg = build_config(None, values)
    aligned_dir = resolve(cfg, cfg.model.aligned)
    base_dir = resolve(cfg, cfg.model.base) if cfg.model.base else None
    splits = build_splits(cfg, need_poison=False)
    return build_context(cfg, model, tokenizer, splits, aligned_dir, base_dir, fingerprint(aligned_dir))


def _sft_trainer_class():
    try:
        from trl import SFTTrainer
    except ImportError:
        raise SafeFTError("safeft.trl.SafeSFTTrainer needs TRL: pip install trl") from None
    from transformers import Trainer

    from safeft.trainer import DefenseTrainerMixin

    class SafeSFTTrainer(DefenseTrainerMixin, SFTTrainer):
        """TRL's ``SFTTrainer`` plus safeft defenses: ``defense``, ``defense_config``, ``defense_context`` (see the
        module docstring); every other argument is ``SFTTrainer``'s."""

        def __init__(
            self,
            *args: Any,
            defense: str | Defense | list[Defense] = "sft",
            defense_config: dict[str, Any] | None = None,
            defense_context: DefenseContext | dict[str, Any] | None = None,
            **kwargs: Any,
        ):
            defenses = resolve_defenses(defense, defense_config)  # bad names fail before any model is loaded
            super().__init__(*args, defenses=None, **kwargs)
            self._refuse_unsupported(defenses)
            if isinstance(defense, str):
                self._prepare(defenses, defense_context)
            elif defense_context is not None:
                raise SafeFTError(
                    "defense_context is for defenses given by name; Defense objects come prepared"
                )
            self.defenses = defenses
            self._needs_logits = any(d.needs_logits for d in defenses)

        def _refuse_unsupported(self, defenses: list[Defense]) -> None:
            for d in defenses:
                if _overrides(d, "modify_dataset") and not _overrides(d, "use_tokenised_data"):
                    raise SafeFTError(
                        f"defense {d.name!r} changes the training examples before tokenisation, which SFTTrainer "
                        f"does itself: add its examples to your train_dataset (for safeinstr: harmful prompt → "
                        f"refusal pairs) or train with `safeft train`"
                    )
                if d.needs_logits and self.args.loss_type != "nll":
                    raise SafeFTError(
                        f"defense {d.name!r} needs the task forward's logits, computed here with the plain NLL "
                        f"loss: set loss_type='nll' (got {self.args.loss_type!r})"
                    )
                if d.needs_logits and (self.args.packing or self.args.padding_free):
                    raise SafeFTError(
                        f"defense {d.name!r} runs θ₀ on each task sequence apart, which packed / padding-free "
                        f"batches do not separate: set packing=False and padding_free=False"
                    )

        def _prepare(self, defenses: list[Defense], ctx: DefenseContext | dict[str, Any] | None) -> None:
            needy = [d.name for d in defenses if _overrides(d, "prepare")]
            if ctx is None and needy:
                raise SafeFTError(
                    f"defense(s) {', '.join(needy)} prepare artifacts or data from the aligned model: pass "
                    f"defense_context={{'model.aligned': <θ₀ dir or hub id>, ...}} (run-config keys, see "
                    f"docs/trl.md), a DefenseContext, or Defense objects you prepared yourself"
                )
            # a processor (vision-language models) carries its tokenizer
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            if isinstance(ctx, dict):
                ctx = defense_context(self.model, tokenizer, ctx)
            if ctx is None:  # only defenses without a prepare of their own: the base checks (LoRA-only, θ_b)
                ctx = DefenseContext(tokenizer=tokenizer, use_lora=_is_peft(self.model))
            # multi-process: rank 0 computes and caches the artifacts first, the others then load them
            with self.args.main_process_first(local=False, desc="defense prepare"):
                for d in defenses:
                    if _overrides(d, "use_tokenised_data"):  # SaLoRA's task init reads the training rows
                        d.use_tokenised_data(self.train_dataset, self._rows_collate(d.name))
                    d.prepare(self.model, ctx)

        def _rows_collate(self, name: str):
            def collate(rows: list[dict]) -> dict:
                if self.args.packing or self.args.padding_free:
                    raise SafeFTError(
                        f"defense {name!r} reads your training examples one by one, which packed / padding-free "
                        f"rows do not separate: set packing=False and padding_free=False"
                    )
                return self.data_collator(rows)

            return collate

        def task_loss(self, model, inputs, num_items_in_batch, return_outputs: bool):
            """TRL's loss (fused LM head: no logits; ``loss_terms`` get ``outputs=None``), or, when a defense reads
            the logits (``Defense.needs_logits``), the model's own loss from the full logits, as SafeTrainer."""
            if self._needs_logits:
                inputs["use_cache"] = False
                return Trainer.compute_loss(
                    self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            parent = super(DefenseTrainerMixin, self)
            if return_outputs:
                return parent.compute_loss(
                    model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            return parent.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch), None

    SafeSFTTrainer.__module__ = __name__
    SafeSFTTrainer.__qualname__ = "SafeSFTTrainer"
    return SafeSFTTrainer


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name == "SafeSFTTrainer":
        if name not in _CLASSES:
            _CLASSES[name] = _sft_trainer_class()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
