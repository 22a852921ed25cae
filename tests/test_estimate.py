"""``safeft estimate``: model dimensions from presets and config.json, the counts the cost model is built on, the
printed table, and bad input (one line on stderr, exit code 2)."""

from __future__ import annotations

import json

import pytest

from safeft import estimate as est
from safeft.cli import main
from safeft.errors import SafeFTError


def test_presets_match_the_known_parameter_counts():
    # published sizes: Llama-3-8B 8.03B, Llama-3-70B 70.6B, Qwen2.5-0.5B 0.49B, SmolLM2-135M 0.135B
    want = {"llama-3-8b": 8.03e9, "llama-3-70b": 70.55e9, "qwen2.5-0.5b": 0.494e9, "smollm2-135m": 0.1348e9}
    for name, n in want.items():
        assert est.PRESETS[name].params == pytest.approx(n, rel=0.01), name


def test_config_json_equals_the_preset(tmp_path):
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for spec in (str(tmp_path / "config.json"), str(tmp_path)):
        d = est.resolve_model(spec)
        assert d.params == est.PRESETS["llama-3-8b"].params
    nested = {"model_type": "llava", "text_config": cfg}  # multimodal configs: the language model's part
    (tmp_path / "mm.json").write_text(json.dumps(nested))
    assert est.resolve_model(str(tmp_path / "mm.json")).hidden == 4096
    assert est.resolve_model("meta-llama/Meta-Llama-3-8B-Instruct").params == est.PRESETS["llama-3-8b"].params


def test_cwac_counts_one_v_per_distinct_input_and_w0v_for_full_ft():
    m = est.PRESETS["llama-3-8b"]
    s = est.Setting(cwac_rank=10)
    p = est.cwac_parts(m, s)
    h, i = m.hidden, m.intermediate
    # per layer: q/k/v share the attention input (h), o_proj reads heads·hd = h, gate/up share h, down reads i
    assert p["V"] == m.layers * 10 * (h + h + h + i)
    assert p["W0V"] == 0
    full = est.cwac_parts(m, est.Setting(method="full", cwac_rank=10))
    d_out = sum(a for a, _ in m.module_shapes().values())
    assert full["W0V"] == m.layers * 10 * d_out
    qv = est.cwac_parts(m, est.Setting(cwac_rank=10, lora_targets=("q_proj", "v_proj")))
    assert qv["V"] == m.layers * 10 * h  # q and v: one shared V
    assert p["SAE"] == 2 * 8 * h * h + 8 * h + h
    mid = est.cwac_parts(m, est.Setting(cwac_rank=10, cwac_layers="middle"))
    assert mid["V"] == p["V"] // 2



def test_salora_counts_its_fixed_tensors_and_hook_flops():
    m = est.PRESETS["llama-3-8b"]
    s = est.Setting(lora_r=8, salora_rank=32, lora_targets=("q_proj", "v_proj"))
    p = est.salora_parts(m, s)
    h, kv = m.hidden, m.kv_heads * m.hd  # q_proj: h -> h, v_proj: h -> kv
    assert p["V_s"] == m.layers * 32 * (h + kv)  # V_s [d_out, r_s] per module
    assert p["init"] == m.layers * 8 * ((h + h) + (h + kv))  # A₀ [r, d_in] + C B₀ [d_out, r] per module
    # C on the branch output (8·d_out·r_s) + the init term (4·r·(d_in + d_out)), fwd + bwd, per token
    assert p["flops_per_token"] == m.layers * (8 * 32 * (h + kv) + 4 * 8 * (h + h + h + kv))
    e = est.estimate(m, "salora", s)
    assert e.artifact_bytes == 4 * p["V_s"] and e.train_extra_bytes == 4 * (p["V_s"] + p["init"])
    assert 1.0 < e.step_ratio < 1.2
    assert 1.0 < est.estimate(m, "salora", est.Setting()).prepare_seconds < 60  # an 8B on an H200: seconds
    assert est.estimate(m, "salora", est.Setting(method="full")).notes[0].startswith("LoRA only")

def test_sharding_divides_what_is_sharded_only():
    m = est.PRESETS["llama-3-70b"]
    one = est.estimate(m, "cwac", est.Setting(method="full", gpus=8, fsdp=False))
    eight = est.estimate(m, "cwac", est.Setting(method="full", gpus=8, fsdp=True))
    w0v = est.COST.artifact_bytes * one.parts["W0V"]
    # W₀V is row-sharded with W; V, the SAE and baselines are replicated on every rank
    assert one.train_extra_bytes - eight.train_extra_bytes == pytest.approx(w0v * 7 / 8, rel=1e-9)
    asft1 = est.estimate(m, "asft", est.Setting(gpus=8))
    asft8 = est.estimate(m, "asft", est.Setting(gpus=8, fsdp=True))
    assert asft8.train_extra_bytes == pytest.approx(asft1.train_extra_bytes / 8)
    assert est.base_memory_bytes(m, est.Setting(method="full", gpus=8, fsdp=True)) == pytest.approx(
        16 * m.params / 8
    )


def test_estimates_are_sane():
    m = est.PRESETS["llama-3-8b"]
    rows = {d: est.estimate(m, d, est.Setting()) for d in est.DEFENSES}
    assert rows["sft"].step_ratio == 1.0 and rows["sft"].train_extra_bytes == 0
    assert 1.0 < rows["cwac"].step_ratio < 1.5
    assert rows["pact"].step_ratio > rows["cwac"].step_ratio  # two teacher forwards per step
    # CWAC's artifacts for an 8B: about a GB (SAE dominated), far below one d_in² float64 covariance per module × 32
    assert 0.3e9 < rows["cwac"].artifact_bytes < 3e9
    assert rows["cwac"].artifact_bytes < 32 * 8.0 * m.intermediate**2


def test_cli_prints_a_row_per_defense(capsys):
    assert main(["estimate", "--model", "llama-3-8b", "--defense", "all"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llama-3-8b: 8.03B params")
    for d in est.DEFENSES:
        assert any(line.startswith(d + " ") for line in out.splitlines()), d
    assert "a d_in² float64 covariance of down_proj would be 1.6 GB per module" in out
    assert (
        main(["estimate", "--model", "llama-3-70b", "--method", "full", "--gpus", "8", "--fsdp", "--json"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["setting"]["gpus"] == 8 and data["estimates"][0]["defense"] == "cwac"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "llama-4-900b"], "not a preset"),
        (["--model", "{bad}.json"], "not a preset"),
        (["--model", "llama-3-8b", "--defense", "cwac,nope"], "--defense 'nope'"),
        (["--model", "llama-3-8b", "--gpus", "0"], "--gpus 0"),
        (["--model", "llama-3-8b", "--hardware", "tpu"], "--hardware 'tpu'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert main(["estimate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("safeft: error: ") and message in err and "\n" not in err


def test_malformed_config_json_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text('{\n  "hidden_size": 64,\n  "num_hidden_layers": \n}\n')
    assert main(["estimate", "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"safeft: error: {bad}:4: not valid JSON") and "\n" not in err
    bad.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": "two"}))
    assert main(["estimate", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "'num_hidden_layers' must be a positive integer, got 'two'" in err and "\n" not in err
    bad.write_text("[1, 2]")
    with pytest.raises(SafeFTError, match="expected a JSON object"):
        est.resolve_model(str(bad))


def test_hub_id_without_network_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["estimate", "--model", "someone/some-model-not-cached"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot fetch its config.json from the Hub" in err and "\n" not in err
