"""Offline and security guarantees.

* Offline: with every internet socket blocked (``connect``/``connect_ex``/``create_connection``/DNS raise and are
  recorded) and ``HF_HUB_OFFLINE=1``, a full ``safeft train --eval`` through the CLI, model loading from a local
  dir, and resuming touch no network; a Hub id fails with a one-line SafeFTError without one connection attempt.
* Source hygiene: ``src/`` never unpickles (``pickle.load``, ``torch.load`` without ``weights_only=True``), never
  hard-codes ``trust_remote_code=True``, never uses ``yaml.load`` (only ``safe_load``), never evals strings or runs
  shells.

To block sockets for the whole suite, the lead adds the fixture from the report to tests/conftest.py.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from helpers_models import demo_train_args, make_tiny_model_dir

from safeft.errors import SafeFTError

SRC = Path(__file__).resolve().parents[1] / "src"


class NetworkBlocked(OSError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Block and record every attempt to reach another host (AF_UNIX sockets stay allowed)."""
    attempts: list[str] = []

    def _refuse(what):
        def f(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what.startswith('socket.') else args}")
            raise NetworkBlocked(f"network access blocked in tests: {what} {args[1:2]}")

        return f

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        return _refuse("socket.connect")(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", _refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", _refuse("getaddrinfo"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    try:  # huggingface_hub reads the variable at import: mirror it
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
    return attempts


def test_socket_block_works(no_network):
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    assert no_network  # recorded


def test_end_to_end_train_eval_resume_offline(tmp_path, no_network, capsys):
    from safeft.cli import main

    model_dir = make_tiny_model_dir(tmp_path / "m", max_position_embeddings=256)
    extra = ["--max-length", "96", "--n-harmful", "2", "--n-task", "2", "--max-new-tokens", "2"]
    extra += ["--set", "training.save_steps=1", "--defense", "lisa"]
    extra += ["--set", "defense.options.lisa.align_steps=1", "--set", "defense.options.lisa.user_steps=1"]
    args = demo_train_args(model_dir, tmp_path / "run", tmp_path / "c", max_steps=2, extra=extra)
    assert main([*args, "--eval"]) == 0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["harmful"]["n"] == 2
    # resume (loads optimizer / scheduler / RNG state) and evaluate a saved run through the CLI
    assert main([*args, "--max-steps", "3", "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resumed_from"].endswith("checkpoint-2")
    assert (
        main(
            [
                "eval",
                "--model",
                str(model_dir),
                "--task",
                "demo",
                "--eval-source",
                "demo",
                "--n-harmful",
                "2",
                "--n-task",
                "2",
                "--max-new-tokens",
                "2",
                "--run-dir",
                str(tmp_path / "run"),
                "--set",
                f"model.cache_dir={tmp_path / 'c'}",
            ]
        )
        == 0
    )
    assert no_network == []


def test_model_loading_paths_offline(tmp_path, no_network):
    from safeft.models import fingerprint, load_model, load_tokenizer, resolve_model

    model_dir = make_tiny_model_dir(tmp_path / "m")
    model, tok, directory = load_model(str(model_dir))
    assert directory == model_dir.resolve() and model.config.hidden_size == 64
    assert load_tokenizer(str(model_dir)).pad_token == tok.pad_token
    assert len(fingerprint(model_dir)) == 64
    with pytest.raises(SafeFTError, match=r"cannot load Hugging Face model 'no-such-org/no-such-model'") as e:
        resolve_model("no-such-org/no-such-model", cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert no_network == []


# ---- source hygiene ------------------------------------------------------------------------------------------------


def _calls(text: str, name: str) -> list[tuple[int, str]]:
    """(line, full call text) of every ``name(`` call, parentheses balanced across lines."""
    out = []
    for m in re.finditer(re.escape(name) + r"\s*\(", text):
        depth, i = 0, m.end() - 1
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        out.append((text.count("\n", 0, m.start()) + 1, text[m.start() : i + 1]))
    return out


def _code_lines(text: str) -> str:
    """The source with comments blanked (line numbers kept); strings stay (docstrings may mention bad calls, so
    patterns below match call syntax only)."""
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.split("\n"))


BANNED = [
    (r"\bpickle\.loads?\s*\(", "unpickling runs arbitrary code: use safetensors / JSON"),
    (r"\b(cPickle|dill|joblib|shelve)\b.*\bload", "unpickling runs arbitrary code"),
    (r"\byaml\.load\s*\(", "yaml.load can build arbitrary objects: use yaml.safe_load"),
    (r"\byaml\.(unsafe_load|full_load|load_all)\s*\(|\b(Unsafe|Full)?Loader\b\s*\)", "use yaml.safe_load"),
    (r"trust_remote_code\s*=\s*True", "remote code must stay opt-in (model.trust_remote_code in the config)"),
    (r"weights_only\s*=\s*False", "torch.load must be weights_only=True"),
    (r"use_safetensors\s*=\s*False", "weights are read from safetensors only"),
    (r"(?<![\w.])(eval|exec)\s*\(", "no eval/exec of strings"),
    (r"shell\s*=\s*True", "no shell commands"),
]


def test_source_has_no_unsafe_deserialisation_or_remote_code():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    found = []
    for f in files:
        code = _code_lines(f.read_text(encoding="utf-8"))
        for pattern, why in BANNED:
            for m in re.finditer(pattern, code):
                line = code.count("\n", 0, m.start()) + 1
                found.append(f"{f.relative_to(SRC.parent)}:{line}: {m.group(0)!r} ({why})")
        for line, call in _calls(code, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", call):
                found.append(f"{f.relative_to(SRC.parent)}:{line}: torch.load without weights_only=True")
    assert not found, "\n".join(found)


def test_hygiene_scanner_catches_each_pattern():
    """The scanner itself: each banned snippet is found, the safe forms are not."""
    bad = [
        "pickle.load(f)",
        "yaml.load(text)",
        "yaml.load(t, Loader=yaml.FullLoader)",
        "x = eval(s)",
        "from_pretrained(p, trust_remote_code=True)",
        "torch.load(p, weights_only=False)",
        "subprocess.run(c, shell=True)",
    ]
    for snippet in bad:
        assert any(re.search(p, snippet) for p, _ in BANNED), snippet
    assert _calls("torch.load(\n  p,\n)", "torch.load") and not re.search(
        r"weights_only\s*=\s*True", _calls("torch.load(\n  p,\n)", "torch.load")[0][1]
    )
    ok = [
        "yaml.safe_load(text)",
        "model.eval()",
        "torch.load(p, weights_only=True)",
        "trust_remote_code=cfg.model.trust_remote_code",
        "# pickle.load(x) in a comment",
    ]
    for snippet in ok:
        assert not any(re.search(p, _code_lines(snippet)) for p, _ in BANNED), snippet
