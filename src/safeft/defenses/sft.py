"""Plain SFT: the null defense. No terms, no hooks: its loss equals the plain Trainer's loss exactly."""

from __future__ import annotations

from safeft.defenses.base import Defense, register_defense


@register_defense
class SFT(Defense):
    name = "sft"
    paper = "none (plain supervised fine-tuning, the undefended baseline)"
    artifacts = "none"
