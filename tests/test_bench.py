"""safeft bench: presets → cells → cached subprocess runs → summary.json / results.md / pareto.png.

The end-to-end test runs the ``smoke`` preset on a tiny random model in real ``safeft`` subprocesses; everything
else (planning, hashing, ratios, reports) is checked on synthetic cell folders, in milliseconds.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from helpers_models import make_tiny_model_dir

import safeft.bench.runner as runner
from safeft.bench import config_hash, load_preset, plan_cells, run_bench
from safeft.bench.preset import cell_config
from safeft.bench.report import ROW_KEYS, build_rows, write_reports
from safeft.cli import main
from safeft.errors import SafeFTError

REPO = Path(__file__).resolve().parents[1]
ISSUE_SCHEMA = [
    "preset",
    "model",
    "task",
    "n",
    "p",
    "defense",
    "seed",
    "hs",
    "hs_ci",
    "refusal_rate",
    "compliance_rate",
    "hs_keyword",
    "fa",
    "fa_ci",
    "over_refusal",
    "judge",
    "train_seconds",
    "step_time_ratio_vs_sft",
    "peak_mem_ratio_vs_sft",
    "prepare_seconds",
    "command",
]
EXTRA = ["template_echo", "gibberish_rate", "n_eval_harmful", "n_eval_task", "judge_accuracy", "status"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("bench") / "tiny", max_position_embeddings=256)


@pytest.fixture
def smoke_env(monkeypatch, tiny_model):
    monkeypatch.setenv("SAFEFT_SMOKE_MODEL", str(tiny_model))
    return tiny_model


def _write_preset(tmp_path: Path, text: str) -> str:
    p = tmp_path / "preset.yaml"
    p.write_text(text)
    return str(p)


MINI = """
name: mini
base:
  model.aligned: /nowhere/model
  data.task: demo
  training.lr: 1.0e-3
grid: {p: [0.1, 0.2], defenses: [cwac, sft, cwac-weight, pact], seeds: [0]}
defense_options:
  cwac: {n_anchor: 12}
"""

MINI_GRID = "grid: {p: [0.1, 0.2], defenses: [cwac, sft, cwac-weight, pact], seeds: [0]}"


def _mini_with_grid(grid: str) -> str:
    """MINI with its grid line replaced by ``grid`` (YAML text starting with ``grid:``)."""
    assert MINI_GRID in MINI
    return MINI.replace(MINI_GRID, grid)



# ---- presets and planning ----------------------------------------------------------------------------------------


def test_shipped_presets_plan_and_validate(tmp_path):
    v1 = plan_cells(load_preset("tiny-v1"), tmp_path)  # the first benchmark, kept with its cells
    assert len(v1) == 19 and v1[0].id == "aligned" and v1[0].kind == "eval"
    assert [c.defense for c in v1[1:3]] == ["sft", "cwac"]  # sft first: the reference of the cost ratios
    assert not any(c.skip for c in v1)  # tiny has θ_b
    for c in v1:  # every cell's config validates (values, ranges, defense options)
        cfg = cell_config(c, tmp_path / c.id)
        assert cfg["data"]["harmful_source"] == "hh_rlhf" and cfg["eval"]["harmful_source"] == "harmbench"
        if c.defense in ("cwac", "cwac-weight"):  # the setting chosen on validation prompts (cwac-tune)
            assert cfg["defense"]["options"][c.defense]["layers"] == "all"
    tiny = plan_cells(load_preset("tiny"), tmp_path)
    assert [c.id for c in tiny[:3]] == ["aligned", "p0.1-sft-s0", "p0.1-cwac-s0"]  # the headline block first
    for c in tiny:
        cfg = cell_config(c, tmp_path / c.id)
        assert cfg["data"]["harmful_source"] == "smollm2_content"  # the content attack
        ev = cfg["eval"]
        assert ev["harmful_source"] == "harmbench_heldout" and ev["n_harmful"] >= 200 and ev["n_xstest"] >= 100
        assert ev["n_copyright"] > 0
    seeds = {(c.defense, c.seed) for c in tiny if c.p == 0.1}
    assert {("sft", s) for s in (0, 1, 2)} | {("cwac", s) for s in (0, 1, 2)} <= seeds
    assert {c.p for c in tiny if c.defense == "cwac"} == {0.0, 0.05, 0.1, 0.2}
    assert {cell_config(c, tmp_path)["data"]["task"] for c in tiny if c.kind == "train"} == {"sst2", "agnews"}
    # AG News articles run to 375 tokens with the chat template: both cells of the second task take the same, longer limit
    ag = [cell_config(c, tmp_path)["data"] for c in tiny if c.kind == "train" and c.defense.endswith("@agnews")]
    assert len(ag) == 2 and {d["task"] for d in ag} == {"agnews"} and {d["max_length"] for d in ag} == {512}
    small = plan_cells(load_preset("small"), tmp_path)
    skipped = {c.defense: c.skip for c in small if c.skip}
    assert set(skipped) == {"pact", "asft", "safelora"}
    assert all("θ_b" in r for r in skipped.values())
    assert {cell_config(c, tmp_path)["data"]["harmful_source"] for c in small if not c.skip} == {"advbench"}
    for c in small:  # v2: tiny's evaluation (issue 14)
        ev = cell_config(c, tmp_path)["eval"]
        assert ev["harmful_source"] == "harmbench_heldout" and ev["n_harmful"] >= 200 and ev["n_xstest"] >= 100
    small_seeds = {(c.defense, c.seed) for c in small if c.p == 0.1}
    assert {(d, s) for d in ("sft", "cwac") for s in (0, 1, 2)} <= small_seeds
    assert {c.p for c in small if c.defense == "cwac"} == {0.0, 0.1}
    v1_small = plan_cells(load_preset("small-v1"), tmp_path)  # the first version, kept with its cells
    assert {cell_config(c, tmp_path)["eval"]["n_harmful"] for c in v1_small} == {48}
    for name in ("small-attack", "small-attack-content", "small-cwac-tune", "small-cwac-lam", "small-cwac-anchors", "tiny-val", "tiny-attack", "tiny-attack-echo", "tiny-attack-hh",
                 "tiny-tune", "cwac-tune"):  # tuning presets: no test prompts
        val = plan_cells(load_preset(name), tmp_path)
        assert all(cell_config(c, tmp_path)["eval"]["harmful_source"] == "harmbench_val" for c in val)
        if name == "tiny-tune":  # the equal tuning budget: three settings for every defense but the reference
            per = Counter(c.defense.partition("@")[0] for c in val if c.kind == "train" and c.defense != "sft")
            assert set(per.values()) == {3} and len(per) == 8, per
    anchors = {c.defense: cell_config(c, tmp_path) for c in plan_cells(load_preset("small-cwac-anchors"), tmp_path)
               if c.kind == "train"}
    assert {cfg["data"]["poison_share"] for cfg in anchors.values()} == {0.5}  # the same poison pool in every cell
    with_adv, no_adv = anchors["cwac"]["defense"]["options"]["cwac"], anchors["cwac@noadv"]["defense"]["options"]["cwac"]
    assert "advbench" not in no_adv.pop("anchor_sources") and with_adv == no_adv  # they differ in the anchor sources alone
    tune = {c.defense: cell_config(c, tmp_path)["defense"]["options"] for c in val if c.kind == "train"}
    assert tune["cwac@all-layers-lam5"]["cwac"] == {"n_anchor": 60, "sae_steps": 300, "layers": "all", "lam": 5.0}


def test_tiny_runs_the_settings_tiny_tune_chose(tmp_path):
    """The chosen setting of every defense carries from the tuning preset to tiny unchanged (issue 14)."""
    root = Path(__file__).resolve().parents[1]
    sel = json.loads((root / "benchmarks/results/tiny-tune/selection.json").read_text())["p0.1-s0"]
    tune = {c.defense: cell_config(c, tmp_path) for c in plan_cells(load_preset("tiny-tune"), tmp_path)
            if c.kind == "train"}
    tiny = [c for c in plan_cells(load_preset("tiny"), tmp_path) if c.kind == "train" and c.p == 0.1 and c.seed == 0]
    checked = []
    for c in tiny:
        if c.defense == "sft" or "@" in c.defense or c.defense.startswith("cwac-"):
            continue  # the reference, the second task, CWAC's halves (they take cwac's options)
        s = sel[c.defense]
        assert s["chosen"] and "not finished" not in s["why"], f"{c.defense}: tiny-tune has not chosen yet"
        cfg, t = cell_config(c, tmp_path), tune[s["chosen"]]
        assert cfg["defense"]["name"] == t["defense"]["name"] == c.defense
        assert cfg["defense"]["options"].get(c.defense, {}) == t["defense"]["options"].get(c.defense, {}), c.defense
        assert {**cfg["training"], "output_dir": None} == {**t["training"], "output_dir": None}, c.defense
        assert cfg["data"] == t["data"] and cfg["model"] == t["model"] and cfg["align"] == t["align"]
        checked.append(c.defense)
    assert {"cwac", "pact"} <= set(checked)


def test_small_runs_tinys_settings_unchanged(tmp_path):
    """Issue 14: the settings chosen on tiny's validation prompts carry to small unchanged, for every defense alike."""
    tiny = {c.defense: cell_config(c, tmp_path) for c in plan_cells(load_preset("tiny"), tmp_path)
            if c.kind == "train" and c.p == 0.1 and c.seed == 0}
    checked = []
    for c in plan_cells(load_preset("small"), tmp_path):
        if c.kind != "train" or c.defense == "sft":
            continue
        cfg = cell_config(c, tmp_path)
        assert cfg["defense"] == tiny[c.defense]["defense"], c.defense
        assert {k: cfg["training"][k] for k in ("lr", "epochs", "lora_r", "lora_alpha", "lora_targets")} == {
            k: tiny[c.defense]["training"][k] for k in ("lr", "epochs", "lora_r", "lora_alpha", "lora_targets")}
        checked.append(c.defense)
    assert {"cwac", "lisa", "safeinstr", "sppft", "salora", "pact", "asft", "safelora"} <= set(checked)


def test_plan_order_options_fallback_and_only(tmp_path):
    pre = load_preset(_write_preset(tmp_path, MINI))
    cells = plan_cells(pre, tmp_path)
    assert [c.id for c in cells] == [
        "aligned",
        "p0.1-sft-s0",
        "p0.1-cwac-s0",
        "p0.1-cwac-weight-s0",
        "p0.1-pact-s0",
        "p0.2-sft-s0",
        "p0.2-cwac-s0",
        "p0.2-cwac-weight-s0",
        "p0.2-pact-s0",
    ]
    by = {c.id: c for c in cells}
    # an ablation variant without its own options uses cwac's; other defenses get none
    assert by["p0.1-cwac-weight-s0"].overrides["defense.options"] == {"cwac-weight": {"n_anchor": 12}}
    assert "defense.options" not in by["p0.1-sft-s0"].overrides
    assert "θ_b" in by["p0.1-pact-s0"].skip and by["p0.1-cwac-s0"].skip is None
    only = plan_cells(pre, tmp_path, only=["sft", "aligned"])
    assert [c.id for c in only] == ["aligned", "p0.1-sft-s0", "p0.2-sft-s0"]
    with pytest.raises(SafeFTError, match="lisa not in preset mini"):
        plan_cells(pre, tmp_path, only=["lisa"])


def test_named_variants_merge_options_and_get_their_own_rows(tmp_path):
    text = MINI.replace(
        "defenses: [cwac, sft, cwac-weight, pact]", "defenses: [sft, cwac, cwac@lam5, cwac-weight@all]"
    )
    text += "  cwac@lam5: {lam: 5.0}\n  cwac-weight@all: {layers: [0, 1]}\n"
    pre = load_preset(_write_preset(tmp_path, text))
    by = {c.id: c for c in plan_cells(pre, tmp_path)}
    v = by["p0.1-cwac@lam5-s0"]
    assert v.defense == "cwac@lam5" and v.overrides["defense.name"] == "cwac"
    assert v.overrides["defense.options"] == {"cwac": {"n_anchor": 12, "lam": 5.0}}
    w = by["p0.2-cwac-weight@all-s0"]
    assert w.overrides["defense.options"] == {"cwac-weight": {"n_anchor": 12, "layers": [0, 1]}}
    assert by["p0.1-cwac-s0"].overrides["defense.options"] == {"cwac": {"n_anchor": 12}}
    cfgs = {i: cell_config(c, tmp_path / i) for i, c in by.items()}
    assert cfgs["p0.1-cwac@lam5-s0"]["defense"]["options"]["cwac"]["lam"] == 5.0
    assert config_hash(v, cfgs["p0.1-cwac@lam5-s0"]) != config_hash(by["p0.1-cwac-s0"], cfgs["p0.1-cwac-s0"])
    assert [c.id for c in plan_cells(pre, tmp_path, only=["cwac@lam5"])] == [
        "p0.1-cwac@lam5-s0",
        "p0.2-cwac@lam5-s0",
    ]


@pytest.mark.parametrize(
    ("entry", "opts", "message"),
    [
        ("cwac@", "", "variant is one defense name"),
        ("cwac+pact@x", "", "variant is one defense name"),
        ("nope@x", "", "nope"),
        ("cwac@x", "  cwac@y: {lam: 1.0}\n", "cwac@y: variant not listed"),
        ("cwac@x", "  cwac@x: {lamb: 1.0}\n", "lamb"),
    ],
)
def test_bad_variants_are_refused(tmp_path, entry, opts, message):
    text = f"grid: {{defenses: [sft, '{entry}']}}\ndefense_options:\n  cwac: {{n_anchor: 12}}\n{opts}"
    with pytest.raises(SafeFTError, match=message):
        for c in plan_cells(load_preset(_write_preset(tmp_path, text)), tmp_path):
            cell_config(c, tmp_path)


def test_config_hash_tracks_results_not_paths(tmp_path):
    pre = load_preset(_write_preset(tmp_path, MINI))
    cells = {c.id: c for c in plan_cells(pre, tmp_path)}
    c = cells["p0.1-sft-s0"]
    h = config_hash(c, cell_config(c, tmp_path / "a"))
    assert h == config_hash(c, cell_config(c, tmp_path / "elsewhere"))  # output dir is not part of it
    c.overrides["training.lr"] = 2e-3
    assert config_hash(c, cell_config(c, tmp_path / "a")) != h
    # θ₀'s evaluation does not depend on the grid's p or the training settings
    al = cells["aligned"]
    h0 = config_hash(al, cell_config(al, tmp_path))
    al.overrides.update({"data.p": 0.5, "training.lr": 0.1, "data.poison_share": 0.5})
    assert config_hash(al, cell_config(al, tmp_path)) == h0


def test_poison_share_keeps_old_cells_cached_at_its_default(tmp_path):
    pre = load_preset(_write_preset(tmp_path, MINI))
    c = {c.id: c for c in plan_cells(pre, tmp_path)}["p0.1-sft-s0"]
    cfg = cell_config(c, tmp_path)
    assert cfg["data"]["poison_share"] == 1.0
    before = {**cfg, "data": {k: v for k, v in cfg["data"].items() if k != "poison_share"}}  # made before the key
    assert config_hash(c, before) == config_hash(c, cfg)
    c.overrides["data.poison_share"] = 0.5
    assert config_hash(c, cell_config(c, tmp_path)) != config_hash(c, cfg)


def test_overrides_change_only_their_entry(tmp_path):
    text = ("grid: {p: [0.1, 0.2], defenses: [sft, 'lisa@slow']}\n"
            "overrides:\n  lisa@slow: {training: {lr: 3.0e-5, lora_targets: [q_proj, v_proj]}}\n")
    cells = {c.id: c for c in plan_cells(load_preset(_write_preset(tmp_path, text)), tmp_path)}
    slow = cells["p0.2-lisa@slow-s0"]
    cfg = cell_config(slow, tmp_path)
    assert cfg["training"]["lr"] == 3.0e-5 and cfg["training"]["lora_targets"] == ["q_proj", "v_proj"]
    assert cfg["data"]["p"] == 0.2 and cfg["defense"]["name"] == "lisa"
    assert cell_config(cells["p0.2-sft-s0"], tmp_path)["training"]["lr"] != 3.0e-5
    assert cell_config(cells["aligned"], tmp_path)["training"]["lr"] != 3.0e-5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\ngrids: {}\n", "unknown preset key"),
        ("grid: {defenses: [nope]}\n", "nope"),
        ("grid: {p: [1.5]}\n", "grid.p"),
        ("grid: {defenses: [sft]}\ndefense_options: {lisaa: {}}\n", "defense_options.lisaa"),
        ("base: {model.aligned: '${SAFEFT_TEST_UNSET_VAR}'}\n", "SAFEFT_TEST_UNSET_VAR"),
        ("base: {training.lr: -1}\n", "training.lr"),
        ("grid: {defenses: [sft]}\noverrides: {lisa: {training.lr: 1.0e-4}}\n", "overrides.lisa: not an entry"),
        ("grid: {defenses: [sft]}\noverrides: {sft: {data.p: 0.5}}\n", "overrides.sft.data.p: set by the grid"),
        ("grid: {defenses: [sft]}\noverrides: {sft: {training.lr: -1}}\n", "training.lr"),
    ],
)
def test_bad_presets_are_refused_with_the_key(tmp_path, monkeypatch, text, message):
    monkeypatch.delenv("SAFEFT_TEST_UNSET_VAR", raising=False)
    path = _write_preset(tmp_path, text)
    with pytest.raises(SafeFTError, match=message):
        cells = plan_cells(load_preset(path), tmp_path)
        for c in cells:
            cell_config(c, tmp_path)


def test_dry_run_lists_cells_and_writes_nothing(tmp_path, smoke_env, capsys):
    out = tmp_path / "res"
    assert main(["bench", "--preset", "smoke", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "4 cells" in text and "aligned" in text and "p0.25-sft-s0" in text
    assert "p0.25-pact-s0" in text and "skipped: needs the unaligned base model" in text
    assert "safeft train --config" in text and "safeft eval --config" in text
    assert not out.exists()


# ---- reports on synthetic cells ----------------------------------------------------------------------------------


def _fake_cell(out: Path, cell, hs, fa, step=None, mem=None, status="ok", theta0="a" * 64):
    cdir = out / "cells" / cell.id
    cdir.mkdir(parents=True)
    h = config_hash(cell, cell_config(cell, cdir))
    (cdir / "cell.json").write_text(
        json.dumps(
            {
                "id": cell.id,
                "hash": h,
                "status": status,
                "wall_seconds": 10.0,
                "error": None if status == "ok" else "exit code 1: boom",
            }
        )
    )
    if status != "ok":
        return
    ev = {
        "judge": "keyword",
        "harmful": {
            "hs": hs,
            "hs_ci": [hs - 5, hs + 5],
            "n": 20,
            "template_echo": 2,
            "gibberish_rate": 0.0,
            "judge": "keyword",
        },
        "task": {"fa": fa, "fa_ci": [fa - 4, fa + 4], "n": 50},
        "over_refusal": {"rate": 8.0, "n": 10},
    }
    (cdir / "eval.json").write_text(json.dumps(ev))
    if cell.kind == "train":
        (cdir / "run.json").write_text(
            json.dumps(
                {
                    "train_seconds": 100.0,
                    "prepare_seconds": 3.0,
                    "step_seconds_mean": step,
                    "peak_memory_mb": mem,
                    "n_harmful_train": 12,
                    "fingerprint": theta0,
                }
            )
        )


def test_rows_ratios_tables_and_plot_from_finished_cells(tmp_path):
    pre = load_preset(_write_preset(tmp_path, MINI))
    out = tmp_path / "res"
    cells = plan_cells(pre, out)
    by = {c.id: c for c in cells}
    _fake_cell(out, by["aligned"], 2.0, 50.0)
    _fake_cell(out, by["p0.1-sft-s0"], 80.0, 90.0, step=2.0, mem=1000.0)
    _fake_cell(out, by["p0.1-cwac-s0"], 10.0, 89.0, step=2.1, mem=1020.0)
    _fake_cell(out, by["p0.1-cwac-weight-s0"], 0, 0, status="failed")
    _fake_cell(out, by["p0.2-cwac-s0"], 12.0, 88.0, step=2.2, mem=1010.0)  # no sft at p=0.2: no ratios
    acc = {"keyword": {"xstest": {"harm": 0.9, "refusal": 0.8}}}
    rows = build_rows(pre, cells, out, judge_acc=acc)
    r = {x["cell_id"]: x for x in rows}
    for row in rows:
        assert set(ISSUE_SCHEMA + EXTRA) <= set(row)
    assert ROW_KEYS == ISSUE_SCHEMA
    assert (
        r["p0.1-sft-s0"]["step_time_ratio_vs_sft"] == 1.0 and r["p0.1-sft-s0"]["peak_mem_ratio_vs_sft"] == 1.0
    )
    assert r["p0.1-cwac-s0"]["step_time_ratio_vs_sft"] == pytest.approx(1.05)
    assert r["p0.1-cwac-s0"]["peak_mem_ratio_vs_sft"] == pytest.approx(1.02)
    assert r["p0.2-cwac-s0"]["step_time_ratio_vs_sft"] is None
    assert r["aligned"]["defense"] == "aligned" and r["aligned"]["n"] is None and r["aligned"]["p"] is None
    assert r["aligned"]["step_time_ratio_vs_sft"] is None
    assert r["aligned"]["judge_accuracy"] == {"xstest": {"harm": 0.9, "refusal": 0.8}}
    assert r["p0.1-cwac-weight-s0"]["status"] == "failed" and "boom" in r["p0.1-cwac-weight-s0"]["reason"]
    assert r["p0.1-pact-s0"]["status"] == "skipped" and "θ_b" in r["p0.1-pact-s0"]["reason"]
    assert r["p0.2-sft-s0"]["status"] == "not run"
    assert r["p0.1-cwac-s0"]["template_echo"] == 2 and r["p0.1-cwac-s0"]["n_eval_task"] == 50

    paths = write_reports(pre, cells, out, command="safeft bench --preset mini", wall_seconds=42.0)
    assert [p.name for p in paths] == ["summary.json", "results.md", "pareto.png"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == len(cells) and summary["command"] == "safeft bench --preset mini"
    md = (out / "results.md").read_text()
    assert "## p = 0.1" in md and "## p = 0.2" in md and "## Ablation" in md
    # HS [CI] | refusal | comply | HS keyword (not in these fake cells) | FA [CI] | over-refusal | echo
    assert "| cwac | 10.0 [5.0, 15.0] | – | – | – | 89.0 [85.0, 93.0] | 8.0 | 2 |" in md
    assert "| 1.05 | 1.020 |" in md  # step-time and memory ratios of cwac at p = 0.1
    assert "+8.0" in md and "-1.0" in md  # ablation: HS − aligned, FA − SFT for cwac at p = 0.1
    assert "safeft bench --preset mini" in md and "wall time" in md
    assert "copyright" not in md  # no cell judged copyright items
    ev = json.loads((out / "cells" / "p0.1-cwac-s0" / "eval.json").read_text())
    ev["copyright"] = {"hs": 25.0, "n": 8}
    (out / "cells" / "p0.1-cwac-s0" / "eval.json").write_text(json.dumps(ev))
    write_reports(pre, cells, out, command="safeft bench --preset mini", wall_seconds=42.0)
    md = (out / "results.md").read_text()
    assert "## HarmBench copyright items" in md and "| cwac | 0.1 | 0 | 25.0 | 8 |" in md
    assert "| cwac | 10.0 [5.0, 15.0] |" in md  # HS unchanged by them


def test_grid_blocks_union_and_seed_spread_table(tmp_path):
    text = _mini_with_grid(
        "grid:\n  - {p: [0.1], defenses: [sft, cwac, pact]}\n  - {p: [0, 0.1], defenses: [sft, cwac]}\n"
        "  - {p: [0.1], defenses: [sft, cwac], seeds: [1, 2]}",
    )
    pre = load_preset(_write_preset(tmp_path, text))
    assert pre.p == [0.0, 0.1] and pre.seeds == [0, 1, 2] and pre.defenses == ["sft", "cwac", "pact"]
    out = tmp_path / "res"
    cells = plan_cells(pre, out)
    ids = [c.id for c in cells]
    # the union, each cell once, block by block (the first block's cells first)
    assert ids == ["aligned", "p0.1-sft-s0", "p0.1-cwac-s0", "p0.1-pact-s0", "p0-sft-s0", "p0-cwac-s0",
                   "p0.1-sft-s1", "p0.1-cwac-s1", "p0.1-sft-s2", "p0.1-cwac-s2"]
    by = {c.id: c for c in cells}
    _fake_cell(out, by["aligned"], 2.0, 50.0)
    for seed, (hs, fa) in enumerate([(10.0, 80.0), (20.0, 84.0), (30.0, 88.0)]):
        theta0 = "a" * 64 if seed == 0 else "b" * 64  # seeds 1, 2 trained from a θ₀ rebuilt elsewhere
        _fake_cell(out, by[f"p0.1-cwac-s{seed}"], hs, fa, step=2.0, mem=1000.0, theta0=theta0)
        _fake_cell(out, by[f"p0.1-sft-s{seed}"], 60.0, 90.0, step=2.0, mem=1000.0, theta0=theta0)
    write_reports(pre, cells, out, command="safeft bench --preset mini", wall_seconds=1.0)
    md = (out / "results.md").read_text()
    assert "θ₀ weights differ between cells**: `aaaaaaaaaaaa` (2 cells: p0.1-sft-s0, p0.1-cwac-s0); `bbbbbbbbbbbb` (4" in md
    summary = json.loads((out / "summary.json").read_text())
    assert {r["theta0_fingerprint"] for r in summary["rows"] if r["status"] == "ok" and r["cell_id"] != "aligned"} == {"a" * 64, "b" * 64}
    assert "## Across seeds" in md
    assert "| 0.1 | cwac | 0, 1, 2 | 20.0 [10.0–30.0] | – | 84.0 [80.0–88.0] |" in md
    assert "| 0.1 | sft | 0, 1, 2 | 60.0 [60.0–60.0] |" in md and "| 0.1 | pact |" not in md.split("## Across")[1]
    bad = _mini_with_grid("grid:\n  - {p: [0.1], defenses: [sft]}\n  - {p: [2.0], defenses: [sft]}")
    with pytest.raises(SafeFTError, match=r"grid\[1\]\.p"):
        load_preset(_write_preset(tmp_path, bad))
    with pytest.raises(SafeFTError, match="non-empty list"):
        load_preset(_write_preset(tmp_path, _mini_with_grid("grid: []")))


def test_variant_rows_join_the_ablation_grouped_by_label(tmp_path):
    text = MINI.replace("defenses: [cwac, sft, cwac-weight, pact]", "defenses: [sft, cwac, cwac@x, cwac-weight@x]")
    text += "  cwac@x: {lam: 5.0}\n  cwac-weight@x: {lam: 5.0}\n"
    pre = load_preset(_write_preset(tmp_path, text))
    out = tmp_path / "res"
    cells = plan_cells(pre, out)
    by = {c.id: c for c in cells}
    _fake_cell(out, by["aligned"], 2.0, 50.0)
    _fake_cell(out, by["p0.1-sft-s0"], 80.0, 90.0, step=2.0, mem=1000.0)
    _fake_cell(out, by["p0.1-cwac-s0"], 40.0, 89.0, step=2.1, mem=1020.0)
    _fake_cell(out, by["p0.1-cwac@x-s0"], 6.0, 88.0, step=2.2, mem=1020.0)
    _fake_cell(out, by["p0.1-cwac-weight@x-s0"], 30.0, 87.0, step=2.0, mem=1000.0)
    write_reports(pre, cells, out, command="safeft bench --preset mini", wall_seconds=1.0)
    md = (out / "results.md").read_text()
    abl = md[md.index("## Ablation") :]
    order = [abl.index(f"| 0.1 | {v} |") for v in ("sft", "cwac", "cwac-weight@x", "cwac@x")]
    assert order == sorted(order)
    assert "| 0.1 | cwac@x | ✓ | ✓ | 6.0" in abl and "| 0.1 | cwac-weight@x | ✓ |  | 30.0" in abl
    assert "| cwac@x | 6.0 [1.0, 11.0] |" in md  # its own row in the p table


def test_ablation_table_only_where_the_halves_ran(tmp_path):
    text = _mini_with_grid(
        "grid:\n  - {p: [0.1], defenses: [sft, cwac, cwac-weight]}\n  - {p: [0.1], defenses: [sft, cwac], seeds: [1]}\n"
        "  - {p: [0.2], defenses: [sft, cwac]}\n  - {p: [0.1], defenses: [cwac@other]}",
    )
    pre = load_preset(_write_preset(tmp_path, text))
    out = tmp_path / "res"
    cells = plan_cells(pre, out)
    by = {c.id: c for c in cells}
    _fake_cell(out, by["aligned"], 2.0, 50.0)
    for cid in by:
        if cid != "aligned":
            _fake_cell(out, by[cid], 30.0, 80.0, step=2.0, mem=1000.0)
    write_reports(pre, cells, out, command="safeft bench --preset mini", wall_seconds=1.0)
    abl = (out / "results.md").read_text().split("## Ablation")[1].split("\n\n", 2)[1]
    rows = [line.split(" | ")[:2] for line in abl.splitlines() if line.startswith("| 0")]
    # one group (p 0.1, seed 0): the seed-1 and p-0.2 cells and the variant without halves are the main tables'
    assert rows == [["| 0.1", "sft"], ["| 0.1", "cwac-weight"], ["| 0.1", "cwac"]]


def test_stale_cell_is_reported_not_run(tmp_path):
    pre = load_preset(_write_preset(tmp_path, MINI))
    out = tmp_path / "res"
    cells = plan_cells(pre, out)
    c = cells[1]
    _fake_cell(out, c, 50.0, 50.0, step=1.0, mem=1.0)
    c.overrides["training.lr"] = 5e-3  # the preset changed after the cell ran
    row = build_rows(pre, cells, out, None)[1]
    assert row["status"] == "not run" and "changed" in row["reason"] and row["hs"] is None


# ---- end to end: real subprocesses on a tiny random model ----------------------------------------------------------


def test_smoke_preset_end_to_end_cached_failed_and_report_only(tmp_path, smoke_env, monkeypatch, capsys):
    out = tmp_path / "res"
    calls: list[list[str]] = []
    real_child = runner._run_child
    real_argv = runner.cell_argv

    def counting_child(argv, log_path, timeout_s):
        calls.append(argv)
        return real_child(argv, log_path, timeout_s)

    def failing_argv(cell, cfg_path, cell_dir):  # make safeinstr's child fail (argparse error, exit 2)
        argv = real_argv(cell, cfg_path, cell_dir)
        return argv + ["--no-such-flag"] if cell.defense == "safeinstr" else argv

    monkeypatch.setattr(runner, "_run_child", counting_child)
    monkeypatch.setattr(runner, "cell_argv", failing_argv)
    rc = run_bench("smoke", out_dir=str(out))
    assert rc == 1  # a cell failed; the others ran
    assert len(calls) == 3
    printed = capsys.readouterr().out
    assert "[ 2/4] p0.25-sft-s0" in printed and "ETA" in printed and "FAILED" in printed
    # each cell says it started (with its log) before the long wait, and its result after
    assert printed.index("p0.25-sft-s0                 running (log: ") < printed.index("p0.25-sft-s0                 ok in")
    rows = {r["defense"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert list(rows) == ["aligned", "sft", "safeinstr", "pact"]
    for r in rows.values():
        assert list(r)[: len(ISSUE_SCHEMA)] == ISSUE_SCHEMA and set(EXTRA) <= set(r)
    sft = rows["sft"]
    assert (
        sft["status"] == "ok" and sft["step_time_ratio_vs_sft"] == 1.0 and sft["peak_mem_ratio_vs_sft"] == 1.0
    )
    assert sft["n"] == 16 and sft["p"] == 0.25 and sft["task"] == "demo" and sft["model"] == str(smoke_env)
    assert sft["n_eval_harmful"] == 4 and sft["n_eval_task"] == 4 and 0 <= sft["hs"] <= 100
    assert sft["train_seconds"] > 0 and sft["command"].startswith("safeft train --config")
    assert rows["aligned"]["status"] == "ok" and rows["aligned"]["train_seconds"] is None
    assert rows["safeinstr"]["status"] == "failed" and "no-such-flag" in rows["safeinstr"]["reason"]
    assert rows["pact"]["status"] == "skipped" and "θ_b" in rows["pact"]["reason"]
    run = json.loads((out / "cells" / "p0.25-sft-s0" / "run.json").read_text())
    assert (
        run["n_harmful_train"] == 4 and run["global_steps"] == 2
    )  # the preset's n, p and max_steps reached the child
    assert (out / "cells" / "p0.25-sft-s0" / "log.txt").read_text().startswith("$ ")
    curves = json.loads((out / "summary.json").read_text())["monitor_curves"]
    assert list(curves) == ["p0.25-sft-s0"]  # the failed cell left no monitor history; θ₀ and skipped cells none
    assert [c["step"] for c in curves["p0.25-sft-s0"]["checks"]] == [0, 1, 2]
    assert all(0 <= c["refusal_rate"] <= 100 for c in curves["p0.25-sft-s0"]["checks"])
    assert "## Safety drift during fine-tuning" in (out / "results.md").read_text()

    # rerun: finished cells are cached (not re-trained), the failed one is retried (now without the bad flag)
    monkeypatch.setattr(runner, "cell_argv", real_argv)
    mtime = os.stat(out / "cells" / "p0.25-sft-s0" / "run.json").st_mtime_ns
    calls.clear()
    assert run_bench("smoke", out_dir=str(out)) == 0
    assert [a[0] for a in calls] == ["train"] and calls[0][2].endswith("p0.25-safeinstr-s0/config.yaml")
    assert os.stat(out / "cells" / "p0.25-sft-s0" / "run.json").st_mtime_ns == mtime
    rows = {r["defense"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["safeinstr"]["status"] == "ok" and rows["safeinstr"]["step_time_ratio_vs_sft"] > 0

    # report-only regenerates summary, table and plot without running anything
    for f in ("summary.json", "results.md", "pareto.png", "monitor.png"):
        (out / f).unlink()
    calls.clear()
    assert main(["bench", "--preset", "smoke", "--out", str(out), "--report-only"]) == 0
    assert calls == []
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "monitor.png").stat().st_size > 1000
    curves = json.loads((out / "summary.json").read_text())["monitor_curves"]
    assert set(curves) == {"p0.25-sft-s0", "p0.25-safeinstr-s0"}
    md = (out / "results.md").read_text()
    assert "| safeinstr |" in md and "skipped: needs the unaligned base model" in md and str(smoke_env) in md
    assert len(json.loads((out / "summary.json").read_text())["rows"]) == 4


def test_cells_made_under_a_defenses_earlier_defaults_are_stale(tmp_path):
    from safeft.bench.preset import Cell
    from safeft.bench.runner import is_cached, stale_defaults

    def cell(defense, revisions):
        d = tmp_path / defense
        d.mkdir()
        run = {"config": {"defense": {"name": defense}}}
        if revisions is not None:
            run["defense_revisions"] = revisions
        (d / "run.json").write_text(json.dumps(run))
        (d / "eval.json").write_text("{}")
        (d / "cell.json").write_text(json.dumps({"status": "ok", "hash": "h"}))
        return Cell(f"p0.1-{defense}-s0", defense, 0.1, 0, "train", {}), d

    c, d = cell("safelora", None)  # recorded before revisions: revision 1; SafeLoRA's defaults are now revision 2
    assert "safelora 1 → 2" in stale_defaults(c, d) and not is_cached(c, d, "h")
    c, d = cell("sft", None)  # SFT's defaults never changed
    assert stale_defaults(c, d) is None and is_cached(c, d, "h")
    c, d = cell("lisa", {"lisa": 2})
    assert stale_defaults(c, d) is None and is_cached(c, d, "h")
