"""Activation constraint, offline part: the SAE training stream, the SAEs, the safety latents S, the baselines and
the causal check.

- SAE data: documents of harmful prompts (never anchors, poison or evaluation prompts; with a dataset refusal when
  one is known) and general text (task *training* splits, harmless prompts), chat-formatted, mixed to
  ``benign_fraction`` general tokens, in a seeded random document order, cut at a token budget.
- Capture: one forward per batch up to the deepest SAE layer; the residual rows at every SAE layer (position 0 and
  the template prefix left out) go to disk shards (:mod:`safeft.components.activation_store`), resumable.
- S: per SAE layer, latents ranked by mean activation on scoring anchors minus on harmless prompts **at the last
  ``n_positions`` prompt positions** (where the loss reads them); only positive scores, ties broken by index.
- Baselines: θ₀'s codes of S at those positions for the baseline anchors; their mean squared norm normalises
  L_safety.
- Causal check: θ₀'s refusal rate on held-out anchors with and without S ablated at every SAE layer.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safeft.components.activation_store import ShardReader, ShardWriter
from safeft.components.capture import run_to_layers
from safeft.components.sae import StoreRows, TopKSAE, ablate_latents_hook, load_sae, train_sae
from safeft.defenses.cwac.common import last_positions, length_mask, norm_text, pad_right
from safeft.errors import SafeFTError

SHARD_BYTES = 64 * 2**20  # one activation shard ≈ 64 MiB (bf16)
HELDOUT_FRACTION = 0.05  # of the SAE stream, for explained variance and dead fraction


def default_sae_layers(n_layers: int, n: int) -> list[int]:
    """``n`` layers spread evenly over the depth, the deepest being the last block (so every block gets a safety
    gradient): round((i + 1)·L / n) − 1."""
    return sorted({max(0, round((i + 1) * n_layers / n) - 1) for i in range(n)})


# ---- SAE documents -----------------------------------------------------------------------------------------------------
def _general_examples(source: str, harmless: Sequence[str]) -> list[tuple[str, str | None]]:
    """(prompt, response or None) of a general-text source: a task's *training* split, or the harmless pool."""
    if source == "harmless":
        return [(p, None) for p in harmless]
    from safeft.data import load_task

    return [(e.prompt, e.response) for e in load_task(source, "train")]


def sae_documents(
    tokenizer: Any,
    template: str,
    max_length: int,
    harmful: Sequence[str],
    refusal_by_prompt: dict[str, str],
    general_sources: Sequence[str],
    harmless: Sequence[str],
    budget: int,
    benign_fraction: float,
    start: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> tuple[list[list[int]], dict[str, Any]]:
    """Token ids of the SAE training documents and their counts.

    Harmful documents (prompt + dataset refusal when ``refusal_by_prompt`` has one) fill up to
    (1 − ``benign_fraction``)·``budget`` tokens; general documents (round-robin over ``general_sources``, each in a
    seeded order) fill the rest of the budget, and the part the harmful text could not fill. Tokens are counted
    at the captured positions (from ``start`` on). The documents come back in one seeded random order."""
    from safeft.data import Example, format_prompt, tokenize_example

    g = torch.Generator().manual_seed(int(seed) + 7)

    def doc(prompt: str, response: str | None) -> list[int]:
        if response:
            try:
                row = tokenize_example(tokenizer, Example(prompt, response), template, max_length)
                return list(row["input_ids"])
            except SafeFTError:  # the prompt alone fills max_length: keep its end, as below
                pass
        ids = tokenizer(format_prompt(tokenizer, prompt, template), add_special_tokens=False)["input_ids"]
        return list(ids)[-max_length:]

    def count(ids: list[int]) -> int:
        return max(0, len(ids) - start)

    docs: list[list[int]] = []
    kinds: list[str] = []
    n_harm = 0
    target_harm = round((1 - benign_fraction) * budget)
    order = torch.randperm(len(harmful), generator=g).tolist()
    for i in order:
        if n_harm >= target_harm:
            break
        p = harmful[i]
        ids = doc(p, refusal_by_prompt.get(norm_text(p)))
        if count(ids):
            docs.append(ids)
            kinds.append("harmful")
            n_harm += count(ids)
    streams: list[tuple[str, Iterator[tuple[str, str | None]]]] = []
    for s in general_sources:
        try:
            ex = _general_examples(s, harmless)
        except SafeFTError as e:
            log(f"CWAC note: SAE general-text source {s!r} skipped ({e})")
            continue
        if ex:
            perm = torch.randperm(len(ex), generator=g).tolist()
            streams.append((s, iter([ex[j] for j in perm])))
    n_gen = 0
    per_source = {s: 0 for s, _ in streams}
    while streams and n_harm + n_gen < budget:  # round-robin, one document per source per turn
        kept = []
        for s, it in streams:
            if n_harm + n_gen >= budget:
                break
            nxt = next(it, None)
            if nxt is None:
                continue
            ids = doc(*nxt)
            if count(ids):
                docs.append(ids)
                kinds.append("general")
                n_gen += count(ids)
                per_source[s] += count(ids)
            kept.append((s, it))
        streams = kept
    perm = torch.randperm(len(docs), generator=g).tolist()
    docs = [docs[i] for i in perm]
    stats = {
        "documents": len(docs),
        "tokens": n_harm + n_gen,
        "tokens_harmful": n_harm,
        "tokens_general": n_gen,
        "tokens_general_by_source": per_source,
        "budget": budget,
    }
    if n_harm + n_gen < budget:
        log(f"CWAC note: the SAE data ran out at {n_harm + n_gen} tokens of the {budget} budget")
    return docs, stats


# ---- capture to disk -------------------------------------------------------------------------------------------------
WINDOW_DOCS = 64  # documents captured together; the unit written to disk


def _windows(n: int, first: int):
    """Consecutive document windows ``[i, j)`` from ``first``: the unit written to disk (resume restarts at one)."""
    size = WINDOW_DOCS
    for i in range(first, n, size):
        yield i, min(n, i + size)


def _length_batches(lengths: list[int], max_tokens: int = 8192, max_docs: int = 32) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most ``max_tokens`` padded tokens / ``max_docs``: little
    padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) >= max_docs or lengths[i] * (len(cur) + 1) > max_tokens):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def capture_to_store(
    model: nn.Module,
    docs: list[list[int]],
    layers: Sequence[int],
    directory: Path,
    key: dict[str, Any],
    start: int,
    pad: int,
    progress: bool = True,
) -> ShardReader:
    """Residual rows of every document at every layer in ``layers`` (positions ``start`` … end) into a shard
    store at ``directory`` (resumed when a capture with the same ``key`` was interrupted); θ₀ must be active.
    A progress bar counts tokens and shows the ETA."""
    from tqdm.auto import tqdm

    dev = next(model.parameters()).device
    d = int(model.get_input_embeddings().weight.shape[1])
    writer = ShardWriter(directory, layers, d, key, shard_rows=max(1, SHARD_BYTES // (2 * d)))
    if writer.complete:
        return ShardReader(directory)
    total = sum(max(0, len(x) - start) for x in docs)
    done_tokens = sum(max(0, len(x) - start) for x in docs[: writer.docs_done])
    bar = tqdm(
        total=total,
        initial=done_tokens,
        unit="tok",
        unit_scale=True,
        desc="CWAC: capturing SAE activations",
        disable=not progress,
    )
    t0 = time.perf_counter()
    for i, j in _windows(len(docs), writer.docs_done):
        window = docs[i:j]
        rows: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
        for part in _length_batches([len(x) for x in window]):
            ids, lengths = pad_right([window[k] for k in part], pad)
            pos = torch.arange(ids.shape[1])[None]
            sel = (pos < lengths[:, None]) & (pos >= start)
            hs = run_to_layers(model, ids.to(dev), length_mask(lengths, ids.shape[1]).to(dev), layers)
            sel_dev = sel.to(dev)
            for L in layers:
                rows[L].append(hs[L][sel_dev].cpu())
            bar.update(int(sel.sum()))
        # whole windows only: a shard never ends inside a window, so a resumed capture restarts at a window
        writer.add({L: torch.cat(v) for L, v in rows.items()}, docs_done=j)
    writer.close({"tokens": total, "seconds": round(time.perf_counter() - t0, 3)})
    bar.close()
    return ShardReader(directory)


def remove_store(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


# ---- training -------------------------------------------------------------------------------------------------------
MIN_SAE_STEPS = (
    1000  # default steps: one pass over the rows, but at least this many (several passes on small data)
)


def train_saes(
    reader: ShardReader,
    layers: Sequence[int],
    *,
    width: int,
    k: int,
    steps: int | None,
    batch_size: int,
    lr: float,
    aux_coef: float,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[dict[int, TopKSAE], dict[str, dict[str, Any]]]:
    """One SAE per layer from the captured rows (:func:`~safeft.components.sae.train_sae`, streamed, the stream's
    tail held out). Returns ``({layer: sae}, {str(layer): shapes + held-out stats})``."""
    saes: dict[int, TopKSAE] = {}
    meta: dict[str, dict[str, Any]] = {}
    for L in layers:
        rows = StoreRows(reader, L, HELDOUT_FRACTION)
        n_steps = steps or max(math.ceil(rows.n_train / batch_size), MIN_SAE_STEPS)
        sae, st = train_sae(
            rows, d_sae=width, k=min(k, width), steps=n_steps, lr=lr, batch_size=batch_size, seed=seed + L,
            device=device, progress=progress, aux_coef=aux_coef, desc=f"CWAC: training the SAE of layer {L}",
        )  # fmt: skip
        saes[L] = sae.eval().requires_grad_(False)
        meta[str(L)] = {"d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k, **st}
    return saes, meta


# ---- pretrained SAEs -------------------------------------------------------------------------------------------------
def pretrained_stamp(path: str, layers: list[int]) -> dict[str, Any]:
    """What identifies pretrained SAE files in a cache key: path, layers, and each weights file's size and mtime."""
    stamp: dict[str, Any] = {"sae_path": path, "layers": layers}
    for f in sorted(Path(path).rglob("sae_weights.safetensors")):
        st = f.stat()
        stamp[str(f.relative_to(path))] = [st.st_size, st.st_mtime_ns]
    return stamp


def load_pretrained(path: str, requested: list[int] | None, n_layers: int) -> dict[int, TopKSAE]:
    """SAEs from ``sae_path``: a SAELens folder (``cfg.json``; its layer is ``hook_layer`` unless one layer is
    requested) or a folder of ``layer_<L>/`` SAELens folders (our export). Requested layers must be present."""
    root = Path(path)
    if (root / "cfg.json").is_file():
        sae = load_sae(root)
        if requested is not None and len(requested) != 1:
            raise SafeFTError(
                f"defense.cwac.sae_path={path} holds one SAE but sae_layers={requested}; give one layer "
                f"or a folder of layer_<L>/ SAEs"
            )
        layer = requested[0] if requested else sae.hook_layer
        if layer is None:
            raise SafeFTError(f"{root / 'cfg.json'}: no hook_layer; set defense.cwac.sae_layer")
        return {int(layer): sae}
    found = {}
    for sub in sorted(root.glob("layer_*")):
        if (sub / "cfg.json").is_file() and sub.name[6:].isdigit():
            found[int(sub.name[6:])] = sub
    if not found:
        raise SafeFTError(
            f"defense.cwac.sae_path={path}: no cfg.json and no layer_<L>/ folders (SAELens format expected)"
        )
    want = requested if requested is not None else sorted(found)
    missing = [L for L in want if L not in found]
    if missing:
        raise SafeFTError(
            f"defense.cwac.sae_path={path}: no SAE for layer(s) {missing} (has {sorted(found)})"
        )
    bad = [L for L in want if L >= n_layers]
    if bad:
        raise SafeFTError(f"defense.cwac.sae_path={path}: layer(s) {bad} out of range ({n_layers} layers)")
    return {L: load_sae(found[L]) for L in want}


# ---- safety latents, baselines ---------------------------------------------------------------------------------------
@torch.no_grad()
def codes_at_last_positions(
    model: nn.Module,
    saes: dict[int, TopKSAE],
    seqs: Sequence[Sequence[int]],
    n_positions: int,
    pad: int,
    bs: int = 8,
) -> dict[int, torch.Tensor]:
    """``{layer: z [N, n_positions, d_sae]}``: every SAE's codes at the last ``n_positions`` tokens of each
    sequence (θ₀ must be active), float32 on cpu."""
    dev = next(model.parameters()).device
    layers = sorted(saes)
    out: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    for i in range(0, len(seqs), bs):
        ids, lengths = pad_right(seqs[i : i + bs], pad)
        hs = run_to_layers(model, ids.to(dev), length_mask(lengths, ids.shape[1]).to(dev), layers)
        pos = last_positions(lengths, n_positions).to(dev)
        for L in layers:
            h = torch.gather(hs[L], 1, pos[..., None].expand(-1, -1, hs[L].shape[-1])).float()
            out[L].append(saes[L].encode(h).cpu())
    return {L: torch.cat(v) for L, v in out.items()}


def select_features(score: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (ascending) of the ``n`` latents with the largest positive ``score``; ties broken by the lower
    index (a stable sort), so the choice never depends on the sorting kernel."""
    vals, idx = torch.sort(score, descending=True, stable=True)
    keep = idx[:n][vals[:n] > 0]
    return keep.sort().values


@torch.no_grad()
def safety_features(
    model: nn.Module,
    saes: dict[int, TopKSAE],
    score_seqs: Sequence[Sequence[int]],
    harmless_seqs: Sequence[Sequence[int]],
    base_seqs: Sequence[Sequence[int]],
    n_features: int,
    n_positions: int,
    pad: int,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[str, Any]]:
    """S and the baselines per SAE layer (θ₀ must be active): latents ranked by mean code on the scoring anchors
    minus on harmless prompts at the last ``n_positions`` prompt positions, and θ₀'s codes of S there for the
    baseline anchors (``[n_base, n_positions, |S|]``). Returns ``(features, z_base, meta)``."""
    za = codes_at_last_positions(model, saes, score_seqs, n_positions, pad)
    zh = codes_at_last_positions(model, saes, harmless_seqs, n_positions, pad)
    feats: dict[int, torch.Tensor] = {}
    meta: dict[str, Any] = {"layers": {}}
    for L in sorted(saes):
        score = za[L].double().mean((0, 1)) - zh[L].double().mean((0, 1))
        feats[L] = select_features(score, n_features)
        meta["layers"][str(L)] = {
            "n_features": int(feats[L].numel()),
            "score_top": float(score.max()),
            "score_mean_selected": float(score[feats[L]].mean()) if feats[L].numel() else 0.0,
            "positive_scores": int((score > 0).sum()),
        }
    zb = codes_at_last_positions(model, saes, base_seqs, n_positions, pad)
    return feats, {L: zb[L][..., feats[L]] for L in sorted(saes)}, meta


# ---- causal check ----------------------------------------------------------------------------------------------------
def causal_check(
    blocks: nn.ModuleList,
    saes: dict[int, TopKSAE],
    features: dict[int, torch.Tensor],
    prompts: list[str],
    answer: Callable[[list[str]], list[str]],
    outcomes: Callable[[list[str], list[str]], list[str]],
) -> dict[str, Any]:
    """θ₀'s refusal rate on ``prompts``, plain and with every SAE layer's safety latents ablated (a hook subtracts
    z[S]·W_dec[S] from the block output at every position). θ₀ must be active."""
    plain = [o == "refusal" for o in outcomes(prompts, answer(prompts))]
    handles = []
    try:
        for L, sae in saes.items():
            f = features[L].to(sae.W_dec.device)
            handles.append(blocks[L].register_forward_hook(ablate_latents_hook(sae, f)))
        ablated_answers = answer(prompts)
    finally:
        for h in handles:
            h.remove()
    ablated = [o == "refusal" for o in outcomes(prompts, ablated_answers)]
    n = max(1, len(prompts))
    r0, r1 = sum(plain) / n, sum(ablated) / n
    return {
        "prompts": len(prompts),
        "refusal_rate": r0,
        "refusal_rate_ablated": r1,
        "drop": r0 - r1,
        "examples_ablated": ablated_answers[:3],
    }


def causal_verdict(res: dict[str, Any], min_drop: float) -> tuple[bool, str]:
    """(passed, message) for a causal-check result and the required drop in refusal rate."""
    msg = (
        f"ablating the safety latents changed θ₀'s refusal rate on {res['prompts']} held-out anchors from "
        f"{res['refusal_rate']:.1%} to {res['refusal_rate_ablated']:.1%} (drop {res['drop'] * 100:.1f} points; "
        f"required ≥ {min_drop * 100:.1f})"
    )
    return res["drop"] >= min_drop - 1e-12, msg


def baseline_norms(z_base: dict[int, torch.Tensor]) -> dict[int, float]:
    """Per layer: mean over baseline anchors of ‖z_base‖² (summed over positions and latents); L_safety at that
    layer is divided by it (1 when it is 0: no safety latent fires on the baselines)."""
    out = {}
    for L, z in z_base.items():
        v = float(z.double().pow(2).sum(dim=tuple(range(1, z.ndim))).mean()) if z.numel() else 0.0
        out[L] = v if v > 0 and math.isfinite(v) else 1.0
    return out
