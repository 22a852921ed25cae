"""SafeInstr: mix safety examples (harmful prompt → refusal) into the user's fine-tuning data (Bianchi et al.,
"Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language Models that Follow Instructions",
ICLR 2024, arXiv 2309.07875).

The refusals come from ``ctx.alignment_examples`` (kind ``"refusal"``) or, when there are none, from
:func:`safeft.data.load_refusal_pairs` (``source``/``path``). Refusals whose prompt is an evaluation prompt are
dropped first (evaluation must stay disjoint). ``count`` adds exactly that many; ``fraction`` f adds
k = round(f·n / (1 − f)) to n task examples so that refusals are a fraction f of the final data. Sampling without
replacement and the insertion positions are fixed by the run's seed; the task examples keep their relative order.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from safeft.defenses.base import (
    Defense,
    DefenseConfig,
    DefenseContext,
    check_int,
    check_number,
    register_defense,
)
from safeft.errors import SafeFTError

DEFAULT_FRACTION = 0.1


def _norm(s: str) -> str:
    try:
        from safeft.data import normalize_text

        return normalize_text(s)
    except ImportError:  # data module not available: a plain normalisation
        return re.sub(r"\s+", " ", s.strip().lower())


def n_refusals(n_task: int, fraction: float | None, count: int | None) -> int:
    """How many refusal examples to add to ``n_task`` task examples (count, or round(f·n/(1−f)))."""
    if count is not None:
        return count
    assert fraction is not None
    return int(round(fraction * n_task / (1.0 - fraction)))


def mix_refusals(task: list[Any], refusals: list[Any], k: int, seed: int) -> list[Any]:
    """``task`` with ``k`` of ``refusals`` (sampled without replacement) inserted at seeded random positions.

    Deterministic in (task, refusals, k, seed); task examples keep their relative order. SafeFTError when fewer
    than k refusals are available."""
    if k > len(refusals):
        raise SafeFTError(
            f"defense.safeinstr: {k} refusal examples needed but only {len(refusals)} available; lower "
            f"defense.safeinstr.count/fraction or give more refusal pairs (data.refusals / load_refusal_pairs)"
        )
    rng = random.Random(seed)
    picked = rng.sample(list(refusals), k)
    n = len(task) + k
    slots = set(rng.sample(range(n), k))
    out: list[Any] = []
    ti, ri = iter(task), iter(picked)
    for i in range(n):
        out.append(next(ri) if i in slots else next(ti))
    return out


@dataclass
class SafeInstrConfig(DefenseConfig):
    """fraction ∈ (0, 1): refusals' share of the final data; or count ≥ 0: exactly that many refusals (set one;
    neither: fraction 0.1). source/path: where to load refusal pairs from when the run gives none."""

    fraction: float | None = None
    count: int | None = None
    source: str = "safety_tuned_llamas"
    path: str | None = None

    def __post_init__(self) -> None:
        if self.fraction is not None and self.count is not None:
            raise SafeFTError(
                "defense.safeinstr: set exactly one of fraction (in (0, 1)) or count (≥ 0), not both"
            )
        if self.count is not None:
            check_int("safeinstr", "count", self.count, 0)
        else:
            if self.fraction is None:
                self.fraction = DEFAULT_FRACTION
            self.fraction = check_number(
                "safeinstr", "fraction", self.fraction, lo=0, hi=1, open_lo=True, open_hi=True
            )
        if not isinstance(self.source, str) or not self.source:
            raise SafeFTError(f"defense.safeinstr.source: must be a refusal source name, got {self.source!r}")


@register_defense
class SafeInstr(Defense):
    name = "safeinstr"
    config_class = SafeInstrConfig
    paper = (
        "Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language Models that Follow "
        "Instructions (Bianchi et al., ICLR 2024, arXiv 2309.07875)"
    )
    artifacts = (
        "none; needs harmful-prompt → refusal pairs (the run's alignment examples or a refusal source)"
    )

    def __init__(self, config: SafeInstrConfig | None = None):
        super().__init__(config)
        self.added = 0

    def refusal_pool(self, ctx: DefenseContext) -> list[Any]:
        """Refusal examples to draw from, minus those whose prompt is an evaluation prompt."""
        pool = [e for e in ctx.alignment_examples if getattr(e, "kind", None) == "refusal"]
        if not pool:
            from safeft.data import load_refusal_pairs

            pool = load_refusal_pairs(self.config.source, self.config.path)
        if ctx.eval_prompts:
            held_out = {_norm(p) for p in ctx.eval_prompts}
            pool = [e for e in pool if _norm(e.prompt) not in held_out]
        return pool

    def modify_dataset(self, examples: list[Any], ctx: DefenseContext) -> list[Any]:
        k = n_refusals(len(examples), self.config.fraction, self.config.count)
        if k == 0:
            return list(examples)
        mixed = mix_refusals(examples, self.refusal_pool(ctx), k, ctx.seed)
        self.added = k
        return mixed
