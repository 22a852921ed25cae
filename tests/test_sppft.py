"""SPPFT (Li et al., arXiv 2408.17003): locating the safety layers from the N-M vs N-N angle gap, the over-rejection
refinement, freezing them under SafeTrainer, config errors, and a CLI run — on tiny random Llama models."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_models import (
    demo_train_args,
    make_tiny_model,
    make_tiny_model_dir,
    make_tiny_tokenizer,
    tiny_task_rows,
    tiny_training_args,
)

from safeft.components.capture import decoder_layers
from safeft.data import CompletionCollator, Example
from safeft.defenses import build_defenses
from safeft.defenses import sppft as S
from safeft.defenses.base import DefenseContext
from safeft.errors import SafeFTError
from safeft.models import setup_trainable
from safeft.trainer import SafeTrainer


# ---- a synthetic model of the safety layers: the gap appears at block 3, grows through 5, then plateaus -------------
def _synthetic_states(n_layers=8, p=12, d=64, onset=3, top=5, seed=0):
    """(harmful, harmless) ``[P, L, d]``: per layer a shared vector c plus noise; harmful prompts are c rotated by
    θ_l = 10° per block over blocks onset..top (0° before, constant after), so the N-M vs N-N angle gap appears at
    block ``onset``, grows through block ``top`` and then plateaus."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n_layers, d, generator=g)
    c = 24.0 * c / c.norm(dim=-1, keepdim=True)
    e = torch.randn(n_layers, d, generator=g)
    e = e - (e * c).sum(-1, keepdim=True) * c / 24.0**2
    e = 24.0 * e / e.norm(dim=-1, keepdim=True)
    degrees = [10.0 * max(0, min(k, top) - onset + 1) for k in range(n_layers)]
    theta = torch.deg2rad(torch.tensor(degrees))[:, None]
    harm_center = torch.cos(theta) * c + torch.sin(theta) * e

    def states(center: torch.Tensor) -> torch.Tensor:
        return center[None] + 0.2 * torch.randn(p, n_layers, d, generator=g)

    return states(harm_center), states(c)


def test_pair_angles_match_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    harm, harmless = torch.randn(4, 3, 5, generator=g), torch.randn(3, 3, 5, generator=g)

    def ang(a, b):
        return torch.rad2deg(
            torch.arccos(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
        )

    got = S.pair_angles(harm, harmless)
    for k in range(3):
        nn = [ang(harmless[a, k], harmless[b, k]) for a in range(3) for b in range(a + 1, 3)]
        mm = [ang(harm[a, k], harm[b, k]) for a in range(4) for b in range(a + 1, 4)]
        nm = [ang(harmless[a, k], harm[b, k]) for a in range(3) for b in range(4)]
        for key, vals in (("nn", nn), ("mm", mm), ("nm", nm)):
            assert got[key][k].item() == pytest.approx(torch.stack(vals).mean().item(), abs=1e-9)


def test_initial_range_finds_the_known_safety_layers():
    harm, harmless = _synthetic_states()
    ang = S.pair_angles(harm, harmless)
    gap = ang["nm"] - ang["nn"]
    assert gap[:3].abs().max() < 2.0 and gap[5] > 25.0  # the construction does what it says
    assert S.initial_range(gap, onset=0.1, smooth=0.1, min_gap=0.5) == (3, 5)
    # a curve that rises at 2, grows through 4 and is flat after: the rule reads the bounds off the curve
    assert S.initial_range(torch.tensor([0.0, 0.1, 2.0, 5.0, 9.0, 9.1, 9.0]), 0.1, 0.1, 0.5) == (2, 4)
    with pytest.raises(SafeFTError, match="no safety-layer signal.*defense.sppft.layers"):
        S.initial_range(torch.tensor([0.1, 0.2, 0.15, 0.1]), 0.1, 0.1, 0.5)  # below min_gap
    with pytest.raises(SafeFTError, match="no safety-layer signal"):
        S.initial_range(torch.tensor([3.0, 2.0, 1.0]), 0.1, 0.1, 0.5)  # never rises


def test_last_token_states_equal_output_hidden_states():
    model = make_tiny_model(seed=2, num_hidden_layers=3)
    seqs = [[5, 9, 12, 7], [4, 8], [10, 11, 13]]
    got = S.last_token_states(model, seqs, pad=1, batch_size=2)
    assert got.shape == (3, 3, 64)
    for r, s in enumerate(seqs):
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states
        for k in range(2):  # the last entry of hidden_states has the final norm applied; ours never does
            torch.testing.assert_close(got[r, k], hs[k + 1][0, -1], atol=1e-5, rtol=1e-5)


def _ctx(tmp_path=None, n=12, **kw):
    return DefenseContext(
        tokenizer=make_tiny_tokenizer(),
        anchor_pool=[f"how do i do harm {i}" for i in range(n)],
        harmless_pool=[f"what is the capital of france {i}" for i in range(n)],
        artifacts_dir=tmp_path,
        fingerprint="f" * 64,
        max_length=32,
        **kw,
    )


def test_prepare_locates_freezes_and_caches(tmp_path, monkeypatch):
    states = iter(_synthetic_states(n_layers=8))
    monkeypatch.setattr(S, "last_token_states", lambda *a, **k: next(states))
    model = setup_trainable(make_tiny_model(num_hidden_layers=8), method="full")
    d = S.SPPFT()
    logs = []
    d.log = logs.append
    summary = d.prepare(model, _ctx(tmp_path))
    assert summary["source"] == "computed" and summary["layers"] == [3, 4, 5]
    assert len(summary["gap_deg"]) == 8 and any("safety layers 3–5 of 8" in m for m in logs)
    blocks = decoder_layers(model)
    for k, b in enumerate(blocks):
        assert all(p.requires_grad == (k not in (3, 4, 5)) for p in b.parameters())
    assert summary["frozen_parameters"] == sum(p.numel() for k in (3, 4, 5) for p in blocks[k].parameters())
    # a second run loads the cached range and curves without a forward pass
    monkeypatch.setattr(S, "last_token_states", lambda *a, **k: pytest.fail("recomputed"))
    again = S.SPPFT().prepare(
        setup_trainable(make_tiny_model(num_hidden_layers=8), method="full"), _ctx(tmp_path)
    )
    assert (
        again["source"] == "cached"
        and again["layers"] == [3, 4, 5]
        and again["gap_deg"] == summary["gap_deg"]
    )
    # other settings are another artifact
    states = iter(_synthetic_states(n_layers=8, onset=2, top=4))
    monkeypatch.setattr(S, "last_token_states", lambda *a, **k: next(states))
    other = S.SPPFT(S.SPPFTConfig(onset=0.2)).prepare_artifacts(
        make_tiny_model(num_hidden_layers=8), _ctx(tmp_path)
    )
    assert other["source"] == "computed" and other["layers"] == [2, 3, 4]


def _train(tmp_path, model, defenses):
    tok = make_tiny_tokenizer()
    args = tiny_training_args(tmp_path, max_steps=2, weight_decay=0.1)
    tr = SafeTrainer(
        model=model,
        args=args,
        train_dataset=tiny_task_rows(tok, 8, max_length=32),
        data_collator=CompletionCollator(tok),
        processing_class=tok,
        defenses=defenses,
    )
    tr.train()
    return tr


@pytest.mark.parametrize("method", ["full", "lora"])
def test_frozen_layers_are_unchanged_after_training(tmp_path, method):
    model = setup_trainable(
        make_tiny_model(seed=3, num_hidden_layers=4), method=method, lora_r=4, lora_alpha=8
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    defenses = build_defenses("sppft", {"sppft": {"layers": "1-2"}})
    for d in defenses:
        d.log = lambda _m: None
        d.prepare(model, _ctx())
    tr = _train(tmp_path, model, defenses)
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    frozen = [n for n in before if any(f"layers.{k}." in n for k in (1, 2))]
    assert frozen and not changed & set(frozen)  # bit-identical, weight decay included
    trained = [n for n in before if before[n] is not None and any(f"layers.{k}." in n for k in (0, 3))]
    if method == "lora":
        trained = [n for n in trained if "lora_B" in n]
    assert trained and set(trained) <= changed  # the other blocks do train
    fin = tr.finalize_defenses()["sppft"]
    assert fin["layers"] == [1, 2] and fin["source"] == "config" and fin["trainable_in_safety_layers"] == 0


def test_refine_moves_bounds_by_over_rejection(tmp_path, monkeypatch):
    """The stub answers as a model whose scaled blocks 2–4 cause refusals and other scaled blocks reduce them."""
    model = make_tiny_model(num_hidden_layers=8)
    blocks = decoder_layers(model)
    orig = [b.self_attn.q_proj.weight.detach().clone() for b in blocks]
    truth = {2, 3, 4}

    def answers(m, tok, prompts, template, n_tokens):
        assert n_tokens == 16
        scaled = {k for k, b in enumerate(blocks) if not torch.equal(b.self_attn.q_proj.weight, orig[k])}
        n = max(0, 3 * len(scaled & truth) - 2 * len(scaled - truth))
        return ["I cannot help with that."] * n + ["Sure."] * (len(prompts) - n)

    monkeypatch.setattr(S, "initial_range", lambda *a: (3, 3))
    monkeypatch.setattr(S, "last_token_states", lambda *a, **k: torch.randn(12, 8, 64))
    border = [Example(f"how do i kill time {i}", "ok", "benign", None, {"contrast": True}) for i in range(10)]
    d = S.SPPFT(S.SPPFTConfig(refine=True, refine_window=2))
    d.answer_fn = answers
    d.log = lambda _m: None
    summary = d.prepare_artifacts(model, _ctx(alignment_examples=border))
    assert summary["initial_range"] == [3, 3] and summary["layers"] == [2, 3, 4]
    assert summary["refine"]["refusals_by_upper"] == {"3": 3, "4": 6, "5": 4}
    assert summary["refine"]["refusals_by_lower"] == {"1": 7, "2": 9, "3": 6, "4": 3}
    assert all(torch.equal(b.self_attn.q_proj.weight, o) for b, o in zip(blocks, orig))  # restored exactly
    with pytest.raises(SafeFTError, match="defense.sppft.refine: .*borderline"):
        S.SPPFT(S.SPPFTConfig(refine=True)).prepare_artifacts(model, _ctx())


def test_config_and_context_errors_name_the_field():
    for kw, field in [
        ({"layers": []}, "layers"),
        ({"layers": "5-2"}, "layers"),
        ({"layers": [1, -1]}, "layers"),
        ({"layers": "a-b"}, "layers"),
        ({"n_prompts": 1}, "n_prompts"),
        ({"onset": 0}, "onset"),
        ({"smooth": 1.0}, "smooth"),
        ({"min_gap": -1}, "min_gap"),
        ({"refine": "yes"}, "refine"),
        ({"scale": 1.0}, "scale"),
        ({"scale": 0}, "scale"),
        ({"refine_window": -1}, "refine_window"),
        ({"batch_size": 0}, "batch_size"),
    ]:
        with pytest.raises(SafeFTError, match=rf"^defense\.sppft\.{field}: must be") as e:
            S.SPPFTConfig(**kw)
        assert "\n" not in str(e.value)
    assert S.SPPFTConfig(layers="2-4").layers == [2, 3, 4]
    assert S.SPPFTConfig(layers=[4, 2, 4]).layers == [2, 4]
    with pytest.raises(SafeFTError, match="unknown key"):
        build_defenses("sppft", {"sppft": {"bogus": 1}})
    model = setup_trainable(make_tiny_model(), method="full")
    with pytest.raises(SafeFTError, match=r"defense\.sppft\.layers: \[5\] out of range.*2 layers"):
        S.SPPFT(S.SPPFTConfig(layers=[0, 5])).prepare(model, _ctx())
    with pytest.raises(SafeFTError, match="leaves nothing to train"):
        S.SPPFT(S.SPPFTConfig(layers="0-1")).prepare(
            setup_trainable(make_tiny_model(), method="lora"), _ctx()
        )
    with pytest.raises(SafeFTError, match="at least 2 harmful"):
        S.SPPFT().prepare(model, _ctx(n=1))
    held = _ctx()
    held.eval_prompts = list(held.anchor_pool[:11])  # evaluation prompts are never used to locate the layers
    with pytest.raises(SafeFTError, match="got 1 and 12"):
        S.SPPFT().prepare(model, held)


def test_cli_train_with_sppft_records_the_layers(tmp_path, capsys):
    from safeft.cli import main

    model_dir = make_tiny_model_dir(tmp_path / "m", num_hidden_layers=4)
    base = demo_train_args(model_dir, tmp_path / "r", tmp_path / "cache", extra=["--defense", "sppft"])
    capsys.readouterr()
    assert main([*base, "--set", "defense.options.sppft.onset=2"]) == 2
    err = capsys.readouterr().err
    assert "defense.sppft.onset" in err and "Traceback" not in err
    # a random θ₀ is not aligned: its N-M vs N-N gap never rises, and the search says so instead of guessing
    assert main([*base, "--set", "defense.options.sppft.n_prompts=8"]) == 2
    err = capsys.readouterr().err
    assert "no safety-layer signal" in err and "defense.sppft.layers" in err and "Traceback" not in err
    assert main([*base, "--set", "defense.options.sppft.layers=1-2"]) == 0
    assert "SPPFT: froze blocks 1–2 of 4" in capsys.readouterr().out
    rec = json.loads((tmp_path / "r" / "run.json").read_text())["finalize"]["sppft"]
    assert rec["source"] == "config" and rec["layers"] == [1, 2] and rec["n_layers"] == 4
    assert rec["trainable_in_safety_layers"] == 0 and rec["frozen_parameters"] > 0
