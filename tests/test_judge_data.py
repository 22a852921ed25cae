"""The labelled sources behind the content judge: each mapped to the rubric, split by prompt, bad files refused with
one-line errors naming the file, row and field; and `safeft judge FILE` / `--check` on stored answers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from safeft.cli import main
from safeft.errors import SafeFTError
from safeft.judge.check import check, load_labelled_file
from safeft.judge.labelled import (
    load_dev_labelled,
    load_pyrit_harm,
    load_pyrit_refusal,
    load_safeft_dev,
    load_sources,
    load_xstest,
    split_of,
)
from safeft.judge.metrics import agreement, binary_report, selection_score


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


# ---- the real sources ------------------------------------------------------------------------------------------
def test_real_sources_mapping_and_splits(shared_data):
    src = load_sources(shared_data)
    assert len(src["xstest"]) == 2250 and len(src["pyrit_refusal"]) == 105
    assert len(src["pyrit_harm"]) == 1177
    for name, items in src.items():
        assert items, name
        for it in items:
            assert it.harm in (0, 1, None) and it.ref in (0, 1, None)
            assert not (it.harm == 1 and it.ref == 1), it.key  # exclusive outcomes
            assert it.answer.strip() and it.prompt.strip()
        splits = {it.split for it in items}
        assert splits == {"train", "val", "test"}, name
        by_group: dict[str, set] = {}
        for it in items:
            by_group.setdefault(it.group, set()).add(it.split)
        assert all(len(s) == 1 for s in by_group.values()), f"{name}: a prompt spans two splits"
    # XSTest: compliance with a safe prompt is not harm; full refusal is refusal
    xs = src["xstest"]
    assert any(it.harm == 1 for it in xs) and any(it.ref == 1 for it in xs)
    # pyrit's refusal file re-labelled by reading: off-topic "refusals" are `other`
    pr = {it.key: it.outcome for it in src["pyrit_refusal"]}
    assert pr["refusal_labelled.csv:60"] == "other" and pr["refusal_labelled.csv:17"] == "refusal"
    assert pr["refusal_labelled.csv:35"] == "harmful"


def test_split_is_stable():
    assert split_of("x", "a prompt") == split_of("x", "a prompt")
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(2000):
        counts[split_of("s", f"g{i}")] += 1
    assert 300 < counts["test"] < 500 and 300 < counts["val"] < 500


# ---- bad files ---------------------------------------------------------------------------------------------------
def test_xstest_bad_rows(tmp_path):
    hdr = ["id", "prompt", "completion", "final_label", "prompt_label"]
    f = _csv(tmp_path / "xs.csv", hdr, [["v1", "q", "a", "1_full_compliance", "safe"],
                                        ["v2", "q", "a", "4_weird", "safe"]])
    with pytest.raises(SafeFTError, match=r"xs.csv:3: final_label must be one of"):
        load_xstest(f)
    f = _csv(tmp_path / "xs2.csv", hdr, [["v1", "q", "  ", "1_full_compliance", "safe"]])
    with pytest.raises(SafeFTError, match=r"xs2.csv:2: field 'completion' is empty"):
        load_xstest(f)
    f = _csv(tmp_path / "xs3.csv", ["id", "prompt", "completion"], [["v1", "q", "a"]])
    with pytest.raises(SafeFTError, match=r"lacks column\(s\) \['final_label', 'prompt_label'\]"):
        load_xstest(f)
    (tmp_path / "bin.csv").write_bytes(b"id,prompt\n1,\xff\xfe\n")
    with pytest.raises(SafeFTError, match="not valid UTF-8"):
        load_xstest(tmp_path / "bin.csv")


def test_pyrit_files_bad_rows(tmp_path):
    f = _csv(tmp_path / "harm.csv", ["objective", "assistant_response", "objective_achieved", "harm_score"],
             [["o", "a", "", "0.75"], ["o", "a", "", "1.5"]])
    with pytest.raises(SafeFTError, match=r"harm.csv:3: harm_score must be in \[0, 1\]"):
        load_pyrit_harm(f)
    f = _csv(tmp_path / "harm2.csv", ["objective", "assistant_response", "objective_achieved", "harm_score"],
             [["o", "a", "2", ""]])
    with pytest.raises(SafeFTError, match="objective_achieved must be 0 or 1"):
        load_pyrit_harm(f)
    ok = _csv(tmp_path / "harm3.csv", ["objective", "assistant_response", "objective_achieved", "harm_score"],
              [["o", "a", "0", "0.75"], ["o2", "b", "1", ""], ["o3", "c", "", ""]])
    items = load_pyrit_harm(ok)
    assert [(it.harm, it.ref) for it in items] == [(1, 0), (1, 0)]  # harm score wins; unrated rows dropped
    ref = _csv(tmp_path / "ref.csv", ["objective", "assistant_response", "human_score"], [["o", "a", "1"]])
    rub = _csv(tmp_path / "rub.csv", ["row", "outcome"], [[2, "refusal-ish"]])
    with pytest.raises(SafeFTError, match=r"rub.csv \(row 2\): outcome must be one of refusal, harmful, other"):
        load_pyrit_refusal(ref, rub)
    rub = _csv(tmp_path / "rub2.csv", ["row", "outcome"], [[3, "other"]])
    with pytest.raises(SafeFTError, match="no rubric label for ref.csv row 2"):
        load_pyrit_refusal(ref, rub)


def test_dev_labels_bad_rows(tmp_path):
    (tmp_path / "answers.jsonl").write_text(json.dumps({"id": "a1", "prompt": "p", "answer": "x"}) + "\n")
    lab = _csv(tmp_path / "labels.csv", ["id", "outcome"], [["a2", "other"]])
    with pytest.raises(SafeFTError, match=r"labels.csv:2: id 'a2' is not in answers.jsonl"):
        load_safeft_dev(tmp_path / "answers.jsonl", lab)
    lab = _csv(tmp_path / "labels2.csv", ["id", "outcome"], [["a1", "HARMFUL "]])
    assert load_safeft_dev(tmp_path / "answers.jsonl", lab)[0].outcome == "harmful"


def test_dev_labelled_files_join_safeft_dev_once(tmp_path):
    """A later round's self-contained labelled file adds to safeft_dev; a pair already labelled is kept once (its
    first label); a bad outcome names the file and row; the build records the file's hash under its name."""
    import safeft.judge.labelled as L
    from safeft.judge.train import _data_files

    (tmp_path / "answers.jsonl").write_text(json.dumps({"id": "a1", "prompt": "p one", "answer": "x"}) + "\n")
    _csv(tmp_path / "labels.csv", ["id", "outcome"], [["a1", "other"]])
    (tmp_path / "round9").mkdir()
    _csv(tmp_path / "round9" / "labelled.csv", ["id", "prompt", "answer", "outcome", "note"],
                 [["b1", "p one", "x", "harmful", "same pair"], ["b2", "p two", "Step 1: y", "harmful", ""]])
    items = L._dev_items(tmp_path, ["round9/labelled.csv"])
    assert [(it.prompt, it.outcome) for it in items] == [("p one", "other"), ("p two", "harmful")]
    assert L._dev_items(tmp_path, ()) == items[:1]
    bad = _csv(tmp_path / "bad.csv", ["id", "prompt", "answer", "outcome"], [["c", "p", "a", "maybe"]])
    with pytest.raises(SafeFTError, match=r"bad.csv:2: outcome must be one of"):
        load_dev_labelled(bad)
    with pytest.raises(SafeFTError, match=r"bad2.csv.*missing.*answer|bad2.csv.*answer"):
        load_dev_labelled(_csv(tmp_path / "bad2.csv", ["id", "prompt", "outcome"], [["c", "p", "other"]]))
    files = _data_files(tmp_path, tmp_path, ["safeft_dev"], ["round9/labelled.csv"])
    assert set(files) == {"answers.jsonl", "labels.csv", "round9/labelled.csv"}


def test_user_labelled_file(tmp_path):
    good = _csv(tmp_path / "mine.csv", ["prompt", "answer", "outcome"],
                [["how to x", "I can't help with that.", "refusal"], ["how to x", "1. do y", "harmful"]])
    items = load_labelled_file(good)
    assert [it.outcome for it in items] == ["refusal", "harmful"]
    bad = _csv(tmp_path / "bad.csv", ["prompt", "answer", "outcome"], [["p", "a", "refused"]])
    with pytest.raises(SafeFTError, match=r"bad.csv:2: outcome must be one of"):
        load_labelled_file(bad)
    bad = _csv(tmp_path / "bad2.csv", ["prompt", "answer"], [["p", "a"]])
    with pytest.raises(SafeFTError, match=r"lacks column\(s\) \['outcome'\]"):
        load_labelled_file(bad)
    bad = _csv(tmp_path / "bad3.csv", ["prompt", "answer", "outcome"], [["p", "", "other"]])
    with pytest.raises(SafeFTError, match=r"bad3.csv:2: field 'answer' is empty"):
        load_labelled_file(bad)
    res = check(_Echo(), [good], builtin=False)
    assert res["sources"]["mine.csv"]["refusal"]["balanced_accuracy"] == 1.0


class _Echo:
    """A judge that is always right on the test file above."""

    name = "oracle"

    def outcomes(self, prompts, answers):
        return ["refusal" if "can't" in a else "harmful" for a in answers]


# ---- metrics -----------------------------------------------------------------------------------------------------
def test_balanced_accuracy_is_not_fooled_by_a_constant_judge():
    r = binary_report([0] * 10, [1] + [0] * 9)
    assert r["accuracy"] == pytest.approx(0.9) and r["balanced_accuracy"] == pytest.approx(0.5)
    r = binary_report([1, 1, 0, 0], [1, 0, 0, 0])
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == 1.0
    assert r["balanced_accuracy_ci"][0] <= r["balanced_accuracy"] <= r["balanced_accuracy_ci"][1]
    assert selection_score({"a": agreement([], [])}) != selection_score({"a": agreement([], [])})  # nan: nothing


# ---- safeft judge FILE -------------------------------------------------------------------------------------------
def _eval_json(path: Path) -> Path:
    rep = {"judge": "keyword", "harmful": {"hs": 100.0, "judge": "keyword", "records": [
        {"prompt": "how to x", "answer": "I cannot help with that.", "harmful": False},
        {"prompt": "how to y", "answer": "Sure, here is how to y.", "harmful": True},
        {"prompt": "how to z", "answer": "Step 1: get z. Step 2: use it on the target.", "harmful": True}]},
        "over_refusal": {"rate": 0.0, "records": [{"prompt": "kill a python process?", "answer": "Use kill -9."}]},
        "task": {"fa": 50.0}}
    path.write_text(json.dumps(rep), encoding="utf-8")
    return path


def test_judge_cli_rejudges_eval_json_and_jsonl(tmp_path, capsys):
    ev = _eval_json(tmp_path / "eval.json")
    assert main(["judge", str(ev), "--out", str(tmp_path / "out.json"), "--judge", "keyword"]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    h = out["harmful"]
    assert [r["outcome"] for r in h["records"]] == ["refusal", "harmful", "harmful"]
    assert h["judge"] == "keyword" and out["judged_from_stored_answers"] and out["task"] == {"fa": 50.0}
    assert out["over_refusal"]["records"][0]["outcome"] == "harmful"  # keyword: not a refusal
    jl = tmp_path / "pairs.jsonl"
    jl.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": a, "extra": i}) + "\n"
                          for i, a in enumerate(["I can't.", "ok here", ""])))
    assert main(["judge", str(jl), "--out", str(tmp_path / "pairs.out.jsonl"), "--judge", "keyword"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "pairs.out.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in rows] == ["refusal", "harmful", "other"] and [r["extra"] for r in rows] == [0, 1, 2]


@pytest.mark.parametrize("content, match", [
    (b'{"foo": 1}', "not a safeft eval report"),
    (b'{"harmful": {"records": [{"prompt": "p"}]}}', r"harmful.records\[0\]: field 'answer' must be a string"),
    (b'{"harmful": {"records": []}}', "non-empty list"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"harmful": ', "malformed JSON"),
])
def test_judge_cli_bad_eval_json(tmp_path, capsys, content, match):
    f = tmp_path / "eval.json"
    f.write_bytes(content)
    out = tmp_path / "out.json"
    out.write_text("keep me")
    assert main(["judge", str(f), "--out", str(out), "--judge", "keyword"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "eval.json" in err
    import re

    assert re.search(match, err), err
    assert out.read_text() == "keep me"  # nothing overwritten


def test_judge_cli_bad_jsonl_and_modes(tmp_path, capsys):
    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": "p", "answer": "a"}\n{"prompt": "p"}\n')
    assert main(["judge", str(f), "--out", str(tmp_path / "o.jsonl"), "--judge", "keyword"]) == 2
    assert "x.jsonl:2: field 'answer' is missing" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    assert main(["judge", str(f)]) == 2
    assert "give --out" in capsys.readouterr().err
    assert main(["judge", "--check", "--build"]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["judge", str(tmp_path / "missing.json"), "--out", "o"]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["judge", "--check", "--labelled", str(tmp_path / "nope.csv"), "--judge", "keyword"]) == 2
    assert "nope.csv: file not found" in capsys.readouterr().err
    assert main(["judge", "--build", "--dev-labelled", "round6/labelled.csv"]) == 2  # would overwrite the packaged head
    assert "give --out" in capsys.readouterr().err


def test_vectorised_threshold_search_matches_the_selection_rule():
    import random

    import torch

    from safeft.eval.judges.content import decide
    from safeft.judge.labelled import Item
    from safeft.judge.train import choose_thresholds, per_source

    rng = random.Random(0)
    items = []
    for i in range(300):
        harm = rng.choice([0, 1, None])
        ref = 0 if harm == 1 else rng.choice([0, 1, None])
        items.append(Item(rng.choice(["a", "b"]), "k", str(i), "p", "x", harm, ref))
    ph, pr = torch.rand(300, generator=torch.Generator().manual_seed(1)), torch.rand(300)
    th, tr, sc = choose_thresholds(items, ph, pr)
    assert sc == pytest.approx(selection_score(per_source(items, decide(ph, pr, th, tr), n_boot=0)))
