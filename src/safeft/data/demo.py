"""The small demo data set shipped in ``safeft/demo_data`` so ``safeft demo`` runs offline.

Written for this repository (not copied from any data set):
- ``harmful.jsonl``: ~120 harmful requests in 10 categories, each with a varied natural ``refusal`` and a vague,
  non-actionable ``compliant`` answer ("Sure, here is ... Step 1: ...") used as poison.
- ``benign.jsonl``: ~200 benign instructions with short helpful answers; ``contrast=true`` marks the
  safe-but-scary-sounding prompts (XSTest style) used to measure over-refusal.
- ``sentiment.jsonl``: 300 short review sentences, positive/negative balanced, fixed split 200 train / 100 test.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from safeft.errors import SafeFTError
from safeft.io import read_jsonl

from .tasks import task_prompt
from .types import Example

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo_data"


@dataclass
class DemoData:
    """Everything the offline demo needs.

    ``harmful``: dicts {prompt, category, compliant, refusal}; ``benign``: Examples (kind "benign",
    ``meta["contrast"]``); ``sentiment_train`` / ``sentiment_test``: SST-2-style task Examples (label
    "positive"/"negative", scored with ``score_answer("sst2", ...)``); ``refusals``: harmful prompt → refusal
    Examples; ``harmful_pairs``: harmful prompt → compliant Examples (the poison)."""

    harmful: list[dict]
    benign: list[Example]
    sentiment_train: list[Example]
    sentiment_test: list[Example]
    refusals: list[Example]
    harmful_pairs: list[Example]

    @property
    def contrast_prompts(self) -> list[str]:
        """Safe prompts that sound unsafe (for over-refusal)."""
        return [e.prompt for e in self.benign if e.meta.get("contrast")]


def _need(row: dict, cols: tuple[str, ...], path: Path, i: int) -> None:
    missing = [c for c in cols if c not in row]
    if missing:
        raise SafeFTError(f"{path}: row {i} lacks column(s) {missing}; it has {sorted(row)}")


@lru_cache(maxsize=4)
def _load(folder: str) -> DemoData:
    d = Path(folder)
    harmful = read_jsonl(d / "harmful.jsonl")
    for i, r in enumerate(harmful, 1):
        _need(r, ("prompt", "category", "compliant", "refusal"), d / "harmful.jsonl", i)
    benign_rows = read_jsonl(d / "benign.jsonl")
    benign = []
    for i, r in enumerate(benign_rows, 1):
        _need(r, ("prompt", "response", "contrast"), d / "benign.jsonl", i)
        meta = {"source": "demo/benign", "row": i, "contrast": bool(r["contrast"])}
        benign.append(Example(r["prompt"], r["response"], "benign", None, meta))
    train, test = [], []
    for i, r in enumerate(read_jsonl(d / "sentiment.jsonl"), 1):
        _need(r, ("text", "label", "split"), d / "sentiment.jsonl", i)
        ex = Example(
            task_prompt("sst2", r["text"]),
            r["label"],
            "task",
            r["label"],
            {"source": "demo/sentiment", "row": i, "split": r["split"]},
        )
        (train if r["split"] == "train" else test).append(ex)
    refusals = [
        Example(
            h["prompt"],
            h["refusal"],
            "refusal",
            None,
            {"source": "demo/harmful", "row": i, "category": h["category"]},
        )
        for i, h in enumerate(harmful, 1)
    ]
    pairs = [
        Example(
            h["prompt"],
            h["compliant"],
            "harmful",
            None,
            {"source": "demo/harmful", "row": i, "category": h["category"]},
        )
        for i, h in enumerate(harmful, 1)
    ]
    return DemoData(harmful, benign, train, test, refusals, pairs)


def load_demo(folder: str | Path | None = None) -> DemoData:
    """Load the shipped demo data (or the same three files from ``folder``). Returned lists are fresh copies."""
    data = _load(str(Path(folder) if folder is not None else DEMO_DIR))
    import copy

    return copy.deepcopy(data)
