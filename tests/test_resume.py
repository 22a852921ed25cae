"""Resume: a `safeft train` process killed with SIGKILL after a checkpoint, rerun with --resume, ends with exactly
the adapter of an uninterrupted run (defense state included); run.json / eval.json are written atomically.

The killed run is a real subprocess (`python -c` calling ``safeft.cli.main``) with one test-only patch: right after
checkpoint-4 is complete (defense state written) it writes a marker file and sleeps, so the SIGKILL always lands
between step 4 and step 5. Lisa (align 1 / user 2 steps) is the defense: its phase, counters, alignment-data cursor
and snapshot must come back from ``defense_state.safetensors``, or the resumed run takes a different path.
Tolerance: exact (``torch.equal``) on every adapter tensor; same machine, same thread count.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_models import demo_train_args, make_tiny_model_dir
from safetensors.torch import load_file

from safeft.cli import main

KILL_AFTER = 4

_PATCHED_MAIN = """
import sys, time
from pathlib import Path
import safeft.trainer as T
_orig = T._DefenseCallback.on_save
def on_save(self, args, state, control, **kw):
    _orig(self, args, state, control, **kw)
    Path(args.output_dir, f"saved-{state.global_step}").write_text("ok")
    if state.global_step == KILL_AFTER:
        time.sleep(120)  # wait here for SIGKILL
T._DefenseCallback.on_save = on_save
from safeft.cli import main
sys.exit(main(sys.argv[1:]))
""".replace("KILL_AFTER", str(KILL_AFTER))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", max_position_embeddings=256)


def _args(model_dir, out, cache):
    extra = ["--lr", "1e-2", "--max-length", "96", "--defense", "lisa"]
    for kv in (
        "defense.options.lisa.align_steps=1",
        "defense.options.lisa.user_steps=2",
        "training.save_steps=2",
        "training.save_total_limit=5",
        "training.lora_r=4",
        "training.lora_alpha=8",
        "training.logging_steps=1",
    ):
        extra += ["--set", kv]
    return demo_train_args(model_dir, out, cache, n=24, max_steps=6, extra=extra)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, model_dir, capsys):
    cache = tmp_path / "cache"
    # reference: uninterrupted, in this process
    assert main(_args(model_dir, tmp_path / "ref", cache)) == 0
    ref = _adapter(tmp_path / "ref")

    # killed run: a real process, SIGKILL once checkpoint-4 is complete
    out = tmp_path / "run"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _PATCHED_MAIN, *_args(model_dir, out, cache)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    marker = out / f"saved-{KILL_AFTER}"
    deadline = time.monotonic() + 90
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"training exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("checkpoint-4 did not appear within 90 s")
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists() and not (out / "run.json").exists()
    assert (out / f"checkpoint-{KILL_AFTER}" / "defense_state.safetensors").is_file()

    # the checkpointed Lisa state: steps 1 (align) 2-3 (user) 4 (align) done -> next phase user, counters at 4
    state = load_file(str(out / f"checkpoint-{KILL_AFTER}" / "defense_state.safetensors"))
    assert int(state["lisa.phase"]) == 1 and int(state["lisa.phase_step"]) == 0
    assert int(state["lisa.global_step"]) == KILL_AFTER
    assert int(state["lisa.data_cursor"]) > 0  # two alignment batches were drawn

    capsys.readouterr()
    assert main(_args(model_dir, out, cache) + ["--resume"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from"].endswith(f"checkpoint-{KILL_AFTER}") and run["global_steps"] == 6
    got = _adapter(out)
    assert set(got) == set(ref)
    diffs = {k: float((got[k] - ref[k]).abs().max()) for k in ref}
    assert all(torch.equal(got[k], ref[k]) for k in ref), f"max |Δ| {max(diffs.values()):.3g}"
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 1e-3  # training moved B

    # sensitivity: resuming the same checkpoint without the defense state takes another path
    (out / f"checkpoint-{KILL_AFTER}" / "defense_state.safetensors").unlink()
    for extra in ("final", "run.json"):
        p = out / extra
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    for ckpt in out.glob(
        "checkpoint-*"
    ):  # resume from checkpoint-4 again, not from the finished run's last one
        if int(ckpt.name.split("-")[1]) > KILL_AFTER:
            shutil.rmtree(ckpt)
    assert main(_args(model_dir, out, cache) + ["--resume"]) == 0
    stateless = _adapter(out)
    assert any(not torch.equal(stateless[k], ref[k]) for k in ref)


# ---- atomic writes -------------------------------------------------------------------------------------------------


def test_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    from safeft import io

    target = tmp_path / "run.json"
    io.atomic_write_json(target, {"version": 1})

    def disk_full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        io.atomic_write_json(target, {"version": 2, "big": "x" * 10_000})
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temp file left behind


def test_run_json_and_eval_json_go_through_atomic_write(tmp_path, model_dir, monkeypatch):
    import safeft.pipeline as pipeline
    from safeft.config import build_config

    written: list[str] = []
    real = pipeline.atomic_write_json

    def spy(path, obj):
        written.append(Path(path).name)
        real(path, obj)

    monkeypatch.setattr(pipeline, "atomic_write_json", spy)
    cfg = build_config(
        None,
        {
            "model.aligned": str(model_dir),
            "model.cache_dir": str(tmp_path / "cache"),
            "data.task": "demo",
            "data.harmful_source": "demo",
            "data.n": 8,
            "data.p": 0.25,
            "data.max_length": 96,
            "training.max_steps": 1,
            "training.batch_size": 4,
            "training.lora_r": 4,
            "training.lora_alpha": 8,
            "training.output_dir": str(tmp_path / "run"),
            "training.progress": False,
            "eval.harmful_source": "demo",
            "eval.n_harmful": 2,
            "eval.n_task": 2,
            "eval.max_new_tokens": 2,
        },
    )
    rec = pipeline.run_train(cfg, keep_model=True, log=lambda *a: None)
    pipeline.run_eval(cfg, rec["model"], rec["tokenizer"], out_path=tmp_path / "run" / "eval.json")
    assert written == ["run.json", "eval.json"]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["harmful"]["n"] == 2
