"""Anchors: harmful prompts that θ₀ refuses, from several sources, disjoint from the poison and the evaluation
prompts (normalised text and near-duplicates), judged on θ₀'s own greedy answers; and their split into the sets
each part of CWAC uses.

Pure functions; θ₀'s answers and the judge come in as callables (``select_anchors``), θ₀'s first-token gaps as
numbers (``thinnest``; read by :func:`safeft.defenses.cwac.common.first_token_gaps`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from safeft.defenses.cwac.common import norm_text
from safeft.errors import SafeFTError

SHINGLE = 5  # characters per shingle
CONTAINMENT = 0.8  # near-duplicate when ≥ 80% of the shorter text's shingles are in the longer one ...
MIN_SHINGLES_CONTAINMENT = 20  # ... and the shorter text has at least this many shingles (≈ 24 characters)
# anchor split (fractions of the anchors, disjoint): feature scoring, baselines (the loss), causal check (held out);
# the weight subspace uses every anchor outside the causal-check set
SPLIT = {"score": 0.35, "baseline": 0.35, "causal": 0.30}
MIN_BASELINE, MIN_CAUSAL = 60, 50

Outcomes = Callable[[list[str], list[str]], list[str]]


# ---- sources ------------------------------------------------------------------------------------------------------
def load_sources(
    sources: Sequence[str], pool: Sequence[str], log: Callable[[str], None] = print
) -> dict[str, list[str]]:
    """``{source: prompts}``: ``"pool"`` is the run's anchor pool (``ctx.anchor_pool``); any other name is read
    with :func:`safeft.data.load_harmful_prompts`. A shared-data source that is missing is skipped with a note;
    an unknown name is an error naming the field."""
    from safeft.data import load_harmful_prompts

    out: dict[str, list[str]] = {}
    for s in sources:
        if s == "pool":
            out[s] = [p for p in pool if p and p.strip()]
            continue
        try:
            out[s] = load_harmful_prompts(s)
        except SafeFTError as e:
            if "unknown" in str(e):
                raise SafeFTError(f"defense.cwac.anchor_sources: {e}") from None
            log(f"CWAC note: anchor source {s!r} skipped ({e})")
    if not any(out.values()):
        raise SafeFTError(
            f"CWAC: no anchor candidates: defense.cwac.anchor_sources={list(sources)} gave no prompts "
            f"(pool empty and shared data absent?)"
        )
    return out


def interleave(by_source: dict[str, list[str]], seed: int) -> list[tuple[str, str]]:
    """Round-robin merge of the sources, each in a seeded random order: ``[(source, prompt), ...]``. Checking
    candidates in this order makes every source contribute anchors from the first chunk on."""
    g = torch.Generator().manual_seed(int(seed))
    lists = []
    for s, prompts in by_source.items():
        order = torch.randperm(len(prompts), generator=g).tolist()
        lists.append([(s, prompts[i]) for i in order])
    out: list[tuple[str, str]] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


# ---- near-duplicates -------------------------------------------------------------------------------------------------
def shingles(text: str, n: int = SHINGLE) -> set[str]:
    """Character n-grams of the normalised text (the whole text when shorter than n)."""
    t = norm_text(text)
    return {t[i : i + n] for i in range(max(1, len(t) - n + 1))}


def _incidence(sets: list[set[str]], vocab: dict[str, int]) -> torch.Tensor:
    rows, cols = [], []
    for i, s in enumerate(sets):
        for g in s:
            rows.append(i)
            cols.append(vocab.setdefault(g, len(vocab)))
    idx = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
    return idx


def near_duplicate_matrix(
    a: Sequence[str], b: Sequence[str], threshold: float, chunk: int = 2048
) -> torch.Tensor:
    """``[len(a), len(b)]`` bool: pair (i, j) is a near-duplicate when the Jaccard similarity of their
    character-5-gram sets is ≥ ``threshold``, or when ≥ 80% of the shorter one's shingles occur in the longer one
    and it has ≥ 20 shingles (one prompt wrapped in or extended by another). Sparse products: a few seconds for
    thousands × thousands of prompts."""
    sa, sb = [shingles(x) for x in a], [shingles(x) for x in b]
    if not sa or not sb:
        return torch.zeros(len(sa), len(sb), dtype=torch.bool)
    vocab: dict[str, int] = {}
    ia, ib = _incidence(sa, vocab), _incidence(sb, vocab)
    V = len(vocab)
    na = torch.tensor([len(s) for s in sa], dtype=torch.float32)
    nb = torch.tensor([len(s) for s in sb], dtype=torch.float32)
    out = torch.empty(len(sa), len(sb), dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's beta-state notices about sparse tensors
        mb = torch.sparse_coo_tensor(ib, torch.ones(ib.shape[1]), (len(sb), V)).coalesce().t().coalesce()
        for s0 in range(0, len(sa), chunk):
            keep = (ia[0] >= s0) & (ia[0] < s0 + chunk)
            sub = ia[:, keep].clone()
            sub[0] -= s0
            n = min(chunk, len(sa) - s0)
            ma = torch.sparse_coo_tensor(sub, torch.ones(sub.shape[1]), (n, V)).coalesce()
            inter = torch.sparse.mm(ma, mb).to_dense()
            a_n = na[s0 : s0 + n, None]
            jac = inter / (a_n + nb[None, :] - inter).clamp_min(1)
            short = torch.minimum(a_n.expand_as(inter), nb[None, :].expand_as(inter))
            cont = (short >= MIN_SHINGLES_CONTAINMENT) & (inter >= CONTAINMENT * short)
            out[s0 : s0 + n] = (jac >= threshold) | cont
    return out


def near_duplicate_of(candidates: Sequence[str], references: Sequence[str], threshold: float) -> list[bool]:
    """True for each candidate that is a near-duplicate (:func:`near_duplicate_matrix`) of any reference."""
    if not candidates or not references:
        return [False] * len(candidates)
    return near_duplicate_matrix(candidates, references, threshold).any(1).tolist()


def dedupe_near(texts: Sequence[str], threshold: float) -> list[int]:
    """Indices kept by a greedy pass in order: a text is dropped when it is a near-duplicate of an earlier kept
    one."""
    n = len(texts)
    if n == 0:
        return []
    dup = near_duplicate_matrix(texts, texts, threshold)
    kept = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        if not bool((dup[i, :i] & kept[:i]).any()):
            kept[i] = True
    return kept.nonzero().flatten().tolist()


def build_candidates(
    by_source: dict[str, list[str]],
    exclude: Sequence[str],
    threshold: float,
    seed: int,
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Ordered anchor candidates ``[(source, prompt)]``: exact duplicates (normalised text) removed across
    sources, every prompt equal to or a near-duplicate of an ``exclude`` prompt (poison, evaluation) removed,
    near-duplicates within the pool collapsed to their first occurrence, then sources interleaved in a seeded
    order. Returns the candidates and counts (``dropped_exact``, ``dropped_near``, ``dropped_self_near``)."""
    excl_norm = {norm_text(p) for p in exclude if norm_text(p)}
    seen: set[str] = set()
    clean: dict[str, list[str]] = {}
    stats = {"dropped_exact": 0, "dropped_near": 0, "dropped_self_near": 0, "dropped_duplicate": 0}
    for s, prompts in by_source.items():
        keep = []
        for p in prompts:
            k = norm_text(p)
            if not k:
                continue
            if k in excl_norm:
                stats["dropped_exact"] += 1
            elif k in seen:
                stats["dropped_duplicate"] += 1
            else:
                seen.add(k)
                keep.append(p)
        clean[s] = keep
    flat = [(s, p) for s, ps in clean.items() for p in ps]
    near = near_duplicate_of([p for _, p in flat], [p for p in exclude if norm_text(p)], threshold)
    stats["dropped_near"] = sum(near)
    kept_src: dict[str, list[str]] = {s: [] for s in clean}
    for (s, p), bad in zip(flat, near):
        if not bad:
            kept_src[s].append(p)
    ordered = interleave(kept_src, seed)
    keep_idx = dedupe_near([p for _, p in ordered], threshold)
    stats["dropped_self_near"] = len(ordered) - len(keep_idx)
    return [ordered[i] for i in keep_idx], stats


# ---- judging -----------------------------------------------------------------------------------------------------
def resolve_judge(spec: str, log: Callable[[str], None] = print) -> tuple[Outcomes, str]:
    """``(outcomes(prompts, answers) -> ['refusal' | 'harmful' | 'other'], name)`` for ``anchor_judge``.

    ``"keyword"``: :class:`~safeft.eval.KeywordJudge` (refusal or other). Any other spec goes through
    ``safeft.eval.judges.get_judge``; a judge with ``outcomes`` is used as is. ``"content"`` that is not
    available, or a judge without ``outcomes``, falls back to the keyword judge with a logged warning; the name
    returned says which judge ran (it is part of the anchors' cache key)."""
    from safeft.eval.judges import KeywordJudge, get_judge

    def keyword() -> Outcomes:
        kw = KeywordJudge()
        return lambda _prompts, answers: ["refusal" if kw.is_refusal(a) else "other" for a in answers]

    s = spec.strip()
    if s.lower() == "keyword":
        return keyword(), "keyword"
    try:
        judge = get_judge(s)
    except SafeFTError as e:
        if s.lower() != "content":
            raise SafeFTError(f"defense.cwac.anchor_judge={spec!r}: {e}") from None
        log(
            f"CWAC warning: the content judge is not available ({e}); anchors are judged by the keyword judge"
        )
        return keyword(), "keyword (content unavailable)"
    if hasattr(judge, "outcomes"):
        return judge.outcomes, s.lower() if s.lower() == "content" else f"judge:{s}"
    log(
        f"CWAC warning: judge {spec!r} has no outcomes() (refusal / harmful / other); anchors are judged by the "
        f"keyword judge"
    )
    return keyword(), f"keyword ({s} has no outcomes)"


def select_anchors(
    candidates: Sequence[tuple[str, str]],
    answer: Callable[[list[str]], list[str]],
    outcomes: Outcomes,
    n_anchor: int,
    chunk: int = 64,
) -> tuple[list[int], list[str], dict[str, Any]]:
    """Check candidates in order, ``chunk`` at a time (θ₀'s answers from ``answer(prompts)``, judged by
    ``outcomes``), until ``n_anchor`` refusals are found (the caller may ask for more and thin them out, as
    ``anchor_margin_token`` does with :func:`thinnest`). Returns the indices of the anchors (into
    ``candidates``), their answers, and counts: ``checked``, ``refused``, ``outcomes`` and per ``source``
    (checked / refused)."""
    picked: list[int] = []
    answers: list[str] = []
    counts: dict[str, int] = {}
    per_source: dict[str, dict[str, int]] = {}
    checked = 0
    for start in range(0, len(candidates), chunk):
        part = list(candidates[start : start + chunk])
        prompts = [p for _, p in part]
        outs = answer(prompts)
        labels = outcomes(prompts, outs)
        checked += len(part)
        for j, ((src, _p), a, lab) in enumerate(zip(part, outs, labels)):
            counts[lab] = counts.get(lab, 0) + 1
            ps = per_source.setdefault(src, {"checked": 0, "refused": 0})
            ps["checked"] += 1
            if lab == "refusal" and len(picked) < n_anchor:
                picked.append(start + j)
                answers.append(a)
                ps["refused"] += 1
        if len(picked) >= n_anchor:
            break
    return (
        picked,
        answers,
        {"checked": checked, "refused": len(picked), "outcomes": counts, "sources": per_source},
    )


def thinnest(gaps: Sequence[float], n: int) -> list[int]:
    """Positions of the ``n`` smallest gaps, in their original order (ties: the earlier position first)."""
    order = sorted(range(len(gaps)), key=lambda i: (gaps[i], i))
    return sorted(order[: max(0, n)])


def split_anchors(n: int, seed: int) -> dict[str, list[int]]:
    """Disjoint index sets over ``n`` anchors (seeded shuffle): ``score`` (rank the safety latents), ``baseline``
    (the loss's anchors), ``causal`` (held out: the causal check, and the weight subspace's held-out energy);
    ``subspace`` = every anchor outside ``causal``."""
    if n < 3:
        raise SafeFTError(
            f"CWAC: {n} anchors; at least 3 are needed (scoring / baseline / causal-check sets)"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 1)).tolist()
    n_causal = max(1, round(SPLIT["causal"] * n))
    n_score = max(1, round(SPLIT["score"] * n))
    n_score = min(n_score, n - n_causal - 1)
    causal = sorted(perm[:n_causal])
    score = sorted(perm[n_causal : n_causal + n_score])
    baseline = sorted(perm[n_causal + n_score :])
    held = set(causal)
    return {
        "subspace": [i for i in range(n) if i not in held],
        "score": score,
        "baseline": baseline,
        "causal": causal,
    }
