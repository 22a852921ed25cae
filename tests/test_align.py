"""The alignment stage on a tiny model: trains, merges, caches by (θ_b, settings, exact data), reloads."""

from __future__ import annotations

import json

from helpers_models import make_tiny_model_dir

from safeft.config import build_config
from safeft.models import fingerprint, load_model
from safeft.pipeline import resolve, run_align


def _cfg(tmp_path, model_dir, **extra):
    s = {
        "model.aligned": f"aligned:{model_dir}",
        "model.cache_dir": str(tmp_path / "cache"),
        "data.task": "demo", "data.harmful_source": "demo", "eval.harmful_source": "demo",
        "training.progress": False,
        "align.steps": 2, "align.batch_size": 4, "align.n_refusal": 8, "align.n_benign": 8, "align.max_length": 96,
    }
    s.update(extra)
    return build_config(None, s)


def test_align_trains_merges_and_caches(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "m", max_position_embeddings=256)
    cfg = _cfg(tmp_path, model_dir)
    info = run_align(cfg, str(model_dir), log=lambda *a: None)
    out = info["aligned_dir"]
    assert not info["cached"] and (out / "model.safetensors").is_file() and (out / "align.json").is_file()
    assert 0.0 <= info["refusal_rate_harmful"] <= 1.0
    assert info["n_refusal"] == 8 and info["n_benign"] == 8
    # merged weights: a plain model (no adapter files), different from θ_b
    assert not (out / "adapter_config.json").exists()
    assert fingerprint(out) != fingerprint(model_dir)
    model, _, _ = load_model(str(out))
    assert not any("lora_" in n for n, _ in model.named_parameters())
    # second call: cached, same folder; `aligned:` specs resolve to it
    again = run_align(cfg, str(model_dir), log=lambda *a: None)
    assert again["cached"] and again["aligned_dir"] == out
    assert resolve(cfg, f"aligned:{model_dir}", log=lambda *a: None) == out
    assert json.loads((out / "align.json").read_text())["base_fingerprint"] == fingerprint(model_dir)
    # other settings → another θ₀
    other = run_align(_cfg(tmp_path, model_dir, **{"align.lr": 1e-4}), str(model_dir), log=lambda *a: None)
    assert other["aligned_dir"] != out
