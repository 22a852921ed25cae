"""benchmarks/select_settings.py: the equal-tuning-budget rule on synthetic summary rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "select_settings", Path(__file__).resolve().parents[1] / "benchmarks" / "select_settings.py")
sel = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sel)


def _row(defense, hs, fa, refusal=50.0, status="ok"):
    return {"defense": defense, "p": 0.1, "seed": 0, "hs": hs, "fa": fa, "refusal_rate": refusal, "status": status}


def test_lowest_hs_within_the_fa_slack():
    rows = [_row("sft", 40, 90), _row("lisa", 5, 60), _row("lisa@a", 10, 88), _row("lisa@b", 20, 91)]
    got = sel.choose(rows)["lisa"]
    assert got["chosen"] == "lisa@a"  # lisa has the lowest HS but loses 30 points of FA
    assert got["tried"] == ["lisa", "lisa@a", "lisa@b"]


def test_ties_go_to_refusal_then_fa_then_the_default():
    rows = [_row("sft", 40, 90), _row("pact@x", 10, 89, refusal=60), _row("pact", 10, 89, refusal=60),
            _row("pact@y", 10, 88, refusal=70)]
    assert sel.choose(rows)["pact"]["chosen"] == "pact@y"
    rows[-1]["refusal_rate"] = 60
    assert sel.choose(rows)["pact"]["chosen"] == "pact"  # same HS, refusal; FA 89 > 88; default before @x


def test_no_setting_within_the_slack_takes_the_highest_fa_and_unfinished_rows_are_never_chosen():
    rows = [_row("sft", 40, 90), _row("asft", 0, 50), _row("asft@a", 5, 70), _row("asft@b", 0, 95, status="failed")]
    got = sel.choose(rows)["asft"]
    assert got["chosen"] == "asft@a" and "no setting kept FA" in got["why"] and "1 of 3" in got["why"]


def test_needs_sft_and_writes_the_report(tmp_path):
    with pytest.raises(SystemExit, match="sft"):
        sel.choose([_row("lisa", 0, 90)])
    summary = {"preset": "t", "defense_options": {"lisa": {"rho": 1.0}, "lisa@r10": {"rho": 10.0}},
               "overrides": {"lisa@r10": {"training.lr": 1e-4}},
               "rows": [_row("sft", 40, 90), _row("lisa", 20, 89), _row("lisa@r10", 10, 88)]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert sel.main([str(tmp_path)]) == 0
    md = (tmp_path / "selection.md").read_text()
    assert "| lisa@r10 | " in md and '"rho": 10.0' in md and '"training.lr": 0.0001' in md and "**chosen**" in md
    assert json.loads((tmp_path / "selection.json").read_text())["p0.1-s0"]["lisa"]["chosen"] == "lisa@r10"
    assert sel.main([str(tmp_path / "missing")]) == 2
