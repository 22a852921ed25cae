"""Poisoning mix (n task rows, a fraction p harmful) and prompt-set disjointness."""

from __future__ import annotations

import dataclasses
import random
import string
import unicodedata
from itertools import combinations

from safeft.errors import SafeFTError

from .types import Example


def mix_poison(task: list[Example], harmful: list[Example], n: int, p: float, seed: int) -> list[Example]:
    """``n`` training rows of which exactly ``round(p·n)`` (Python ``round``) are harmful.

    Task and harmful rows are sampled without replacement with ``random.Random(seed)`` and shuffled together;
    the same arguments always give the same list. Returned Examples are copies with ``kind`` set to
    ``"task"`` or ``"harmful"``. SafeFTError when p ∉ [0, 1], n < 1, or the inputs hold too few rows."""
    if not isinstance(p, (int, float)) or not (0.0 <= float(p) <= 1.0):
        raise SafeFTError(f"p={p} outside [0, 1]; the harmful fraction must be between 0 and 1")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SafeFTError(f"n={n} must be an integer ≥ 1")
    n_harm = round(p * n)
    n_task = n - n_harm
    if n_harm > len(harmful):
        raise SafeFTError(
            f"n={n}, p={p} needs {n_harm} harmful rows but the harmful data holds {len(harmful)}; "
            f"lower n or p, or add harmful data"
        )
    if n_task > len(task):
        raise SafeFTError(
            f"n={n}, p={p} needs {n_task} task rows but the task data holds {len(task)}; lower n or add task data"
        )
    rng = random.Random(seed)
    picked_task = [
        dataclasses.replace(task[i], kind="task", meta=dict(task[i].meta))
        for i in rng.sample(range(len(task)), n_task)
    ]
    picked_harm = [
        dataclasses.replace(harmful[i], kind="harmful", meta=dict(harmful[i].meta))
        for i in rng.sample(range(len(harmful)), n_harm)
    ]
    out = picked_task + picked_harm
    rng.shuffle(out)
    return out


def normalize_text(s: str) -> str:
    """Canonical form for de-duplication: NFKC, lowercase, whitespace runs → one space, punctuation and spaces
    stripped from both ends."""
    s = " ".join(unicodedata.normalize("NFKC", s).lower().split())
    i, j = 0, len(s)
    while i < j and (s[i] in string.whitespace or unicodedata.category(s[i]).startswith("P")):
        i += 1
    while j > i and (s[j - 1] in string.whitespace or unicodedata.category(s[j - 1]).startswith("P")):
        j -= 1
    return s[i:j]


def check_disjoint(named_sets: dict[str, list[str]]) -> None:
    """Raise SafeFTError when any two named prompt sets share a prompt after :func:`normalize_text`.

    The message names every overlapping pair of sets with its overlap count and one example."""
    norm = {name: {normalize_text(x) for x in items} - {""} for name, items in named_sets.items()}
    problems = []
    for a, b in combinations(named_sets, 2):
        common = norm[a] & norm[b]
        if common:
            problems.append(f"{a!r} and {b!r} share {len(common)} prompt(s), e.g. {min(common)[:80]!r}")
    if problems:
        raise SafeFTError(
            "prompt sets must be disjoint: "
            + "; ".join(problems)
            + ". Remove the shared prompts from one set"
        )
