"""Fine-tuning tasks (SST-2, AG News, GSM8K): loading, the instruction text, and answer scoring.

Splits come from ``<shared data>/tasks/<name>_<split>.jsonl``. SST-2 has train / validation / test files.
AG News and GSM8K have only train / test files, so their ``validation`` split is carved deterministically out of
train: the train rows are shuffled with a fixed seed (``VALIDATION_SEED``, independent of the ``seed`` argument)
and the last 10% become ``validation``; ``train`` is the remaining 90% in file order. Choose hyperparameters on
``validation``, report on ``test``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path
from typing import Any

from safeft.errors import SafeFTError
from safeft.io import read_table

from .types import Example

TASKS = ("sst2", "agnews", "gsm8k")
SST2_LABELS = ("negative", "positive")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
VALIDATION_SEED = 20240601
VALIDATION_FRACTION = 0.1
_FILES = {
    "sst2": {"train": "sst2_train", "validation": "sst2_validation", "test": "sst2_test"},
    "agnews": {"train": "agnews_train", "test": "agnews_test"},
    "gsm8k": {"train": "gsm8k_train", "test": "gsm8k_test"},
}
_TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def shared_data_dir() -> Path | None:
    """Folder of the shared real data sets: ``$SAFEFT_SHARED_DATA``, else the first existing ``../shared/data``
    relative to the working directory or to the repository root; None when none exists.

    Raises SafeFTError when ``$SAFEFT_SHARED_DATA`` is set to a folder that does not exist."""
    env = os.environ.get("SAFEFT_SHARED_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise SafeFTError(f"SAFEFT_SHARED_DATA={env} is not a folder; fix or unset it")
        return p
    repo_root = Path(__file__).resolve().parents[3]
    for cand in (Path.cwd().parent / "shared" / "data", repo_root.parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def require_shared_file(rel: str, what: str) -> Path:
    """``shared_data_dir() / rel`` or a SafeFTError telling the user to pass ``path=`` or set SAFEFT_SHARED_DATA."""
    root = shared_data_dir()
    if root is None:
        raise SafeFTError(
            f"{what}: no shared data folder found (looked for ../shared/data); "
            f"pass path= (--data-path) or set SAFEFT_SHARED_DATA"
        )
    p = root / rel
    if not p.is_file():
        raise SafeFTError(f"{what}: {p} not found; pass path= (--data-path) or set SAFEFT_SHARED_DATA")
    return p


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"{s} overflows to a non-finite number")
    return v


def _read_jsonl(path: Path) -> list[dict]:
    """Like :func:`safeft.io.read_jsonl` but splits records on "\\n" only (GSM8K train holds U+2028 inside
    strings, which ``str.splitlines`` would cut), and maps deep nesting and float overflow to SafeFTError."""
    if not path.is_file():
        raise SafeFTError(f"{path}: file not found; check the path")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SafeFTError(
            f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8"
        ) from None
    rows = []
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_float=_finite_float, parse_constant=_finite_float)
        except (ValueError, RecursionError) as e:
            raise SafeFTError(
                f"{path}:{i}: malformed JSON ({e}); each line must be one JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise SafeFTError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def read_rows(path: str | os.PathLike, split: str | None = None) -> tuple[list[dict], str]:
    """Rows of a local table (.jsonl/.json/.csv/.parquet) or of a Hub data set id; returns (rows, source name)."""
    p = Path(path)
    if p.suffix.lower() == ".jsonl":
        return _read_jsonl(p), str(p)
    if p.is_file() or p.suffix.lower() in _TABLE_SUFFIXES:
        return read_table(p), str(p)
    name = str(path)
    if p.exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise SafeFTError(f"{name}: not a data file (.jsonl/.json/.csv/.parquet) nor a Hub data set id")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown id, unknown split: all user-fixable
        raise SafeFTError(
            f"could not load Hub data set {name!r} split {split!r} ({type(e).__name__}: {str(e)[:200]}); "
            f"when offline download it elsewhere and pass a local .jsonl/.csv/.parquet path"
        ) from None
    return [dict(r) for r in ds], f"{name}[{split}]"


def _pick(row: dict, names: tuple[str, ...], source: str, i: int) -> Any:
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    raise SafeFTError(
        f"{source}: row {i} lacks column {' or '.join(repr(n) for n in names)}; it has {sorted(row)}. "
        f"Rename the column or pass another file"
    )


def task_prompt(task: str, text: str) -> str:
    """The user-turn instruction for one task item (``text`` = sentence, article or math question)."""
    if task == "sst2":
        return (
            "Classify the sentiment of the following sentence.\n"
            f"Sentence: {text.strip()}\n"
            "Answer with one word: positive or negative."
        )
    if task == "agnews":
        return (
            "Classify the topic of the following news article.\n"
            f"Article: {text.strip()}\n"
            "Answer with one word: World, Sports, Business or Sci/Tech."
        )
    if task == "gsm8k":
        return f'{text.strip()}\nSolve it step by step and end with "The final answer is: <number>".'
    raise SafeFTError(f"task={task!r} is unknown; choose one of {', '.join(TASKS)}")


def _sst2_label(v: Any, source: str, i: int) -> str:
    s = str(v).strip().lower()
    if s in ("0", "negative", "neg"):
        return "negative"
    if s in ("1", "positive", "pos"):
        return "positive"
    raise SafeFTError(f"{source}: row {i} has label {v!r}; SST-2 labels must be 0/1 or negative/positive")


def _agnews_label(row: dict, source: str, i: int) -> str:
    if "label_text" in row and row["label_text"] is not None:
        s = str(row["label_text"]).strip()
    else:
        s = str(_pick(row, ("label",), source, i)).strip()
    if s.isdigit() and int(s) < 4:
        return AGNEWS_LABELS[int(s)]
    for lab in AGNEWS_LABELS:
        if s.lower() == lab.lower():
            return lab
    raise SafeFTError(
        f"{source}: row {i} has label {s!r}; AG News labels are 0-3 or {', '.join(AGNEWS_LABELS)}"
    )


_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_response(answer: str) -> tuple[str, str]:
    """(response text, final number) from a GSM8K answer: calculator annotations ``<<...>>`` are removed and the
    ``#### N`` line becomes ``The final answer is: N``."""
    body, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError("no '####' line")
    final = final.strip().replace(",", "")
    body = _CALC.sub("", body).rstrip()
    return f"{body}\nThe final answer is: {final}", final


def _row_to_example(task: str, row: dict, source: str, i: int) -> Example:
    meta = {"source": source, "row": i}
    if task == "sst2":
        text = str(_pick(row, ("sentence", "text"), source, i))
        label = _sst2_label(_pick(row, ("label",), source, i), source, i)
        return Example(task_prompt(task, text), label, "task", label, meta)
    if task == "agnews":
        text = str(_pick(row, ("text",), source, i))
        label = _agnews_label(row, source, i)
        return Example(task_prompt(task, text), label, "task", label, meta)
    question = str(_pick(row, ("question",), source, i))
    answer = str(_pick(row, ("answer",), source, i))
    try:
        response, final = gsm8k_response(answer)
    except ValueError:
        raise SafeFTError(f"{source}: row {i} answer has no '#### <number>' line") from None
    return Example(task_prompt(task, question), response, "task", final, meta)


def _validation_indices(n: int) -> set[int]:
    order = list(range(n))
    random.Random(VALIDATION_SEED).shuffle(order)
    n_val = max(1, int(round(VALIDATION_FRACTION * n)))
    return set(order[n - n_val :])


def load_task(
    name: str, split: str, path: str | os.PathLike | None = None, limit: int | None = None, seed: int = 0
) -> list[Example]:
    """Load a task split as Examples (``kind="task"``, ``label`` = gold answer, ``response`` = target text).

    ``name`` ∈ {"sst2", "agnews", "gsm8k"}; ``split`` ∈ {"train", "validation", "test"}. ``path`` overrides the
    file (jsonl / csv / parquet, or a Hub data set id loaded with ``datasets``; ``split`` then names the Hub split).
    ``limit`` keeps a seeded random subsample of that many rows (file order kept; all rows if fewer)."""
    if name not in TASKS:
        raise SafeFTError(f"task={name!r} is unknown; choose one of {', '.join(TASKS)}")
    if split not in ("train", "validation", "test"):
        raise SafeFTError(f"split={split!r} is unknown; use train, validation or test")
    if limit is not None and limit < 1:
        raise SafeFTError(f"limit={limit} must be ≥ 1")
    carve = None
    if path is not None:
        rows, source = read_rows(path, split)
    else:
        files = _FILES[name]
        carve = split if split not in files else None
        fname = files.get(split, files["train"])
        p = require_shared_file(f"tasks/{fname}.jsonl", f"task {name} split {split}")
        rows, source = read_rows(p)
    examples = [_row_to_example(name, r, source, i) for i, r in enumerate(rows, start=1)]
    if path is None and name != "sst2":
        val = _validation_indices(len(examples))
        if carve == "validation":
            examples = [e for j, e in enumerate(examples) if j in val]
        elif split == "train":
            examples = [e for j, e in enumerate(examples) if j not in val]
    for e in examples:
        e.meta["split"] = split
    if limit is not None and limit < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
        examples = [examples[j] for j in keep]
    return examples


# ---------------------------------------------------------------- scoring

_LABEL_PATTERNS = {
    "sst2": [("negative", r"\bnegative\b"), ("positive", r"\bpositive\b")],
    "agnews": [
        ("World", r"\bworld\b"),
        ("Sports", r"\bsports?\b"),
        ("Business", r"\bbusiness\b"),
        ("Sci/Tech", r"\bsci\s*[/&-]?\s*tech\b|\bscience\b|\btechnology\b"),
    ],
}
_NUM = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_FINAL = re.compile(r"final answer is\s*:?\s*\$?\s*(" + _NUM + ")", re.IGNORECASE)


def _labels_in(task: str, text: str) -> set[str]:
    return {lab for lab, pat in _LABEL_PATTERNS[task] if re.search(pat, text, re.IGNORECASE)}


def predict_label(task: str, answer_text: str) -> str | None:
    """The label word an answer gives: look at the first non-empty line; if it names exactly one label that is
    the prediction, if it names several the answer is ambiguous (None); if none, apply the same rule to the whole
    text."""
    lines = [ln for ln in answer_text.splitlines() if ln.strip()]
    for chunk in ([lines[0]] if lines else []) + [answer_text]:
        found = _labels_in(task, chunk)
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None
    return None


def _to_number(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def extract_number(answer_text: str) -> float | None:
    """The number after "The final answer is:", else the last number in the text (commas allowed), else None."""
    m = _FINAL.search(answer_text)
    if m:
        return _to_number(m.group(1))
    nums = re.findall(_NUM, answer_text)
    return _to_number(nums[-1]) if nums else None


def score_answer(task: str, answer_text: str, example: Example | str) -> bool:
    """True when ``answer_text`` gives the gold answer of ``example`` (an Example or the label string).

    sst2 / agnews: the label word of :func:`predict_label` (case-insensitive; ambiguous → False).
    gsm8k: :func:`extract_number` equals the gold number (numeric comparison, |a − b| < 1e-6)."""
    gold = example.label if isinstance(example, Example) else example
    if gold is None:
        raise SafeFTError(f"cannot score a {task} answer: the example has no label")
    if task in ("sst2", "agnews"):
        pred = predict_label(task, answer_text)
        return pred is not None and pred.lower() == str(gold).lower()
    if task == "gsm8k":
        got, want = extract_number(answer_text), _to_number(str(gold))
        return got is not None and want is not None and abs(got - want) < 1e-6
    raise SafeFTError(f"task={task!r} is unknown; choose one of {', '.join(TASKS)}")
