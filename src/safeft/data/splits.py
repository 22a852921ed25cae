"""The prompt sets of one run, disjoint by construction: poison, held-out evaluation prompts, anchors, refusal data
for the defenses and for the alignment stage, harmless prompts, XSTest's safe prompts.

Refusal data and same-source harmful prompts are split by :func:`prompt_bucket`, a stable hash of the normalised
text, so the same prompt lands on the same side in every run and on every machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from safeft.errors import SafeFTError

if TYPE_CHECKING:
    from safeft.config import RunConfig


def _hash32(text: str, salt: str = "") -> int:
    """A stable 32-bit hash of ``salt`` + a prompt's normalised text (sha256, first 8 hex digits)."""
    from safeft.data import normalize_text

    return int(hashlib.sha256((salt + normalize_text(text)).encode("utf-8")).hexdigest()[:8], 16)


def prompt_bucket(text: str) -> int:
    """Stable bucket in [0, 100) of a prompt's normalised text: the same prompt lands in the same split always."""
    return _hash32(text) % 100


def in_poison_share(text: str, share: float) -> bool:
    """Whether a harmful prompt is in the ``data.poison_share`` part of its source: a stable hash of the normalised
    text, salted so that it is independent of :func:`prompt_bucket` (the evaluation / refusal splits)."""
    if share >= 1.0:
        return True
    return _hash32(text, "poison-share:") / 0xFFFFFFFF < share


@dataclass
class Splits:
    """Disjoint prompt sets of one run (checked on normalised text).

    poison: harmful prompt → compliant answer pairs the user data's harmful samples are drawn from (the poison
        pool: only the ``data.poison_share`` part of the source).
    eval_harmful: held-out harmful prompts for the harmful score.
    anchor_pool: harmful prompts defenses may use as anchors (CWAC), never evaluated on.
    refusal_pairs: harmful prompt → refusal pairs (PACT's responses, SafeInstr, Lisa's alignment data).
    align_refusals / benign: the alignment stage's training data.
    harmless_pool: harmless prompts (SAE training mix, feature ranking).
    """

    poison: list = field(default_factory=list)
    eval_harmful: list[str] = field(default_factory=list)
    anchor_pool: list[str] = field(default_factory=list)
    refusal_pairs: list = field(default_factory=list)
    align_refusals: list = field(default_factory=list)
    benign: list = field(default_factory=list)
    harmless_pool: list[str] = field(default_factory=list)
    xstest_safe: list[str] = field(default_factory=list)


def build_splits(cfg: RunConfig, need_poison: bool = True) -> Splits:
    """Build every prompt set for a run. Refusal data is split by a stable hash: buckets [0, 50) train the
    alignment stage, [50, 100) serve the defenses (anchors, PACT, SafeInstr, Lisa). Harmful prompts overlapping the
    evaluation set are dropped from every training-side set; the result is checked disjoint."""
    from safeft.data import (
        Example,
        check_disjoint,
        load_benign_pairs,
        load_demo,
        load_harmful_pairs,
        load_harmful_prompts,
        load_refusal_pairs,
        normalize_text,
        shared_data_dir,
    )

    s = Splits()
    demo_mode = cfg.data.task == "demo" or cfg.data.harmful_source == "demo" or cfg.eval.harmful_source == "demo"
    demo = load_demo() if demo_mode else None

    # evaluation prompts first: everything else is made disjoint from them
    if cfg.eval.harmful_source == "demo":
        s.eval_harmful = [h["prompt"] for h in demo.harmful if prompt_bucket(h["prompt"]) >= 70]
    elif cfg.eval.harmful_source == cfg.data.harmful_source:
        s.eval_harmful = [p for p in load_harmful_prompts(cfg.eval.harmful_source, cfg.eval.harmful_path) if prompt_bucket(p) >= 50]
    else:
        s.eval_harmful = load_harmful_prompts(cfg.eval.harmful_source, cfg.eval.harmful_path)
    held = {normalize_text(p) for p in s.eval_harmful}

    def keep(prompt: str) -> bool:
        return normalize_text(prompt) not in held

    if need_poison:
        if cfg.data.harmful_source == "demo":
            pairs = [Example(h["prompt"], h["compliant"], "harmful", None, {"category": h.get("category")}) for h in demo.harmful
                     if 50 <= prompt_bucket(h["prompt"]) < 70]
        elif cfg.data.harmful_source == cfg.eval.harmful_source:
            pairs = [e for e in load_harmful_pairs(cfg.data.harmful_source, cfg.data.harmful_path) if prompt_bucket(e.prompt) < 50]
        else:
            pairs = load_harmful_pairs(cfg.data.harmful_source, cfg.data.harmful_path)
        kept = [e for e in pairs if keep(e.prompt)]
        s.poison = [e for e in kept if in_poison_share(e.prompt, cfg.data.poison_share)]
        if kept and not s.poison:
            raise SafeFTError(
                f"data.poison_share={cfg.data.poison_share:g} leaves none of the {len(kept)} poison pairs of "
                f"data.harmful_source={cfg.data.harmful_source}: raise it (1 = all)"
            )

    if demo_mode:
        refusals = [Example(h["prompt"], h["refusal"], "refusal", None, {"category": h.get("category")}) for h in demo.harmful
                    if prompt_bucket(h["prompt"]) < 50]
        benign = load_benign_pairs("demo")
    else:
        refusals = load_refusal_pairs("safety_tuned_llamas")
        benign = load_benign_pairs("demo")
        root = shared_data_dir()
        if root is not None and (root / "overrefusal" / "xstest.csv").is_file():
            from safeft.io import read_csv

            s.xstest_safe = [r["prompt"] for r in read_csv(root / "overrefusal" / "xstest.csv") if r.get("label") == "safe"]
    poison_prompts = {normalize_text(e.prompt) for e in s.poison}
    refusals = [e for e in refusals if keep(e.prompt) and normalize_text(e.prompt) not in poison_prompts]
    if demo_mode:
        # the demo is small: the alignment stage and the defenses share the refusal set (never the eval set)
        s.align_refusals = refusals
        s.refusal_pairs = refusals
    else:
        s.align_refusals = [e for e in refusals if prompt_bucket(e.prompt) < 50]
        s.refusal_pairs = [e for e in refusals if prompt_bucket(e.prompt) >= 50]
    s.anchor_pool = [e.prompt for e in s.refusal_pairs]
    s.benign = benign
    s.harmless_pool = [e.prompt for e in benign if not e.meta.get("contrast")]
    if not s.xstest_safe and demo is not None:
        s.xstest_safe = [p for p in demo.contrast_prompts if prompt_bucket(p) >= 70]
        # contrast prompts used for over-refusal are not trained on
        held_c = {normalize_text(p) for p in s.xstest_safe}
        s.benign = [e for e in s.benign if normalize_text(e.prompt) not in held_c]
    sets = {"eval_harmful": s.eval_harmful, "anchor_pool": s.anchor_pool}
    if s.poison:
        sets["poison"] = [e.prompt for e in s.poison]
    check_disjoint(sets)
    return s


def subsample(items: list, n: int, seed: int) -> list:
    """``n`` of ``items`` drawn without replacement by ``seed``, kept in their original order (all of them when
    ``n`` is 0 or at least their number)."""
    if n <= 0 or n >= len(items):
        return list(items)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(items), generator=g)[:n].tolist()
    return [items[i] for i in sorted(idx)]
