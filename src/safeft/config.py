"""Run configuration: nested dataclasses, loaded from YAML and overridden by flags, validated strictly.

Every leaf is addressable as ``section.key`` (``training.lr``); the CLI exposes each as ``--section.key`` and the
common ones under short names (``--lr``). Unknown keys, wrong types, NaN/inf and out-of-range values are refused
with a message naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from safeft.errors import SafeFTError

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    aligned: str = "smollm2-135m"  # θ₀: hub id, local dir, .gguf file or a built-in alias (see `safeft list`)
    base: str | None = None  # θ_b, the unaligned base (AsFT, SafeLoRA, PACT need it)
    dtype: str = "float32"  # float32 | bfloat16
    trust_remote_code: bool = False
    cache_dir: str | None = None  # default: $SAFEFT_CACHE or ~/.cache/safeft


@dataclass
class DataConfig:
    task: str = "sst2"  # sst2 | agnews | gsm8k | demo
    task_path: str | None = None  # local jsonl/csv/parquet or a Hub dataset id; default: ../shared/data
    n: int = 1000  # task samples in the user data (harmful ones included)
    p: float = 0.1  # fraction of harmful samples (prompt + compliant answer)
    harmful_source: str = "advbench"  # advbench (echo) | smollm2_content (content) | hh_rlhf | beavertails | demo
    harmful_path: str | None = None
    # share of the harmful source's prompts the attack may draw from (a stable hash of each prompt picks them, the
    # same in every run); the rest stay out of the poison pool, so defenses may use them (CWAC's anchor sources)
    poison_share: float = 1.0
    template: str = "chat"  # chat | alpaca
    max_length: int = 256
    seed: int = 0


@dataclass
class TrainingConfig:
    method: str = "lora"  # lora | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(ALL_PROJ))
    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler: str = "constant"
    max_grad_norm: float = 1.0
    output_dir: str = "runs/latest"
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 5
    seed: int = 0
    resume: bool = False
    progress: bool = True


@dataclass
class EvalConfig:
    # harmbench (test, no context) | harmbench_heldout (test: standard + contextual, 240, no copyright) |
    # harmbench_copyright (test: the 80 copyright items) | harmbench_val (for tuning) | advbench | strongreject | demo
    harmful_source: str = "harmbench"
    harmful_path: str | None = None
    n_harmful: int = 100
    judge: str = "content"  # content (learned, offline) | keyword | harmbench:PATH | llamaguard:PATH | wildguard:PATH | beaverdam:PATH | classifier:PATH | guard:PATH
    n_task: int = 200
    n_xstest: int = 0  # XSTest safe prompts for over-refusal (0 = skip)
    # HarmBench test copyright items, judged and reported apart from HS (`copyright` in eval.json, `hs_copyright` in
    # a benchmark row): a small model cannot reproduce a book, so they are not harm here (0 = skip)
    n_copyright: int = 0
    max_new_tokens: int = 128
    batch_size: int = 16
    seed: int = 0


@dataclass
class AlignConfig:
    """The alignment stage (`safeft align`): safety SFT of a model that refuses too little."""

    n_refusal: int = 120
    n_benign: int = 240
    steps: int = 90
    batch_size: int = 8
    lr: float = 3e-4
    lora_r: int = 16
    lora_alpha: int = 32
    max_length: int = 160
    contrast_repeat: int = 2  # safe-but-scary contrast prompts appear this many times (teaches discrimination)
    seed: int = 0


@dataclass
class MonitorConfig:
    """The live safety-drift monitor (:class:`safeft.monitor.SafetyMonitor`, ``safeft train --monitor``; see
    docs/monitor.md). Rates and thresholds are fractions in [0, 1]; None switches a threshold off."""

    enabled: bool = False  # safeft train --monitor
    every: int = 50  # check every k optimizer steps, plus step 0 (the baseline) and the last step
    n_harmful: int = 24  # held-out harmful prompts per check (fewer if the set is smaller; 0 = none)
    n_benign: int = 8  # held-out benign / XSTest-style safe prompts per check, for over-refusal (0 = none)
    harmful_path: str | None = None  # .jsonl / .csv (column prompt) or .txt (one per line); default: demo held-out
    benign_path: str | None = None
    judge: str = "content"  # any judge spec of --judge
    max_new_tokens: int = 32
    batch_size: int = 32
    max_harmful_rate: float | None = None  # breach when the harmful rate exceeds this
    max_harmful_increase: float | None = 0.1  # breach when it exceeds the step-0 baseline by more than this
    max_refusal_drop: float | None = 0.3  # breach when the refusal rate falls this far below the baseline's
    max_over_refusal: float | None = None  # breach when the refusal rate on benign prompts exceeds this
    max_sae_drift: float | None = None  # breach when CWAC's safety-latent drift exceeds this (CWAC runs only)
    on_breach: str = "warn"  # warn | stop (stop: control.should_training_stop)
    save_last_safe: bool = True  # save the model to <output_dir>/last_safe after every check that passes
    seed: int = 0  # which prompts are drawn when a set is larger than n_harmful / n_benign


@dataclass
class DefenseSection:
    name: str = "sft"  # one defense or a composition: cwac+pact
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-defense config: {cwac: {lam: 0.5}}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    defense: DefenseSection = field(default_factory=DefenseSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    artifacts_dir: str | None = None  # default: <cache>/artifacts

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- validation ------------------------------------------------------------------------------------------------

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "data.task": ("sst2", "agnews", "gsm8k", "demo"),
    "data.harmful_source": ("advbench", "smollm2_content", "hh_rlhf", "beavertails", "demo"),
    "data.template": ("chat", "alpaca"),
    "training.method": ("lora", "full"),
    "training.lr_scheduler": ("constant", "linear", "cosine", "constant_with_warmup"),
    "eval.harmful_source": ("advbench", "harmbench", "harmbench_val", "harmbench_heldout", "harmbench_copyright",
                            "strongreject", "demo"),
    "monitor.on_breach": ("warn", "stop"),
}
# key -> (low, high, low_inclusive, high_inclusive)
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "data.n": (1, math.inf, True, False),
    "data.p": (0, 1, True, True),
    "data.poison_share": (0, 1, False, True),
    "data.max_length": (8, 1 << 20, True, True),
    "training.lora_r": (1, 4096, True, True),
    "training.lora_alpha": (1, 1 << 16, True, True),
    "training.lora_dropout": (0, 1, True, False),
    "training.lr": (0, 1, False, True),
    "training.epochs": (0, 10000, False, True),
    "training.batch_size": (1, 1 << 16, True, True),
    "training.grad_accum": (1, 1 << 16, True, True),
    "training.weight_decay": (0, 10, True, True),
    "training.warmup_ratio": (0, 1, True, False),
    "training.max_grad_norm": (0, 1e6, True, True),
    "training.save_steps": (1, math.inf, True, False),
    "training.save_total_limit": (1, 1000, True, True),
    "training.logging_steps": (1, math.inf, True, False),
    "eval.n_harmful": (0, math.inf, True, False),
    "eval.n_task": (0, math.inf, True, False),
    "eval.n_xstest": (0, math.inf, True, False),
    "eval.n_copyright": (0, math.inf, True, False),
    "eval.max_new_tokens": (1, 8192, True, True),
    "eval.batch_size": (1, 4096, True, True),
    "align.n_refusal": (1, math.inf, True, False),
    "align.n_benign": (0, math.inf, True, False),
    "align.steps": (1, math.inf, True, False),
    "align.batch_size": (1, 4096, True, True),
    "align.lr": (0, 1, False, True),
    "align.lora_r": (1, 4096, True, True),
    "align.lora_alpha": (1, 1 << 16, True, True),
    "align.max_length": (8, 1 << 20, True, True),
    "align.contrast_repeat": (1, 100, True, True),
    "monitor.every": (1, math.inf, True, False),
    "monitor.n_harmful": (0, math.inf, True, False),
    "monitor.n_benign": (0, math.inf, True, False),
    "monitor.max_new_tokens": (1, 8192, True, True),
    "monitor.batch_size": (1, 4096, True, True),
    "monitor.max_harmful_rate": (0, 1, True, True),
    "monitor.max_harmful_increase": (0, 1, True, True),
    "monitor.max_refusal_drop": (0, 1, True, True),
    "monitor.max_over_refusal": (0, 1, True, True),
    "monitor.max_sae_drift": (0, math.inf, True, False),
}


def _fmt_range(lo: float, hi: float, lo_inc: bool, hi_inc: bool) -> str:
    left = "[" if lo_inc else "("
    right = "]" if hi_inc else ")"
    return f"{left}{lo:g}, {'inf' if hi == math.inf else f'{hi:g}'}{right}"


def validate_section(section: str, obj: Any) -> None:
    """Finite numbers, allowed choices and ranges of one section's leaves (None = unset is always allowed for an
    optional key)."""
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}"
        value = getattr(obj, f.name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise SafeFTError(f"config key {key}: {value} is not a finite number")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise SafeFTError(f"config key {key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
        if key in _RANGES:
            lo, hi, lo_inc, hi_inc = _RANGES[key]
            ok = (value >= lo if lo_inc else value > lo) and (value <= hi if hi_inc else value < hi)
            if not ok:
                raise SafeFTError(f"config key {key}: {value} is outside the allowed range {_fmt_range(lo, hi, lo_inc, hi_inc)}")


def validate_monitor(m: MonitorConfig) -> None:
    """The monitor section, plus what only makes sense together."""
    validate_section("monitor", m)
    if m.n_harmful == 0 and m.n_benign == 0:
        raise SafeFTError("config keys monitor.n_harmful and monitor.n_benign are both 0: the monitor would check "
                          "nothing; give at least one prompt")
    thresholds = ("max_harmful_rate", "max_harmful_increase", "max_refusal_drop", "max_over_refusal",
                  "max_sae_drift")
    if m.on_breach == "stop" and all(getattr(m, t) is None for t in thresholds):
        raise SafeFTError("config key monitor.on_breach=stop: no threshold is set, so nothing can stop training; "
                          "set one of " + ", ".join(f"monitor.{t}" for t in thresholds))


def without_idle_monitor(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run config dict as compared for reuse (benchmark cell hashes, demo runs): an idle monitor changes no result,
    so its section is left out, and runs made before it existed still match. Returns a shallow copy."""
    cfg = dict(cfg)
    if not (cfg.get("monitor") or {}).get("enabled"):
        cfg.pop("monitor", None)
    return cfg


def validate(cfg: RunConfig) -> None:
    for section in ("model", "data", "training", "eval", "align"):
        validate_section(section, getattr(cfg, section))
    validate_monitor(cfg.monitor)
    if not cfg.training.lora_targets:
        raise SafeFTError("config key training.lora_targets: empty; name at least one module, e.g. [q_proj, v_proj]")
    if not isinstance(cfg.defense.options, dict):
        raise SafeFTError("config key defense.options: must be a mapping {defense_name: {key: value}}")
    from safeft.defenses.base import build_config, get_defense_class, parse_defense_spec

    names = parse_defense_spec(cfg.defense.name)
    for dname, opts in cfg.defense.options.items():
        cls = get_defense_class(dname)
        if not isinstance(opts, dict):
            raise SafeFTError(f"config key defense.options.{dname}: must be a mapping of that defense's settings")
        build_config(cls, opts)  # raises on unknown keys / bad values
    del names


# ---- building from dicts, YAML and flags -----------------------------------------------------------------------

def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _inner(tp: Any) -> Any:
    if _is_optional(tp):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML/flag value to the field type, or raise naming the key."""
    if value is None:
        if _is_optional(tp):
            return None
        raise SafeFTError(f"config key {key}: null is not allowed here")
    base = _inner(tp)
    origin = typing.get_origin(base)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise SafeFTError(f"config key {key}: expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise SafeFTError(f"config key {key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise SafeFTError(f"config key {key}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool):
            raise SafeFTError(f"config key {key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise SafeFTError(f"config key {key}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise SafeFTError(f"config key {key}: {value!r} is not a finite number")
        return out
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise SafeFTError(f"config key {key}: expected a string, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise SafeFTError(f"config key {key}: expected a list, got {value!r}")
        return [_coerce(key, v, typing.get_args(base)[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise SafeFTError(f"config key {key}: expected a mapping, got {value!r}")
        return value
    return value


def _section_from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise SafeFTError(f"config key {prefix}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SafeFTError(f"unknown config key(s) {', '.join(f'{prefix}.{u}' for u in unknown)}; allowed in {prefix}: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(f"{prefix}.{k}", v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "defense": DefenseSection,
    "eval": EvalConfig,
    "align": AlignConfig,
    "monitor": MonitorConfig,
}


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    if not isinstance(data, dict):
        raise SafeFTError("config: the top level must be a mapping of sections (model, data, training, ...)")
    allowed = set(_SECTIONS) | {"artifacts_dir"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SafeFTError(f"unknown config section(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in data:
            kwargs[name] = _section_from_dict(cls, data[name] or {}, name)
    if "artifacts_dir" in data:
        kwargs["artifacts_dir"] = _coerce("artifacts_dir", data["artifacts_dir"], str | None)
    return RunConfig(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SafeFTError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SafeFTError(f"{path}: not valid UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line (reader errors span several)
        raise SafeFTError(f"{path}{where}: malformed YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SafeFTError(f"{path}: the top level must be a mapping of sections (model, data, training, ...)")
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict (creating levels)."""
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise SafeFTError(f"config key {key}: {p} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` (value parsed as YAML: numbers, booleans, lists) -> (key, value)."""
    if "=" not in text:
        raise SafeFTError(f"--set {text!r}: expected key=value, e.g. --set training.lr=2e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """YAML file (optional) + dotted overrides (flags win) -> validated RunConfig."""
    data = load_yaml(yaml_path) if yaml_path else {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return config_from_dict(data)


def leaf_fields() -> list[tuple[str, Any, Any]]:
    """All ``(section.key, type, default)`` leaves, for generating CLI flags and docs."""
    out = []
    for name, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append((f"{name}.{f.name}", hints[f.name], default))
    return out
