"""End-to-end on a tiny random model: train → save → reload → evaluate, through the same code the CLI uses."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_models import make_tiny_model_dir

from safeft.cli import main
from safeft.config import build_config
from safeft.pipeline import build_splits, load_trained, run_eval, run_train


def _cfg(tmp_path, model_dir, **extra):
    s = {
        "model.aligned": str(model_dir),
        "model.cache_dir": str(tmp_path / "cache"),
        "data.task": "demo",
        "data.harmful_source": "demo",
        "data.n": 24,
        "data.p": 0.25,
        "data.max_length": 96,
        "training.lora_r": 4,
        "training.lora_alpha": 8,
        "training.max_steps": 3,
        "training.batch_size": 4,
        "training.lr": 1e-2,
        "training.save_steps": 2,
        "training.logging_steps": 1,
        "training.output_dir": str(tmp_path / "run"),
        "training.progress": False,
        "eval.harmful_source": "demo",
        "eval.n_harmful": 4,
        "eval.n_task": 4,
        "eval.n_xstest": 2,
        "eval.max_new_tokens": 4,
    }
    s.update(extra)
    return build_config(None, s)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", max_position_embeddings=256)


def test_demo_splits_are_disjoint_and_nonempty(tmp_path, model_dir):
    s = build_splits(_cfg(tmp_path, model_dir))
    assert s.poison and s.eval_harmful and s.anchor_pool and s.benign and s.xstest_safe
    ev = {p.lower() for p in s.eval_harmful}
    assert not ev & {p.lower() for p in s.anchor_pool}
    assert not ev & {e.prompt.lower() for e in s.poison}
    assert not {p.lower() for p in s.xstest_safe} & {e.prompt.lower() for e in s.benign}


def test_train_save_reload_eval_roundtrip(tmp_path, model_dir):
    cfg = _cfg(tmp_path, model_dir)
    rec = run_train(cfg, keep_model=True, log=lambda *a: None)
    assert rec["global_steps"] == 3
    assert rec["n_harmful_train"] == 6  # round(0.25 * 24)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["n_train"] == 24 and len(run["losses"]) >= 1
    assert run["defense_revisions"] == {cfg.defense.name: 1} and cfg.defense.name in run["defense_config_resolved"]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    model, tok = load_trained(cfg, tmp_path / "run")
    x = torch.tensor([[5, 6, 7, 8]])
    rec["model"].eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, rec["model"](input_ids=x).logits, atol=1e-5)
    report = run_eval(cfg, model, tok, out_path=tmp_path / "eval.json")
    assert report["harmful"]["n"] == 4 and report["task"]["n"] == 4 and report["over_refusal"]["n"] == 2
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["harmful"]["records"][0]["prompt"]


def test_full_finetuning_roundtrip(tmp_path, model_dir):
    cfg = _cfg(tmp_path, model_dir, **{"training.method": "full", "training.lr": 1e-3})
    rec = run_train(cfg, keep_model=True, log=lambda *a: None)
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    model, _ = load_trained(cfg, tmp_path / "run")
    sd1 = rec["model"].state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd1[k]), k


def test_cli_train_runs_and_bad_inputs_exit_2(tmp_path, model_dir, capsys):
    args = ["train", "--model", str(model_dir), "--task", "demo", "--harmful-source", "demo", "--eval-source", "demo",
            "--n", "8", "--p", "0.25", "--max-steps", "1", "--batch-size", "4", "--output-dir", str(tmp_path / "r"),
            "--set", f"model.cache_dir={tmp_path / 'cache'}", "--set", "training.progress=false"]
    assert main(args) == 0
    assert (tmp_path / "r" / "final").is_dir()
    for bad, needle in [
        (["--p", "1.5"], "data.p"),
        (["--lr", "nan"], "training.lr"),
        (["--defense", "nope"], "unknown defense"),
        (["--set", "training.bogus=1"], "training.bogus"),
        (["--n", "100000"], "rows"),
        (["--model", str(tmp_path / "missing")], "does not exist"),
    ]:
        capsys.readouterr()
        assert main(args + bad) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and err.count("\n") == 1, err
