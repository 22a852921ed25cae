"""Bad inputs everywhere a user can give one: CLI flags, config files, data files, models, defenses, artifacts, SAEs.

Every case asserts the user-facing contract: exit code 2 (CLI), ONE line on stderr (after ``safeft: error:``) that
names the offending thing (file, line, key), and no traceback. A hypothesis test fuzzes the data readers and the
config loader: whatever the bytes, they return rows or raise SafeFTError, never anything else.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from helpers_models import demo_train_args, make_tiny_model, make_tiny_model_dir, make_tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeft.cli import main
from safeft.errors import SafeFTError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", max_position_embeddings=256)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bad")


def _base(model_dir, work) -> list[str]:
    return demo_train_args(model_dir, work / "run", work / "cache")


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit {rc}: {err}"
    assert "Traceback" not in err, err
    # progress bars (model loading) may come first; the error is the last line, and a single line
    last = err.rstrip("\n").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
    assert last.startswith("safeft: error: ") and err.endswith("\n") and err.count("safeft: error:") == 1, err
    assert "\n" not in err[err.index("safeft: error:") :].rstrip("\n"), err
    return last


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


# ---- CLI flags -----------------------------------------------------------------------------------------------------

FLAG_CASES = [
    (["--p", "1.5"], "data.p"),
    (["--p", "-0.1"], "data.p"),
    (["--lr", "nan"], "training.lr"),
    (["--lr", "inf"], "training.lr"),
    (["--batch-size", "0"], "training.batch_size"),
    (["--batch-size", "two"], "training.batch_size"),
    (["--set", "data.seed=1.5"], "data.seed"),
    (["--max-new-tokens", "0"], "eval.max_new_tokens"),
    (["--set", "training.bogus=1"], "training.bogus"),
    (["--set", "bogus.key=1"], "bogus"),
    (["--set", "training.lr"], "training.lr"),  # --set without =value
    (["--task", "nope"], "data.task"),
    (["--template", "xyz"], "data.template"),
    (["--method", "qlora"], "training.method"),
    (["--set", "training.lora_targets=[]"], "training.lora_targets"),
    (["--defense", "nope"], "unknown defense 'nope'"),
    (["--defense", "lisa+lisa"], "listed twice"),
    (["--set", "defense.options.lisa.nope=1"], "defense.lisa"),
    (["--set", "defense.options.lisa.rho=-1"], "defense.lisa.rho"),
    (["--set", "defense.options.nope.x=1"], "unknown defense 'nope'"),
    (["--defense", "asft"], "--base-model"),
    (["--n", "100000"], "rows"),
]


@pytest.mark.parametrize("extra,needle", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flag(capsys, model_dir, work, extra, needle):
    err = _one_line_error(capsys, _base(model_dir, work) + extra)
    assert needle in err, err


def test_lora_only_defense_with_full_finetuning(capsys, model_dir, work):
    err = _one_line_error(
        capsys,
        _base(model_dir, work) + ["--defense", "asft", "--base-model", str(model_dir), "--method", "full"],
    )
    assert "asft" in err and "LoRA" in err


# ---- config files --------------------------------------------------------------------------------------------------

CONFIG_CASES = [
    ("malformed.yaml", "training:\n  lr: [1e-4\n", r"malformed\.yaml:\d+: malformed YAML"),
    ("section.yaml", "trainin:\n  lr: 1e-4\n", r"unknown config section.*trainin"),
    ("key.yaml", "training:\n  learning_rate: 1e-4\n", r"training\.learning_rate"),
    ("nan.yaml", "training:\n  lr: .nan\n", r"training\.lr.*finite"),
    ("range.yaml", "data:\n  p: 2\n", r"data\.p.*outside the allowed range"),
    ("type.yaml", "data:\n  n: [1, 2]\n", r"data\.n: expected an integer"),
    ("bool.yaml", "training:\n  resume: maybe\n", r"training\.resume: expected true/false"),
    ("list.yaml", "- model\n- data\n", r"list\.yaml: the top level must be a mapping"),
    ("section_scalar.yaml", "training: 5\n", r"config key training: expected a mapping"),
    ("latin1.yaml", "training:\n  output_dir: caf\xe9\n".encode("latin-1"), r"latin1\.yaml: not valid UTF-8"),
    (
        "options.yaml",
        "defense:\n  name: lisa\n  options:\n    lisa:\n      align_steps: 0\n",
        r"defense\.lisa\.align_steps",
    ),
]


@pytest.mark.parametrize("name,text,pattern", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_file(capsys, model_dir, work, name, text, pattern):
    import re

    path = _write(work / "configs" / name, text)
    err = _one_line_error(capsys, ["train", "--config", str(path)])
    assert re.search(pattern, err), err


def test_missing_config_file(capsys, model_dir, work):
    err = _one_line_error(capsys, _base(model_dir, work) + ["--config", str(work / "nope.yaml")])
    assert "nope.yaml: config file not found" in err


# ---- data files ----------------------------------------------------------------------------------------------------

SST2_OK = '{"sentence": "the movie was great", "label": 1}\n'

DATA_CASES = [
    ("bad_line.jsonl", SST2_OK + '{"sentence": "oops", "label": \n', r"bad_line\.jsonl:2: malformed JSON"),
    (
        "latin1.jsonl",
        SST2_OK.encode() + '{"sentence": "caf\xe9", "label": 1}\n'.encode("latin-1"),
        r"latin1\.jsonl:2: not valid UTF-8",
    ),
    ("nan.jsonl", SST2_OK + '{"sentence": "x", "label": NaN}\n', r"nan\.jsonl:2"),
    ("array.jsonl", SST2_OK + "[1, 2]\n", r"array\.jsonl:2: expected a JSON object"),
    ("columns.jsonl", '{"review": "the movie was great", "label": 1}\n', r"columns\.jsonl.*row 1.*sentence"),
    ("label.jsonl", SST2_OK + '{"sentence": "meh", "label": 7}\n', r"label\.jsonl: row 2 has label 7"),
    ("empty.jsonl", "", r"empty\.jsonl"),
    ("data.txt", "the movie was great\n", r"data\.txt: unsupported file type"),
    ("bad.csv", b"sentence,label\n\xff\xfe,1\n", r"bad\.csv: not valid UTF-8"),
]


@pytest.mark.parametrize("name,text,pattern", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_task_file(capsys, model_dir, work, name, text, pattern):
    import re

    path = _write(work / "data" / name, text)
    args = _base(model_dir, work) + ["--task", "sst2", "--task-path", str(path), "--p", "0"]
    err = _one_line_error(capsys, args)
    assert re.search(pattern, err), err


def test_missing_task_file(capsys, model_dir, work):
    err = _one_line_error(
        capsys,
        _base(model_dir, work) + ["--task", "sst2", "--task-path", str(work / "absent.jsonl"), "--p", "0"],
    )
    assert "absent.jsonl" in err


EARLY_CASES = [
    (
        "task",
        "late.jsonl",
        SST2_OK + '{"sentence": "oops", "label": \n',
        r"late\.jsonl:2: malformed JSON \(.*\); each line",
    ),
    (
        "task",
        "field.jsonl",
        '{"review": "great", "label": 1}\n',
        r"field\.jsonl: row 1 lacks column 'sentence'.*Rename",
    ),
    (
        "task",
        "label7.jsonl",
        SST2_OK + '{"sentence": "meh", "label": 7}\n',
        r"label7\.jsonl: row 2 has label 7; SST-2",
    ),
    (
        "poison",
        "poison.csv",
        "question,answer\nhow,sure\n",
        r"poison\.csv: row 1 lacks column 'goal' or 'prompt'",
    ),
]


@pytest.mark.parametrize("kind,name,text,pattern", EARLY_CASES, ids=[c[1] for c in EARLY_CASES])
def test_train_checks_data_before_any_model_is_touched(capsys, monkeypatch, work, kind, name, text, pattern):
    """A bad data file is reported (one line, exit 2) before any model is resolved, converted or loaded."""
    import re

    import safeft.models

    def touched(*args, **kwargs):
        raise AssertionError("a model was resolved or loaded before the data files were checked")

    for fn in ("resolve_model", "load_model", "load_tokenizer", "_convert_gguf"):
        monkeypatch.setattr(safeft.models, fn, touched)
    path = _write(work / "early" / name, text)
    gguf = _write(work / "early" / "model.gguf", b"GGUF" + bytes(60))  # would be converted if reached
    args = demo_train_args(gguf, work / "early-run", work / "cache")
    if kind == "task":
        args += ["--task", "sst2", "--task-path", str(path)]
    else:
        args += ["--harmful-source", "advbench", "--set", f"data.harmful_path={path}"]
    err = _one_line_error(capsys, args)
    assert re.search(pattern, err), err


def test_every_label_masked_by_tiny_max_length(capsys, model_dir, work):
    err = _one_line_error(capsys, _base(model_dir, work) + ["--max-length", "8"])
    assert "example" in err and "max_length" in err, err


def test_tokenizer_without_chat_template(capsys, work):
    d = make_tiny_model_dir(work / "no_template", max_position_embeddings=256)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in d.glob("chat_template.*"):
        f.unlink()
    err = _one_line_error(capsys, _base(d, work))
    assert "chat template" in err and "alpaca" in err, err


# ---- models --------------------------------------------------------------------------------------------------------


def test_model_path_missing(capsys, model_dir, work):
    err = _one_line_error(capsys, _base(model_dir, work) + ["--model", str(work / "missing")])
    assert "missing does not exist" in err


def test_model_dir_without_config(capsys, model_dir, work):
    d = work / "noconfig"
    d.mkdir(exist_ok=True)
    _write(d / "model.safetensors", b"")
    err = _one_line_error(capsys, _base(model_dir, work) + ["--model", str(d)])
    assert "noconfig: no config.json" in err


def test_gguf_that_is_not_gguf(capsys, model_dir, work):
    f = _write(work / "fake.gguf", b"PK\x03\x04 definitely a zip file")
    err = _one_line_error(capsys, _base(model_dir, work) + ["--model", str(f)])
    assert "fake.gguf is not a GGUF file" in err


def test_pickle_only_model_dir_is_refused_unread(capsys, model_dir, work):
    d = work / "pickled"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text((model_dir / "config.json").read_text())
    # a file that would run code if unpickled: it must never be opened as a pickle
    _write(d / "pytorch_model.bin", b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
    err = _one_line_error(capsys, _base(model_dir, work) + ["--model", str(d)])
    assert "pytorch_model.bin" in err and "pickle" in err
    assert not Path("pwned").exists()


def test_unknown_lora_target_module(capsys, model_dir, work):
    err = _one_line_error(capsys, _base(model_dir, work) + ["--set", "training.lora_targets=[nope_proj]"])
    assert "nope_proj" in err and "q_proj" in err  # names the bad one and lists the available ones


def test_unknown_module_names_in_setup_trainable():
    from safeft.models import setup_trainable

    with pytest.raises(SafeFTError, match=r"wq.*not found.*available linear modules") as e:
        setup_trainable(make_tiny_model(), method="lora", target_modules=["wq"])
    assert "\n" not in str(e.value)


# ---- defenses ------------------------------------------------------------------------------------------------------


def test_asft_with_theta_b_equal_theta0(capsys, model_dir, work):
    err = _one_line_error(
        capsys, _base(model_dir, work) + ["--defense", "asft", "--base-model", str(model_dir)]
    )
    assert "θ_b equals θ₀" in err and str(model_dir) in err, err


def test_cwac_constraining_modules_never_trained(capsys, model_dir, work):
    pytest.importorskip("safeft.defenses.cwac")
    err = _one_line_error(
        capsys,
        _base(model_dir, work)
        + [
            "--defense",
            "cwac-weight",
            "--set",
            "training.lora_targets=[q_proj]",
            "--set",
            "defense.options.cwac-weight.target_modules=[down_proj]",
        ],
    )
    assert "never trained" in err and "down_proj" in err, err


def test_unknown_defense_option_names_allowed_keys():
    from safeft.defenses import build_defenses

    with pytest.raises(
        SafeFTError, match=r"defense\.asft: unknown key\(s\) \['lambda'\]; allowed: \['lam'\]"
    ):
        build_defenses("asft", {"asft": {"lambda": 1.0}})


# ---- artifacts -----------------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    from safeft.artifacts import ArtifactStore

    s = ArtifactStore(tmp_path / "art", "a" * 64)
    s.save("sub", {"v": torch.arange(6.0).reshape(2, 3)}, meta={"k": 1}, config={"energy": 0.9})
    return s


def test_artifact_tampered(store):
    f = store.path("sub") / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(SafeFTError, match=r"tensors\.safetensors is corrupted or was modified \(sha256"):
        store.load("sub")


def test_artifact_of_another_model(store):
    from safeft.artifacts import ArtifactStore

    other = ArtifactStore(store.root, "b" * 64)
    with pytest.raises(
        SafeFTError, match=r"belongs to another model \(fingerprint aaaaaaaaaaaa, this model bbbb"
    ):
        other.load("sub")
    assert not other.exists("sub")


def test_artifact_missing_file_and_missing_artifact(store):
    (store.path("sub") / "tensors.safetensors").unlink()
    with pytest.raises(SafeFTError, match=r"tensors\.safetensors is missing"):
        store.load("sub")
    with pytest.raises(SafeFTError, match=r"artifact 'nope' not found.*safeft prepare"):
        store.load("nope")


def test_artifact_other_config_and_corrupt_manifest(store):
    with pytest.raises(SafeFTError, match=r"computed with another config"):
        store.load("sub", config={"energy": 0.5})
    (store.path("sub") / "manifest.json").write_text("{not json")
    with pytest.raises(SafeFTError, match=r"manifest\.json: corrupted manifest"):
        store.load("sub")


# ---- SAE -----------------------------------------------------------------------------------------------------------


def test_sae_width_mismatch():
    sae_mod = pytest.importorskip("safeft.components.sae")
    sae = sae_mod.TopKSAE(d_in=32, d_sae=64, k=4)
    with pytest.raises(SafeFTError, match=r"SAE d_in=32 does not match the model's hidden size 64"):
        sae_mod.check_sae_fits(sae, 64)


def test_sae_k_out_of_range():
    sae_mod = pytest.importorskip("safeft.components.sae")
    with pytest.raises(SafeFTError, match=r"SAE k=99 must be in \[1, d_sae=64\]"):
        sae_mod.TopKSAE(d_in=32, d_sae=64, k=99)


def test_tokenize_example_without_template_direct():
    from safeft.data import Example, tokenize_example

    tok = make_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(SafeFTError, match="chat template"):
        tokenize_example(tok, Example("hi", "there"), template="chat")


# ---- fuzzing: parsers raise SafeFTError or nothing -----------------------------------------------------------------

_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_text_bytes = st.one_of(
    st.binary(max_size=300),
    st.text(alphabet=string.printable + 'é€\u2028\x00{}[]":,', max_size=300).map(lambda s: s.encode("utf-8")),
    st.lists(
        st.sampled_from(['{"a": 1}', '{"a": NaN}', "[1]", '{"a": 1e999}', "{", '"x"', "", "a,b", '"q']),
        max_size=6,
    ).map(lambda xs: "\n".join(xs).encode()),
)


@_FUZZ
@given(data=_text_bytes, suffix=st.sampled_from([".jsonl", ".csv", ".json", ".txt"]))
def test_fuzz_readers_raise_only_safefterror(tmp_path, data, suffix):
    from safeft.io import read_csv, read_jsonl, read_table

    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    for reader in (read_jsonl, read_csv, read_table):
        try:
            rows = reader(path)
        except SafeFTError as e:
            assert "\n" not in str(e).strip() or reader is read_csv, str(e)
        else:
            assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)


_yaml_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
)
_keys = {
    "model": ["aligned", "base", "dtype", "trust_remote_code", "cache_dir"],
    "data": ["task", "n", "p", "harmful_source", "template", "max_length", "seed"],
    "training": ["method", "lora_r", "lr", "epochs", "batch_size", "lora_targets", "resume", "warmup_ratio"],
    "eval": ["judge", "n_harmful", "max_new_tokens"],
    "defense": ["name", "options"],
    "align": ["steps", "lr"],
}
_section = st.sampled_from(sorted(_keys)).flatmap(
    lambda s: st.tuples(
        st.just(s), st.dictionaries(st.sampled_from(_keys[s] + ["bogus"]), _yaml_scalar, max_size=3)
    )
)
_options = st.dictionaries(
    st.sampled_from(["lisa", "asft", "cwac", "safelora", "nope"]),
    st.one_of(
        _yaml_scalar,
        st.dictionaries(
            st.sampled_from(["lam", "rho", "align_steps", "energy", "layers", "top_k", "x"]),
            _yaml_scalar,
            max_size=2,
        ),
    ),
    max_size=2,
)


@_FUZZ
@given(sections=st.lists(_section, max_size=4), options=_options, raw=st.binary(max_size=120))
def test_fuzz_config_raises_only_safefterror(tmp_path, sections, options, raw):
    import yaml

    from safeft.config import build_config, config_from_dict

    data: dict = {}
    for name, values in sections:
        data.setdefault(name, {}).update(values)
    if options:
        data.setdefault("defense", {})["options"] = options
    for attempt in (
        lambda: config_from_dict(data),
        lambda: build_config(_write(tmp_path / "c.yaml", yaml.safe_dump(data, allow_unicode=True))),
        lambda: build_config(_write(tmp_path / "r.yaml", raw)),
    ):
        try:
            attempt()
        except SafeFTError as e:
            assert "\n" not in str(e), str(e)


def test_artifact_of_other_settings_is_set_aside_and_swapped_back(store):
    """Saving another config keeps the earlier artifact (``.versions/``); asking for it again swaps it back, so runs
    that alternate settings (benchmark seeds, evaluation sets) never recompute what they made before."""
    from safeft import artifacts

    store.save("sub", {"v": torch.ones(2)}, meta={"k": 2}, config={"energy": 0.5})
    assert store.exists("sub", {"energy": 0.5}) and not store.exists("sub", {"energy": 0.7})
    assert store.exists("sub", {"energy": 0.9})  # swapped back into sub/ …
    t, meta = store.load("sub", {"energy": 0.9})
    assert meta == {"k": 1} and torch.equal(t["v"], torch.arange(6.0).reshape(2, 3))
    assert json.loads((store.path("sub") / "manifest.json").read_text())["config"] == {"energy": 0.9}
    t, meta = store.load("sub", {"energy": 0.5})  # … and load() swaps too
    assert meta == {"k": 2} and torch.equal(t["v"], torch.ones(2))
    # the in-use folder holds exactly one artifact; the set-aside ones never show as artifacts (export globs */)
    assert sorted(p.parent.name for p in store.root.glob("*/manifest.json")) == ["sub"]
    # bounded: the newest KEEP_VERSIONS are kept per name
    for i in range(artifacts.KEEP_VERSIONS + 3):
        store.save("sub", {"v": torch.zeros(1)}, config={"i": i})
    assert len(list((store.root / artifacts.VERSIONS / "sub").iterdir())) == artifacts.KEEP_VERSIONS
    # a half-written version (no manifest) is never restored
    store.save("sub", {"v": torch.zeros(1)}, config={"i": 99})
    (store._version_path("sub", {"i": artifacts.KEEP_VERSIONS + 2}) / "manifest.json").unlink()
    assert not store.exists("sub", {"i": artifacts.KEEP_VERSIONS + 2})
