"""CWAC through the real pipeline on a tiny model: prepare → train → eval, artifacts reloaded from cache."""

from __future__ import annotations

import json

import pytest
from helpers_models import make_tiny_model_dir

from safeft.config import build_config
from safeft.pipeline import run_eval, run_prepare, run_train


@pytest.fixture
def always_refuses(monkeypatch):
    # a random tiny model refuses nothing; the anchor filter would (rightly) stop. Pretend θ₀ refuses everything.
    from safeft.eval import KeywordJudge

    monkeypatch.setattr(KeywordJudge, "is_refusal", lambda self, text: True)


# small everything; the demo's own prompts only (anchors from the run's pool, the SAE's general text from the
# harmless pool) so the test needs no shared data
FAST = {"n_anchor": 24, "anchor_sources": ["pool"], "sae_general_sources": ["harmless"], "sae_tokens": 1500,
        "sae_steps": 20, "sae_batch_size": 256, "sae_width_factor": 2, "sae_k": 4, "n_features": 8,
        "n_positions": 2, "anchor_batch": 2, "max_new_tokens_anchor_check": 2, "causal_check": False,
        "anchor_judge": "keyword"}


def _cfg(tmp_path, model_dir, **extra):
    s = {
        "model.aligned": str(model_dir),
        "model.cache_dir": str(tmp_path / "cache"),
        "data.task": "demo", "data.harmful_source": "demo", "data.n": 16, "data.p": 0.25, "data.max_length": 96,
        "training.lora_r": 4, "training.lora_alpha": 8, "training.max_steps": 3, "training.batch_size": 4,
        "training.lr": 1e-2, "training.save_steps": 100, "training.output_dir": str(tmp_path / "run"),
        "training.progress": False, "training.logging_steps": 1,
        "eval.harmful_source": "demo", "eval.n_harmful": 3, "eval.n_task": 3, "eval.max_new_tokens": 3,
        "defense.name": "cwac",
        "defense.options.cwac": dict(FAST),
    }
    s.update(extra)
    return build_config(None, s)


def _manifests(root):
    return {p.parent.name: p.stat().st_mtime_ns for p in root.rglob("manifest.json")}


def test_cwac_prepare_train_eval_and_cache(tmp_path, always_refuses):
    model_dir = make_tiny_model_dir(tmp_path / "m", max_position_embeddings=256)
    cfg = _cfg(tmp_path, model_dir)
    prep = run_prepare(cfg, log=lambda *a: None)
    art_root = tmp_path / "cache" / "artifacts"
    first = _manifests(art_root)
    assert {"cwac-anchors", "cwac-subspace", "cwac-sae", "cwac-features"} <= set(first), first
    assert prep["cwac"]["prepare_seconds"] > 0

    rec = run_train(cfg, keep_model=True, log=lambda *a: None)
    assert _manifests(art_root) == first  # second use: loaded from cache, nothing recomputed
    leak = rec["finalize"]["cwac"]["cwac_max_relative_leak"]
    assert leak < 1e-5
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert any("cwac/safety" in h for h in run["log_history"])  # the activation term is logged
    report = run_eval(cfg, rec["model"], rec["tokenizer"])
    assert report["harmful"]["n"] == 3 and report["task"]["n"] == 3

    # the weight-only ablation reuses the same cached artifacts and adds no loss term
    cfg_w = _cfg(tmp_path, model_dir, **{"defense.name": "cwac-weight",
                                         "training.output_dir": str(tmp_path / "run_w"),
                                         "defense.options.cwac-weight": dict(FAST)})
    cfg_w.defense.options.pop("cwac", None)
    rec_w = run_train(cfg_w, log=lambda *a: None)
    assert _manifests(art_root) == first
    assert not any("cwac/safety" in h for h in rec_w["log_history"])
    assert rec_w["finalize"]["cwac-weight"]["cwac_max_relative_leak"] < 1e-5
