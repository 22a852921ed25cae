"""Judges: three outcomes per (prompt, answer) — ``refusal`` / ``harmful`` / ``other`` (SPEC §5).

``content`` (default) is the learned offline judge; ``keyword`` the refusal-keyword baseline; the model judges
(``harmbench:``, ``llamaguard:``, ``wildguard:``, ``beaverdam:``, ``classifier:``, ``guard:``) load a local folder or
a Hub id. :func:`get_judge` builds one from a spec string; docs/judges.md says what each measures and how well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safeft.errors import SafeFTError
from safeft.eval.judges.base import OUTCOMES, Judge, harm_only_outcomes
from safeft.eval.judges.hf import (
    BEAVERDAM_FORMAT,
    HARMBENCH_CLS_PROMPT,
    WILDGUARD_PROMPT,
    ClassifierJudge,
    GuardJudge,
    HarmBenchJudge,
    LlamaGuardJudge,
    WildGuardJudge,
    parse_guard_verdict,
    parse_wildguard,
    unsafe_probs,
)
from safeft.eval.judges.keyword import REFUSAL_PHRASES, KeywordJudge

MODEL_JUDGES: dict[str, Any] = {
    "classifier": ClassifierJudge,
    "beaverdam": ClassifierJudge,
    "guard": GuardJudge,
    "llamaguard": LlamaGuardJudge,
    "harmbench": HarmBenchJudge,
    "wildguard": WildGuardJudge,
}
JUDGE_NAMES = ("content", "keyword", *MODEL_JUDGES)


def get_judge(spec: str | None = "content", **kwargs: Any) -> Judge:
    """Build a judge from a spec string.

    * ``"content"`` (or None / ""): the learned content judge; ``"content:PATH"`` loads another head file.
    * ``"keyword"``: :class:`KeywordJudge`.
    * ``"KIND:PATH_OR_HUB_ID"`` with KIND one of ``harmbench``, ``llamaguard``, ``wildguard``, ``beaverdam`` (a
      sequence classifier read in beaver-dam's format), ``classifier``, ``guard``.
    * a bare local model folder: classifier when its ``config.json`` architectures end in
      ``ForSequenceClassification``, else guard.

    ``kwargs`` go to the judge's constructor. Raises :class:`SafeFTError` for an unknown spec or a missing folder.
    """
    if spec is None or spec.strip() == "" or spec.strip().lower() == "content":
        from safeft.eval.judges.content import ContentJudge

        return ContentJudge(**kwargs)
    spec = spec.strip()
    if spec.lower() == "keyword":
        return KeywordJudge(**kwargs)
    kind, sep, rest = spec.partition(":")
    kind = kind.lower()
    if sep and kind == "content":
        from safeft.eval.judges.content import ContentJudge

        return ContentJudge(weights=rest, **kwargs)
    if sep and kind in MODEL_JUDGES:
        if not rest:
            raise SafeFTError(f"judge {spec!r}: give a folder or Hub id after '{kind}:', e.g. {kind}:/models/judge")
        if kind == "beaverdam":
            kwargs.setdefault("text_format", BEAVERDAM_FORMAT)
        return MODEL_JUDGES[kind](rest, **kwargs)
    p = Path(spec).expanduser()
    if not p.exists():
        raise SafeFTError(
            f"judge {spec!r}: not one of {', '.join(JUDGE_NAMES)} (use KIND:PATH for a model judge) nor an existing "
            "model folder; check the spelling or the path"
        )
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise SafeFTError(f"judge {spec!r}: {cfg_file} not found; pass a Hugging Face model folder")
    try:
        archs = json.loads(cfg_file.read_text(encoding="utf-8")).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise SafeFTError(f"judge {spec!r}: {cfg_file} is not valid JSON ({e})") from None
    if any(str(a).endswith("ForSequenceClassification") for a in archs):
        return ClassifierJudge(p, **kwargs)
    return GuardJudge(p, **kwargs)


__all__ = [
    "BEAVERDAM_FORMAT",
    "HARMBENCH_CLS_PROMPT",
    "JUDGE_NAMES",
    "OUTCOMES",
    "REFUSAL_PHRASES",
    "WILDGUARD_PROMPT",
    "ClassifierJudge",
    "GuardJudge",
    "HarmBenchJudge",
    "Judge",
    "KeywordJudge",
    "LlamaGuardJudge",
    "WildGuardJudge",
    "get_judge",
    "harm_only_outcomes",
    "parse_guard_verdict",
    "parse_wildguard",
    "unsafe_probs",
]
