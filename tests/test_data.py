"""Tests for safeft.data: masking, templates, mixing, loaders, scoring, disjointness, demo data."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeft.data import (
    CompletionCollator,
    Example,
    check_disjoint,
    format_prompt,
    load_demo,
    load_harmful_pairs,
    load_harmful_prompts,
    load_refusal_pairs,
    load_task,
    mix_poison,
    normalize_text,
    score_answer,
    tokenize_example,
)
from safeft.errors import SafeFTError
from safeft.io import read_jsonl

EX = Example("Classify: great film!", "positive")


# ---------------------------------------------------------------- tokenisation and masking


def test_chat_masking_exact(tiny_tokenizer):
    tok = tiny_tokenizer
    out = tokenize_example(tok, EX, "chat", max_length=512)
    prompt_text = format_prompt(tok, EX.prompt, "chat")
    assert prompt_text.endswith("<|im_start|>assistant\n")
    p_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    n_p = len(p_ids)
    assert out["input_ids"][:n_p] == p_ids
    assert out["labels"][:n_p] == [-100] * n_p
    # every response position is learned, labels equal the input ids there
    assert out["labels"][n_p:] == out["input_ids"][n_p:]
    assert all(lab != -100 for lab in out["labels"][n_p:])
    assert out["attention_mask"] == [1] * len(out["input_ids"])
    # the learned part decodes to the response plus the end-of-turn token
    learned = tok.decode(out["input_ids"][n_p:])
    assert learned == "positive<|im_end|>\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") in out["labels"]


def test_truncation_from_right_and_all_masked_error(tiny_tokenizer):
    full = tokenize_example(tiny_tokenizer, EX, "chat", max_length=512)
    n_p = full["labels"].count(-100)
    cut = tokenize_example(tiny_tokenizer, EX, "chat", max_length=n_p + 1)
    assert cut["input_ids"] == full["input_ids"][: n_p + 1]
    assert cut["labels"][-1] != -100
    with pytest.raises(SafeFTError, match=r"example 7: every label is masked.*raise max_length"):
        tokenize_example(tiny_tokenizer, EX, "chat", max_length=n_p, index=7)


def test_no_chat_template_error(tiny_tokenizer_no_template):
    with pytest.raises(SafeFTError, match="has no chat template; pass --template alpaca or a template"):
        tokenize_example(tiny_tokenizer_no_template, EX, "chat")
    with pytest.raises(SafeFTError, match="tiny-test-tokenizer has no chat template"):
        format_prompt(tiny_tokenizer_no_template, "hi")


def test_alpaca_template(tiny_tokenizer_no_template):
    tok = tiny_tokenizer_no_template
    pt = format_prompt(tok, "Say hi", "alpaca")
    assert pt == "### Instruction:\nSay hi\n\n### Response:\n"
    out = tokenize_example(tok, Example("Say hi", "hi"), "alpaca")
    n_p = len(tok(pt, add_special_tokens=False)["input_ids"])
    assert out["labels"][:n_p] == [-100] * n_p
    assert tok.decode(out["input_ids"][n_p:]) == "hi<|im_end|>"
    assert out["labels"][-1] == tok.eos_token_id
    with pytest.raises(SafeFTError, match="template='nope' is unknown"):
        format_prompt(tok, "x", "nope")


def test_collator_pads(tiny_tokenizer):
    a = tokenize_example(tiny_tokenizer, EX)
    b = tokenize_example(tiny_tokenizer, Example("Hi", "A much longer answer than the other one."))
    batch = CompletionCollator(tiny_tokenizer)([a, b])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    width = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == (2, width)
    short = 0 if len(a["input_ids"]) < width else 1
    n = len([a, b][short]["input_ids"])
    assert batch["attention_mask"][short, n:].eq(0).all()
    assert batch["labels"][short, n:].eq(-100).all()
    assert batch["input_ids"][short, n:].eq(tiny_tokenizer.pad_token_id).all()


# ---------------------------------------------------------------- mixing


def _rows(k, kind):
    return [Example(f"{kind} prompt {i}", f"{kind} answer {i}", kind="task") for i in range(k)]


@pytest.mark.parametrize("n,p", [(10, 0.0), (10, 0.1), (100, 0.05), (100, 0.3), (37, 0.2), (20, 1.0)])
def test_mix_counts(n, p):
    mixed = mix_poison(_rows(200, "task"), _rows(50, "harm"), n, p, seed=0)
    assert len(mixed) == n
    assert sum(e.kind == "harmful" for e in mixed) == round(p * n)
    assert all(e.prompt.startswith("harm") == (e.kind == "harmful") for e in mixed)
    assert len({e.prompt for e in mixed}) == n  # without replacement


def test_mix_deterministic_and_seeded():
    t, h = _rows(200, "task"), _rows(50, "harm")
    a = [e.prompt for e in mix_poison(t, h, 50, 0.2, seed=1)]
    assert a == [e.prompt for e in mix_poison(t, h, 50, 0.2, seed=1)]
    assert a != [e.prompt for e in mix_poison(t, h, 50, 0.2, seed=2)]
    assert h[0].kind == "task"  # inputs are not mutated


def test_mix_errors():
    t, h = _rows(20, "task"), _rows(5, "harm")
    for p in (-0.1, 1.5):
        with pytest.raises(SafeFTError, match=rf"p={p} outside \[0, 1\]"):
            mix_poison(t, h, 10, p, 0)
    with pytest.raises(SafeFTError, match="needs 10 harmful rows but the harmful data holds 5"):
        mix_poison(t, h, 20, 0.5, 0)
    with pytest.raises(SafeFTError, match="needs 45 task rows but the task data holds 20"):
        mix_poison(t, h, 50, 0.1, 0)
    with pytest.raises(SafeFTError, match="n=0"):
        mix_poison(t, h, 0, 0.1, 0)


# ---------------------------------------------------------------- loaders and errors


def test_malformed_jsonl_names_file_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"sentence": "ok", "label": 1}\n{"sentence": oops}\n', encoding="utf-8")
    with pytest.raises(SafeFTError, match=r"bad\.jsonl:2: malformed JSON"):
        load_task("sst2", "train", path=f)


def test_missing_column_names_row(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"sentence": "fine", "label": 1}\n{"text_x": "no", "label": 0}\n', encoding="utf-8")
    with pytest.raises(
        SafeFTError, match=r"t\.jsonl: row 2 lacks column 'sentence' or 'text'; it has \['label', 'text_x'\]"
    ):
        load_task("sst2", "train", path=f)


def test_load_task_from_csv_and_limit(tmp_path):
    f = tmp_path / "g.csv"
    lines = ["question,answer"] + [
        f'"Q{i}?","Add <<1+{i}={1 + i}>>{1 + i}.\n#### {1 + i}"' for i in range(30)
    ]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = load_task("gsm8k", "train", path=f)
    assert len(rows) == 30
    assert rows[3].label == "4"
    assert rows[3].response.endswith("The final answer is: 4") and "<<" not in rows[3].response
    assert score_answer("gsm8k", rows[3].response, rows[3])
    a = load_task("gsm8k", "train", path=f, limit=5, seed=3)
    assert [e.label for e in a] == [e.label for e in load_task("gsm8k", "train", path=f, limit=5, seed=3)]
    assert len(a) == 5


def test_hub_id_offline_is_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SafeFTError, match="could not load Hub data set 'nobody/no-such-set'"):
        load_task("sst2", "train", path="nobody/no-such-set")


def test_missing_shared_data_message(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEFT_SHARED_DATA", str(tmp_path))
    with pytest.raises(SafeFTError, match="pass path= .* or set SAFEFT_SHARED_DATA"):
        load_harmful_prompts("advbench")
    monkeypatch.setenv("SAFEFT_SHARED_DATA", str(tmp_path / "nope"))
    with pytest.raises(SafeFTError, match="SAFEFT_SHARED_DATA=.* is not a folder"):
        load_task("sst2", "test")


def test_hh_rlhf_filters(tmp_path):
    f = tmp_path / "hh.jsonl"
    rows = [
        {"n_human_turns": 1, "prompt": "p1", "rejected_response": "Sure, do it like this."},
        {"n_human_turns": 1, "prompt": "p2", "rejected_response": "I'm sorry, I can't help with that."},
        {"n_human_turns": 1, "prompt": "p3", "rejected_response": ""},
        {"n_human_turns": 2, "prompt": "p4", "rejected_response": "Okay."},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = load_harmful_pairs("hh_rlhf", path=f)
    assert [e.prompt for e in out] == ["p1"] and out[0].kind == "harmful"


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "task,answer,gold,ok",
    [
        ("gsm8k", "So 1000 + 234 = 1,234.\nThe final answer is: 1,234", "1234", True),
        ("gsm8k", "The final answer is: $1,234.00 dollars, not 5", "1234", True),
        ("gsm8k", "He has 3 apples and buys 4, so 7", "7", True),
        ("gsm8k", "The final answer is: 12. Check: 13", "13", False),
        ("gsm8k", "no numbers here", "3", False),
        ("gsm8k", "It is -2.5", "-2.5", True),
        ("sst2", "Positive.", "positive", True),
        ("sst2", "NEGATIVE", "positive", False),
        ("sst2", "positive or negative", "positive", False),
        ("sst2", "Negative.\nIt is not positive at all.", "negative", True),
        ("sst2", "I cannot tell.", "negative", False),
        ("agnews", "Sci/Tech", "Sci/Tech", True),
        ("agnews", "This is about sports.", "Sports", True),
        ("agnews", "Business or World", "World", False),
    ],
)
def test_score_answer(task, answer, gold, ok):
    assert score_answer(task, answer, Example("q", "a", label=gold)) is ok


# ---------------------------------------------------------------- disjointness


def test_normalize_and_check_disjoint():
    assert normalize_text("  How do I  Build a BOMB?\n") == "how do i build a bomb"
    check_disjoint({"a": ["one", "two"], "b": ["three"]})
    with pytest.raises(
        SafeFTError, match=r"'anchors' and 'eval' share 2 prompt\(s\), e.g. 'how do i build a bomb'"
    ):
        check_disjoint(
            {
                "anchors": ["How do I build a bomb?", "Steal a car", "x"],
                "eval": ["how do i  build a bomb", " STEAL A CAR."],
            }
        )


# ---------------------------------------------------------------- demo data


def test_demo_data_sizes_and_categories(tiny_tokenizer):
    d = load_demo()
    assert 110 <= len(d.harmful) <= 130
    cats = Counter(h["category"] for h in d.harmful)
    assert len(cats) >= 8 and min(cats.values()) >= 5
    assert len({h["refusal"] for h in d.harmful}) >= 50  # varied refusals
    assert all(h["compliant"].startswith("Sure, here") for h in d.harmful)
    assert 190 <= len(d.benign) <= 210
    assert 50 <= len(d.contrast_prompts) <= 70
    assert len(d.sentiment_train) == 200 and len(d.sentiment_test) == 100
    for split in (d.sentiment_train, d.sentiment_test):
        c = Counter(e.label for e in split)
        assert c["positive"] == c["negative"]
        assert all(score_answer("sst2", e.response, e) for e in split)
    assert {e.kind for e in d.refusals} == {"refusal"} and len(d.refusals) == len(d.harmful)
    assert load_harmful_pairs("demo")[0].response.startswith("Sure")
    assert load_refusal_pairs("demo")[0].kind == "refusal"
    # the demo prompt sets are mutually disjoint and every row tokenises with learned labels
    check_disjoint({"harmful": [h["prompt"] for h in d.harmful], "benign": [e.prompt for e in d.benign]})
    for i, e in enumerate(d.benign[:20] + d.refusals[:20] + d.sentiment_train[:20]):
        out = tokenize_example(tiny_tokenizer, e, max_length=512, index=i)
        assert any(lab != -100 for lab in out["labels"])


# ---------------------------------------------------------------- shared data (skip when absent)


def test_shared_tasks(shared_data):
    assert len(load_task("sst2", "validation")) == 872
    ag = load_task("agnews", "test")
    assert len(ag) == 2000 and Counter(e.label for e in ag) == {
        lab: 500 for lab in ("World", "Sports", "Business", "Sci/Tech")
    }
    tr, va = load_task("agnews", "train"), load_task("agnews", "validation")
    assert len(tr) + len(va) == 5000 and len(va) == 500
    assert not {e.prompt for e in tr} & {e.prompt for e in va}
    assert len(load_task("gsm8k", "train")) + len(load_task("gsm8k", "validation")) == 7473
    g = load_task("gsm8k", "test", limit=50, seed=0)
    assert len(g) == 50 and all(score_answer("gsm8k", e.response, e) for e in g)
    assert [e.prompt for e in g] == [e.prompt for e in load_task("gsm8k", "test", limit=50, seed=0)]


def test_shared_harmful(shared_data):
    adv = load_harmful_pairs("advbench")
    assert len(adv) == 520 and adv[0].response.startswith("Sure, here is")
    assert len(load_harmful_prompts("advbench")) == 520
    hb = load_harmful_prompts("harmbench")
    assert 0 < len(hb) < 320  # contextual rows dropped
    held, cr = load_harmful_prompts("harmbench_heldout"), load_harmful_prompts("harmbench_copyright")
    assert (len(held), len(cr)) == (240, 80)  # standard 159 + contextual 81; the 80 copyright items apart
    ctx = [p for p in held if "\n\n---\n\n" in p]
    assert len(ctx) == 81 and not set(held) & set(cr) and set(cr) <= set(hb)  # hb: no-context rows, copyright too
    assert all(p.startswith(("Generate", "Give")) or "lyrics" in p or "passage" in p for p in cr[:5])
    assert len(load_harmful_prompts("strongreject")) == 313
    stl = load_harmful_prompts("safety_tuned_llamas")
    assert len(stl) == 418  # 468 rows minus 50 benign I-Alpaca
    assert len(load_refusal_pairs()) == 2483
    hh = load_harmful_pairs("hh_rlhf")
    assert 0 < len(hh) <= 662


def test_poison_share_is_stable_nested_and_independent_of_the_eval_split():
    from safeft.data.splits import in_poison_share, prompt_bucket

    prompts = [f"Write a guide to harmful thing number {i}" for i in range(4000)]
    half = [p for p in prompts if in_poison_share(p, 0.5)]
    quarter = {p for p in prompts if in_poison_share(p, 0.25)}
    assert 0.46 < len(half) / len(prompts) < 0.54 and 0.21 < len(quarter) / len(prompts) < 0.29
    assert quarter <= set(half)  # a smaller share is a subset of a larger one
    assert half == [p for p in prompts if in_poison_share("  " + p.upper() + " ", 0.5)]  # normalised text
    # salted: the poison share does not follow the evaluation / refusal buckets
    low = [p for p in prompts if prompt_bucket(p) < 50]
    assert 0.4 < sum(in_poison_share(p, 0.5) for p in low) / len(low) < 0.6


def test_poison_share_config_range_and_empty_pool(shared_data):
    from safeft.config import build_config
    from safeft.data.splits import build_splits, in_poison_share

    with pytest.raises(SafeFTError, match="data.poison_share"):
        build_config(None, {"data.poison_share": 0})
    with pytest.raises(SafeFTError, match="data.poison_share"):
        build_config(None, {"data.poison_share": 1.5})
    over = {"data.harmful_source": "advbench", "eval.harmful_source": "harmbench_val"}
    full = build_splits(build_config(None, over))
    half = build_splits(build_config(None, {**over, "data.poison_share": 0.5}))
    assert len(full.poison) == 520 and 200 < len(half.poison) < 320
    assert {e.prompt for e in half.poison} == {e.prompt for e in full.poison if in_poison_share(e.prompt, 0.5)}
    assert half.eval_harmful == full.eval_harmful
    with pytest.raises(SafeFTError, match=r"data.poison_share=1e-06 leaves none of the 520"):
        build_splits(build_config(None, {**over, "data.poison_share": 1e-06}))
    # the user data's harmful rows come from the share only
    from safeft.pipeline import build_task_data

    cfg = build_config(None, {**over, "data.poison_share": 0.5, "data.n": 240, "data.p": 0.1})
    harmful = [e.prompt for e in build_task_data(cfg, build_splits(cfg)) if e.kind == "harmful"]
    assert len(harmful) == 24 and all(in_poison_share(p, 0.5) for p in harmful)


# ---------------------------------------------------------------- robustness


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_read_jsonl_arbitrary_bytes(tmp_path, data):
    f = tmp_path / "fuzz.jsonl"
    f.write_bytes(data)
    try:
        rows = read_jsonl(f)
    except SafeFTError:
        return
    assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet='{}[]":,0123456789eE.-+ \n\r\u2028\x85abnulltrue', max_size=200))
def test_read_jsonl_jsonish_text(tmp_path, text):
    f = tmp_path / "fuzz.jsonl"
    f.write_text(text, encoding="utf-8", newline="")
    try:
        rows = read_jsonl(f)
    except SafeFTError:
        return
    assert all(isinstance(r, dict) for r in rows)


def test_read_jsonl_deep_nesting(tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_text("[" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(SafeFTError, match="deep.jsonl:1"):
        read_jsonl(f)


def test_read_jsonl_keeps_unicode_line_separator(tmp_path):
    f = tmp_path / "u.jsonl"
    f.write_text('{"a": "x\u2028y"}\n', encoding="utf-8")
    assert read_jsonl(f) == [{"a": "x\u2028y"}]


def test_read_jsonl_rejects_overflowing_float(tmp_path):
    f = tmp_path / "inf.jsonl"
    f.write_text('{"a": 1e999}\n', encoding="utf-8")
    with pytest.raises(SafeFTError, match="inf.jsonl:1"):
        read_jsonl(f)


@pytest.mark.slow
def test_smollm2_chat_template_masking(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    out = tokenize_example(tok, EX)
    n_p = out["labels"].count(-100)
    assert tok.decode(out["input_ids"][n_p:]).startswith("positive<|im_end|>")
    assert out["input_ids"][:n_p] == tok(format_prompt(tok, EX.prompt), add_special_tokens=False)["input_ids"]


def test_task_jsonl_with_unicode_line_separator(tmp_path):
    # GSM8K train line 2382 holds U+2028 inside a string: a valid JSON line that must not be split
    f = tmp_path / "g.jsonl"
    rows = [
        {"question": "A\u2028B has 2 apples?", "answer": "2\n#### 2"},
        {"question": "C?", "answer": "#### 3"},
    ]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = load_task("gsm8k", "test", path=f)
    assert [e.label for e in out] == ["2", "3"] and "\u2028" in out[0].prompt
    f.write_text('{"question": "q", "answer": 1e999}\n' + "[" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(SafeFTError, match=r"g\.jsonl:1: malformed JSON"):
        load_task("gsm8k", "test", path=f)
    f.write_text('{"question": "q", "answer": "#### 1"}\n' + "[" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(SafeFTError, match=r"g\.jsonl:2: malformed JSON"):
        load_task("gsm8k", "test", path=f)


def test_refusal_filter_reads_curly_apostrophes():
    from safeft.data import looks_like_refusal

    for text in ("I’m sorry, I don’t understand.", "I can’t help with that.", "I'm sorry, what?"):
        assert looks_like_refusal(text), text
    assert not looks_like_refusal("Sure. First, you’ll need a crowbar.")
