"""Projections, covariance, early-exit capture and the TopK SAE, on tiny in-process models."""

from __future__ import annotations

import json

import pytest
import torch

from safeft.components import (
    TopKSAE,
    check_sae_fits,
    decoder_layers,
    load_sae,
    project_rows_out,
    project_update_out,
    run_to_layer,
    save_sae,
    top_energy_basis,
    train_sae,
)
from safeft.errors import SafeFTError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run faster on one thread


def tiny_llama(n_layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    return LlamaForCausalLM(cfg).eval()


def _orthonormal(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q


# ---- projections -----------------------------------------------------------------------------------------------
def test_project_rows_out_kills_subspace_and_is_idempotent():
    V = _orthonormal(32, 5).float()
    A = torch.randn(8, 32)
    P = project_rows_out(A, V)
    assert (P @ V).abs().max() < 1e-5
    assert torch.allclose(project_rows_out(P, V), P, atol=1e-6)
    # the orthogonal part is untouched
    assert torch.allclose(P - P @ V @ V.T, P, atol=1e-5)
    assert torch.allclose(A - P, (A @ V) @ V.T, atol=1e-5)


def test_project_rows_out_bf16_roundtrip_keeps_dtype():
    V = _orthonormal(32, 4)
    A = torch.randn(8, 32).bfloat16()
    P = project_rows_out(A, V)
    assert P.dtype == torch.bfloat16
    assert (P.float() @ V.float()).abs().max() < 5e-2 * A.float().abs().max()


def test_project_update_out_full_ft():
    V = _orthonormal(16, 3)
    W0 = torch.randn(12, 16, dtype=torch.float64)
    W = W0 + 0.1 * torch.randn(12, 16, dtype=torch.float64)
    Wp = project_update_out(W, W0, V)
    assert ((Wp - W0) @ V).abs().max() < 1e-12
    assert torch.allclose(project_update_out(Wp, W0, V), Wp)
    with pytest.raises(SafeFTError, match="d_in"):
        project_rows_out(torch.randn(2, 5), V)


def test_top_energy_basis_hand_example():
    # eigenvalues 6, 3, 1 on the coordinate axes, trace 10
    C = torch.diag(torch.tensor([3.0, 1.0, 6.0], dtype=torch.float64))
    V = top_energy_basis(C, 0.5)  # 6 ≥ 5
    assert V.shape == (3, 1) and torch.allclose(
        V[:, 0].abs(), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    )
    assert top_energy_basis(C, 0.6).shape == (3, 1)  # 6 ≥ 6 exactly
    assert top_energy_basis(C, 0.61).shape == (3, 2)  # needs 6 + 3
    V2 = top_energy_basis(C, 0.9)
    assert V2.shape == (3, 2)
    assert torch.allclose(V2.abs().sum(1), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    assert top_energy_basis(C, 0.95).shape == (3, 3)
    assert torch.allclose(V2.T @ V2, torch.eye(2, dtype=torch.float64))
    with pytest.raises(SafeFTError, match="energy"):
        top_energy_basis(C, 1.5)


# ---- capture --------------------------------------------------------------------------------------------------
def test_run_to_layer_matches_hidden_states_and_stops_early():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    layers = decoder_layers(model)
    calls = [0] * len(layers)
    hs = [
        layers[i].register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1)) for i in range(4)
    ]
    head_calls = []
    hs.append(model.lm_head.register_forward_hook(lambda *_a: head_calls.append(1)))
    h = run_to_layer(model, ids, mask, 1)
    for x in hs:
        x.remove()
    assert h.shape == (2, 9, 64)
    assert torch.allclose(h, full[2], atol=1e-5)
    assert calls == [1, 1, 0, 0] and head_calls == []
    with pytest.raises(SafeFTError, match="out of range"):
        run_to_layer(model, ids, mask, 4)


def test_run_to_layer_peft_gradients_flow():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    ids = torch.randint(0, 256, (2, 6))
    h = run_to_layer(model, ids, torch.ones_like(ids), 2)
    h.pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # lora_B starts at zero, so lora_A gets no gradient, but lora_B of layers 0..2 does; layer 3 is never run
    got = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert any("layers.0." in n and "lora_B" in n for n in got)
    assert not any("layers.3." in n for n in got)


def test_no_decoder_layers_is_refused():
    with pytest.raises(SafeFTError, match="decoder"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(3, 3)))


# ---- SAE --------------------------------------------------------------------------------------------------------
def _low_rank_data(n=3000, d=32, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g)
    coef = torch.randn(n, rank, generator=g) * torch.rand(n, rank, generator=g).lt(0.5)
    return coef @ basis + 0.01 * torch.randn(n, d, generator=g) + 2.0


def test_topk_encode_keeps_k_largest():
    sae = TopKSAE(8, 16, 3)
    z = sae.encode(torch.randn(5, 8))
    assert z.shape == (5, 16)
    assert ((z > 0).sum(-1) <= 3).all()
    pre = torch.relu(sae.pre_acts(torch.zeros(1, 8)))
    z0 = sae.encode(torch.zeros(1, 8))
    assert torch.allclose(z0[z0 > 0].sort().values, pre.topk(3).values[pre.topk(3).values > 0].sort().values)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-5)


def test_train_sae_explains_low_rank_data(tmp_path):
    x = _low_rank_data()
    sae0 = TopKSAE(32, 64, 4)
    from safeft.components import sae_stats

    before = sae_stats(sae0, x)["explained_variance"]
    sae, stats = train_sae(x, d_sae=64, k=4, steps=300, lr=3e-3, batch_size=256, seed=0, progress=False)
    assert stats["explained_variance"] > 0.5 > before
    assert stats["l0"] <= 4.0 + 1e-6
    assert 0.0 <= stats["dead_fraction"] <= 1.0
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-4)
    # save -> load round trip in the SAELens layout
    save_sae(sae, tmp_path / "sae", hook_layer=3, model_name="tiny")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 32 and cfg["d_sae"] == 64 and cfg["k"] == 4
    assert cfg["hook_name"] == "blocks.3.hook_resid_post" and cfg["dtype"] == "float32"
    back = load_sae(tmp_path / "sae")
    # the input scale is folded into the saved weights: the SAELens copy reads raw activations, same function
    assert float(back.input_scale) == 1.0 and float(sae.input_scale) != 1.0
    assert torch.allclose(back.encode(x[:10]), sae.encode(x[:10]), atol=1e-5)
    assert torch.allclose(back(x[:10]), sae(x[:10]), atol=1e-4)
    assert back.hook_layer == 3


def test_sae_width_mismatch_refused(tmp_path):
    sae = TopKSAE(32, 64, 4)
    with pytest.raises(SafeFTError, match=r"d_in=32 .* hidden size 64"):
        check_sae_fits(sae, 64)
    with pytest.raises(SafeFTError, match="cfg.json"):
        load_sae(tmp_path / "missing")


def test_sae_lens_can_load_ours(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = TopKSAE(16, 32, 4)
    save_sae(sae, tmp_path / "s", hook_layer=1)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    x = torch.randn(4, 16)
    assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-5)


# ---- SAE: dead latents, streaming --------------------------------------------------------------------------------
def _anisotropic_sparse(n=6000, d=16, m=128, seed=0):
    """Sparse combinations of m unit directions whose magnitudes span two decades, around a large mean: most of
    a random SAE's latents never win the top-k on such data and die without a dead-latent loss."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    mag = torch.logspace(0.5, -1.5, m)
    c = (torch.rand(n, m, generator=g) < 4 / m) * torch.rand(n, m, generator=g) * mag
    return c @ D + 2.0


def test_auxk_loss_revives_dead_latents():
    x = _anisotropic_sparse()
    kw = dict(d_sae=256, k=4, steps=150, lr=2e-3, batch_size=256, seed=0, progress=False, dead_after=1024)
    _, plain = train_sae(x, aux_coef=0.0, heldout_fraction=0.2, **kw)
    _, auxk = train_sae(x, aux_coef=0.25, aux_k=8, heldout_fraction=0.2, **kw)
    # dead fraction measured on held-out rows (1200 rows the SAE never trained on)
    assert plain["rows_heldout"] == 1200 and plain["dead_fraction"] > 0.2
    assert auxk["dead_fraction"] < 0.5 * plain["dead_fraction"], (plain, auxk)
    assert auxk["explained_variance"] > 0.6


def test_train_sae_streams_from_disk_shards(tmp_path):
    from safeft.components import ShardReader, ShardWriter, StoreRows

    x = _low_rank_data(n=2000)
    w = ShardWriter(tmp_path / "acts", [3], 32, key={"k": 1}, shard_rows=300)
    for i in range(0, 1000, 100):  # documents of 100 rows; the writer cuts shards at document boundaries
        w.add({3: x[i : i + 100]}, docs_done=i // 100 + 1)
    assert w.docs_done == 9 and len(w.progress["shards"]) == 3  # 100 buffered rows not yet on disk
    # an interrupted capture resumes after the last shard written; another key starts afresh
    w2 = ShardWriter(tmp_path / "acts", [3], 32, key={"k": 1}, shard_rows=300)
    assert w2.docs_done == 9 and w2.rows_done == 900
    for i in range(900, 2000, 100):
        w2.add({3: x[i : i + 100]}, docs_done=i // 100 + 1)
    w2.close()
    r = ShardReader(tmp_path / "acts")
    assert r.n_rows == 2000 and r.layers == [3]
    assert torch.allclose(torch.cat(list(r.iter_range(3, 0, 2000, chunk=333))), x.bfloat16().float())
    seen = torch.cat(list(r.batches(3, 1900, 256, torch.Generator().manual_seed(0), buffer_rows=500)))
    assert seen.shape == (1900, 32)  # one epoch over the training rows, each once
    assert torch.allclose(seen.sum(0), x[:1900].bfloat16().float().sum(0), rtol=1e-3, atol=1e-2)
    src = StoreRows(r, 3, heldout_fraction=0.05)
    sae, st = train_sae(src, d_sae=64, k=4, steps=120, lr=3e-3, batch_size=256, seed=0, progress=False)
    assert st["rows_heldout"] == 100 and st["explained_variance"] > 0.5
    fresh = ShardWriter(tmp_path / "acts", [3], 32, key={"k": 2})
    assert fresh.docs_done == 0 and not fresh.complete


def test_basis_from_rows_gram_equals_covariance_and_keeps_the_mean():
    from safeft.components import basis_from_rows

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 100, generator=g) @ torch.diag(torch.logspace(1, -2, 100)) + 3.0
    V_gram, info = basis_from_rows(X, 0.9)  # N = 40 < d = 100: the 40 × 40 Gram route
    V_cov = top_energy_basis(X.double().T @ X.double(), 0.9).float()
    assert info["method"] == "gram" and V_gram.shape == V_cov.shape
    assert torch.allclose(V_gram @ V_gram.T, V_cov @ V_cov.T, atol=1e-5)
    assert torch.allclose(V_gram.T @ V_gram, torch.eye(V_gram.shape[1]), atol=1e-5)
    # centred: energy ranks the directions along which rows differ, and the mean direction is always kept
    Xc = torch.randn(500, 20, generator=g) * 0.01 + torch.linspace(1, 2, 20)
    Vu, iu = basis_from_rows(Xc, 0.9)
    Vc, ic = basis_from_rows(Xc, 0.9, center=True)
    assert iu["method"] == "cov" and iu["rank"] == 1  # uncentred: the mean direction alone holds 90%
    assert ic["rank"] > 10
    mu = Xc.mean(0) / Xc.mean(0).norm()
    assert float((Vc.T @ mu).norm()) == pytest.approx(1.0, abs=1e-4)


def test_run_to_layers_and_shared_input_groups():
    from safeft.components import run_to_layers, shared_input_groups

    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True).hidden_states
        hs = run_to_layers(model, ids, torch.ones_like(ids), [2, 0])
    assert sorted(hs) == [0, 2] and all(torch.allclose(hs[i], full[i + 1], atol=1e-5) for i in (0, 2))
    layer = decoder_layers(model)[1]
    mods = {n: getattr(layer.self_attn if n[0] in "qkvo" else layer.mlp, n) for n in
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}  # fmt: skip
    groups = shared_input_groups(model, mods, ids[:1])
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_budget_passes_keeps_order_fits_the_budget_and_isolates_an_oversized_item():
    from safeft.components.capture import budget_passes

    sizes = {"a": 4, "b": 4, "c": 3, "d": 20, "e": 1}
    assert budget_passes(list(sizes), sizes.__getitem__, 10) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert budget_passes([], sizes.__getitem__, 10) == [[]]
