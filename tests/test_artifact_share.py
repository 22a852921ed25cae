"""Shareable artifacts (issue 16): a prepare exports a self-describing folder; a fresh cache loads it and CWAC uses
it without recomputing; another model, a tampered file, a path outside the folder or a pickle is refused; the card
and the SAELens copies are right; --push-to without network is one line and keeps the folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers_models import make_tiny_model_dir
from safetensors.torch import load_file

from safeft.config import build_config
from safeft.errors import SafeFTError
from safeft.pipeline import run_prepare
from safeft.share import CARD, INDEX, load_shared, push_shared, verify_shared

NAMES = {"cwac-anchors", "cwac-subspace", "cwac-sae", "cwac-features"}
# as tests/test_cwac_pipeline.py: small everything, the demo's own prompts only (no shared data needed)
FAST = {"n_anchor": 12, "anchor_sources": ["pool"], "sae_general_sources": ["harmless"], "sae_tokens": 600,
        "sae_steps": 8, "sae_batch_size": 128, "sae_width_factor": 2, "sae_k": 4, "n_features": 8,
        "n_positions": 2, "anchor_batch": 2, "max_new_tokens_anchor_check": 1, "causal_check": False,
        "anchor_judge": "keyword", "n_sae_layers": 2}  # fmt: skip


def quiet(*_a, **_k) -> None:
    pass


def _cfg(root: Path, model_dir: Path, **cwac):
    return build_config(None, {
        "model.aligned": str(model_dir), "model.cache_dir": str(root / "cache"),
        "data.task": "demo", "data.harmful_source": "demo", "data.n": 16, "data.p": 0.25, "data.max_length": 64,
        "training.lora_r": 4, "training.lora_alpha": 8, "training.output_dir": str(root / "run"),
        "training.progress": False, "eval.harmful_source": "demo", "eval.n_harmful": 3, "eval.n_task": 3,
        "defense.name": "cwac", "defense.options.cwac": {**FAST, **cwac},
    })  # fmt: skip


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One CWAC prepare on a tiny random Llama (θ₀ pretends to refuse everything), exported to ``folder``."""
    from safeft.eval import KeywordJudge

    tmp = tmp_path_factory.mktemp("share")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KeywordJudge, "is_refusal", lambda self, text: True)
        model_dir = make_tiny_model_dir(tmp / "m", max_position_embeddings=256)
        prep = run_prepare(_cfg(tmp / "a", model_dir), log=quiet, export_to=str(tmp / "shared"))
    assert set(prep["cwac"]["cache"]["computed"]) == NAMES
    return SimpleNamespace(model_dir=model_dir, folder=tmp / "shared", fp=prep["fingerprint"],
                           store=Path(prep["artifacts_dir"]))  # fmt: skip


@pytest.fixture
def always_refuses(monkeypatch):
    from safeft.eval import KeywordJudge

    monkeypatch.setattr(KeywordJudge, "is_refusal", lambda self, text: True)


def _copy(shared, tmp_path) -> Path:
    return Path(shutil.copytree(shared.folder, tmp_path / "copy"))


# ---- round trip --------------------------------------------------------------------------------------------------
def test_round_trip_fresh_cache_uses_shared_artifacts_without_recomputing(shared, tmp_path, always_refuses):
    prep = run_prepare(_cfg(tmp_path, shared.model_dir), log=quiet, share_from=str(shared.folder))
    assert prep["fingerprint"] == shared.fp
    assert prep["cwac"]["cache"]["computed"] == [] and set(prep["cwac"]["cache"]["loaded"]) == NAMES
    store = Path(prep["artifacts_dir"])
    assert store != shared.store
    for name in NAMES:
        a, b = (
            load_file(str(shared.store / name / "tensors.safetensors")),
            load_file(str(store / name / "tensors.safetensors")),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        man = json.loads((store / name / "manifest.json").read_text())
        assert man["fingerprint"] == shared.fp and man["imported_from"] == str(shared.folder)


def test_other_settings_stop_instead_of_recomputing(shared, tmp_path, always_refuses):
    with pytest.raises(
        SafeFTError, match=r"'cwac-features' in .* other settings \(n_features: shared 8, this run 6\)"
    ):
        run_prepare(_cfg(tmp_path, shared.model_dir, n_features=6), log=quiet, share_from=str(shared.folder))


# ---- refusals ----------------------------------------------------------------------------------------------------
def test_wrong_fingerprint_refused_naming_both(shared, tmp_path):
    from safeft.models import fingerprint

    other = fingerprint(make_tiny_model_dir(tmp_path / "other", seed=1))
    assert other != shared.fp
    with pytest.raises(
        SafeFTError,
        match=rf"another model: its θ₀ fingerprint is {shared.fp[:16]}, this model's is {other[:16]}",
    ):
        load_shared(str(shared.folder), tmp_path / "store", other, log=quiet)
    assert not (tmp_path / "store").exists()  # nothing copied


def test_tampered_file_refused(shared, tmp_path):
    folder = _copy(shared, tmp_path)
    f = folder / "cwac-subspace" / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(
        SafeFTError, match=r"cwac-subspace/tensors\.safetensors: corrupted or modified \(sha256"
    ):
        load_shared(str(folder), tmp_path / "store", shared.fp, log=quiet)
    assert not (tmp_path / "store").exists()
    # a manifest edited to claim other settings is a tampered file too
    folder = Path(shutil.copytree(shared.folder, tmp_path / "copy2"))
    man = folder / "cwac-features" / "manifest.json"
    m = json.loads(man.read_text())
    m["config"]["n_features"] = 6
    man.write_text(json.dumps(m))
    with pytest.raises(SafeFTError, match=r"manifest\.json: corrupted or modified"):
        verify_shared(folder, shared.fp)


def test_paths_outside_and_pickles_refused(shared, tmp_path):
    for rel, msg in (("../evil.json", "points outside the folder"), ("cwac-sae/evil.bin", "no pickle")):
        folder = Path(shutil.copytree(shared.folder, tmp_path / rel.replace("/", "_").replace(".", "_")))
        index = json.loads((folder / INDEX).read_text())
        index["files"][rel] = "0" * 64
        (folder / INDEX).write_text(json.dumps(index))
        with pytest.raises(SafeFTError, match=msg):
            verify_shared(folder, shared.fp)
    with pytest.raises(SafeFTError, match="not a shared artifact folder"):
        verify_shared(tmp_path, shared.fp)


def test_export_replaces_an_earlier_export_and_refuses_a_foreign_folder(shared, tmp_path):
    from safeft.share import export_shared

    out = _copy(shared, tmp_path)
    (out / "cwac-subspace" / "stale.safetensors").write_bytes(b"x")
    export_shared(shared.store, shared.fp, out, names=["cwac-subspace"], model="m")
    index = verify_shared(out, shared.fp)
    assert set(index["artifacts"]) == {"cwac-subspace"} and not (out / "cwac-sae").exists()
    assert not (out / "cwac-subspace" / "stale.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SafeFTError, match="not empty and not a shared artifact folder"):
        export_shared(shared.store, shared.fp, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_pact_artifact_round_trip_without_theta_b_reads(tmp_path, tiny_tokenizer):
    import copy

    from test_pact import Loader, lora, make_ctx, tiny_llama

    from safeft.artifacts import session
    from safeft.defenses.pact import PACT, PACTConfig
    from safeft.share import export_shared

    models = {"aligned": tiny_llama(0), "base": tiny_llama(1)}
    loader = Loader(models)
    first = PACT(PACTConfig(k=6, response_tokens=4))
    first.prepare(lora(copy.deepcopy(models["aligned"])), make_ctx(tiny_tokenizer, tmp_path / "a", loader))
    export_shared(tmp_path / "a", "f" * 64, tmp_path / "shared", defenses=["pact"])
    load_shared(str(tmp_path / "shared"), tmp_path / "b", "f" * 64, log=quiet)
    again = PACT(PACTConfig(k=6, response_tokens=4))
    with session(strict=tmp_path / "b", source="shared"):
        again.prepare(
            lora(copy.deepcopy(models["aligned"])), make_ctx(tiny_tokenizer, tmp_path / "b", loader)
        )
    assert loader.calls == ["base"]  # θ_b read by the first prepare only: the second loaded the shared tokens
    assert torch.equal(again.safety_ids, first.safety_ids) and torch.equal(again.weights, first.weights)
    with (
        session(strict=tmp_path / "b", source="shared"),
        pytest.raises(SafeFTError, match="k: shared 6, this run 5"),
    ):
        PACT(PACTConfig(k=5, response_tokens=4)).prepare(
            lora(copy.deepcopy(models["aligned"])), make_ctx(tiny_tokenizer, tmp_path / "b", loader)
        )


def test_pact_key_names_the_tokenizer_by_content_not_path(tmp_path):
    from helpers_models import make_tiny_tokenizer
    from transformers import AutoTokenizer

    from safeft.defenses.pact import _tokenizer_id

    make_tiny_tokenizer().save_pretrained(tmp_path / "a")
    make_tiny_tokenizer().save_pretrained(tmp_path / "b")
    a, b = AutoTokenizer.from_pretrained(tmp_path / "a"), AutoTokenizer.from_pretrained(tmp_path / "b")
    assert a.name_or_path != b.name_or_path and _tokenizer_id(a) == _tokenizer_id(b)
    b.add_tokens(["<extra>"])
    assert _tokenizer_id(a) != _tokenizer_id(b)


# ---- card, settings, SAELens -------------------------------------------------------------------------------------
def test_card_names_fingerprint_defense_sizes_and_usage(shared):
    text = (shared.folder / CARD).read_text()
    assert shared.fp in text and "cwac" in text
    for name in NAMES:
        assert f"`{name}`" in text
    assert "--from" in text and "SAE.load_from_disk" in text and "task data: `demo`" in text
    assert " KB |" in text or " B |" in text  # sizes
    # config.yaml is a valid --config that reproduces the artifacts' settings
    cfg = build_config(shared.folder / "config.yaml")
    assert cfg.defense.name == "cwac" and cfg.defense.options["cwac"]["n_features"] == 8
    index = json.loads((shared.folder / INDEX).read_text())
    assert index["fingerprint"] == shared.fp and set(index["artifacts"]) == NAMES
    assert CARD not in index["files"] and "config.yaml" in index["files"]


def test_sae_lens_files_have_the_right_keys_and_shapes(shared):
    from safeft.components.sae import TopKSAE, load_sae

    index = json.loads((shared.folder / INDEX).read_text())
    sae_meta = json.loads((shared.folder / "cwac-sae" / "manifest.json").read_text())["meta"]["layers"]
    assert set(index["sae_lens"]) == {f"layer_{L}" for L in sae_meta}
    tensors = load_file(str(shared.folder / "cwac-sae" / "tensors.safetensors"))
    for L, lm in sae_meta.items():
        d = shared.folder / index["sae_lens"][f"layer_{L}"]
        cfg = json.loads((d / "cfg.json").read_text())
        d_in, d_sae = lm["d_in"], lm["d_sae"]
        assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == ("topk", 64, 128, 4)
        assert cfg["normalize_activations"] == "none" and cfg["hook_name"] == f"blocks.{L}.hook_resid_post"
        w = load_file(str(d / "sae_weights.safetensors"))
        shapes = {k: tuple(v.shape) for k, v in w.items()}
        assert shapes == {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        # the SAELens copy reads raw activations: same codes and reconstructions as the artifact's SAE
        ours = TopKSAE(d_in, d_sae, lm["k"])
        ours.load_state_dict(
            {k[len(f"sae.{L}.") :]: v for k, v in tensors.items() if k.startswith(f"sae.{L}.")}
        )
        x = torch.randn(5, d_in, generator=torch.Generator().manual_seed(0)) * 3
        theirs = load_sae(d)
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-4, atol=1e-4)


def test_sae_lens_loads_the_export(shared):
    sae_lens = pytest.importorskip("sae_lens", reason="sae_lens (optional extra) is not installed")
    index = json.loads((shared.folder / INDEX).read_text())
    for rel in index["sae_lens"].values():
        sae = sae_lens.SAE.load_from_disk(str(shared.folder / rel))
        w = load_file(str(shared.folder / rel / "sae_weights.safetensors"))
        assert torch.equal(sae.W_enc.detach().cpu(), w["W_enc"]) and sae.cfg.d_sae == w["W_enc"].shape[1]


# ---- push --------------------------------------------------------------------------------------------------------
def test_push_without_network_is_one_line_and_keeps_the_folder(
    shared, tmp_path, monkeypatch, capsys, always_refuses
):
    import huggingface_hub

    from safeft.cli import main

    class NoNetwork:
        def create_repo(self, *a, **k):
            raise ConnectionError(
                "Failed to resolve 'huggingface.co' ([Errno -3] Temporary failure)\nretrying..."
            )

        upload_folder = create_repo

    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = tmp_path / "cache"
    rc = main(["prepare", "--config", str(shared.folder / "config.yaml"), "--model", str(shared.model_dir),
               "--set", f"model.cache_dir={cache}", "--set", f"training.output_dir={tmp_path / 'run'}",
               "--from", str(shared.folder), "--push-to", "me/safeft-artifacts"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(
        "safeft: error: --push-to me/safeft-artifacts: upload failed (Failed to resolve"
    )
    assert "huggingface-cli upload me/safeft-artifacts" in err[-1]
    kept = cache / "artifacts" / f"{shared.fp[:16]}-shared"
    assert str(kept) in err[-1] and verify_shared(kept, shared.fp)["fingerprint"] == shared.fp
    # offline mode never reaches the network at all
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        SafeFTError, match=r"offline \(HF_HUB_OFFLINE is set\); the shared folder is kept"
    ) as e:
        push_shared(kept, "me/safeft-artifacts")
    assert "\n" not in str(e.value)


def test_hub_source_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    def fail(**_k):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(
        SafeFTError, match=r"--from someone/artifacts: no such local folder, and fetching"
    ) as e:
        load_shared("someone/artifacts", tmp_path / "store", "a" * 64, log=quiet)
    assert "\n" not in str(e.value)


def test_malformed_index_fields_are_one_line_errors(shared, tmp_path):
    import shutil

    from safeft.errors import SafeFTError

    for field, value, msg in (("format_version", "1.0", "format_version must be an integer"),
                              ("artifacts", [], "artifacts must map"),
                              ("files", {"a": 1}, "files must map")):  # fmt: skip
        bad = tmp_path / f"bad-{field}"
        shutil.copytree(shared.folder, bad)
        index = json.loads((bad / INDEX).read_text())
        index[field] = value
        (bad / INDEX).write_text(json.dumps(index))
        with pytest.raises(SafeFTError, match=msg) as e:
            verify_shared(bad, shared.fp)
        assert "\n" not in str(e.value)


def test_local_paths_are_not_shared():
    from safeft.config import build_config
    from safeft.pipeline import share_settings

    cfg = build_config(None, {"model.aligned": "/home/alice/private/theta0", "model.base": "smollm2-135m",
                              "data.harmful_path": "/home/alice/secret/train.jsonl"})  # fmt: skip
    d = share_settings(cfg)
    assert "aligned" not in d["model"] and d["data"]["harmful_path"] is None
    assert d["model"]["base"] == "smollm2-135m"  # a built-in alias stays
    assert "alice" not in json.dumps(d)
