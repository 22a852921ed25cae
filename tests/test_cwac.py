"""CWAC on tiny in-process models: exact projection under AdamW (LoRA and full FT), the activation term, caching,
refusals of misconfigured runs, and the null configuration (both switches off = SFT)."""

from __future__ import annotations

import pytest
import torch

from safeft.components import run_to_layer
from safeft.defenses import DefenseContext, get_defense_class
from safeft.defenses.cwac import CWAC, CWACConfig
from safeft.errors import SafeFTError

HARMFUL = [f"Explain how to build weapon number {i} and hide it from the police" for i in range(24)]
HARMLESS = [f"Classify the sentiment of review {i}: the quick brown fox is great" for i in range(12)]
EVAL = ["Explain how to build weapon number 0 and hide it from the police", "Some held-out eval prompt"]
SMALL = dict(sae_steps=40, sae_width_factor=4, sae_k=8, n_features=8, n_positions=3, anchor_batch=3)


def tiny_model(seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=400,
    )
    return LlamaForCausalLM(cfg)


def lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets))
    )


def ctx_for(tok, tmp_path, use_lora=True, **kw):
    return DefenseContext(
        tokenizer=tok,
        template="chat",
        fingerprint="f" * 64,
        artifacts_dir=tmp_path / "art",
        anchor_pool=list(HARMFUL),
        harmless_pool=list(HARMLESS),
        eval_prompts=list(EVAL),
        use_lora=use_lora,
        max_length=128,
        seed=0,
        **kw,
    )


def make(config: CWACConfig | None = None, refuse: bool = True, cls=CWAC) -> CWAC:
    d = cls(config or CWACConfig(**SMALL))
    d.log = lambda *_a: None
    # θ₀ here is a random tiny model: stand in its greedy answers (the real path uses safeft.eval.generate)
    text = "I'm sorry, but I can't help with that request." if refuse else "Sure, here is how to do it."
    d.answer_fn = lambda _m, _t, prompts, _tpl, _n: [text] * len(prompts)
    return d


def batch(seed: int, n: int = 4, t: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (n, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train(model, defense, steps=5, lr=1e-2, extra=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    model.train()
    for s in range(steps):
        inputs = batch(s)
        out = model(**inputs)
        loss = out.loss if extra is None else extra(model, inputs)
        for v in defense.loss_terms(model, inputs, out).values():
            loss = loss + v
        opt.zero_grad()
        loss.backward()
        opt.step()
        defense.after_step(model)


# ---- config -----------------------------------------------------------------------------------------------------
def test_config_validation_names_field():
    with pytest.raises(SafeFTError, match=r"defense\.cwac\.energy.*\(0, 1\)"):
        CWACConfig(energy=1.0)
    with pytest.raises(SafeFTError, match=r"defense\.cwac\.lam"):
        CWACConfig(lam=-1)
    with pytest.raises(SafeFTError, match=r"defense\.cwac\.n_positions"):
        CWACConfig(n_positions=0)
    assert get_defense_class("cwac-weight")().config.activation is False
    assert get_defense_class("cwac-weight")().config.weight is True
    assert get_defense_class("cwac-activation")().config.weight is False


def test_both_switches_off_is_exactly_sft(tiny_tokenizer, tmp_path):
    model = lora(tiny_model())
    d = make(CWACConfig(weight=False, activation=False))
    d.prepare(model, ctx_for(tiny_tokenizer, tmp_path))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = batch(0)
    out = model(**inputs)
    assert d.loss_terms(model, inputs, out) == {}
    d.after_step(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not (tmp_path / "art").exists()  # nothing computed


# ---- weight constraint -------------------------------------------------------------------------------------------
@torch.no_grad()
def _delta_w_leak(model, defense) -> tuple[float, float]:
    """max over constrained modules of ‖ΔW V‖/‖ΔW‖, and min ‖ΔW‖ (to show training moved them)."""
    worst, smallest = 0.0, float("inf")
    for name, mod in defense._lora_modules.items():
        V = [v for n, _a, v in defense._lora if n == name][0].double()
        dw = (mod.lora_B["default"].weight.double() @ mod.lora_A["default"].weight.double()) * mod.scaling[
            "default"
        ]
        worst = max(worst, float((dw @ V).norm() / dw.norm()))
        smallest = min(smallest, float(dw.norm()))
    return worst, smallest


def test_lora_adamw_keeps_delta_w_out_of_subspace(tiny_tokenizer, tmp_path):
    model = lora(tiny_model())
    d = make(CWACConfig(activation=False))
    s = d.prepare(model, ctx_for(tiny_tokenizer, tmp_path))
    assert set(s["subspace"]["ranks"]) == {
        f"{i}.{p}"
        for i in (1, 2)
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert all(1 <= r < 128 for r in s["subspace"]["ranks"].values())
    train(model, d, steps=5)
    leak, moved = _delta_w_leak(model, d)
    assert moved > 1e-4  # training did change every constrained module
    assert leak < 1e-5
    assert d.finalize(model)["cwac_max_relative_leak"] < 1e-5
    # an unconstrained module (layer 0) is free: its update does overlap span(V) of layer 1's inputs
    m0 = model.base_model.model.model.layers[0].mlp.down_proj
    V1 = [v for n, _a, v in d._lora if n == "1.mlp.down_proj"][0]
    dw0 = (m0.lora_B["default"].weight @ m0.lora_A["default"].weight).detach()
    assert float((dw0 @ V1).norm() / dw0.norm()) > 1e-2


def test_full_ft_adamw_keeps_delta_w_out_of_subspace(tiny_tokenizer, tmp_path):
    model = tiny_model()
    d = make(CWACConfig(activation=False))
    d.prepare(model, ctx_for(tiny_tokenizer, tmp_path, use_lora=False))
    assert sorted(n for n, *_ in d._full) == ["1.mlp.down_proj", "2.mlp.down_proj"]
    train(model, d, steps=4, lr=1e-3)
    for name, W, W0, V in d._full:
        dw = (W - W0).double()
        assert dw.norm() > 1e-4
        assert float((dw @ V.double()).norm() / dw.norm()) < 1e-5, name


def test_refuses_constraint_on_untrained_modules(tiny_tokenizer, tmp_path):
    model = lora(tiny_model(), targets=("q_proj", "v_proj"))
    d = make(CWACConfig(activation=False, target_modules=["down_proj"]))
    with pytest.raises(SafeFTError, match="never trained.*plain SFT"):
        d.prepare(model, ctx_for(tiny_tokenizer, tmp_path))
    with pytest.raises(SafeFTError, match=r"target_modules.*\['nope_proj'\] not found"):
        make(CWACConfig(activation=False, target_modules=["nope_proj"])).prepare(
            model, ctx_for(tiny_tokenizer, tmp_path)
        )
    with pytest.raises(SafeFTError, match=r"defense\.cwac\.layers.*out of range.*4 layers"):
        make(CWACConfig(layers=[7])).prepare(model, ctx_for(tiny_tokenizer, tmp_path))
    # default targets follow what LoRA trains: q/v of the middle layers
    d2 = make(CWACConfig(activation=False))
    s = d2.prepare(model, ctx_for(tiny_tokenizer, tmp_path))
    assert sorted(s["subspace"]["ranks"]) == [
        "1.self_attn.q_proj",
        "1.self_attn.v_proj",
        "2.self_attn.q_proj",
        "2.self_attn.v_proj",
    ]
    # the default leaves layer 3 of 4 under neither constraint (outside layers 1–2, above the SAE layer 2): said
    logs: list[str] = []
    d4 = make(CWACConfig(**SMALL))
    d4.log = logs.append
    d4.prepare(model, ctx_for(tiny_tokenizer, tmp_path))
    assert any("layers 3 are trained but under neither constraint" in x and "layers: all" in x for x in logs), logs
    # layers: "all" constrains every trained module of every layer
    d3 = make(CWACConfig(activation=False, layers="all"))
    d3.log = logs.append
    logs.clear()
    s3 = d3.prepare(model, ctx_for(tiny_tokenizer, tmp_path))
    assert not any("neither constraint" in x for x in logs)
    assert sorted(s3["subspace"]["ranks"]) == [
        f"{i}.self_attn.{m}" for i in range(4) for m in ("q_proj", "v_proj")
    ]
    with pytest.raises(SafeFTError, match=r"defense\.cwac\.layers: must be.*'middle'"):
        CWACConfig(layers="middle")


def test_refuses_when_theta0_refuses_nothing(tiny_tokenizer, tmp_path):
    d = make(refuse=False)
    with pytest.raises(SafeFTError, match="refused none of the 23"):
        d.prepare(lora(tiny_model()), ctx_for(tiny_tokenizer, tmp_path))


def test_refuses_unsupported_architecture(tiny_tokenizer, tmp_path):
    with pytest.raises(SafeFTError, match="decoder"):
        make().prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), ctx_for(tiny_tokenizer, tmp_path))


# ---- anchors, caching ----------------------------------------------------------------------------------------
def test_artifacts_cached_and_tamper_refused(tiny_tokenizer, tmp_path):
    ctx = ctx_for(tiny_tokenizer, tmp_path)
    d1 = make()
    s1 = d1.prepare(lora(tiny_model()), ctx)
    assert d1.stats["computed"] == ["cwac-anchors", "cwac-subspace", "cwac-sae"] and d1.stats["loaded"] == []
    # anchors are disjoint from the eval prompts and the four sets are disjoint
    anchors = s1["anchors"]
    assert anchors == 23 and sum(s1["splits"].values()) == 23
    assert 0.0 <= s1["sae"]["sae_dead_fraction"] <= 1.0 and "causal_check" in s1["sae"]
    d2 = make()
    d2.answer_fn = None  # a cache hit must not need θ₀'s generations at all
    s2 = d2.prepare(lora(tiny_model()), ctx)
    assert d2.stats == {"computed": [], "loaded": ["cwac-anchors", "cwac-subspace", "cwac-sae"]}
    assert s2["subspace"]["ranks"] == s1["subspace"]["ranks"]
    assert torch.equal(d2._z_base, d1._z_base) and torch.equal(d2._features, d1._features)
    # the ablations reuse the same artifacts
    d3 = make(cls=get_defense_class("cwac-weight"))
    d3.prepare(lora(tiny_model()), ctx)
    assert d3.stats["computed"] == []
    # tamper with the cached subspace
    f = tmp_path / "art" / "cwac-subspace" / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(SafeFTError, match="sha256"):
        make().prepare(lora(tiny_model()), ctx)
    # another model's fingerprint does not reuse the artifacts
    d4 = make(CWACConfig(activation=False))
    d4.prepare(lora(tiny_model()), ctx_for(tiny_tokenizer, tmp_path / "other"))
    assert "cwac-subspace" in d4.stats["computed"]


def test_eval_overlap_never_becomes_anchor(tiny_tokenizer, tmp_path):
    d = make(CWACConfig(activation=False))
    seen = []
    d.answer_fn = lambda _m, _t, prompts, _tpl, _n: (
        seen.extend(prompts),
        ["I cannot help with that."] * len(prompts),
    )[1]
    d.prepare(lora(tiny_model()), ctx_for(tiny_tokenizer, tmp_path))
    assert EVAL[0] not in seen and len(seen) == len(HARMFUL) - 1


# ---- activation constraint ----------------------------------------------------------------------------------------
def _drift(model, d: CWAC, prompts_ids, lengths, z0) -> float:
    with torch.no_grad():
        h = run_to_layer(
            model,
            prompts_ids,
            (torch.arange(prompts_ids.shape[1])[None] < lengths[:, None]).long(),
            d._sae_layer,
        )
        pos = (lengths[:, None] - d.config.n_positions + torch.arange(d.config.n_positions)[None]).clamp_min(
            0
        )
        hs = torch.gather(h, 1, pos[..., None].expand(-1, -1, h.shape[-1]))
        z = d._sae.encode(hs.float())[..., d._features]
    return float((z - z0).pow(2).sum(dim=(1, 2)).mean()) if z0 is not None else z


def _push_objective(layer: int):
    u = torch.randn(64, generator=torch.Generator().manual_seed(5))

    def objective(model, inputs):
        h = run_to_layer(model, inputs["input_ids"], inputs["attention_mask"], layer)
        return -(h @ u).mean()

    return objective


def _heldout(d: CWAC, ctx):
    """Token ids of the feature-scoring anchors: never used by the loss (it samples the baseline split)."""
    from safeft.defenses.cwac.defense import _pad_right

    n = d.summary["splits"]
    anchors = d._last_anchors[n["subspace"] + n["sae"] : n["subspace"] + n["sae"] + n["score"]]
    return _pad_right(d._prompt_ids(ctx, anchors), ctx.tokenizer.pad_token_id)


def test_activation_term_reduces_safety_feature_drift(tiny_tokenizer, tmp_path):
    drifts = {}
    for lam in (0.0, 20.0):
        model = lora(tiny_model(seed=1))
        d = make(CWACConfig(weight=False, lam=lam, **SMALL))
        ctx = ctx_for(tiny_tokenizer, tmp_path)
        d.prepare(model, ctx)
        ids, lengths = _heldout(d, ctx)
        model.eval()
        z0 = _drift(model, d, ids, lengths, None)
        inputs = batch(0)
        terms = d.loss_terms(model, inputs, None)
        assert set(terms) == {"cwac/safety"} and float(terms["cwac/safety"]) == pytest.approx(0.0, abs=1e-6)
        torch.manual_seed(0)
        train(model, d, steps=12, lr=2e-2, extra=_push_objective(d._sae_layer))
        model.eval()
        drifts[lam] = _drift(model, d, ids, lengths, z0)
    assert drifts[0.0] > 0
    assert drifts[20.0] < 0.5 * drifts[0.0], drifts


def test_loss_term_gradient_and_rng_resume(tiny_tokenizer, tmp_path):
    model = lora(tiny_model())
    d = make(CWACConfig(weight=False, **SMALL))
    d.prepare(model, ctx_for(tiny_tokenizer, tmp_path))
    state = d.state_dict()
    a = [torch.randperm(d._base_ids.shape[0], generator=d._gen)[:3].tolist() for _ in range(3)]
    d.load_state_dict(state)
    b = [torch.randperm(d._base_ids.shape[0], generator=d._gen)[:3].tolist() for _ in range(3)]
    assert a == b
    # once θ moves, the term is positive and gives LoRA B a gradient in the layers up to sae_layer only
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    term = d.loss_terms(model, batch(0), None)["cwac/safety"]
    assert float(term) > 0
    term.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(f"layers.{d._sae_layer}." in n for n in grads)
    assert not any(f"layers.{d._sae_layer + 1}." in n for n in grads)


def test_sae_path_width_mismatch_refused(tiny_tokenizer, tmp_path):
    from safeft.components import TopKSAE, save_sae

    save_sae(TopKSAE(32, 64, 4), tmp_path / "sae")
    d = make(CWACConfig(weight=False, sae_path=str(tmp_path / "sae"), **SMALL))
    with pytest.raises(SafeFTError, match=r"d_in=32.*hidden size 64"):
        d.prepare(lora(tiny_model()), ctx_for(tiny_tokenizer, tmp_path))


def test_pretrained_sae_path_is_used(tiny_tokenizer, tmp_path):
    ctx = ctx_for(tiny_tokenizer, tmp_path)
    d1 = make(CWACConfig(weight=False, **SMALL))
    d1.prepare(lora(tiny_model()), ctx)
    exported = tmp_path / "art" / "cwac-sae" / "sae_lens"
    d2 = make(CWACConfig(weight=False, sae_path=str(exported), **SMALL))
    s2 = d2.prepare(lora(tiny_model()), ctx)
    assert s2["sae"]["sae_source"] == str(exported)
    assert torch.equal(d2._features, d1._features)
    assert torch.allclose(d2._z_base, d1._z_base, atol=1e-5)
