"""The command line: each command offers flags for exactly the config keys it reads (checked against what the
pipeline reads), both flag spellings reach the same key, ``safeft --version``, ``python -m safeft`` and its exit
code 2. That ``safeft train`` checks data files before touching a model is in test_bad_inputs.py."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_models import make_tiny_model_dir

from safeft.cli import ALIASES, COMMAND_KEYS, _overrides, build_parser, command_keys, main, version
from safeft.config import RunConfig, build_config, leaf_fields

SRC = Path(__file__).resolve().parents[1] / "src"
ALL_KEYS = [key for key, _tp, _default in leaf_fields()] + ["artifacts_dir"]


def _help(capsys, *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[A-Za-z][\w.-]*", text))


# ---- per-command flags ---------------------------------------------------------------------------------------------


def test_command_table_names_real_keys():
    sections = {k.split(".")[0] for k in ALL_KEYS}
    for command, entries in COMMAND_KEYS.items():
        for entry in entries:
            assert entry in ALL_KEYS or entry in sections, (
                f"{command}: {entry} is not a config key or section"
            )
    assert set(ALIASES.values()) <= set(ALL_KEYS)
    assert command_keys("train") == ALL_KEYS  # train reads every section


def test_eval_help_has_no_training_flags(capsys):
    flags = _flags(_help(capsys, "eval"))
    assert {
        "--model",
        "--model.aligned",
        "--judge",
        "--eval.judge",
        "--n-harmful",
        "--eval.batch_size",
        "--task",
        "--eval-source",
        "--align.steps",
        "--run-dir",
        "--out",
        "--config",
        "--set",
    } <= flags
    unread = {
        "--lr",
        "--epochs",
        "--training.lora_r",
        "--batch-size",
        "--defense",
        "--base-model",
        "--output-dir",
        "--resume",
        "--p",
        "--n",
        "--max-length",
    }
    assert not flags & unread, flags & unread
    assert not [f for f in flags if f.startswith(("--training.", "--defense."))]


def test_train_help_lists_every_key_under_its_section(capsys):
    text = _help(capsys, "train")
    flags = _flags(text)
    assert {f"--{key}" for key in ALL_KEYS} <= flags
    assert set(ALIASES) | {"--resume", "--eval", "--config", "--set"} <= flags
    for section in ("model", "data", "training", "defense", "eval", "align"):
        assert f"{section} settings:" in text
    assert re.search(r"--lr V, --training\.lr V\s+default: 0\.0001", text), text


@pytest.mark.parametrize("command", ["align", "prepare"])
def test_align_and_prepare_help_match_the_table(capsys, command):
    flags = _flags(_help(capsys, command))
    config_flags = {f for f in flags if f.lstrip("-") in ALL_KEYS}
    assert config_flags == {f"--{key}" for key in command_keys(command)}
    assert "--lr" not in flags and "--epochs" not in flags and "--judge" not in flags


def test_short_and_full_flags_reach_the_same_key():
    parse = build_parser().parse_args
    assert _overrides(parse(["train", "--lr", "2e-5"])) == _overrides(
        parse(["train", "--training.lr", "2e-5"])
    )
    assert build_config(None, _overrides(parse(["train", "--training.lr", "2e-5"]))).training.lr == 2e-5
    assert _overrides(parse(["train", "--resume"])) == {"training.resume": True}
    assert _overrides(parse(["eval", "--eval.n_harmful", "3", "--model", "m"])) == {
        "eval.n_harmful": 3,
        "model.aligned": "m",
    }


def test_flag_of_a_key_the_command_does_not_read_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--lr", "1e-4"])
    assert e.value.code == 2 and "unrecognized arguments: --lr" in capsys.readouterr().err


class _Reads:
    """A RunConfig stand-in that records each config key read through it (``section.key`` or ``artifacts_dir``)."""

    def __init__(self, obj, prefix: str = "", seen: set[str] | None = None):
        self.__dict__.update(_obj=obj, _prefix=prefix, seen=set() if seen is None else seen)

    def __getattr__(self, name: str):
        value = getattr(self._obj, name)
        if name in {f.name for f in dataclasses.fields(self._obj)}:
            key = f"{self._prefix}{name}"
            if dataclasses.is_dataclass(value):
                return _Reads(value, key + ".", self.seen)
            self.seen.add(key)
        return value


def _demo_cfg(model_dir: Path, tmp_path: Path, **sections) -> RunConfig:
    from safeft.config import config_from_dict

    data = {
        "model": {"aligned": str(model_dir), "cache_dir": str(tmp_path / "cache")},
        "data": {"task": "demo", "harmful_source": "demo", "max_length": 96},
        "eval": {"harmful_source": "demo", "judge": "keyword", "n_harmful": 2, "n_task": 2},
        "training": {"output_dir": str(tmp_path / "run"), "progress": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


def test_eval_and_prepare_read_only_their_listed_keys(tmp_path, monkeypatch):
    """The table is checked against the code: run the real pipeline functions on a tiny model through a config
    that records what is read."""
    import safeft.eval
    from safeft.pipeline import run_eval, run_prepare

    model_dir = make_tiny_model_dir(tmp_path / "m", max_position_embeddings=256)
    monkeypatch.setattr(safeft.eval, "evaluate_model", lambda *a, **k: {"harmful": {}, "task": {}})
    cfg = _Reads(_demo_cfg(model_dir, tmp_path))
    run_eval(cfg)
    assert cfg.seen and cfg.seen <= set(command_keys("eval")), cfg.seen - set(command_keys("eval"))

    cfg = _Reads(_demo_cfg(model_dir, tmp_path))
    run_prepare(cfg, log=lambda *a: None)
    # training.output_dir goes into the defense context, which no defense's prepare step reads
    extra = cfg.seen - set(command_keys("prepare")) - {"training.output_dir"}
    assert "defense.name" in cfg.seen and not extra, extra


# ---- --version, python -m safeft, exit codes -----------------------------------------------------------------------


def test_stdout_is_line_buffered_so_a_redirected_log_shows_progress(monkeypatch):
    """`safeft bench > bench.log` (no PYTHONUNBUFFERED): each progress line reaches the file when printed."""
    import io

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # a file-like stdout: block-buffered by default
    assert not out.line_buffering
    monkeypatch.setattr(sys, "stdout", out)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert out.line_buffering
    print("[ 1/2] cell running", file=out)
    assert out.buffer.getvalue().endswith(b"cell running\n")  # already written through, no flush called


def test_version(capsys, monkeypatch):
    import importlib.metadata

    import safeft

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"safeft {version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version())

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert version() == safeft.__version__


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "safeft", *argv], env=env, capture_output=True, text=True, timeout=120
    )


def test_python_m_safeft_version_and_exit_code_2(tmp_path):
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"safeft {version()}", proc.stderr
    bad = tmp_path / "run.yaml"
    bad.write_text("training:\n  lr: [1e-4\n", encoding="utf-8")
    proc = _run("train", "--config", str(bad))  # fails before torch is imported: under a second
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert re.fullmatch(r"safeft: error: \S*run\.yaml:\d+: malformed YAML \(.*\)\n", proc.stderr), proc.stderr


def test_a_command_leaves_the_process_group(tmp_path, capsys):
    # under torchrun / accelerate launch the CLI destroys the group before the interpreter exits (an exit with gloo
    # alive has aborted with SIGABRT after the work was saved)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["list"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
