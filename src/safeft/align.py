"""The alignment stage: θ_b + safety SFT → θ₀, cached by θ_b's weights, the stage's settings and its exact data.

``model.aligned: "aligned:<spec>"`` in a config names this stage's output for ``<spec>``
(:func:`safeft.pipeline.resolve` calls :func:`run_align`); ``safeft align`` runs it alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from safeft.config import RunConfig
from safeft.data.rows import RowsDataset, tokenize_all
from safeft.data.splits import Splits, build_splits, subsample
from safeft.errors import SafeFTError
from safeft.io import atomic_write_json, jsonable


def _align_key(cfg: RunConfig, base_fp: str, examples: list) -> str:
    """Cache key of an alignment-stage output: θ_b's weights, the stage's settings and the exact training examples
    (so two runs share θ₀ exactly when they would train the same model)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.kind}\x00{e.prompt}\x00{e.response}\x01".encode())
    payload = {"base": base_fp, "align": cfg.to_dict()["align"], "template": cfg.data.template,
               "lora_targets": cfg.training.lora_targets, "data": h.hexdigest(), "v": 2}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _validation_harmful(cfg: RunConfig, splits: Splits) -> list[str]:
    """Harmful prompts for checking the alignment stage: HarmBench's validation split when the shared data is there
    (never the test prompts the benchmark reports HS on), else the run's held-out evaluation prompts (demo)."""
    from safeft.data import load_harmful_prompts, shared_data_dir

    if cfg.eval.harmful_source != "demo" and shared_data_dir() is not None:
        try:
            return load_harmful_prompts("harmbench_val")
        except SafeFTError:
            pass
    return splits.eval_harmful


def run_align(cfg: RunConfig, base_spec: str, *, evaluate: bool = True, log: Any = print) -> dict[str, Any]:
    """Safety SFT of ``base_spec`` (θ_b) on harmful-prompt → refusal pairs plus benign instructions (safe-but-
    scary contrast prompts included, so it learns to discriminate), LoRA merged into the weights. The result is θ₀,
    cached under ``<cache>/aligned/`` keyed by θ_b's fingerprint and ``cfg.align``; a second call loads it."""
    from safeft.data import CompletionCollator
    from safeft.models import cache_root, fingerprint, load_model, resolve_model, setup_trainable
    from safeft.trainer import SafeTrainer

    base_dir = resolve_model(base_spec, cache_dir=cfg.model.cache_dir, trust_remote_code=cfg.model.trust_remote_code)
    base_fp = fingerprint(base_dir)
    splits = build_splits(cfg, need_poison=False)
    a = cfg.align
    g = torch.Generator().manual_seed(a.seed)
    refusals = [splits.align_refusals[i] for i in torch.randperm(len(splits.align_refusals), generator=g)[: a.n_refusal]]
    benign = [splits.benign[i] for i in torch.randperm(len(splits.benign), generator=g)[: a.n_benign]]
    if not refusals:
        raise SafeFTError("alignment stage: no refusal pairs available; check the data sources")
    contrast = [e for e in benign if e.meta.get("contrast")]
    examples = refusals + benign + contrast * (a.contrast_repeat - 1)
    key = _align_key(cfg, base_fp, examples)
    root = (Path(cfg.model.cache_dir) if cfg.model.cache_dir else cache_root()) / "aligned"
    out = root / f"{Path(str(base_dir)).name}-{key}"
    info_path = out / "align.json"
    if info_path.is_file() and (out / "config.json").is_file():
        info = json.loads(info_path.read_text())
        info["aligned_dir"] = out
        info["cached"] = True
        return info
    log(f"alignment stage: {len(refusals)} refusal + {len(benign)} benign pairs, {a.steps} steps (cached afterwards)")
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    model, tok, _ = load_model(str(base_dir), dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir)
    model = setup_trainable(model, method="lora", lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                            target_modules=cfg.training.lora_targets)
    rows = tokenize_all(tok, examples, cfg.data.template, a.max_length, "alignment data")
    from transformers import TrainingArguments

    tmp_out = root / f".{out.name}.run"
    args = TrainingArguments(
        output_dir=str(tmp_out), per_device_train_batch_size=a.batch_size, learning_rate=a.lr, max_steps=a.steps,
        lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=max(1, a.steps // 10), save_strategy="no",
        seed=a.seed, report_to=[], remove_unused_columns=False, disable_tqdm=not cfg.training.progress,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    trainer = SafeTrainer(model=model, args=args, train_dataset=RowsDataset(rows),
                          data_collator=CompletionCollator(tok), processing_class=tok)
    trainer.train()
    merged = trainer.model.merge_and_unload()
    stage = root / f".{out.name}.tmp"
    if stage.exists():
        shutil.rmtree(stage)
    merged.save_pretrained(str(stage), safe_serialization=True)
    tok.save_pretrained(str(stage))
    info: dict[str, Any] = {
        "base_model": str(base_dir), "base_fingerprint": base_fp, "align_config": cfg.to_dict()["align"],
        "n_refusal": len(refusals), "n_benign": len(benign), "train_seconds": time.perf_counter() - t0,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
    }
    if evaluate:
        from safeft.eval import KeywordJudge, generate

        judge = KeywordJudge()
        harm = subsample(_validation_harmful(cfg, splits), 40, a.seed)
        safe = subsample(splits.xstest_safe, 40, a.seed)
        merged.eval()
        ans_h = generate(merged, tok, harm, template=cfg.data.template, max_new_tokens=48, batch_size=16,
                         desc="align check: harmful")
        ans_s = generate(merged, tok, safe, template=cfg.data.template, max_new_tokens=48, batch_size=16,
                         desc="align check: safe") if safe else []
        info["refusal_rate_harmful"] = sum(judge.is_refusal(x) for x in ans_h) / max(1, len(ans_h))
        info["refusal_rate_safe"] = sum(judge.is_refusal(x) for x in ans_s) / max(1, len(ans_s)) if ans_s else None
        info["check_sizes"] = [len(ans_h), len(ans_s)]
        log(f"aligned model: refuses {info['refusal_rate_harmful']:.0%} of {len(ans_h)} held-out (validation) harmful prompts, "
            f"{(info['refusal_rate_safe'] or 0):.0%} of {len(ans_s)} safe contrast prompts")
    atomic_write_json(stage / "align.json", jsonable(info))
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    shutil.rmtree(tmp_out, ignore_errors=True)
    info["aligned_dir"] = out
    info["cached"] = False
    return info
