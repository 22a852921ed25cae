"""The Defense interface every method implements, and the name registry.

A defense is plain SFT plus terms. The trainer calls, in order:

1. ``modify_dataset(examples, ctx)`` once, before tokenisation (SafeInstr mixes refusals in here; SaLoRA keeps
   them); under TRL, ``use_tokenised_data(rows, collate)`` instead, for a defense that only reads them;
2. ``prepare(model, ctx)`` once, before the first step, with the trainable model (peft-wrapped for LoRA): load or
   compute cached artifacts, build frozen references, check requirements. Fail here, never mid-run;
3. for every micro-batch: ``transform_batch(model, inputs, step)`` (Lisa swaps in alignment batches), the task
   forward pass, then ``loss_terms(model, inputs, outputs)`` -> ``{name: weighted scalar}``; the trainer adds
   them to the task loss and logs each under its name;
4. ``set_total_steps(n)`` then ``on_train_begin(model, backend)`` once the training engine has wrapped the model
   (DDP, FSDP2, DeepSpeed), before the first step, on every rank: ``n`` is the run's total optimizer steps (Lisa's
   proximal warm-up is a fraction of it); FSDP2 replaces every parameter by a sharded DTensor, so a defense that
   keeps parameter references takes them again here;
5. ``after_step(model)`` after every optimizer step, on every rank (CWAC projects the weights here);
6. ``finalize(model)`` once after training, on every rank (SafeLoRA projects here).

``state_dict()``/``load_state_dict()`` carry any mutable state across checkpoints (resume).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from safeft.errors import SafeFTError


def config_error(defense: str, field: str, value: Any, rule: str) -> SafeFTError:
    """The one message shape of a bad defense setting: ``defense.<name>.<field>: must be <rule>, got <value>``."""
    return SafeFTError(f"defense.{defense}.{field}: must be {rule}, got {value!r}")


def check_int(defense: str, field: str, value: Any, lo: int, *, none_ok: bool = False) -> int | None:
    """``value`` if it is an integer ≥ ``lo`` (or None where ``none_ok``), else a :func:`config_error`."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise config_error(defense, field, value, f"an integer ≥ {lo}" + (" or null" if none_ok else ""))
    return value


def check_number(
    defense: str,
    field: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    open_lo: bool = False,
    open_hi: bool = False,
    note: str = "",
) -> float:
    """``float(value)`` if it is a finite number within the bounds (``open_*``: bound excluded), else a
    :func:`config_error` whose rule reads like "a number in (0, 1)" or "a number ≥ 0"; ``note`` is appended."""
    if lo is not None and hi is not None:
        from safeft.config import _fmt_range  # the interval notation config keys use

        rule = f"a number in {_fmt_range(lo, hi, not open_lo, not open_hi)}"
    elif lo is not None:
        rule = f"a number {'>' if open_lo else '≥'} {lo:g}"
    elif hi is not None:
        rule = f"a number {'<' if open_hi else '≤'} {hi:g}"
    else:
        rule = "a finite number"
    rule += f" {note}" if note else ""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and abs(value) != float("inf")
    if ok and lo is not None:
        ok = value > lo if open_lo else value >= lo
    if ok and hi is not None:
        ok = value < hi if open_hi else value <= hi
    if not ok:
        raise config_error(defense, field, value, rule)
    return float(value)


@dataclass
class DefenseConfig:
    """Base for every defense's config. Subclasses add fields with defaults and validate in ``__post_init__``,
    raising :class:`SafeFTError` that names the field (``defense.<name>.<field>``) and its allowed range."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DefenseContext:
    """Everything a defense may need beyond the model. Built by the training pipeline.

    aligned_model_path: local safetensors dir of θ₀ (the model whose safety we keep).
    base_model_path: local dir of θ_b, the unaligned base, or None.
    fingerprint: stable hash of θ₀'s weights; artifacts are keyed by it.
    artifacts_dir: where this defense caches artifacts for θ₀ (``<cache>/artifacts/<fingerprint>/``).
    load_model: ``load_model(path) -> PreTrainedModel`` (frozen, eval mode, same dtype/device as training).
    anchor_pool / harmless_pool: harmful prompts (candidates for anchors) and harmless prompts, never task data.
    refusal_pairs: (harmful prompt, refusal) pairs, for artifacts that need θ₀'s refusals.
    eval_prompts: every prompt the evaluation will use; artifacts must be disjoint from them.
    poison_prompts: the harmful prompts the poisoned user data may contain (the whole poison pool, not only the
    sampled ones); anchors must be disjoint from them too.
    """

    tokenizer: Any
    template: str = "chat"
    aligned_model_path: str | None = None
    base_model_path: str | None = None
    fingerprint: str = ""
    artifacts_dir: Path | None = None
    load_model: Callable[[str], Any] | None = None
    anchor_pool: list[str] = field(default_factory=list)
    harmless_pool: list[str] = field(default_factory=list)
    refusal_pairs: list[tuple[str, str]] = field(default_factory=list)
    alignment_examples: list[Any] = field(default_factory=list)
    eval_prompts: list[str] = field(default_factory=list)
    poison_prompts: list[str] = field(default_factory=list)
    use_lora: bool = True
    max_length: int = 512
    seed: int = 0
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    output_dir: Path | None = None
    collate: Callable[[list[Any]], dict] | None = None  # tokenised Example list -> batch dict


class Defense:
    """Base class: the null defense. Subclasses override only what they need."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[DefenseConfig]] = DefenseConfig
    paper: ClassVar[str] = ""
    artifacts: ClassVar[str] = "none"
    needs_base_model: ClassVar[bool] = False
    requires_lora: ClassVar[bool] = False
    # True when a hook reads or writes parameter tensors directly (projections, penalties on LoRA factors,
    # snapshots). Where parameters are sharded such a defense runs only under the backends it lists in
    # ``sharded_backends`` ("fsdp2": FSDP2 DTensors; "zero3": DeepSpeed ZeRO-3), whose hooks handle shards (see
    # safeft.components.sharding); SafeTrainer refuses it under any other before the first step, with the message
    # of ``sharding_refusal``. ``supports_4bit_base``: its hooks are right on a 4-bit (QLoRA) base model.
    needs_full_params: ClassVar[bool] = False
    sharded_backends: ClassVar[tuple[str, ...]] = ()
    supports_4bit_base: ClassVar[bool] = False
    # True when ``loss_terms`` reads the task forward's ``outputs.logits`` (PACT): trainers whose task loss skips the
    # full logits (TRL's fused LM head, see safeft.trl) then compute the task loss from the full logits instead.
    needs_logits: ClassVar[bool] = False
    # defenses that cannot share a run with this one (by name)
    incompatible_with: ClassVar[tuple[str, ...]] = ()
    # Raised when a default setting changes what a run computes: run.json records it, and a finished run made
    # under another revision is not reused (safeft demo, safeft bench; see defaults_revisions).
    defaults_revision: ClassVar[int] = 1

    @classmethod
    def incompatible_with_reason(cls, other: str) -> str:
        return f"does not compose with {other}"

    def __init__(self, config: DefenseConfig | None = None):
        self.config = config if config is not None else self.config_class()

    # ---- hooks -------------------------------------------------------------------------------------------
    def modify_dataset(self, examples: list[Any], ctx: DefenseContext) -> list[Any]:
        return examples

    def use_tokenised_data(self, rows: Any, collate: Callable[[list[Any]], dict]) -> None:
        """Under a trainer that tokenises the data itself (TRL's ``SFTTrainer``), called before ``prepare`` in place of
        ``modify_dataset`` for a defense that only reads the training data: ``rows`` (a sized, indexable dataset of
        tokenised rows) and ``collate`` (rows -> batch with ``input_ids``, ``attention_mask``, ``labels`` -100 off the
        trained tokens). A defense whose ``modify_dataset`` changes the examples leaves this alone (TRL refuses it)."""

    def prepare(self, model: torch.nn.Module, ctx: DefenseContext) -> None:
        if self.needs_base_model and not ctx.base_model_path:
            raise SafeFTError(
                f"defense {self.name!r} needs the unaligned base model θ_b: pass --base-model PATH "
                f"(or model.base in the config)"
            )
        if self.requires_lora and not ctx.use_lora:
            raise SafeFTError(f"defense {self.name!r} works on LoRA adapters only: set training.method: lora")

    def transform_batch(self, model: torch.nn.Module, inputs: dict, step: int) -> dict:
        return inputs

    def loss_terms(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> dict[str, torch.Tensor]:
        return {}

    def set_total_steps(self, total_steps: int) -> None:
        """The run's total optimizer steps (the trainer's ``max_steps``), given before ``on_train_begin``."""
        return None

    def on_train_begin(self, model: torch.nn.Module, backend: str | None) -> None:
        """The model as the training engine wrapped it; ``backend`` is "fsdp2", "zero3" or None (parameters whole).
        Called on every rank before the first step. Refuse here (SafeFTError) what only shows after wrapping."""
        return None

    def sharding_refusal(self, backend: str) -> str | None:
        """Why this defense cannot run with parameters sharded by ``backend`` ("fsdp1", "fsdp2", "zero3"), ending
        with the alternative to use; None when it can."""
        if not self.needs_full_params or backend in self.sharded_backends:
            return None
        if backend == "fsdp1" and "fsdp2" in self.sharded_backends:
            return "FSDP version 1 flattens the parameters it shards: set fsdp_version: 2 (FSDP2)"
        if backend == "zero3" and "fsdp2" in self.sharded_backends:
            return (
                "its loss term reads parameters outside any module's forward, where ZeRO-3 holds empty partitions: "
                "use FSDP2 (fsdp_version: 2) or DeepSpeed ZeRO-2"
            )
        return "its hooks need whole parameter tensors: use DDP or DeepSpeed ZeRO-2 (parameters whole on every rank)"

    def after_step(self, model: torch.nn.Module) -> None:
        return None

    def finalize(self, model: torch.nn.Module) -> dict[str, Any]:
        """Post-training changes; returns a JSON-able summary (may be empty)."""
        return {}

    # ---- resume --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / accelerate / DeepSpeed wrappers (``.module``), keeping a peft wrapper if there is one."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


_REGISTRY: dict[str, type[Defense]] = {}


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: make a defense available by ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"defense name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    import safeft.defenses  # noqa: F401  (registers the built-in defenses)


def defense_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_defense_class(name: str) -> type[Defense]:
    _load_builtin()
    if name not in _REGISTRY:
        raise SafeFTError(
            f"unknown defense {name!r}; choose from {', '.join(sorted(_REGISTRY))} (see `safeft list`)"
        )
    return _REGISTRY[name]


def parse_defense_spec(spec: str) -> list[str]:
    """'cwac+pact' -> ['cwac', 'pact']; each name checked, duplicates and known-incompatible pairs refused."""
    names = [s.strip() for s in str(spec).split("+") if s.strip()]
    if not names:
        raise SafeFTError("defense: empty name; use e.g. 'sft', 'cwac' or 'cwac+pact'")
    if len(set(names)) != len(names):
        raise SafeFTError(f"defense {spec!r}: a defense is listed twice")
    classes = [get_defense_class(n) for n in names]
    if len(names) > 1 and "sft" in names:
        names = [n for n in names if n != "sft"]  # the null defense adds nothing to a composition
        classes = [get_defense_class(n) for n in names]
    for a in classes:
        for b in classes:
            if a is not b and b.name in a.incompatible_with:
                raise SafeFTError(
                    f"defenses {a.name!r} and {b.name!r} cannot be combined: {a.name} {a.incompatible_with_reason(b.name)}"
                )
    return names


def build_config(cls: type[Defense], values: dict[str, Any] | None) -> DefenseConfig:
    """Build ``cls.config_class`` from a dict, refusing unknown keys by name."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SafeFTError(f"defense.{cls.name}: unknown key(s) {unknown}; allowed: {sorted(known) or 'none'}")
    return cls.config_class(**values)


def build_defenses(spec: str, configs: dict[str, dict[str, Any]] | None = None) -> list[Defense]:
    configs = configs or {}
    return [
        get_defense_class(n)(build_config(get_defense_class(n), configs.get(n)))
        for n in parse_defense_spec(spec)
    ]


def defaults_revisions(names: str | list[str]) -> dict[str, int]:
    """``{defense name: defaults_revision}`` for a defense spec (``"cwac+pact"``, a list, ``"sft"``); what run.json
    records so that a run made under older defaults is recognised as such."""
    parts = parse_defense_spec(names) if isinstance(names, str) else list(names)
    return {n: get_defense_class(n).defaults_revision for n in parts}


def revisions_match(recorded: dict[str, int] | None, names: str | list[str]) -> bool:
    """Whether a finished run's recorded revisions (None: a run.json from before they were recorded, i.e. revision
    1 everywhere) equal the current ones of ``names``."""
    rec = recorded or {}
    return all(rec.get(n, 1) == rev for n, rev in defaults_revisions(names).items())
