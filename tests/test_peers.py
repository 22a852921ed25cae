"""Peer defenses: AsFT, SafeLoRA, SafeInstr, Lisa (SPEC §3–4), on tiny random Llama models built in-process."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from safeft.data.types import Example
from safeft.defenses._alignment_matrix import compute_alignment_matrices, lora_factors, lora_modules
from safeft.defenses.asft import AsFT, AsFTConfig, asft_module_penalty
from safeft.defenses.base import DefenseContext, build_defenses
from safeft.defenses.lisa import Lisa, LisaConfig
from safeft.defenses.safeinstr import SafeInstr, SafeInstrConfig, mix_refusals, n_refusals
from safeft.defenses.safelora import SafeLoRA, SafeLoRAConfig, projected_b_and_cosine, select_layers
from safeft.errors import SafeFTError

TARGETS = ("q_proj", "v_proj")
# every Linear of a Llama block: 7 LoRA modules per block, 14 in the 2-layer model (more than SafeLoRA's default 10)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK_V = 2  # rank of W(θ₀) − W(θ_b) on the targeted modules, so that Ĉ has a null space to aim at


# ---- fixtures ----------------------------------------------------------------------------------------------------
def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    return LlamaForCausalLM(cfg).eval()


def _lora(model, r: int = 4, alpha: int = 8, targets: tuple[str, ...] = TARGETS):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
    )


@pytest.fixture
def pair(tmp_path):
    """(peft θ₀, ctx with base_model_path = θ_b saved as safetensors, {module: expected V}).

    θ_b = θ₀ − (a rank-2 matrix) on every LoRA-targeted weight and θ₀ + small noise elsewhere."""
    return _make_pair(tmp_path, TARGETS)


@pytest.fixture
def pair_all_linear(tmp_path):
    """As ``pair``, with LoRA (and V) on every Linear of the blocks: 14 LoRA modules."""
    return _make_pair(tmp_path, ALL_LINEAR)


def _make_pair(tmp_path, targets: tuple[str, ...]):
    aligned = _tiny_llama()
    base = copy.deepcopy(aligned)
    g = torch.Generator().manual_seed(1)
    expected: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in base.named_parameters():
            mod = name[: -len(".weight")]
            if mod.split(".")[-1] in targets:
                u = torch.randn(p.shape[0], RANK_V, generator=g)
                w = torch.randn(RANK_V, p.shape[1], generator=g)
                v = 0.05 * u @ w
                p.sub_(v)
                expected[mod] = v
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    base.save_pretrained(tmp_path / "base")
    aligned.save_pretrained(tmp_path / "aligned")
    model = _lora(aligned, targets=targets)
    ctx = DefenseContext(tokenizer=None, base_model_path=str(tmp_path / "base"), use_lora=True, seed=0)
    return model, ctx, expected


def _randomise_lora(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lora_modules(model).values():
            b, a, _ = lora_factors(mod)
            b.copy_(torch.randn(b.shape, generator=g))
            a.copy_(torch.randn(a.shape, generator=g))


def _naive_asft(b: torch.Tensor, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    c_hat = v @ v.T / torch.linalg.matrix_norm(v)
    eye = torch.eye(v.shape[0], dtype=v.dtype)
    return torch.linalg.matrix_norm((eye - c_hat) @ b @ a) ** 2


class _MaxTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


# ---- the alignment matrix -----------------------------------------------------------------------------------------
def test_alignment_matrix_is_theta0_minus_thetab(pair):
    model, ctx, expected = pair
    mats = compute_alignment_matrices(model, ctx)
    assert sorted(mats) == sorted(expected)  # names match with the peft prefixes stripped
    for name, mat in mats.items():
        assert mat.v.dtype == torch.float32
        torch.testing.assert_close(mat.v, expected[name], atol=1e-6, rtol=0)
        assert mat.norm == pytest.approx(torch.linalg.matrix_norm(expected[name]).item(), rel=1e-5)


def test_theta_b_equal_to_theta0_is_refused(pair, tmp_path):
    model, ctx, _ = pair
    same = DefenseContext(tokenizer=None, base_model_path=str(tmp_path / "aligned"), use_lora=True)
    with pytest.raises(SafeFTError, match="θ_b equals θ₀"):
        compute_alignment_matrices(model, same)
    with pytest.raises(SafeFTError, match="θ_b equals θ₀"):
        AsFT().prepare(model, same)
    by_path = DefenseContext(
        tokenizer=None, aligned_model_path=str(tmp_path / "base"), base_model_path=str(tmp_path / "base")
    )
    with pytest.raises(SafeFTError, match="θ_b equals θ₀"):
        compute_alignment_matrices(model, by_path)


def test_missing_base_and_no_lora_are_refused(pair, tmp_path):
    model, ctx, _ = pair
    with pytest.raises(SafeFTError, match="needs the unaligned base model"):
        AsFT().prepare(model, DefenseContext(tokenizer=None, use_lora=True))
    with pytest.raises(SafeFTError, match="LoRA adapters only"):
        SafeLoRA().prepare(
            model, DefenseContext(tokenizer=None, base_model_path=ctx.base_model_path, use_lora=False)
        )
    with pytest.raises(SafeFTError, match="not found"):
        compute_alignment_matrices(
            model, DefenseContext(tokenizer=None, base_model_path=str(tmp_path / "nope"))
        )
    with pytest.raises(SafeFTError, match="no LoRA layers"):
        compute_alignment_matrices(_tiny_llama(), ctx)


# ---- AsFT ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_out,d_in,r", [(12, 10, 3), (7, 16, 5), (30, 4, 2)])
def test_asft_fast_penalty_equals_naive(d_out, d_in, r):
    g = torch.Generator().manual_seed(d_out)
    v = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, r, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    fast = asft_module_penalty(b, a, v, torch.linalg.matrix_norm(v).item())
    naive = _naive_asft(b, a, v)
    assert fast.item() == pytest.approx(naive.item(), rel=1e-6)
    gb_fast, ga_fast = torch.autograd.grad(fast, (b, a))
    gb_naive, ga_naive = torch.autograd.grad(naive, (b, a))
    torch.testing.assert_close(gb_fast, gb_naive, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ga_fast, ga_naive, rtol=1e-6, atol=1e-9)
    # float32 inputs: same value to float32 precision
    f32 = asft_module_penalty(
        b.detach().float(), a.detach().float(), v.float(), torch.linalg.matrix_norm(v).item()
    )
    assert f32.dtype == torch.float32
    assert f32.item() == pytest.approx(naive.item(), rel=1e-5)


def test_asft_penalty_is_zero_inside_the_basin():
    """B in the column space of V with Ĉ acting as identity there (V with orthonormal columns scaled so that
    σ²/‖V‖_F = 1): (I − Ĉ) B A = 0."""
    q, _ = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64))
    v = q * 3.0**0.5  # σᵢ = √3, ‖V‖_F = 3, σᵢ²/‖V‖_F = 1
    b = q @ torch.randn(3, 2, dtype=torch.float64)
    a = torch.randn(2, 3, dtype=torch.float64)
    assert asft_module_penalty(b, a, v, torch.linalg.matrix_norm(v).item()).item() == pytest.approx(
        0, abs=1e-20
    )


def test_asft_penalty_never_builds_dout_squared():
    """d_out = 20000: the naive Ĉ would be 20000² float64 = 3.2 GB. The fast path allocates nothing larger than V
    itself (d_out × d_in) and finishes in well under a second."""
    d_out, d_in, r = 20000, 8, 4
    g = torch.Generator().manual_seed(0)
    v = torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, r, generator=g, requires_grad=True)
    a = torch.randn(r, d_in, generator=g, requires_grad=True)
    norm = torch.linalg.matrix_norm(v).item()
    t0 = time.perf_counter()
    with _MaxTensor() as rec:
        p = asft_module_penalty(b, a, v, norm)
        p.backward()
    elapsed = time.perf_counter() - t0
    assert rec.max_numel <= d_out * d_in  # nothing larger than V: no d_out × d_out (4e8 elements)
    assert elapsed < 2.0
    # the value agrees with a d_out × d_in (affordable here) evaluation of (I − Ĉ) B A
    with torch.no_grad():
        ba = b.double() @ a.double()
        vd = v.double()
        ref = torch.linalg.matrix_norm(ba - vd @ (vd.T @ ba) / norm) ** 2
    assert p.item() == pytest.approx(ref.item(), rel=1e-4)


def test_asft_loss_term_on_a_model(pair):
    model, ctx, expected = pair
    _randomise_lora(model)
    d = AsFT(AsFTConfig(lam=0.5))
    d.prepare(model, ctx)
    terms = d.loss_terms(model, {}, None)
    assert list(terms) == ["asft/penalty"]
    want = 0.0
    for name, mod in lora_modules(model).items():
        b, a, _ = lora_factors(mod)
        want += _naive_asft(b.detach().double(), a.detach().double(), expected[name].double()).item()
    assert terms["asft/penalty"].item() == pytest.approx(0.5 * want, rel=1e-4)
    terms["asft/penalty"].backward()  # differentiable w.r.t. the LoRA factors
    b, a, _ = lora_factors(next(iter(lora_modules(model).values())))
    assert b.grad is not None and b.grad.abs().sum() > 0 and a.grad.abs().sum() > 0


def test_asft_config_validation():
    with pytest.raises(SafeFTError, match=r"defense\.asft\.lam: must be a number ≥ 0"):
        AsFTConfig(lam=-1)
    assert AsFT.needs_base_model and AsFT.requires_lora and "2506.08473" in AsFT.paper


# ---- SafeLoRA -----------------------------------------------------------------------------------------------------
def _col_basis(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(orthonormal basis of V's column space [d_out, RANK_V], of its orthogonal complement)."""
    u, _, _ = torch.linalg.svd(v.double(), full_matrices=True)
    return u[:, :RANK_V].float(), u[:, RANK_V:].float()


def _setup_safelora_layers(model, expected) -> dict[str, str]:
    """Per layer, B along V's top singular direction ("high" cos), orthogonal to V's column space ("zero"), or
    mostly outside it ("low")."""
    kinds = {}
    g = torch.Generator().manual_seed(3)
    names = sorted(lora_modules(model))
    with torch.no_grad():
        for i, name in enumerate(names):
            b, a, _ = lora_factors(lora_modules(model)[name])
            inside, outside = _col_basis(expected[name])
            kind = ("high", "zero", "low", "high")[i % 4]
            if kind == "high":  # along V's top left singular vector: Ĉ B = (σ₁²/‖V‖_F) B, cos = 1
                new_b = inside[:, :1] @ torch.randn(1, b.shape[1], generator=g)
            elif kind == "zero":
                new_b = outside @ torch.randn(outside.shape[1], b.shape[1], generator=g)
            else:
                new_b = 0.1 * inside @ torch.randn(RANK_V, b.shape[1], generator=g) + outside @ torch.randn(
                    outside.shape[1], b.shape[1], generator=g
                )
            b.copy_(new_b)
            a.copy_(torch.randn(a.shape, generator=g))
            kinds[name] = kind
    return kinds


def test_safelora_cosine_matches_naive(pair):
    model, ctx, expected = pair
    _randomise_lora(model, seed=5)
    mats = compute_alignment_matrices(model, ctx)
    for name, mod in lora_modules(model).items():
        b, a, s = lora_factors(mod)
        p, cos = projected_b_and_cosine(b, a, mats[name])
        v = expected[name].double()
        c_hat = v @ v.T / torch.linalg.matrix_norm(v)
        dw = s * b.detach().double() @ a.detach().double()
        naive = ((c_hat @ dw) * dw).sum() / (
            torch.linalg.matrix_norm(c_hat @ dw) * torch.linalg.matrix_norm(dw)
        )
        assert cos == pytest.approx(naive.item(), abs=1e-5)
        torch.testing.assert_close(p.double(), c_hat @ b.detach().double(), atol=1e-5, rtol=1e-4)


def test_safelora_projects_exactly_the_selected_layers(pair):
    model, ctx, expected = pair
    kinds = _setup_safelora_layers(model, expected)
    before = {
        n: tuple(t.detach().clone() for t in lora_factors(m)[:2]) for n, m in lora_modules(model).items()
    }
    d = SafeLoRA(SafeLoRAConfig(threshold=0.5))  # threshold mode, explicitly (the default is top_k 10)
    assert d.config.threshold == 0.5 and d.config.top_k is None
    d.prepare(model, ctx)
    summary = d.finalize(model)
    cos = summary["cosines"]
    for n, k in kinds.items():
        if k == "high":
            assert cos[n] == pytest.approx(1.0, abs=1e-4)
        elif k == "zero":
            assert cos[n] == pytest.approx(0.0, abs=1e-4)
        else:
            assert 0.0 < cos[n] < 0.5
    assert summary["projected"] == sorted(n for n, k in kinds.items() if k != "high")
    assert summary["projected"] == sorted(n for n, c in cos.items() if c < 0.5)
    mods = lora_modules(model)
    for n, (b0, a0) in before.items():
        b, a, s = lora_factors(mods[n])
        assert torch.equal(a, a0)  # A is never touched
        if n in summary["projected"]:
            v = expected[n].double()
            c_hat = v @ v.T / torch.linalg.matrix_norm(v)
            # new ΔW = Ĉ · old ΔW, exactly (up to float32)
            torch.testing.assert_close(
                s * b.double() @ a.double(), c_hat @ (s * b0.double() @ a0.double()), atol=1e-5, rtol=1e-4
            )
            assert not torch.equal(b, b0)
        else:
            assert torch.equal(b, b0)  # bit-identical
    assert d.matrices == {}  # V freed


def test_safelora_top_k(pair):
    model, ctx, expected = pair
    kinds = _setup_safelora_layers(model, expected)
    d = SafeLoRA(SafeLoRAConfig(top_k=1))
    d.prepare(model, ctx)
    summary = d.finalize(model)
    cos = summary["cosines"]
    assert summary["projected"] == [min(cos, key=lambda n: (cos[n], n))]
    assert kinds[summary["projected"][0]] == "zero"


def _naive_safelora_cosines(model, expected) -> dict[str, float]:
    """cos(ĈΔW, ΔW) per LoRA module with dense float64 matrices, as the authors compute it."""
    out = {}
    for name, mod in lora_modules(model).items():
        b, a, s = lora_factors(mod)
        v = expected[name].double()
        c_hat = v @ v.T / torch.linalg.matrix_norm(v)
        dw = s * b.detach().double() @ a.detach().double()
        out[name] = torch.nn.functional.cosine_similarity(
            (c_hat @ dw).reshape(1, -1), dw.reshape(1, -1)
        ).item()
    return out


def test_safelora_default_projects_the_10_least_similar_layers(pair_all_linear):
    """Authors' default (IBM/SafeLoRA config.py: select_layers_type "number", num_proj_layers 10): with 14 LoRA
    modules, exactly the 10 with the smallest cosine are projected, the other 4 are bit-identical."""
    model, ctx, expected = pair_all_linear
    _randomise_lora(model, seed=11)
    mods = lora_modules(model)
    assert len(mods) == 14
    # spread the cosines: B of every other module partly along V's column space, so they are not all ~√(2/d_out)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for i, name in enumerate(sorted(mods)):
            b, _, _ = lora_factors(mods[name])
            inside, _ = _col_basis(expected[name])
            b.add_((i % 3) * inside @ torch.randn(RANK_V, b.shape[1], generator=g))
    naive = _naive_safelora_cosines(model, expected)
    ranked = sorted(naive, key=naive.get)
    assert naive[ranked[10]] - naive[ranked[9]] > 1e-3  # the 10th and 11th are not tied
    # the old default (τ = 0.5) would select another set: the test tells the two rules apart
    assert sorted(n for n, c in naive.items() if c < 0.5) != sorted(ranked[:10])
    before = {n: lora_factors(m)[0].detach().clone() for n, m in mods.items()}

    d = SafeLoRA()
    assert (d.config.top_k, d.config.threshold) == (10, None)
    d.prepare(model, ctx)
    summary = d.finalize(model)
    assert summary["projected"] == sorted(ranked[:10])
    for n, c in summary["cosines"].items():
        assert c == pytest.approx(naive[n], abs=1e-5)
    for n, b0 in before.items():
        b = lora_factors(mods[n])[0]
        if n in summary["projected"]:
            v = expected[n].double()
            torch.testing.assert_close(
                b.double(), v @ (v.T @ b0.double()) / torch.linalg.matrix_norm(v), atol=1e-5, rtol=1e-4
            )
        else:
            assert torch.equal(b, b0)


def test_safelora_default_projects_every_layer_when_there_are_fewer_than_10(pair):
    model, ctx, expected = pair  # 4 LoRA modules
    _randomise_lora(model, seed=5)
    d = SafeLoRA()
    d.prepare(model, ctx)
    assert d.finalize(model)["projected"] == sorted(lora_modules(model))


def test_safelora_rule_helpers_and_config():
    cos = {"a": 0.9, "b": 0.1, "c": None, "d": 0.4}
    assert select_layers(cos, 0.5, None) == ["b", "d"]
    assert select_layers(cos, None, 2) == ["b", "d"]
    assert select_layers(cos, None, 10) == ["a", "b", "d"]  # untrained layers (None) never selected
    assert (SafeLoRAConfig().top_k, SafeLoRAConfig().threshold) == (10, None)  # authors' default: 10 layers
    assert (SafeLoRAConfig(threshold=0.3).top_k, SafeLoRAConfig(threshold=0.3).threshold) == (None, 0.3)
    assert (SafeLoRAConfig(top_k=3).top_k, SafeLoRAConfig(top_k=3).threshold) == (3, None)
    with pytest.raises(SafeFTError, match="exactly one of threshold"):
        SafeLoRAConfig(threshold=0.5, top_k=3)
    with pytest.raises(SafeFTError, match=r"defense\.safelora\.top_k: must be an integer ≥ 1"):
        SafeLoRAConfig(top_k=0)
    with pytest.raises(SafeFTError, match=r"defense\.safelora\.threshold: must be a number in \[-1, 1\]"):
        SafeLoRAConfig(threshold=2.0)


def test_safelora_untrained_adapter_is_left_alone(pair):
    model, ctx, _ = pair  # fresh LoRA: B = 0, ΔW = 0
    d = SafeLoRA()
    d.prepare(model, ctx)
    summary = d.finalize(model)
    assert summary["projected"] == [] and all(c is None for c in summary["cosines"].values())


# ---- SafeInstr ----------------------------------------------------------------------------------------------------
def _task(n: int) -> list[Example]:
    return [Example(prompt=f"task {i}", response=f"answer {i}") for i in range(n)]


def _refusals(n: int) -> list[Example]:
    return [
        Example(prompt=f"harmful {i}", response="I can't help with that.", kind="refusal") for i in range(n)
    ]


def test_safeinstr_count_is_exact_and_deterministic():
    task = _task(50)
    ctx = DefenseContext(
        tokenizer=None, alignment_examples=_refusals(30) + [Example("hi", "hello", kind="benign")]
    )
    d = SafeInstr(SafeInstrConfig(count=7))
    out = d.modify_dataset(task, ctx)
    assert len(out) == 57 and d.added == 7
    assert sum(e.kind == "refusal" for e in out) == 7
    assert [e for e in out if e.kind == "task"] == task  # task order kept
    assert [e.prompt for e in out] == [
        e.prompt for e in SafeInstr(SafeInstrConfig(count=7)).modify_dataset(task, ctx)
    ]
    ctx1 = DefenseContext(tokenizer=None, alignment_examples=ctx.alignment_examples, seed=1)
    other = SafeInstr(SafeInstrConfig(count=7)).modify_dataset(task, ctx1)
    assert [e.prompt for e in other] != [e.prompt for e in out]


def test_safeinstr_fraction_of_final_data_and_eval_disjointness():
    assert SafeInstrConfig().fraction == 0.1
    assert n_refusals(900, 0.1, None) == 100  # 100 / 1000 of the final data
    assert n_refusals(50, None, 0) == 0
    task = _task(90)
    ctx = DefenseContext(
        tokenizer=None, alignment_examples=_refusals(12), eval_prompts=["Harmful 0", "harmful  1"]
    )
    out = SafeInstr().modify_dataset(task, ctx)
    refusals = [e for e in out if e.kind == "refusal"]
    assert len(refusals) == 10 and len(out) == 100
    assert not {"harmful 0", "harmful 1"} & {
        e.prompt for e in refusals
    }  # evaluation prompts never trained on


def test_safeinstr_not_enough_refusals():
    ctx = DefenseContext(tokenizer=None, alignment_examples=_refusals(3))
    with pytest.raises(SafeFTError, match="5 refusal examples needed but only 3 available"):
        SafeInstr(SafeInstrConfig(count=5)).modify_dataset(_task(10), ctx)
    with pytest.raises(SafeFTError, match="exactly one of fraction"):
        SafeInstrConfig(fraction=0.2, count=3)
    with pytest.raises(SafeFTError, match=r"defense\.safeinstr\.fraction: must be a number in \(0, 1\)"):
        SafeInstrConfig(fraction=1.0)
    with pytest.raises(SafeFTError, match=r"defense\.safeinstr\.count: must be an integer ≥ 0"):
        SafeInstrConfig(count=-1)
    assert len(mix_refusals(_task(4), _refusals(2), 2, seed=0)) == 6


# ---- Lisa ---------------------------------------------------------------------------------------------------------
class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)


def _lisa_ctx(n: int = 5) -> DefenseContext:
    align = [Example(prompt=f"harmful {i}", response="No.", kind="refusal", meta={"i": i}) for i in range(n)]
    return DefenseContext(
        tokenizer=None,
        alignment_examples=align,
        collate=lambda exs: {"input_ids": torch.tensor([[1000 + e.meta["i"]] for e in exs])},
        seed=0,
    )


def test_lisa_alternates_on_schedule_and_swaps_batches():
    model = _Toy()
    d = Lisa(LisaConfig(align_steps=2, user_steps=3))
    d.prepare(model, _lisa_ctx())
    user = {"input_ids": torch.tensor([[1], [2]])}
    phases, seen = [], []
    for step in range(12):
        phases.append(d.phase)
        batch = d.transform_batch(model, user, step)
        if d.phase == "user":
            assert batch is user
        else:
            assert batch["input_ids"].shape == (2, 1) and (batch["input_ids"] >= 1000).all()
            seen += batch["input_ids"].flatten().tolist()
        d.after_step(model)
    assert phases == ["align"] * 2 + ["user"] * 3 + ["align"] * 2 + ["user"] * 3 + ["align"] * 2
    # alignment data cycles through a seeded shuffle: the first 5 draws are a permutation of all 5 examples
    assert sorted(seen[:5]) == [1000, 1001, 1002, 1003, 1004]
    d2 = Lisa(LisaConfig(align_steps=2, user_steps=3))
    d2.prepare(_Toy(), _lisa_ctx())
    assert d2.transform_batch(model, user, 0)["input_ids"].flatten().tolist() == seen[:2]


def test_lisa_proximal_pulls_toward_the_other_phase_state():
    model = _Toy()
    d = Lisa(LisaConfig(align_steps=2, user_steps=3, rho=2.0, proximal_start_step=0))  # no warm-up
    d.prepare(model, _lisa_ctx())
    assert set(d.snapshot) == {"w"}  # trainable parameters only
    with torch.no_grad():
        model.w.copy_(torch.tensor([1.0, 2.0, 3.0]))  # alignment phase moved the weights
    d.after_step(model)
    d.after_step(model)  # switch to the user phase: snapshot = end of alignment
    assert d.phase == "user"
    assert d.loss_terms(model, {}, None)["lisa/proximal"].item() == 0.0  # 0 right after a switch
    with torch.no_grad():
        model.w.add_(torch.tensor([0.5, -1.0, 0.0]))
    term = d.loss_terms(model, {}, None)["lisa/proximal"]
    assert term.item() == pytest.approx(0.5 * 2.0 * (0.25 + 1.0))
    (grad,) = torch.autograd.grad(term, model.w)
    snap = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(grad, 2.0 * (model.w.detach() - snap))  # ρ(w − w_other)
    stepped = model.w.detach() - 0.1 * grad
    assert torch.linalg.norm(stepped - snap) < torch.linalg.norm(
        model.w.detach() - snap
    )  # descent pulls back


def test_lisa_warmup_state_round_trip_and_validation():
    model = _Toy()
    d = Lisa(LisaConfig(align_steps=2, user_steps=3, proximal_start_step=4))
    d.prepare(model, _lisa_ctx())
    with torch.no_grad():
        model.w.fill_(5.0)
    assert d.loss_terms(model, {}, None)["lisa/proximal"].item() == 0.0  # before proximal_start_step
    user = {"input_ids": torch.tensor([[1], [2]])}
    for s in range(3):
        d.transform_batch(model, user, s)
        d.after_step(model)
    state = d.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    resumed = Lisa(LisaConfig(align_steps=2, user_steps=3, proximal_start_step=4))
    resumed.load_state_dict(state)
    resumed.prepare(model, _lisa_ctx())
    assert (resumed.phase, resumed.phase_step, resumed.global_step) == (d.phase, d.phase_step, d.global_step)
    torch.testing.assert_close(resumed.snapshot["w"], d.snapshot["w"])
    for s in range(3, 9):  # the resumed run continues identically (phases and alignment batches)
        a, b = d.transform_batch(model, user, s), resumed.transform_batch(model, user, s)
        assert torch.equal(a["input_ids"], b["input_ids"]) and d.phase == resumed.phase
        d.after_step(model)
        resumed.after_step(model)
    with pytest.raises(SafeFTError, match=r"defense\.lisa\.align_steps: must be an integer ≥ 1"):
        LisaConfig(align_steps=0)
    with pytest.raises(SafeFTError, match=r"defense\.lisa\.rho: must be a number ≥ 0"):
        LisaConfig(rho=-0.5)
    with pytest.raises(SafeFTError, match="needs alignment data"):
        Lisa().prepare(_Toy(), DefenseContext(tokenizer=None))
    with pytest.raises(SafeFTError, match="one of proximal_warmup_fraction .* or proximal_start_step"):
        LisaConfig(proximal_warmup_fraction=0.1, proximal_start_step=3)
    with pytest.raises(
        SafeFTError, match=r"defense\.lisa\.proximal_warmup_fraction: must be a number in \[0, 1\]"
    ):
        LisaConfig(proximal_warmup_fraction=1.5)
    with pytest.raises(SafeFTError, match=r"defense\.lisa\.proximal_start_step: must be an integer ≥ 0"):
        LisaConfig(proximal_start_step=-1)


def test_lisa_default_proximal_warmup_is_the_authors_10_percent():
    """git-disl/Lisa trainer.py: the term is added only when steps > 0.1 × total steps (0-based step counter)."""
    cfg = LisaConfig()
    assert (cfg.proximal_warmup_fraction, cfg.proximal_start_step) == (0.1, None)
    explicit = LisaConfig(proximal_start_step=7)
    assert (explicit.proximal_warmup_fraction, explicit.proximal_start_step) == (None, 7)
    model = _Toy()
    d = Lisa(LisaConfig(align_steps=100, user_steps=900))
    d.prepare(model, _lisa_ctx())
    with pytest.raises(SafeFTError, match="needs the run's total optimizer steps"):
        d.loss_terms(model, {}, None)
    d.set_total_steps(50)  # 10% = 5 steps: off at steps 0..5 (5 is not > 5), on from step 6
    assert d.proximal_start() == 6
    terms = []
    for _ in range(10):
        with torch.no_grad():
            model.w.add_(1.0)  # the weights move away from the snapshot at every step
        terms.append(d.loss_terms(model, {}, None)["lisa/proximal"].item())
        d.after_step(model)  # alignment phase throughout: the snapshot stays at the start
    assert terms[:6] == [0.0] * 6
    assert all(t == pytest.approx(0.5 * 3 * (s + 1) ** 2) for s, t in enumerate(terms) if s >= 6)
    for total, start in ((1, 1), (9, 1), (10, 2), (30, 4), (1000, 101)):
        d.set_total_steps(total)
        assert d.proximal_start() == start  # the first step s with s > 0.1 · total
    d2 = Lisa(LisaConfig(proximal_start_step=2))  # explicit step override: no total needed
    assert d2.proximal_start() == 2


def test_lisa_trainer_run_has_no_proximal_term_in_the_first_10_percent(tmp_path):
    """A real SafeTrainer run (tiny Llama, LoRA): the trainer gives max_steps at train begin; the logged term is 0 at
    every step s ≤ 0.1 · 30 = 3 (0-based) and > 0 at every later step that is not the first of a phase."""
    from helpers_models import make_tiny_model, make_tiny_tokenizer, tiny_task_rows, tiny_training_args

    from safeft.data import CompletionCollator, tokenize_example
    from safeft.models import setup_trainable
    from safeft.trainer import SafeTrainer

    tok = make_tiny_tokenizer()
    rows = tiny_task_rows(tok, 8, numbered=False)
    align = [
        Example(f"how do i bake bread {i}", "i cannot help with that request", kind="refusal")
        for i in range(4)
    ]
    collator = CompletionCollator(tok)
    ctx = DefenseContext(
        tokenizer=tok,
        alignment_examples=align,
        collate=lambda exs: collator([tokenize_example(tok, e, max_length=64) for e in exs]),
        seed=0,
        use_lora=True,
    )
    model = setup_trainable(make_tiny_model(seed=0), method="lora", lora_r=4, lora_alpha=8)
    (lisa,) = build_defenses("lisa", {"lisa": {"align_steps": 2, "user_steps": 3}})
    lisa.prepare(model, ctx)
    args = tiny_training_args(tmp_path, per_device_train_batch_size=2, max_steps=30)
    tr = SafeTrainer(model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=tok,
                     defenses=[lisa])  # fmt: skip
    tr.train()
    assert lisa.total_steps == 30 and lisa.proximal_start() == 4
    term = {h["step"] - 1: h["lisa/proximal"] for h in tr.state.log_history if "lisa/proximal" in h}
    assert sorted(term) == list(range(30))
    # align 2 / user 3: the term is 0 at the first step of a phase (right after a switch)
    first_of_phase = {s for s in range(30) if s % 5 in (0, 2)}
    assert all(term[s] == 0.0 for s in range(4))  # steps 1 and 3 would be > 0 without the warm-up
    assert all(term[s] > 0.0 for s in range(4, 30) if s not in first_of_phase)


# ---- registry and composition -------------------------------------------------------------------------------------
def test_registry_and_paper_attributes():
    from safeft.defenses import defense_names

    assert {"asft", "safelora", "safeinstr", "lisa"} <= set(defense_names())
    for cls in (AsFT, SafeLoRA, SafeInstr, Lisa):
        assert "arXiv" in cls.paper and cls.artifacts


def test_asft_plus_safeinstr_composition(pair):
    model, ctx, expected = pair
    _randomise_lora(model, seed=9)
    defenses = build_defenses("asft+safeinstr", {"safeinstr": {"count": 2}})
    assert [type(d) for d in defenses] == [AsFT, SafeInstr]
    ctx.alignment_examples = _refusals(4)
    data = _task(6)
    for d in defenses:
        data = d.modify_dataset(data, ctx)
    assert len(data) == 8
    for d in defenses:
        d.prepare(model, ctx)
    ids = torch.randint(0, 256, (2, 6))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    outputs = model(**inputs)
    terms = {}
    for d in defenses:
        terms.update(d.loss_terms(model, inputs, outputs))
    assert list(terms) == ["asft/penalty"]  # SafeInstr works on the data only
    total = outputs.loss + sum(terms.values())  # what the trainer adds
    naive = sum(
        _naive_asft(*(t.detach().double() for t in lora_factors(m)[:2]), expected[n].double()).item()
        for n, m in lora_modules(model).items()
    )
    assert total.item() == pytest.approx(outputs.loss.item() + naive, rel=1e-5)
