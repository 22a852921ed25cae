"""Examples → tokenized training rows, and those rows as a dataset the Trainer reads."""

from __future__ import annotations

import torch

from safeft.data.formatting import tokenize_example
from safeft.errors import SafeFTError


class RowsDataset(torch.utils.data.Dataset):
    """Tokenized rows as a map-style dataset for the Trainer."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def tokenize_all(tokenizer, examples, template: str, max_length: int, source: str = "train data") -> list[dict]:
    """Every example tokenized (:func:`tokenize_example`); an error names ``source`` and the example's number."""
    out = []
    for i, ex in enumerate(examples):
        try:
            out.append(tokenize_example(tokenizer, ex, template=template, max_length=max_length))
        except SafeFTError as e:
            raise SafeFTError(f"{source}, example {i + 1}: {e}") from None
    return out
