"""Orchestration: config → data + model → defense.prepare → SafeTrainer → model → eval → report.

The CLI, the demo and the benchmark all go through these functions, so every entry point builds data splits,
contexts and outputs the same way.
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from safeft.align import run_align
from safeft.config import RunConfig
from safeft.data.rows import RowsDataset, tokenize_all
from safeft.data.splits import Splits, build_splits, subsample
from safeft.errors import SafeFTError
from safeft.io import atomic_write_json, jsonable

__all__ = [  # the entry points; build_splits, Splits, tokenize_all and run_align are re-exported from their modules
    "Splits", "artifacts_root", "build_context", "build_splits", "build_task_data", "load_frozen", "load_trained",
    "resolve", "run_align", "run_eval", "run_prepare", "run_train", "share_settings", "tokenize_all",
]  # fmt: skip

# ---- models ------------------------------------------------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


ALIGNED_PREFIX = "aligned:"


def resolve(cfg: RunConfig, spec: str, log: Any = print) -> Path:
    """A model spec -> local safetensors dir. ``aligned:<spec>`` is the alignment stage's output for ``<spec>``
    (computed once with ``cfg.align`` and cached)."""
    from safeft.models import resolve_model

    if spec.startswith(ALIGNED_PREFIX):
        return run_align(cfg, spec[len(ALIGNED_PREFIX) :], log=log)["aligned_dir"]
    return resolve_model(spec, cache_dir=cfg.model.cache_dir, trust_remote_code=cfg.model.trust_remote_code)


def load_frozen(cfg: RunConfig, path: str | Path) -> torch.nn.Module:
    from safeft.models import load_model

    model, _, _ = load_model(str(path), dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir,
                             trust_remote_code=cfg.model.trust_remote_code)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def artifacts_root(cfg: RunConfig) -> Path:
    from safeft.models import cache_root

    if cfg.artifacts_dir:
        return Path(cfg.artifacts_dir)
    return (Path(cfg.model.cache_dir) if cfg.model.cache_dir else cache_root()) / "artifacts"


# ---- training ----------------------------------------------------------------------------------------------------


def build_task_data(cfg: RunConfig, splits: Splits) -> list:
    """The user's data: n task samples with round(p·n) harmful ones (deterministic per data.seed)."""
    from safeft.data import load_demo, load_task, mix_poison

    if cfg.data.task == "demo":
        task = load_demo().sentiment_train
    else:
        task = load_task(cfg.data.task, "train", path=cfg.data.task_path, seed=cfg.data.seed)
        if not task:
            source = cfg.data.task_path or f"task {cfg.data.task}"
            raise SafeFTError(f"{source}: no task rows (empty file?); give at least data.n={cfg.data.n} rows")
    if cfg.data.p > 0 and not splits.poison:
        raise SafeFTError(f"data.p={cfg.data.p} but no harmful pairs are available from {cfg.data.harmful_source}")
    return mix_poison(task, splits.poison, cfg.data.n, cfg.data.p, cfg.data.seed)


class _StepTimer:
    """Wall time of each optimizer step (the first is warm-up and reported apart)."""

    def __init__(self):
        self.times: list[float] = []
        self._t = 0.0

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer._t)

        return _CB()


def _reset_peak_memory() -> None:
    """Start a fresh peak-memory window (training only, not artifact preparation): CUDA's allocator counter, or
    on Linux the process's resident-set high-water mark (``/proc/self/clear_refs`` ← 5)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory_mb() -> float:
    """Peak memory since the last reset: CUDA max allocated, else VmHWM (Linux), else ru_maxrss."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _last_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not output_dir.is_dir():
        return None
    return get_last_checkpoint(str(output_dir))


def build_context(cfg: RunConfig, model, tokenizer, splits: Splits, aligned_dir: Path, base_dir: Path | None,
                  fp: str, collator=None):
    """The DefenseContext of a run: tokenizer, θ₀/θ_b paths, artifact folder keyed by θ₀'s fingerprint, prompt
    pools (never the evaluation prompts), and helpers to load frozen models and collate examples (with the
    training run's ``collator``, or a new CompletionCollator)."""
    from safeft.data import CompletionCollator
    from safeft.defenses import DefenseContext

    collator = collator or CompletionCollator(tokenizer)

    def collate_examples(exs: list) -> dict:
        return collator(tokenize_all(tokenizer, exs, cfg.data.template, cfg.data.max_length, "alignment data"))

    return DefenseContext(
        tokenizer=tokenizer,
        template=cfg.data.template,
        aligned_model_path=str(aligned_dir),
        base_model_path=str(base_dir) if base_dir else None,
        fingerprint=fp,
        artifacts_dir=artifacts_root(cfg) / fp[:16],
        load_model=lambda path: load_frozen(cfg, path),
        anchor_pool=list(splits.anchor_pool),
        harmless_pool=list(splits.harmless_pool),
        refusal_pairs=[(e.prompt, e.response) for e in splits.refusal_pairs],
        alignment_examples=list(splits.refusal_pairs) + list(splits.benign),
        eval_prompts=list(splits.eval_harmful) + list(splits.xstest_safe),
        poison_prompts=[e.prompt for e in splits.poison],
        use_lora=cfg.training.method == "lora",
        max_length=cfg.data.max_length,
        seed=cfg.training.seed,
        dtype=_dtype(cfg.model.dtype),
        device=next(model.parameters()).device,
        output_dir=Path(cfg.training.output_dir),
        collate=collate_examples,
    )


def _check_defense_needs(cfg: RunConfig, defenses: list) -> None:
    from safeft.defenses import get_defense_class

    needs_base = [d.name for d in defenses if get_defense_class(d.name).needs_base_model]
    if needs_base and not cfg.model.base:
        raise SafeFTError(f"defense(s) {', '.join(needs_base)} need the unaligned base model θ_b: pass --base-model PATH (model.base)")
    if cfg.training.method == "full":
        lora_only = [d.name for d in defenses if get_defense_class(d.name).requires_lora]
        if lora_only:
            raise SafeFTError(f"defense(s) {', '.join(lora_only)} work on LoRA adapters only: use --method lora")


def run_prepare(cfg: RunConfig, log: Any = print, *, share_from: str | None = None, export_to: str | None = None,
                push_to: str | None = None) -> dict[str, Any]:
    """Compute (or load from cache) the artifacts of ``cfg.defense`` for θ₀, without training.

    share_from: a shared artifact folder or Hub repo id (safeft.share) loaded into θ₀'s cache first; nothing is
    then computed (an artifact it lacks, or one made with other settings, stops the run). export_to: write the
    artifacts this prepare used as a shared folder there. push_to: upload that folder to this Hub repo (exported
    to ``<artifacts root>/<fingerprint[:16]>-shared`` when no export_to is given, and kept if the upload fails)."""
    from safeft.artifacts import session
    from safeft.defenses import build_defenses
    from safeft.models import fingerprint, load_model, setup_trainable

    defenses = build_defenses(cfg.defense.name, cfg.defense.options)
    _check_defense_needs(cfg, defenses)
    # data first: a bad file is reported before any model is converted or loaded
    splits = build_splits(cfg)  # the poison pool too: anchors are kept disjoint from it (same artifacts as train)
    aligned_dir = resolve(cfg, cfg.model.aligned, log=log)
    base_dir = resolve(cfg, cfg.model.base, log=log) if cfg.model.base else None
    model, tokenizer, _ = load_model(str(aligned_dir), dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir,
                                     trust_remote_code=cfg.model.trust_remote_code)
    fp = fingerprint(aligned_dir)
    model = setup_trainable(model, method=cfg.training.method, lora_r=cfg.training.lora_r,
                            lora_alpha=cfg.training.lora_alpha, target_modules=cfg.training.lora_targets)
    ctx = build_context(cfg, model, tokenizer, splits, aligned_dir, base_dir, fp)
    out: dict[str, Any] = {"fingerprint": fp, "artifacts_dir": str(ctx.artifacts_dir)}
    if share_from:
        from safeft.share import load_shared

        load_shared(share_from, ctx.artifacts_dir, fp, log=log)
        out["shared_from"] = share_from
    with session(strict=ctx.artifacts_dir if share_from else None, source=str(share_from)) as sess:
        for d in defenses:
            t0 = time.perf_counter()
            fn = getattr(d, "prepare_artifacts", None)
            summary = fn(model, ctx) if fn else (d.prepare(model, ctx) or {})
            out[d.name] = {"prepare_seconds": time.perf_counter() - t0,
                           **(summary if isinstance(summary, dict) else {})}
    if export_to or push_to:
        from safeft.share import export_shared, push_shared

        folder = Path(export_to) if export_to else artifacts_root(cfg) / f"{fp[:16]}-shared"
        names = [p.name for p in sess.used if p.parent == Path(ctx.artifacts_dir)]
        export_shared(ctx.artifacts_dir, fp, folder, names=names, settings=share_settings(cfg),
                      model=None if is_local_path(cfg.model.aligned) else cfg.model.aligned,
                      defenses=[d.name for d in defenses])
        out["exported_to"] = str(folder)
        log(f"shared artifact folder written to {folder}")
        if push_to:
            out["pushed_to"] = push_shared(folder, push_to)
            log(f"pushed to {out['pushed_to']}")
    return out


def share_settings(cfg: RunConfig) -> dict[str, Any]:
    """The run settings a shared artifact folder records (config.yaml): everything but local paths and training
    bookkeeping that no artifact depends on."""
    d = cfg.to_dict()
    d.pop("artifacts_dir", None)
    d["model"].pop("cache_dir", None)
    for k in ("output_dir", "resume", "progress", "save_steps", "save_total_limit", "logging_steps"):
        d["training"].pop(k, None)
    # a local path says who made the folder and where (user names, private data sets): it is not shared. Files
    # become None (the built-in source of that key); a model folder is left out (the user passes --model; the
    # fingerprint says which θ₀ the artifacts belong to). Hub ids and built-in aliases stay.
    for section, key in (("model", "aligned"), ("model", "base"), ("data", "task_path"), ("data", "harmful_path"),
                         ("eval", "harmful_path"), ("monitor", "harmful_path"), ("monitor", "benign_path")):
        v = (d.get(section) or {}).get(key)
        if isinstance(v, str) and is_local_path(v):
            if section == "model":
                d[section].pop(key)  # config.yaml stays a valid --config: the user's --model fills it
            else:
                d[section][key] = None
    return d


def is_local_path(value: str) -> bool:
    """Whether a model / data spec names a local file or folder (rather than a Hub id or a built-in alias)."""
    v = value.split(":", 1)[1] if value.startswith("aligned:") else value
    return v.startswith(("/", "./", "../", "~")) or Path(v).expanduser().exists() or "\\" in v


def run_train(cfg: RunConfig, *, keep_model: bool = False, log: Any = print) -> dict[str, Any]:
    """Fine-tune θ₀ on the (poisoned) user data under ``cfg.defense``. Writes ``<output_dir>/final`` (adapter or
    full model, safetensors) and ``<output_dir>/run.json``. Returns the run record (plus ``model``/``tokenizer``
    when ``keep_model``)."""
    from safeft.data import CompletionCollator
    from safeft.defenses import build_defenses
    from safeft.defenses.base import defaults_revisions
    from safeft.models import fingerprint, load_model, setup_trainable
    from safeft.trainer import SafeTrainer

    t_start = time.perf_counter()
    out_dir = Path(cfg.training.output_dir)
    defenses = build_defenses(cfg.defense.name, cfg.defense.options)
    _check_defense_needs(cfg, defenses)
    # config and data files are checked before any model is converted or loaded (minutes for a large GGUF)
    splits = build_splits(cfg)
    examples = build_task_data(cfg, splits)
    aligned_dir = resolve(cfg, cfg.model.aligned, log=log)
    base_dir = resolve(cfg, cfg.model.base, log=log) if cfg.model.base else None

    torch.manual_seed(cfg.training.seed)
    model, tokenizer, _ = load_model(str(aligned_dir), dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir,
                                     trust_remote_code=cfg.model.trust_remote_code)
    fp = fingerprint(aligned_dir)
    model = setup_trainable(model, method=cfg.training.method, lora_r=cfg.training.lora_r,
                            lora_alpha=cfg.training.lora_alpha, lora_dropout=cfg.training.lora_dropout,
                            target_modules=cfg.training.lora_targets)
    collator = CompletionCollator(tokenizer)
    ctx = build_context(cfg, model, tokenizer, splits, aligned_dir, base_dir, fp, collator)
    for d in defenses:
        examples = d.modify_dataset(examples, ctx)
    train_rows = tokenize_all(tokenizer, examples, cfg.data.template, cfg.data.max_length)
    args = _training_args(cfg, out_dir)  # sets up the process group when launched by torchrun / accelerate
    t_prep = time.perf_counter()
    # multi-process: rank 0 computes and caches the artifacts first, the other ranks then load them (no two
    # processes writing one artifact folder at once)
    with args.main_process_first(local=False, desc="defense prepare"):
        for d in defenses:
            d.prepare(model, ctx)
    prepare_seconds = time.perf_counter() - t_prep

    timer = _StepTimer()
    trainer = SafeTrainer(model=model, args=args, train_dataset=RowsDataset(train_rows), data_collator=collator,
                          processing_class=tokenizer, defenses=defenses, callbacks=[timer.callback()])
    monitor = None
    if cfg.monitor.enabled:
        from safeft.monitor import SafetyMonitor

        # after the step timer in the callback list: step times do not include the checks
        monitor = SafetyMonitor(cfg.monitor, template=cfg.data.template, log=log).attach(trainer)
    resume = _last_checkpoint(out_dir) if cfg.training.resume else None
    if cfg.training.resume and resume:
        log(f"resuming from {resume}")
    _reset_peak_memory()
    t_train = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - t_train
    finalize = trainer.finalize_defenses()
    final_dir = out_dir / "final"
    tmp_dir = out_dir / ".final.tmp"
    main_process = trainer.is_world_process_zero()  # multi-process: one writer for final/ and run.json
    # FSDP / ZeRO-3 hold shards: gather the whole state dict (a collective, every rank; rank 0 receives it)
    full_sd = trainer.accelerator.get_state_dict(trainer.model) if trainer.sharding_backend() else None
    if main_process:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        kw = {"state_dict": full_sd} if full_sd is not None else {}
        trainer.model.save_pretrained(str(tmp_dir), safe_serialization=True, **kw)
        tokenizer.save_pretrained(str(tmp_dir))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        tmp_dir.rename(final_dir)
    steps = timer.times[1:] if len(timer.times) > 1 else timer.times
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record = {
        "config": cfg.to_dict(),
        # the settings each defense ran with, defaults filled in, and the revision of those defaults
        "defense_config_resolved": {d.name: jsonable(asdict(d.config)) for d in defenses
                                    if is_dataclass(d.config)},
        "defense_revisions": defaults_revisions([d.name for d in defenses]),
        "aligned_model": str(aligned_dir),
        "base_model": str(base_dir) if base_dir else None,
        "fingerprint": fp,
        "n_train": len(examples),
        "n_harmful_train": sum(1 for e in examples if e.kind == "harmful"),
        "global_steps": result.global_step,
        "train_loss": result.training_loss,
        "losses": losses,
        "log_history": trainer.state.log_history,
        "prepare_seconds": prepare_seconds,
        "train_seconds": train_seconds,
        "step_seconds_mean": sum(steps) / len(steps) if steps else math.nan,
        "step_seconds": timer.times,
        "peak_memory_mb": _peak_memory_mb(),
        "total_seconds": time.perf_counter() - t_start,
        "finalize": finalize,
        "final_dir": str(final_dir),
        "resumed_from": resume,
    }
    if monitor is not None:
        record["monitor"] = monitor.summary()
    if main_process:
        atomic_write_json(out_dir / "run.json", jsonable(record))
    trainer.accelerator.wait_for_everyone()
    if keep_model:
        record["model"] = trainer.model
        record["tokenizer"] = tokenizer
        record["splits"] = splits
    return record


def _training_args(cfg: RunConfig, out_dir: Path):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.training.batch_size,
        gradient_accumulation_steps=cfg.training.grad_accum,
        learning_rate=cfg.training.lr,
        num_train_epochs=cfg.training.epochs,
        max_steps=cfg.training.max_steps,
        weight_decay=cfg.training.weight_decay,
        warmup_steps=cfg.training.warmup_ratio,
        lr_scheduler_type=cfg.training.lr_scheduler,
        max_grad_norm=cfg.training.max_grad_norm,
        logging_steps=cfg.training.logging_steps,
        save_strategy="steps",
        save_steps=cfg.training.save_steps,
        save_total_limit=cfg.training.save_total_limit,
        seed=cfg.training.seed,
        data_seed=cfg.data.seed,
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=not cfg.training.progress,
        bf16=cfg.model.dtype == "bfloat16" and torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


# ---- evaluation --------------------------------------------------------------------------------------------------


def load_trained(cfg: RunConfig, run_dir: str | Path):
    """θ₀ + the adapter in ``<run_dir>/final`` (LoRA), or the full model saved there."""
    from safeft.models import load_model

    final = Path(run_dir) / "final"
    if not final.is_dir():
        final = Path(run_dir)
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        model, tok, _ = load_model(str(resolve(cfg, cfg.model.aligned)), dtype=cfg.model.dtype,
                                   cache_dir=cfg.model.cache_dir, trust_remote_code=cfg.model.trust_remote_code)
        model = PeftModel.from_pretrained(model, str(final))
        return model, tok
    if (final / "config.json").is_file():
        model, tok, _ = load_model(str(final), dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir)
        return model, tok
    raise SafeFTError(f"{run_dir}: no trained model found (expected final/adapter_config.json or final/config.json)")


def run_eval(cfg: RunConfig, model=None, tokenizer=None, splits: Splits | None = None,
             out_path: str | Path | None = None, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Harmful score on held-out harmful prompts, fine-tune accuracy on the task's held-out split, over-refusal.

    Evaluates ``model`` when given, else the trained run in ``run_dir`` (:func:`load_trained`), else θ₀. The
    prompt files and the judge are read before any model is loaded."""
    from safeft.data import load_demo, load_task
    from safeft.eval import evaluate_model, get_judge
    from safeft.models import load_model

    splits = splits or build_splits(cfg, need_poison=False)
    harmful = subsample(splits.eval_harmful, cfg.eval.n_harmful, cfg.eval.seed)
    if cfg.data.task == "demo":
        task_examples = load_demo().sentiment_test
        task_name = "sst2"
    else:
        split = "validation" if cfg.data.task == "sst2" else "test"
        task_examples = load_task(cfg.data.task, split, path=None, seed=cfg.eval.seed)
        task_name = cfg.data.task
    task_examples = subsample(task_examples, cfg.eval.n_task, cfg.eval.seed)
    xs = subsample(splits.xstest_safe, cfg.eval.n_xstest, cfg.eval.seed) if cfg.eval.n_xstest else None
    cr = None
    if cfg.eval.n_copyright:
        from safeft.data import load_harmful_prompts

        cr = subsample(load_harmful_prompts("harmbench_copyright"), cfg.eval.n_copyright, cfg.eval.seed)
    judge = get_judge(cfg.eval.judge)
    if model is None and run_dir is not None:
        model, tokenizer = load_trained(cfg, run_dir)
    elif model is None:
        model, tokenizer, _ = load_model(str(resolve(cfg, cfg.model.aligned)), dtype=cfg.model.dtype,
                                         cache_dir=cfg.model.cache_dir, trust_remote_code=cfg.model.trust_remote_code)
    report = evaluate_model(
        model, tokenizer, harmful_prompts=harmful, judge=judge, task=task_name,
        task_examples=task_examples or None, xstest_prompts=xs, template=cfg.data.template,
        max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, copyright_prompts=cr,
    )
    report["model"] = cfg.model.aligned
    report["eval_config"] = jsonable(cfg.to_dict()["eval"])
    if out_path:
        atomic_write_json(out_path, jsonable(report))
    return report
