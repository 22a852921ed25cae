"""Sharded parameters: FSDP2 and DeepSpeed ZeRO-3 runs on 2 CPU processes (gloo) equal one process with the same
global batch, defense by defense.

Each launch is ``torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py`` with per-device batch 2; the
reference is the same worker in this process with batch 4 (cached per defense). FSDP2 goes through the Trainer's
own path (``TrainingArguments(fsdp=True, fsdp_config={"version": 2})`` → accelerate's ``fsdp2_prepare_model`` →
``fully_shard``); on CPU the worker lifts accelerate's GPU-only gate and nothing else (see its docstring).
ZeRO-3 goes through ``TrainingArguments(deepspeed={...stage 3...})`` and is skipped where DeepSpeed is not installed.

Tolerance: every trainable parameter (gathered) within ATOL = 1e-5 of the one-process run after 3 optimizer steps
of plain SGD at lr 1 (measured: ≤ 6e-8 for every defense, FSDP2 and ZeRO-3). The runs use SGD so that a parameter
difference measures the gradient difference; AdamW divides each gradient entry by √v + ε and turns a 1e-9
rounding difference on a near-zero entry into up to lr·1e-9/ε (measured once: 5.5e-5 on one entry of one LoRA A
for asft at lr 1e-2, ≤ 1e-6 elsewhere).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers_dist import gloo, torchrun

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_fsdp_worker.py"
ATOL = 1e-5



def _launch(out: Path, kinds: list[str], engine: str = "fsdp2", timeout: int = 240) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    args = [str(WORKER), str(out), "--batch", "2", "--engine", engine, "--kinds", ",".join(kinds)]
    proc = torchrun(args, timeout=timeout, env={"DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _worker():
    sys.path.insert(0, str(HERE))
    try:
        import _fsdp_worker
    finally:
        sys.path.remove(str(HERE))
    return _fsdp_worker


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(kind)`` -> {"params", "report"} of the one-process run with batch 4 (computed once per kind)."""
    w = _worker()
    root = tmp_path_factory.mktemp("one")
    w.make_theta_b(root / "theta_b-0")
    cache: dict[str, dict] = {}

    def get(kind: str) -> dict:
        if kind not in cache:
            cache[kind] = w.train(root, kind, batch=4, steps=3, engine=None)
        return cache[kind]

    return get


def _report(out: Path, kind: str, rank: int = 0) -> dict:
    return json.loads((out / f"{kind}.rank{rank}.json").read_text())


def _assert_equal_to_reference(out: Path, kind: str, reference, backend: str) -> float:
    from safetensors.torch import load_file

    reports = [_report(out, kind, r) for r in (0, 1)]
    assert all(r["backend"] == backend for r in reports), reports
    if backend == "fsdp2":  # every trainable parameter was a sharded DTensor during training
        assert all(r["dtensor_params"] == r["trainable"] > 0 for r in reports), reports
    sharded = load_file(str(out / f"{kind}.safetensors"))
    one = reference(kind)["params"]
    assert set(sharded) == set(one) and one
    worst = max(float((sharded[k] - one[k]).abs().max()) for k in one)
    assert worst <= ATOL, f"{kind}: {backend} vs one process max |Δ| = {worst:.3g} > {ATOL}"
    # training moved the parameters (the comparison is not between two untouched initialisations)
    moved = [k for k in one if "lora_B" in k or "down_proj.weight" in k]
    assert max(float(one[k].abs().max()) for k in moved) > 1e-2
    return worst


# ---- FSDP2 --------------------------------------------------------------------------------------------------------
CORE = ["sft", "asft", "pact"]
MORE = ["lisa", "safelora", "rows", "rows-full", "cwac", "cwac-full", "helpers"]


@pytest.fixture(scope="module")
def fsdp_core(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("fsdp_core"), CORE)


@pytest.fixture(scope="module")
def fsdp_more(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("fsdp_more"), MORE)


@gloo
@pytest.mark.parametrize("kind", CORE)
def test_fsdp2_two_processes_equal_one_process(fsdp_core, reference, kind):
    """sft, asft (penalty as DTensor ops on row-sharded B, A, V), pact (LoRA; teacher = the sharded model with
    adapters disabled, head rows read inside unsharded())."""
    _assert_equal_to_reference(fsdp_core, kind, reference, "fsdp2")
    if kind == "pact":  # the KL term was live
        assert reference(kind)["report"]["losses"][0] > _report(fsdp_core, "sft")["losses"][0] + 1.0


@gloo
@pytest.mark.parametrize("kind", ["lisa", "safelora", "rows", "rows-full"])
def test_fsdp2_lisa_safelora_and_row_projections(fsdp_more, reference, kind):
    _assert_equal_to_reference(fsdp_more, kind, reference, "fsdp2")
    rep = _report(fsdp_more, kind)
    if kind == "safelora":  # same layers chosen from all-reduced cosines, on every rank
        one = reference(kind)["report"]["finalize"]["safelora"]
        for r in (0, 1):
            assert _report(fsdp_more, kind, r)["finalize"]["safelora"]["projected"] == one["projected"]
        assert one["projected"]
    if kind.startswith(
        "rows"
    ):  # ΔW·V = 0 on the gathered weights (projected on each rank's shard, no gather)
        assert rep["max_leak"] < 1e-6, rep


def _assert_cwac_run(out: Path, kind: str, reference) -> None:
    """CWAC on both ranks: ΔW·V ≈ 0 on the gathered weights, the finalize leak (all-reduced) ≈ 0, and the
    activation term live (nonzero after the first step, when the weights have moved)."""
    for r in (0, 1):
        rep = _report(out, kind, r)
        assert rep["max_leak"] < 1e-6, rep
        assert rep["finalize"]["cwac"]["cwac_max_relative_leak"] < 1e-5, rep
        assert all(t is not None for t in rep["cwac_terms"]) and max(rep["cwac_terms"][1:]) > 1e-3, rep
    assert max(reference(kind)["report"]["cwac_terms"][1:]) > 1e-3


@gloo
@pytest.mark.parametrize("kind", ["cwac", "cwac-full"])
def test_fsdp2_cwac_lora_and_full_ft_equal_one_process(fsdp_more, reference, kind):
    """CWAC (both constraints) under FSDP2: the projection runs on each rank's Shard(0) rows (LoRA A; full FT W
    with this rank's rows of W₀V), the parameters re-taken in on_train_begin; the SAE term runs through the
    sharded blocks with its early exit (LoRA: stop before block 1, which is never gathered; full FT: after the
    last block). Without the activation term the parameters end up ≥ 0.05 away from these runs, so the 1e-5
    agreement also checks that its gradient is reduced like the task loss's."""
    _assert_equal_to_reference(fsdp_more, kind, reference, "fsdp2")
    _assert_cwac_run(fsdp_more, kind, reference)


@gloo
def test_sharding_helpers_on_an_uneven_fsdp2_shard(fsdp_more):
    reps = [_report(fsdp_more, "helpers", r) for r in (0, 1)]
    assert [r["rows"] for r in reps] == [[0, 3], [3, 5]]  # 5 rows over 2 ranks
    for r in reps:
        assert r["dtensor"] and r["distribute_local_rows_ok"] and r["distribute_roundtrip"] == 0.0
        assert r["update_vs_whole"] < 1e-6 and r["update_leak"] < 1e-6 and r["rows_leak"] < 1e-6, r
        assert r["unsharded_inside"] == ["Parameter", [5, 7]] and r["resharded_after"]


# ---- DeepSpeed ZeRO-3 ---------------------------------------------------------------------------------------------
def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


ZERO3 = ["sft", "pact", "safelora", "rows", "rows-full", "cwac", "asft", "lisa", "cwac-full"]


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("zero3"), ZERO3, engine="zero3", timeout=400)


@gloo
@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed is not installed")
@pytest.mark.parametrize("kind", ["sft", "pact", "safelora", "rows", "rows-full", "cwac"])
def test_zero3_two_processes_equal_one_process(zero3, reference, kind):
    """pact's teacher runs through ZeRO-3's per-module hooks; safelora, the row projections and CWAC (LoRA) edit
    LoRA-sized tensors inside GatheredParameters (rank 0's edit kept); CWAC's SAE term runs through the engine's
    per-module hooks with its early exit."""
    _assert_equal_to_reference(zero3, kind, reference, "zero3")
    if kind.startswith("rows"):
        assert _report(zero3, kind)["max_leak"] < 1e-6
    if kind == "cwac":
        _assert_cwac_run(zero3, kind, reference)


@gloo
@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed is not installed")
def test_zero3_refuses_cwac_full_fine_tuning_naming_fsdp2(zero3):
    for r in (0, 1):
        rep = _report(zero3, "cwac-full", r)
        assert rep["step"] == 0 and "\n" not in rep["refused"]
        assert rep["refused"].startswith("defense 'cwac' does not run under DeepSpeed ZeRO-3: with full fine-tuning")
        assert "use FSDP2 (fsdp_version: 2)" in rep["refused"]


@gloo
@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed is not installed")
@pytest.mark.parametrize("kind", ["asft", "lisa"])
def test_zero3_refuses_loss_terms_on_parameters_before_the_first_step(zero3, kind):
    for r in (0, 1):
        rep = _report(zero3, kind, r)
        assert rep["step"] == 0
        assert rep["refused"].startswith(f"defense '{kind}' does not run under DeepSpeed ZeRO-3: ")
        assert "use FSDP2" in rep["refused"] and "\n" not in rep["refused"]


# ---- the command line under FSDP2 -----------------------------------------------------------------------------------
FSDP_ENV = {  # what `accelerate launch --config_file examples/accelerate/fsdp.yaml` puts in the environment
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
}


@gloo
def test_cli_train_under_fsdp2_writes_the_whole_adapter_and_equals_one_process(tmp_path):
    """``safeft train --defense asft`` on 2 FSDP2 ranks (batch 2) writes final/ once, with whole (gathered) LoRA
    tensors, equal to ``run_train`` in one process with batch 4 (AdamW, lr 1e-2: tolerance 1e-4, see the module
    docstring; measured below 1e-6)."""
    from helpers_models import make_tiny_model_dir
    from safetensors.torch import load_file

    from safeft.config import build_config
    from safeft.pipeline import run_train

    w = _worker()
    model_dir = make_tiny_model_dir(tmp_path / "m", max_position_embeddings=256)
    base_dir = w.make_theta_b(tmp_path / "b")
    sets = {
        "model.cache_dir": str(tmp_path / "cache"),
        "data.n": 16,
        "data.p": 0.25,
        "data.max_length": 96,
        "training.lora_r": 4,
        "training.lora_alpha": 8,
        "training.max_steps": 3,
        "training.lr": 1e-2,
        "training.save_steps": 100,
        "training.progress": False,
        "defense.name": "asft",
    }
    flags = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    args = [
        str(HERE / "_fsdp_cli.py"), "train", "--model", str(model_dir),
        "--base-model", str(base_dir), "--task", "demo", "--harmful-source", "demo", "--eval-source", "demo",
        "--batch-size", "2", "--output-dir", str(tmp_path / "fsdp"), *flags,
    ]  # fmt: skip
    proc = torchrun(args, timeout=240, env=FSDP_ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert run["global_steps"] == 3

    cfg = build_config(
        None,
        {
            **sets,
            "model.aligned": str(model_dir),
            "model.base": str(base_dir),
            "data.task": "demo",
            "data.harmful_source": "demo",
            "eval.harmful_source": "demo",
            "training.batch_size": 4,
            "training.output_dir": str(tmp_path / "one"),
        },
    )
    run_train(cfg, log=lambda *a: None)
    a = load_file(str(tmp_path / "fsdp" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)  # whole tensors, not shards
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-4, f"FSDP2 CLI vs one process max |Δ| = {worst:.3g}"
    assert max(float(b[k].abs().max()) for k in b if "lora_B" in k) > 1e-3
