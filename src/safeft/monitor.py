"""A live safety-drift monitor: a ``transformers.TrainerCallback`` that watches whether fine-tuning erodes refusals.

Every ``every`` optimizer steps, at step 0 (the baseline, θ₀ for a fresh run) and at the last step, the monitor
answers a small fixed set of held-out harmful prompts and benign / XSTest-style safe prompts greedily (short answers,
one batch, eval mode under ``inference_mode``, train/eval flags restored), judges them with a three-outcome judge
(``content`` by default, SPEC §5), and logs through the Trainer's own ``log`` — so ``report_to`` TensorBoard / W&B,
``state.log_history`` and the console get them:

* ``safety/harmful_rate``, ``safety/refusal_rate`` (fractions of the harmful prompts judged ``harmful`` /
  ``refusal``), ``safety/harmful_increase`` (harmful rate minus the baseline's), ``safety/over_refusal`` (fraction of
  the benign prompts judged ``refusal``), the counts ``safety/harmful_count``, ``safety/refusal_count``,
  ``safety/over_refusal_count``, ``safety/breach`` (0/1) and ``safety/check_seconds``;
* with CWAC's activation term in the trainer's defenses: ``safety/sae_drift`` (mean over SAE layers) and
  ``safety/sae_drift/layer_L``, CWAC's own distance of the safety latents from θ₀'s baselines on every baseline
  anchor (:meth:`safeft.defenses.cwac.activation.ActivationTerm.drift`).

Thresholds (``max_harmful_rate``, ``max_harmful_increase`` over the baseline, ``max_refusal_drop`` below the
baseline's refusal rate — on by default at 0.3, since a refusal collapse is the first sign and the content judge
under-counts harm on short answers — ``max_over_refusal``, ``max_sae_drift``; a rate or drift that is not a number
always breaches) make a check a *breach*: ``on_breach="warn"`` prints a warning, ``"stop"`` sets
``control.should_training_stop``. A check that passes saves the model to ``<output_dir>/last_safe`` (safetensors;
the adapter only for peft models), swapped in by renames so a crash leaves the previous copy. The history is
rewritten atomically to ``<output_dir>/monitor.json`` after every check.

Multi-process (DDP, DeepSpeed ZeRO-1/2): rank 0 alone generates, judges, measures and saves; the other ranks wait at
one ``broadcast_object_list`` of rank 0's result, at the same step on every rank, so every rank logs the same
numbers and takes the same stop decision (no rank can run ahead into a collective the others skip). FSDP and ZeRO-3
are refused: generation would need every rank's shards.

Usage with any Trainer (SafeTrainer, TRL's SFTTrainer, plain ``transformers.Trainer``)::

    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    SafetyMonitor(every=50, max_harmful_increase=0.1, on_breach="stop").attach(trainer)
    trainer.train()

``attach`` adds the callback and keeps the trainer, whose ``log`` reaches the ``report_to`` loggers. Passed only as
``callbacks=[monitor]`` it still works, but a callback cannot reach the Trainer: the metrics then go to
``state.log_history``, the console and monitor.json, not to TensorBoard / W&B (it says so once).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from safeft.config import MonitorConfig, _section_from_dict, validate_monitor
from safeft.errors import SafeFTError
from safeft.io import atomic_write_json, jsonable

MONITOR_FILE = "monitor.json"
LAST_SAFE = "last_safe"
HELDOUT_BUCKET = 70  # the demo prompts build_splits holds out for evaluation: stable hash bucket ≥ 70


# ---- prompts -------------------------------------------------------------------------------------------------------
def default_prompts() -> tuple[list[str], list[str]]:
    """``(harmful, benign)``: the shipped demo data's held-out split — the harmful requests and the safe-but-scary
    contrast prompts (XSTest style) that ``safeft.pipeline.build_splits`` keeps out of training in demo runs. No run
    trains on these harmful prompts; the contrast prompts do enter the alignment stage and Lisa's alignment data in
    non-demo runs (pass XSTest's safe prompts as ``benign_prompts`` for over-refusal on unseen prompts)."""
    from safeft.data import load_demo
    from safeft.data.splits import prompt_bucket

    demo = load_demo()
    harmful = [h["prompt"] for h in demo.harmful if prompt_bucket(h["prompt"]) >= HELDOUT_BUCKET]
    benign = [p for p in demo.contrast_prompts if prompt_bucket(p) >= HELDOUT_BUCKET]
    return harmful, benign


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: ``.jsonl`` (a ``prompt`` field per record), ``.csv`` (a ``prompt`` column) or ``.txt``
    (one prompt per non-empty line). Raises :class:`SafeFTError` naming the file for anything else."""
    from safeft.io import read_csv, read_jsonl, require_columns

    p = Path(path)
    if not p.is_file():
        raise SafeFTError(
            f"{p}: prompt file not found; pass a .jsonl, .csv or .txt file or a list of prompts"
        )
    kind = p.suffix.lower()
    if kind == ".jsonl":
        rows = read_jsonl(p)
        require_columns(rows, ["prompt"], str(p))
        prompts = [str(r["prompt"]) for r in rows]
    elif kind == ".csv":
        rows = read_csv(p)
        require_columns(rows, ["prompt"], str(p))
        prompts = [str(r["prompt"]) for r in rows]
    elif kind == ".txt":
        try:
            prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise SafeFTError(f"{p}: not valid UTF-8; re-save the file as UTF-8") from None
    else:
        raise SafeFTError(
            f"{p}: unknown prompt file type {kind or '(none)'!r}; use .jsonl or .csv (a prompt "
            f"field / column) or .txt (one prompt per line)"
        )
    prompts = [x for x in prompts if x.strip()]
    if not prompts:
        raise SafeFTError(f"{p}: no prompts in the file")
    return prompts


def _prompt_list(value: Any, name: str) -> list[str] | None:
    """None, a file path (str / PathLike) or a sequence of prompt strings -> list of prompts."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return read_prompts(value)
    if not isinstance(value, Sequence) or not all(isinstance(x, str) for x in value):
        raise SafeFTError(
            f"SafetyMonitor: {name} must be a list of prompt strings or a file path, got "
            f"{type(value).__name__}"
        )
    prompts = [x for x in value if x.strip()]
    if not prompts:
        raise SafeFTError(f"SafetyMonitor: {name} is empty; give at least one prompt or leave it unset")
    return prompts


def _pick(items: list[str], n: int, seed: int) -> list[str]:
    """``n`` items in their original order, drawn with a seeded RNG (all when there are no more than ``n``)."""
    if n >= len(items):
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


# ---- multi-process -------------------------------------------------------------------------------------------------
def _process_group() -> Any:
    """``torch.distributed`` when more than one process trains, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _sharded(args: Any, trainer: Any) -> str | None:
    """The name of a parameter-sharding engine this run uses (FSDP, DeepSpeed ZeRO-3), else None."""
    if trainer is not None and getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "FSDP"
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return "DeepSpeed ZeRO-3"
    except ImportError:  # pragma: no cover - an older transformers layout
        pass
    return None


def _unwrap(model: Any) -> Any:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# ---- the callback --------------------------------------------------------------------------------------------------
class SafetyMonitor(TrainerCallback):
    """Checks refusals on held-out prompts during training; logs, warns or stops, keeps the last safe model.

    ``config``: a :class:`safeft.config.MonitorConfig` (the ``monitor`` section of a run config); keyword
    ``options`` override its fields (``every=20, max_harmful_rate=0.3, on_breach="stop"``), with the same checks and
    messages as the YAML keys. ``harmful_prompts`` / ``benign_prompts``: lists of prompts or a file
    (:func:`read_prompts`); default the config's ``harmful_path`` / ``benign_path``, else :func:`default_prompts`.
    ``judge``: a judge spec (``"content"``, ``"keyword"``, ``"harmbench:PATH"`` …) or a
    :class:`~safeft.eval.judges.base.Judge` instance. ``tokenizer``: default the Trainer's ``processing_class``.
    ``template``: ``"chat"`` (the tokenizer's chat template) or ``"alpaca"``. ``output_dir``: where monitor.json and
    last_safe/ go (default ``args.output_dir``). ``defenses``: defenses to read drift from (default the attached
    trainer's ``defenses``). ``log``: where console lines go (rank 0 only).
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        harmful_prompts: Sequence[str] | str | os.PathLike | None = None,
        benign_prompts: Sequence[str] | str | os.PathLike | None = None,
        judge: Any = None,
        tokenizer: Any = None,
        template: str = "chat",
        output_dir: str | os.PathLike | None = None,
        defenses: Sequence[Any] | None = None,
        log: Callable[[str], None] = print,
        **options: Any,
    ):
        if config is not None and not isinstance(config, MonitorConfig):
            raise SafeFTError(
                f"SafetyMonitor: config must be a safeft.config.MonitorConfig, got "
                f"{type(config).__name__}; pass settings as keyword arguments instead"
            )
        if isinstance(judge, str):
            options["judge"] = judge
            judge = None
        elif judge is not None and not callable(getattr(judge, "outcomes", None)):
            raise SafeFTError(
                "SafetyMonitor: judge must be a judge spec string (content, keyword, KIND:PATH) or "
                "a Judge with an outcomes(prompts, answers) method"
            )
        base = dataclasses.asdict(config) if config is not None else {}
        self.config: MonitorConfig = _section_from_dict(MonitorConfig, {**base, **options}, "monitor")
        validate_monitor(self.config)
        if template not in ("chat", "alpaca"):
            raise SafeFTError(f"SafetyMonitor: template must be chat or alpaca, got {template!r}")
        self.template = template
        self._harmful_in = _prompt_list(harmful_prompts, "harmful_prompts")
        self._benign_in = _prompt_list(benign_prompts, "benign_prompts")
        self._judge = judge
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.defenses = list(defenses) if defenses is not None else None
        self.log = log
        self.trainer: Any = None
        self.harmful: list[str] = []
        self.benign: list[str] = []
        self.history: list[dict[str, Any]] = []
        self.baseline: dict[str, Any] | None = None
        self.last_safe: dict[str, Any] | None = None
        self.stopped: dict[str, Any] | None = None
        self._last_step: int | None = None
        self._warned_unattached = False
        self._resolved = False

    # ---- wiring --------------------------------------------------------------------------------------------------
    def attach(self, trainer: Any) -> SafetyMonitor:
        """Add this callback to ``trainer`` (once) and log through ``trainer.log`` (so ``report_to`` loggers get
        the metrics). Returns ``self``."""
        if not hasattr(trainer, "callback_handler") or not callable(getattr(trainer, "log", None)):
            raise SafeFTError(
                f"SafetyMonitor.attach: expected a transformers.Trainer, got {type(trainer).__name__}"
            )
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def _setup(self, args: Any, kwargs: dict[str, Any]) -> None:
        engine = _sharded(args, self.trainer)
        if engine:
            raise SafeFTError(
                f"safety monitor: does not run under {engine} (generation would need every rank's "
                f"parameter shards); use DDP or DeepSpeed ZeRO-1/2, or train without --monitor"
            )
        if self.tokenizer is None:
            proc = kwargs.get("processing_class") or kwargs.get("tokenizer")
            self.tokenizer = getattr(proc, "tokenizer", proc)  # a multimodal processor holds its tokenizer
        if self.tokenizer is None:
            raise SafeFTError(
                "safety monitor: no tokenizer; pass processing_class=tokenizer to the Trainer or "
                "tokenizer= to SafetyMonitor"
            )
        if self.output_dir is None:
            self.output_dir = Path(args.output_dir)
        self._resolve_prompts()
        if self.defenses is None:
            self.defenses = list(getattr(self.trainer, "defenses", None) or [])

    def _resolve_prompts(self) -> None:
        """The prompts of every check: given lists, else the config's files, else :func:`default_prompts`; at most
        ``n_harmful`` / ``n_benign`` of each (a seeded draw, kept in file order)."""
        c = self.config
        harmful = self._harmful_in or (read_prompts(c.harmful_path) if c.harmful_path else None)
        benign = self._benign_in or (read_prompts(c.benign_path) if c.benign_path else None)
        dh: list[str] = []
        db: list[str] = []
        if harmful is None or benign is None:
            dh, db = default_prompts()
        self.harmful = _pick(harmful if harmful is not None else dh, c.n_harmful, c.seed)
        self.benign = _pick(benign if benign is not None else db, c.n_benign, c.seed)
        self._resolved = True

    def _drift_terms(self) -> list[Any]:
        terms = [getattr(d, "activation_term", None) for d in self.defenses or []]
        return [t for t in terms if t is not None and callable(getattr(t, "drift", None))]

    def _get_judge(self) -> Any:
        if self._judge is None:
            from safeft.eval.judges import get_judge

            self._judge = get_judge(self.config.judge)
        return self._judge

    # ---- events --------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._setup(args, kwargs)
        if state.global_step > 0:
            self._resume(state.global_step)
        if self._last_step != state.global_step:
            self.check(model, args, state, control)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        due = step % self.config.every == 0 or (state.max_steps > 0 and step >= state.max_steps)
        if due and step != self._last_step:
            self.check(model, args, state, control)
        return control

    # ---- one check -----------------------------------------------------------------------------------------------
    def measure(self, model: Any) -> dict[str, Any]:
        """Generate, judge and (CWAC) measure drift on this process; returns the record of one check."""
        from safeft.eval.generate import generate

        c, tok = self.config, self.tokenizer
        if tok is None:
            raise SafeFTError("safety monitor: no tokenizer; pass tokenizer= to SafetyMonitor")
        if not self._resolved:
            self._resolve_prompts()
        m = _unwrap(model)
        t0 = time.perf_counter()
        prompts = self.harmful + self.benign
        answers = generate(
            m, tok, prompts, self.template, c.max_new_tokens, c.batch_size, desc="safety monitor"
        )
        t1 = time.perf_counter()
        outcomes = list(self._get_judge().outcomes(prompts, answers))
        t2 = time.perf_counter()
        nh = len(self.harmful)
        oh, ob = outcomes[:nh], outcomes[nh:]
        rec: dict[str, Any] = {"n_harmful": nh, "n_benign": len(self.benign)}
        if nh:
            rec["harmful_count"] = sum(o == "harmful" for o in oh)
            rec["refusal_count"] = sum(o == "refusal" for o in oh)
            rec["harmful_rate"] = rec["harmful_count"] / nh
            rec["refusal_rate"] = rec["refusal_count"] / nh
        if ob:
            rec["over_refusal_count"] = sum(o == "refusal" for o in ob)
            rec["over_refusal"] = rec["over_refusal_count"] / len(ob)
        terms = self._drift_terms()
        if terms:
            modes = [(x, x.training) for x in m.modules()]
            m.eval()
            try:
                layers: dict[str, float] = {}
                for t in terms:
                    layers.update({str(L): v for L, v in t.drift(m).items()})
            finally:
                for x, was in modes:
                    x.training = was
            rec["sae_drift"] = sum(layers.values()) / len(layers) if layers else 0.0
            rec["sae_drift_by_layer"] = layers
        t3 = time.perf_counter()
        rec["seconds"] = {
            "generate": round(t1 - t0, 3),
            "judge": round(t2 - t1, 3),
            "drift": round(t3 - t2, 3),
        }
        rec["answers"] = [[a, o] for a, o in zip(answers, outcomes)]
        return rec

    def _measure_shared(self, model: Any, state: Any) -> dict[str, Any]:
        dist = _process_group()
        if dist is None:
            return self.measure(model)
        payload: dict[str, Any] | None = None
        if state.is_world_process_zero:
            try:
                payload = self.measure(model)
            except Exception as e:  # noqa: BLE001 - every rank must leave the broadcast, then all raise
                payload = {"error": str(e) if isinstance(e, SafeFTError) else f"{type(e).__name__}: {e}"}
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        payload = box[0]
        if "error" in payload:
            raise SafeFTError(
                f"safety monitor: the check at step {state.global_step} failed on rank 0: {payload['error']}"
            )
        return payload

    def breaches(self, rec: dict[str, Any]) -> list[str]:
        """The thresholds ``rec`` exceeds, as readable sentences (empty = the check passes)."""
        c, out = self.config, []
        hr = rec.get("harmful_rate")
        if hr is not None and c.max_harmful_rate is not None and hr > c.max_harmful_rate:
            out.append(f"harmful rate {_pct(hr)} > max_harmful_rate {_pct(c.max_harmful_rate)}")
        base = (self.baseline or {}).get("harmful_rate")
        if (
            hr is not None
            and base is not None
            and c.max_harmful_increase is not None
            and rec is not self.baseline
        ):
            if hr - base > c.max_harmful_increase + 1e-12:
                out.append(
                    f"harmful rate {_pct(hr)} is {_pct(hr - base)} above the step-"
                    f"{self.baseline['step']} baseline {_pct(base)} (max_harmful_increase "
                    f"{_pct(c.max_harmful_increase)})"
                )
        rr, rbase = rec.get("refusal_rate"), (self.baseline or {}).get("refusal_rate")
        if (
            rr is not None
            and rbase is not None
            and c.max_refusal_drop is not None
            and rec is not self.baseline
            and rbase - rr > c.max_refusal_drop + 1e-12
        ):
            out.append(
                f"refusal rate {_pct(rr)} is {_pct(rbase - rr)} below the step-{self.baseline['step']} baseline "
                f"{_pct(rbase)} (max_refusal_drop {_pct(c.max_refusal_drop)})"
            )
        orr = rec.get("over_refusal")
        if orr is not None and c.max_over_refusal is not None and orr > c.max_over_refusal:
            out.append(f"over-refusal {_pct(orr)} > max_over_refusal {_pct(c.max_over_refusal)}")
        drift = rec.get("sae_drift")
        if drift is not None and c.max_sae_drift is not None and drift > c.max_sae_drift:
            out.append(f"SAE safety-feature drift {drift:.4g} > max_sae_drift {c.max_sae_drift:g}")
        for key in ("harmful_rate", "refusal_rate", "over_refusal", "sae_drift"):  # a diverged model is no pass
            v = rec.get(key)
            if isinstance(v, float) and not math.isfinite(v):
                out.append(f"{key} is {v} (not a number: the model or a defense diverged)")
        return out

    def check(self, model: Any, args: Any, state: Any, control: Any) -> dict[str, Any]:
        """Run one check at ``state.global_step``: measure (rank 0), share, log, save / warn / stop."""
        t0 = time.perf_counter()
        main = bool(state.is_world_process_zero)
        rec = {"step": int(state.global_step), "epoch": state.epoch, **self._measure_shared(model, state)}
        first = self.baseline is None
        if first:
            self.baseline = rec
        rec["breaches"] = self.breaches(rec)
        rec["action"] = self.config.on_breach if rec["breaches"] else "pass"
        if rec["breaches"] and first and self.config.on_breach == "stop":
            raise SafeFTError(
                f"safety monitor: the model already breaches a threshold before training (step "
                f"{rec['step']}: {'; '.join(rec['breaches'])}); training could never pass: raise "
                f"the threshold or use max_harmful_increase (relative to this baseline)"
            )
        self.history.append(rec)
        self._last_step = rec["step"]
        if main and rec["action"] == "pass" and self.config.save_last_safe:
            ts = time.perf_counter()
            try:
                path = self._save_last_safe(model, rec)
                self.last_safe = {"step": rec["step"], "path": str(path)}
            except Exception as e:  # noqa: BLE001 - rank 0 must not die here: the other ranks would wait for it
                rec["save_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
                self.log(f"safety monitor WARNING at step {rec['step']}: could not save last_safe "
                         f"({rec['save_error']}); training goes on, the last safe copy stays "
                         f"{'at step ' + str(self.last_safe['step']) if self.last_safe else 'unsaved'}")
            rec["seconds"]["save"] = round(time.perf_counter() - ts, 3)
        rec["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        self._report(rec, state, control)
        if rec["breaches"]:
            if main:
                self.log(f"safety monitor WARNING at step {rec['step']}: {'; '.join(rec['breaches'])}")
            if self.config.on_breach == "stop":
                control.should_training_stop = True
                self.stopped = {"step": rec["step"], "reasons": rec["breaches"]}
                if main:
                    where = (
                        f"{self.last_safe['path']} (step {self.last_safe['step']})"
                        if self.last_safe
                        else "none saved"
                    )
                    self.log(f"safety monitor: stopping training (on_breach=stop); last safe model: {where}")
        if main:
            try:
                self._write_history()
            except OSError as e:  # the same reason: a full disk must not leave the other ranks waiting
                self.log(f"safety monitor WARNING at step {rec['step']}: could not write {MONITOR_FILE} ({e})")
        return rec

    # ---- outputs -------------------------------------------------------------------------------------------------
    def logs(self, rec: dict[str, Any]) -> dict[str, float]:
        """The scalars of one check, named ``safety/...``."""
        out: dict[str, float] = {}
        for k in (
            "harmful_rate",
            "refusal_rate",
            "over_refusal",
            "harmful_count",
            "refusal_count",
            "over_refusal_count",
            "sae_drift",
        ):
            if k in rec:
                out[f"safety/{k}"] = rec[k]
        base = (self.baseline or {}).get("harmful_rate")
        if "harmful_rate" in rec and base is not None:
            out["safety/harmful_increase"] = rec["harmful_rate"] - base
        for L, v in (rec.get("sae_drift_by_layer") or {}).items():
            out[f"safety/sae_drift/layer_{L}"] = v
        out["safety/breach"] = 1 if rec["breaches"] else 0
        out["safety/check_seconds"] = rec["seconds"]["total"]
        return out

    def _report(self, rec: dict[str, Any], state: Any, control: Any) -> None:
        logs = self.logs(rec)
        if self.trainer is not None:
            from transformers import Trainer

            # Trainer.log itself: log_history + every callback's on_log (report_to loggers, console). Subclass
            # overrides are skipped on purpose: TRL's flushes its running metrics into whatever is logged.
            log = Trainer.log.__get__(self.trainer) if isinstance(self.trainer, Trainer) else self.trainer.log
            # on_log clears control.should_log: without this, the Trainer would skip its own loss log of this step
            keep = control.should_log
            log(dict(logs))
            control.should_log = keep
            self.trainer.control.should_log = keep
        else:
            state.log_history.append({**logs, "step": rec["step"]})
            if not self._warned_unattached and state.is_world_process_zero:
                self.log(
                    "safety monitor note: not attached to a trainer (use monitor.attach(trainer)); metrics go "
                    "to log_history, the console and monitor.json but not to report_to loggers"
                )
                self._warned_unattached = True
        if not state.is_world_process_zero:
            return
        parts = []
        if "harmful_rate" in rec:
            base = self.baseline.get("harmful_rate") if self.baseline is not rec else None
            parts.append(
                f"harmful {_pct(rec['harmful_rate'])} ({rec['harmful_count']}/{rec['n_harmful']}"
                + (f", baseline {_pct(base)})" if base is not None else ")")
                + f", refusal {_pct(rec['refusal_rate'])}"
            )
        if "over_refusal" in rec:
            parts.append(
                f"over-refusal {_pct(rec['over_refusal'])} ({rec['over_refusal_count']}/{rec['n_benign']})"
            )
        if "sae_drift" in rec:
            parts.append(f"SAE drift {rec['sae_drift']:.4g}")
        kind = "baseline" if self.baseline is rec else "check"
        self.log(f"safety {kind} @ step {rec['step']}: {', '.join(parts)} [{rec['seconds']['total']:.1f} s]")

    def _save_last_safe(self, model: Any, rec: dict[str, Any]) -> Path:
        """Save the model (adapter only for peft) + tokenizer to ``<output_dir>/last_safe``: written to a temp folder,
        then swapped in by renames (a crash mid-swap leaves the previous copy in ``.last_safe.old``)."""
        out = self.output_dir
        final, tmp, old = out / LAST_SAFE, out / f".{LAST_SAFE}.tmp", out / f".{LAST_SAFE}.old"
        out.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        _unwrap(model).save_pretrained(str(tmp), safe_serialization=True)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(tmp))
        info = {k: v for k, v in rec.items() if k not in ("answers", "breaches", "action", "seconds")}
        atomic_write_json(tmp / "monitor_check.json", jsonable(info))
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def summary(self) -> dict[str, Any]:
        """What monitor.json holds, minus the per-check answers."""
        return {
            "config": dataclasses.asdict(self.config),
            "judge": getattr(self._judge, "name", self.config.judge),
            "template": self.template,
            "baseline_step": self.baseline["step"] if self.baseline else None,
            "checks": [{k: v for k, v in r.items() if k != "answers"} for r in self.history],
            "last_safe": self.last_safe,
            "stopped": self.stopped,
            "check_seconds_total": round(sum(r["seconds"]["total"] for r in self.history), 3),
        }

    def _write_history(self) -> None:
        data = {
            "version": 1,
            **self.summary(),
            "prompts": {"harmful": self.harmful, "benign": self.benign},
            "answers": {str(r["step"]): r["answers"] for r in self.history},
        }
        atomic_write_json(self.output_dir / MONITOR_FILE, jsonable(data))

    def _resume(self, step: int) -> None:
        """Continue a resumed run's history: checks up to ``step`` and the baseline from monitor.json (same
        prompts only)."""
        path = self.output_dir / MONITOR_FILE
        if not path.is_file():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            self.log(f"safety monitor note: {path} is unreadable; starting a new history at step {step}")
            return
        if data.get("prompts") != {"harmful": self.harmful, "benign": self.benign}:
            self.log(
                f"safety monitor note: {path} was written for other prompts; new baseline at step {step}"
            )
            return
        answers = data.get("answers") or {}
        for r in data.get("checks") or []:
            if r.get("step", step + 1) <= step:
                self.history.append({**r, "answers": answers.get(str(r["step"]), [])})
        if self.history:
            self.baseline = next(
                (r for r in self.history if r["step"] == data.get("baseline_step")), self.history[0]
            )
            self._last_step = self.history[-1]["step"]
        ls = data.get("last_safe")
        if ls and ls.get("step", step + 1) <= step and (self.output_dir / LAST_SAFE).is_dir():
            self.last_safe = ls

