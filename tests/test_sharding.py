"""safeft.components.sharding in one process, and what SafeTrainer refuses before the first step: per sharding
backend (FSDP1, FSDP2, DeepSpeed ZeRO-3) and on a 4-bit (QLoRA) base. The 2-process runs are in test_fsdp.py.

bitsandbytes cannot be installed on CPU here: 4-bit bases are simulated by the markers a bitsandbytes model carries
(``config.quantization_config.load_in_4bit``, ``is_loaded_in_4bit``, parameters of class ``Params4bit``)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from safeft.components.projection import project_rows_out, project_update_out
from safeft.components.sharding import (
    distribute_like,
    full_tensor,
    gathered,
    is_quantized_4bit,
    local_rows,
    project_rows_out_,
    project_update_out_,
    rows_like,
    unsharded,
    whole_model_loading,
)
from safeft.errors import SafeFTError


def _basis(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q.float()


# ---- helpers on whole tensors ---------------------------------------------------------------------------------------
def test_in_place_projections_equal_the_out_of_place_ones_and_need_only_w0v():
    g = torch.Generator().manual_seed(0)
    v = _basis(32, 5)
    a = torch.randn(4, 32, generator=g)
    want = project_rows_out(a, v)
    got = project_rows_out_(a, v)
    assert got is a and torch.allclose(a, want, atol=1e-6)
    assert float((a @ v).abs().max()) < 1e-5
    w0 = torch.randn(16, 32, generator=g)
    w = w0 + 0.1 * torch.randn(16, 32, generator=g)
    want = project_update_out(w, w0, v)
    project_update_out_(w, w0 @ v, v)  # W₀V [16, 5] instead of W₀ [16, 32]
    assert torch.allclose(w, want, atol=1e-6)
    assert float(((w - w0) @ v).abs().max()) < 1e-5
    before = w.clone()
    project_update_out_(w, w0 @ v, v)  # idempotent
    assert torch.allclose(w, before, atol=1e-6)


def test_projection_dtypes_and_shape_errors():
    v = _basis(8, 2)
    a = torch.randn(3, 8, dtype=torch.bfloat16)
    project_rows_out_(a, v)
    assert a.dtype == torch.bfloat16 and float((a.float() @ v).abs().max()) < 0.05
    with pytest.raises(SafeFTError, match="d_in=8 but the subspace V has d_in=9"):
        project_rows_out_(torch.zeros(3, 8), _basis(9, 2))
    with pytest.raises(SafeFTError, match="W₀V has shape"):
        project_update_out_(torch.zeros(4, 8), torch.zeros(4, 3), v)


def test_whole_tensor_helpers_are_identities():
    t = torch.randn(6, 3)
    assert local_rows(t) == slice(0, 6)
    assert rows_like(torch.arange(12.0).reshape(6, 2), t).shape == (6, 2)
    assert full_tensor(t) is t
    assert distribute_like(t, torch.zeros(6, 9)).shape == (6, 3)
    with pytest.raises(SafeFTError, match="number of rows"):
        rows_like(torch.zeros(5, 2), t)
    lin = torch.nn.Linear(3, 2)
    with unsharded(lin) as m, gathered(lin.parameters()), whole_model_loading():
        assert m is lin  # nothing sharded, no DeepSpeed config: plain no-ops


def test_quantized_4bit_markers():
    from helpers_models import make_tiny_model

    from safeft.models import setup_trainable

    m = make_tiny_model()
    assert not is_quantized_4bit(m)
    m.config.quantization_config = {"load_in_4bit": True, "quant_method": "bitsandbytes"}
    assert is_quantized_4bit(m)
    assert is_quantized_4bit(setup_trainable(m, method="lora", lora_r=2, lora_alpha=4))  # through peft

    m2 = make_tiny_model()
    m2.is_loaded_in_4bit = True
    assert is_quantized_4bit(m2)

    class Params4bit(torch.nn.Parameter):  # bitsandbytes' class name, as FSDP2/peft detect it
        pass

    m3 = make_tiny_model()
    lin = m3.model.layers[0].mlp.down_proj
    lin.weight = Params4bit(lin.weight.detach(), requires_grad=False)
    assert is_quantized_4bit(m3)


# ---- SafeTrainer: refusals before the first step --------------------------------------------------------------------
def _trainer(tmp_path, defenses, model=None):
    from helpers_models import make_tiny_model, make_tiny_tokenizer, tiny_training_args

    from safeft.data import CompletionCollator, Example, tokenize_example
    from safeft.models import setup_trainable
    from safeft.trainer import SafeTrainer

    tok = make_tiny_tokenizer()
    model = model or setup_trainable(make_tiny_model(seed=0), method="lora", lora_r=4, lora_alpha=8)
    rows = [
        tokenize_example(tok, Example(f"the movie was great {i}", "positive"), max_length=32)
        for i in range(4)
    ]
    args = tiny_training_args(tmp_path, per_device_train_batch_size=2, max_steps=1)
    return SafeTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=CompletionCollator(tok),
        processing_class=tok,
        defenses=defenses,
    )


def _fake_backend(monkeypatch, tr, backend: str) -> None:
    """Make the trainer see ``backend`` the way accelerate reports it (plugin objects on the shared state)."""
    state = tr.accelerator.state
    if backend.startswith("fsdp"):
        monkeypatch.setattr(tr, "is_fsdp_enabled", True)
        plugin = SimpleNamespace(fsdp_version=2 if backend == "fsdp2" else 1)
        monkeypatch.setattr(state, "fsdp_plugin", plugin, raising=False)
    else:
        monkeypatch.setattr(tr, "is_deepspeed_enabled", True)
        monkeypatch.setattr(tr, "_deepspeed_zero_stage", lambda: 3)  # what the DeepSpeed plugin reports


def _defense(name: str):
    from safeft.defenses import get_defense_class

    return get_defense_class(name)()


# what each defense does under each sharding backend: None = runs, else the start of the refusal's reason
EXPECTED = {
    ("sft", "fsdp1"): None,
    ("sft", "zero3"): None,
    ("safeinstr", "fsdp2"): None,
    ("asft", "fsdp2"): None,
    ("asft", "fsdp1"): "FSDP version 1 flattens the parameters it shards: set fsdp_version: 2",
    ("asft", "zero3"): "its loss term reads parameters outside any module's forward",
    ("lisa", "fsdp2"): None,
    ("lisa", "zero3"): "its loss term reads parameters outside any module's forward",
    ("safelora", "fsdp2"): None,
    ("safelora", "zero3"): None,
    ("pact", "fsdp2"): None,
    ("pact", "zero3"): None,
    ("pact", "fsdp1"): "FSDP version 1 flattens",
    ("cwac", "fsdp2"): None,
    ("cwac", "zero3"): None,  # LoRA (full fine-tuning: test_cwac_full_fine_tuning_is_refused_under_zero3)
    ("cwac", "fsdp1"): "FSDP version 1 flattens the parameters it shards: set fsdp_version: 2",
    ("cwac-weight", "fsdp2"): None,
    ("cwac-activation", "fsdp2"): None,
}
LABEL = {"fsdp1": "FSDP (version 1)", "fsdp2": "FSDP2", "zero3": "DeepSpeed ZeRO-3"}


@pytest.mark.parametrize(("name", "backend"), sorted(EXPECTED))
def test_each_defense_runs_or_is_refused_per_backend(tmp_path, monkeypatch, name, backend):
    tr = _trainer(tmp_path, [_defense(name)])
    _fake_backend(monkeypatch, tr, backend)
    assert tr.sharding_backend() == backend
    want = EXPECTED[(name, backend)]
    if want is None:
        tr.check_parameter_sharding()
        return
    with pytest.raises(SafeFTError) as e:
        tr.train()
    msg = str(e.value)
    assert msg.startswith(f"defense {name!r} does not run under {LABEL[backend]}: {want}"), msg
    assert msg.endswith("(see docs/distributed.md)") and "\n" not in msg
    assert tr.state.global_step == 0  # refused before the first step


def test_unsharded_backends_refuse_nothing(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, [_defense("asft"), _defense("lisa")])
    assert tr.sharding_backend() is None
    monkeypatch.setattr(tr, "is_deepspeed_enabled", True)
    monkeypatch.setattr(tr, "_deepspeed_zero_stage", lambda: 2)
    assert tr.sharding_backend() is None  # ZeRO-2 shards optimizer state and gradients, not parameters
    tr.check_parameter_sharding()


def test_pact_full_fine_tuning_is_refused_under_sharding(tmp_path, monkeypatch):
    d = _defense("pact")
    d._teacher = torch.nn.Linear(1, 1)  # what prepare() keeps for full fine-tuning: a frozen θ₀ copy
    tr = _trainer(tmp_path, [d])
    _fake_backend(monkeypatch, tr, "fsdp2")
    with pytest.raises(
        SafeFTError, match=r"does not run under FSDP2: with full fine-tuning its θ₀ teacher.*train LoRA"
    ):
        tr.train()


def test_cwac_full_fine_tuning_is_refused_under_zero3(tmp_path, monkeypatch):
    from safeft.defenses.cwac.weights import _Entry

    d = _defense("cwac")
    w = torch.nn.Parameter(torch.zeros(4, 8))  # what prepare() installs for full fine-tuning: W with W₀V
    d.weights.entries = [_Entry("0.mlp.down_proj", "full", w, torch.zeros(8, 2), w0v=torch.zeros(4, 2))]
    tr = _trainer(tmp_path, [d])
    _fake_backend(monkeypatch, tr, "fsdp2")
    tr.check_parameter_sharding()  # FSDP2: each rank projects its rows
    monkeypatch.setattr(tr, "is_fsdp_enabled", False)
    _fake_backend(monkeypatch, tr, "zero3")
    with pytest.raises(SafeFTError) as e:
        tr.train()
    msg = str(e.value)
    assert msg.startswith("defense 'cwac' does not run under DeepSpeed ZeRO-3: with full fine-tuning"), msg
    assert "use FSDP2 (fsdp_version: 2)" in msg and "\n" not in msg and tr.state.global_step == 0


def test_cwac_is_refused_on_a_4bit_base_and_asft_pact_lisa_are_not(tmp_path):
    from helpers_models import make_tiny_model

    from safeft.models import setup_trainable

    base = make_tiny_model()
    base.config.quantization_config = {"load_in_4bit": True}
    model = setup_trainable(base, method="lora", lora_r=4, lora_alpha=8)
    for name in ("cwac", "cwac-weight", "cwac-activation"):
        tr = _trainer(tmp_path / name, [_defense(name)], model=model)
        with pytest.raises(SafeFTError) as e:
            tr.train()
        assert str(e.value).startswith(
            f"defense {name!r} does not run on a 4-bit (QLoRA) base model: train LoRA"
        )
        assert tr.state.global_step == 0 and "\n" not in str(e.value)
    for name in ("asft", "pact", "lisa", "safelora", "sft", "safeinstr"):
        _trainer(tmp_path / name, [_defense(name)], model=model).check_parameter_sharding()


def test_alignment_matrix_on_a_4bit_base_reads_theta0_from_its_files(tmp_path):
    """On a 4-bit base the weight in memory is the quantized one: V must come from θ₀'s files, not from it."""
    from helpers_models import make_tiny_model

    from safeft.defenses._alignment_matrix import compute_alignment_matrices
    from safeft.defenses.base import DefenseContext
    from safeft.models import setup_trainable

    aligned = make_tiny_model(seed=0)
    aligned.save_pretrained(tmp_path / "aligned")
    base = copy.deepcopy(aligned)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "base")
    qmodel = copy.deepcopy(aligned)
    with torch.no_grad():  # "quantization": the in-memory θ₀ weights are rounded coarsely
        for p in qmodel.parameters():
            p.copy_(torch.round(p * 4) / 4)
    qmodel.config.quantization_config = {"load_in_4bit": True}
    model = setup_trainable(qmodel, method="lora", lora_r=2, lora_alpha=4, target_modules=["q_proj"])
    ctx = DefenseContext(
        tokenizer=None, aligned_model_path=str(tmp_path / "aligned"), base_model_path=str(tmp_path / "base")
    )
    mats = compute_alignment_matrices(model, ctx)
    w0 = dict(aligned.named_parameters())
    wb = dict(base.named_parameters())
    for name, mat in mats.items():
        want = (w0[f"{name}.weight"] - wb[f"{name}.weight"]).detach()
        torch.testing.assert_close(mat.v, want, atol=1e-6, rtol=0)
    ctx.aligned_model_path = None
    with pytest.raises(SafeFTError, match="4-bit .*read θ₀'s own weights from its folder"):
        compute_alignment_matrices(model, ctx)
