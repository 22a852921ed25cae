"""The one record type every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("task", "harmful", "refusal", "benign")


@dataclass
class Example:
    """One prompt/response pair.

    ``prompt`` is the raw user turn and ``response`` the raw assistant turn to learn (no template applied);
    ``kind`` is one of ``"task" | "harmful" | "refusal" | "benign"``; ``label`` is the gold answer used for accuracy
    (``"positive"``, ``"World"``, ``"42"``, ...); ``meta`` holds provenance (``source``, ``row``, ...)."""

    prompt: str
    response: str
    kind: str = "task"
    label: str | None = None
    meta: dict = field(default_factory=dict)
