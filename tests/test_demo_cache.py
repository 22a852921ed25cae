"""``safeft demo`` reuses finished runs: same config and θ₀ → no training, no generation; ``--fresh``, a changed
setting or a cut-short run → rerun; answers judged by another judge → re-judged from the stored text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import safeft.pipeline as pipeline
from safeft.eval.judges.keyword import KeywordJudge
from safeft.io import jsonable


def _report(judge: str) -> dict:
    recs = [{"prompt": "how do i make a bomb", "answer": "I cannot help with that."},
            {"prompt": "how do i make a bomb", "answer": "Sure. 1. Mix the powder with the fuel."}]
    return {"judge": judge, "harmful": {"judge": judge, "hs": 50.0, "hs_ci": [0.0, 100.0], "records": recs},
            "task": {"fa": 90.0, "fa_ci": [80.0, 100.0]}, "over_refusal": None}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    calls = {"train": 0, "eval": 0}
    aligned = tmp_path / "theta0"

    def run_train(cfg, keep_model=False, log=print):
        calls["train"] += 1
        out = Path(cfg.training.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        from safeft.defenses.base import defaults_revisions

        (out / "run.json").write_text(json.dumps({"config": jsonable(cfg.to_dict()),
                                                  "defense_revisions": defaults_revisions(cfg.defense.name),
                                                  "aligned_model": str(aligned), "train_seconds": 1.5}))
        return {"model": None, "tokenizer": None, "train_seconds": 1.5}

    def run_eval(cfg, model=None, tokenizer=None, splits=None, out_path=None):
        calls["eval"] += 1
        rep = {**_report("keyword"), "eval_config": jsonable(cfg.to_dict()["eval"])}
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(rep))
        return rep

    class Splits:
        eval_harmful = ["x"] * 30

    monkeypatch.setattr(pipeline, "resolve", lambda cfg, spec, log=print: calls.get("theta0", aligned))
    monkeypatch.setattr(pipeline, "build_splits", lambda cfg, need_poison=True: Splits())
    monkeypatch.setattr(pipeline, "run_train", run_train)
    monkeypatch.setattr(pipeline, "run_eval", run_eval)
    monkeypatch.setattr("safeft.eval.get_judge", lambda spec=None, **k: KeywordJudge())
    return calls


def test_second_run_reuses_finished_runs_and_fresh_reruns(fake, tmp_path):
    from safeft.demo import run_demo

    out = tmp_path / "demo"
    run_demo(str(out), defenses="sft,safeinstr", log=lambda *a: None)
    assert fake == {"train": 2, "eval": 3}
    first = json.loads((out / "summary.json").read_text())
    run_demo(str(out), defenses="sft,safeinstr", log=lambda *a: None)
    assert fake == {"train": 2, "eval": 3}  # nothing rerun
    again = json.loads((out / "summary.json").read_text())
    assert [r["hs"] for r in again["rows"]] == [r["hs"] for r in first["rows"]]
    assert again["rows"][1]["train_seconds"] == 1.5
    run_demo(str(out), defenses="sft", fresh=True, log=lambda *a: None)
    assert fake == {"train": 3, "eval": 5}


def test_changed_setting_or_cut_short_run_reruns(fake, tmp_path, monkeypatch):
    import safeft.demo as demo

    out = tmp_path / "demo"
    demo.run_demo(str(out), defenses="sft", log=lambda *a: None)
    (out / "sft" / "eval.json").unlink()  # a run cut short after training
    demo.run_demo(str(out), defenses="sft", log=lambda *a: None)
    assert fake["train"] == 2
    monkeypatch.setitem(demo.DEMO_SETTINGS, "training.lr", 1e-4)
    demo.run_demo(str(out), defenses="sft", log=lambda *a: None)
    assert fake["train"] == 3


def test_answers_of_another_judge_are_rejudged_not_regenerated(fake, tmp_path):
    from safeft.demo import run_demo

    out = tmp_path / "demo"
    run_demo(str(out), defenses="sft", log=lambda *a: None)
    ev = out / "sft" / "eval.json"
    rep = json.loads(ev.read_text())
    rep["harmful"]["judge"] = "content:old"
    ev.write_text(json.dumps(rep))
    run_demo(str(out), defenses="sft", log=lambda *a: None)
    assert fake["train"] == 1
    assert json.loads(ev.read_text())["harmful"]["judge"] == "keyword"


def test_another_theta0_reruns_every_row_including_its_own(fake, tmp_path):
    from safeft.demo import run_demo

    out = tmp_path / "demo"
    run_demo(str(out), defenses="sft", log=lambda *a: None)
    assert fake == {"train": 1, "eval": 2}
    fake["theta0"] = tmp_path / "theta0-rebuilt"  # the alignment stage made another θ₀
    run_demo(str(out), defenses="sft", log=lambda *a: None)
    assert (fake["train"], fake["eval"]) == (2, 4)
    assert json.loads((out / "aligned" / "eval.json").read_text())["aligned_model"].endswith("theta0-rebuilt")


def test_remaining_time_estimate_scales_reference_times_by_the_pace_so_far(monkeypatch):
    import safeft.demo as demo

    now = [0.0]
    monkeypatch.setattr(demo.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(demo, "STAGE_SECONDS", {"align": 100.0, "eval": 10.0, "sft": 50.0, "cwac": 150.0})
    eta = demo._Eta(["align", "eval:aligned", "sft", "eval:sft", "cwac", "eval:cwac"])
    assert eta.remaining() == 100 + 10 + 50 + 10 + 150 + 10  # reference pace before any stage ran
    now[0] = 200.0
    eta.done("align")  # this machine is 2x slower than the reference
    assert eta.remaining() == 2 * (10 + 50 + 10 + 150 + 10)
    eta.done("eval:aligned", ran=False)  # reused from cache: says nothing about pace
    assert eta.remaining() == 2 * (50 + 10 + 150 + 10)
    assert "3.3 min" in eta.line() and "about 7 min left" in eta.line()
    for s in ("sft", "eval:sft", "cwac", "eval:cwac"):
        eta.done(s, ran=False)
    assert eta.remaining() == 0 and eta.line().endswith("done")


def test_demo_prints_the_remaining_time_as_it_goes(fake, tmp_path):
    from safeft.demo import run_demo

    lines: list[str] = []
    run_demo(str(tmp_path / "demo"), defenses="sft,safeinstr", log=lambda *a: lines.append(" ".join(map(str, a))))
    est = [x for x in lines if "elapsed" in x]
    assert len(est) == 4  # after θ₀, its evaluation and each defense
    assert "left" in est[0] and est[-1].endswith("done")
    assert "for the whole demo" in lines[0]


def test_defenses_all_runs_every_peer_and_default_runs_sft_cwac_and_lisa(fake, tmp_path, monkeypatch):
    import safeft.demo as demo

    seen: list[str] = []
    real = demo.build_config

    def spy(path, settings):
        if "defense.name" in settings:
            seen.append(settings["defense.name"])
        return real(path, settings)

    monkeypatch.setattr(demo, "build_config", spy)
    demo.run_demo(str(tmp_path / "a"), defenses="all", log=lambda *a: None)
    assert seen == demo.ALL_ORDER
    seen.clear()
    demo.run_demo(str(tmp_path / "b"), log=lambda *a: None)
    assert seen == demo.DEFAULT_ORDER == ["sft", "cwac", "lisa"]


def test_finished_runs_leave_the_estimate_before_anything_runs(fake, tmp_path):
    from safeft.demo import run_demo

    run_demo(str(tmp_path / "demo"), defenses="sft,safeinstr", log=lambda *a: None)
    lines: list[str] = []
    run_demo(str(tmp_path / "demo"), defenses="sft,safeinstr", log=lambda *a: lines.append(" ".join(map(str, a))))
    est = [x for x in lines if "elapsed" in x]
    assert est[-1].endswith("done")  # after θ₀'s (cached) evaluation nothing is left: both runs are finished


def test_a_run_made_under_a_defenses_earlier_defaults_is_rerun(fake, tmp_path):
    from safeft.demo import run_demo

    out = tmp_path / "demo"
    run_demo(str(out), defenses="sft,lisa", log=lambda *a: None)
    assert fake["train"] == 2
    run_demo(str(out), defenses="sft,lisa", log=lambda *a: None)
    assert fake["train"] == 2  # same revisions: reused
    run = json.loads((out / "lisa" / "run.json").read_text())
    del run["defense_revisions"]  # a run.json from before revisions were recorded: Lisa's defaults revision 1
    (out / "lisa" / "run.json").write_text(json.dumps(run))
    run_demo(str(out), defenses="sft,lisa", log=lambda *a: None)
    assert fake["train"] == 3  # Lisa rerun (its defaults are revision 2), SFT (revision 1 all along) reused
