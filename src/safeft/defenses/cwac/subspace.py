"""Weight constraint, offline part: which linear modules are constrained, which of them read the same input, the
rows of those inputs at the decision positions of θ₀'s anchors, and one safety subspace V per distinct input.

Decision positions of an anchor (teacher-forced: prompt + θ₀'s own refusal) are the last ``k`` prompt tokens
(generation header included) and the first ``m`` refusal tokens, never position 0 (the attention sink) nor the
prefix every anchor shares (chat-template system prompt / role header).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from safeft.components.capture import budget_passes, capture_module_rows, shared_input_groups
from safeft.components.projection import basis_from_rows, energy_inside
from safeft.defenses.cwac.common import common_prefix_len, pad_right
from safeft.errors import SafeFTError

ROWS_BUDGET_BYTES = 2 * 2**30  # float32 module-input rows held at once while capturing (one pass per budget)


# ---- which modules --------------------------------------------------------------------------------------------------
def linear_children(block: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name in block: module}`` for linear modules (peft LoRA layers count as one module)."""
    out: dict[str, nn.Module] = {}
    for name, mod in block.named_modules():
        if not name:
            continue
        if ".lora_" in f".{name}" or "base_layer" in name.split("."):
            continue
        if hasattr(mod, "lora_A") or isinstance(mod, nn.Linear):
            out[name] = mod
    return out


def is_trained(mod: nn.Module, use_lora: bool) -> bool:
    if use_lora:
        return hasattr(mod, "lora_A") and any(p.requires_grad for p in mod.lora_A.parameters())
    w = getattr(mod, "weight", None)
    return isinstance(w, torch.Tensor) and w.requires_grad


def d_in(mod: nn.Module) -> int:
    base = getattr(mod, "base_layer", mod)
    if hasattr(base, "in_features"):
        return int(base.in_features)
    return int(base.weight.shape[1])


def resolve_layers(layers: list[int] | str | None, n_layers: int) -> list[int]:
    """``None``: the middle half (the paper's choice); ``"all"``: every layer; a list: checked against the model."""
    if layers is None:
        width = max(1, n_layers // 2)
        start = (n_layers - width) // 2
        return list(range(start, start + width))
    if layers == "all":
        return list(range(n_layers))
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise SafeFTError(
            f"defense.cwac.layers={layers}: {bad} out of range, the model has {n_layers} layers (0..{n_layers - 1})"
        )
    return list(layers)


def resolve_modules(
    blocks: nn.ModuleList,
    chosen: list[int],
    use_lora: bool,
    target_modules: list[str] | None,
    log: Callable[[str], None] = print,
) -> dict[str, nn.Module]:
    """``{"<layer>.<path>": module}`` of the constrained modules. Default (``target_modules`` None): every trained
    linear module of the chosen layers — LoRA targets with LoRA, every linear module with a trained weight for
    full fine-tuning. Unknown names and never-trained constrained modules are refused (weight-only CWAC would
    silently be plain SFT)."""
    out: dict[str, nn.Module] = {}
    available: set[str] = set()
    for i in chosen:
        for name, mod in linear_children(blocks[i]).items():
            leaf = name.rsplit(".", 1)[-1]
            available.add(leaf)
            wanted = is_trained(mod, use_lora) if target_modules is None else leaf in target_modules
            if wanted:
                out[f"{i}.{name}"] = mod
    if target_modules is not None:
        unknown = [t for t in target_modules if t not in available]
        if unknown:
            raise SafeFTError(
                f"defense.cwac.target_modules: {unknown} not found in layers {chosen}; "
                f"available linear modules: {', '.join(sorted(available))}"
            )
    if not out:
        raise SafeFTError(
            f"defense.cwac: no trained module in layers {chosen} to constrain (nothing is trained there); "
            f"weight-only CWAC would silently be plain SFT: train modules in these layers or set defense.cwac.layers"
        )
    untrained = [k for k, mod in out.items() if not is_trained(mod, use_lora)]
    if untrained:
        raise SafeFTError(
            f"defense.cwac.target_modules: {untrained[:4]}{' ...' if len(untrained) > 4 else ''} are never "
            f"trained in this run (e.g. LoRA on q/v while target_modules=['down_proj']): weight-only CWAC would "
            f"silently be plain SFT; constrain the trained modules (leave target_modules unset) or train these"
        )
    return out


def free_trained_tensors(model: nn.Module, constrained: dict[str, nn.Module], use_lora: bool) -> list[str]:
    """Names of trained parameters that no weight constraint covers (LoRA factors of unconstrained modules; for
    full fine-tuning every trained tensor outside the constrained modules: embeddings, norms, LM head, ...)."""
    covered: set[int] = set()
    for mod in constrained.values():
        covered.update(id(p) for p in mod.parameters())
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:
            out.append(name)
    return out


def group_key(names: Sequence[str]) -> str:
    """``["3.self_attn.q_proj", "3.self_attn.k_proj"]`` → ``"3.self_attn.q_proj+k_proj"``."""
    if len(names) == 1:
        return names[0]
    parent = names[0].rsplit(".", 1)[0]
    if all(n.rsplit(".", 1)[0] == parent for n in names):
        return parent + "." + "+".join(n.rsplit(".", 1)[1] for n in names)
    return "+".join(names)


def module_groups(
    model: nn.Module, modules: dict[str, nn.Module], probe_ids: torch.Tensor
) -> dict[str, list[str]]:
    """``{group key: [module names]}``: modules that read the same input tensor (q/k/v; gate/up) share one group,
    found by one probe forward (:func:`~safeft.components.capture.shared_input_groups`), within a layer."""
    groups = shared_input_groups(model, modules, probe_ids)
    out: dict[str, list[str]] = {}
    for g in groups:
        layer_parts: dict[str, list[str]] = {}
        for n in g:  # never merge across layers (equal values there would be a coincidence)
            layer_parts.setdefault(n.split(".", 1)[0], []).append(n)
        for part in layer_parts.values():
            out[group_key(part)] = part
    return out


# ---- decision positions ---------------------------------------------------------------------------------------------
def anchor_sequences(
    tokenizer: Any, template: str, prompts: Sequence[str], answers: Sequence[str], max_length: int
) -> list[tuple[list[int], int]]:
    """``[(input_ids, prompt_length)]``: each anchor prompt + θ₀'s refusal, chat-formatted and teacher-forced.
    A sequence longer than ``max_length`` loses tokens from the **start** (the decision positions, at the end of
    the prompt and the start of the answer, are always kept)."""
    from safeft.data import Example, tokenize_example

    out = []
    for p, a in zip(prompts, answers):
        row = tokenize_example(tokenizer, Example(p, a, kind="refusal"), template, 10**9)
        ids = list(row["input_ids"])
        n_prompt = sum(1 for lab in row["labels"] if lab == -100)
        cut = max(0, len(ids) - max_length)
        cut = min(cut, max(0, n_prompt - 1))  # keep at least the last prompt token
        out.append((ids[cut:][:max_length], n_prompt - cut))
    return out


def decision_select(seq_len: int, prompt_len: int, k: int, m: int, start: int) -> list[int]:
    """Positions of one sequence that enter C: the last ``k`` prompt tokens and the first ``m`` answer tokens,
    at or after ``start`` (≥ 1: position 0 is the attention sink)."""
    lo = max(start, prompt_len - k, 1)
    hi = min(seq_len, prompt_len + m)
    return list(range(lo, hi))


def _select_batches(
    seqs: list[tuple[list[int], int]], k: int, m: int, start: int, pad: int, dev, bs: int = 8
):
    for i in range(0, len(seqs), bs):
        part = seqs[i : i + bs]
        ids, lengths = pad_right([s for s, _ in part], pad)
        sel = torch.zeros_like(ids, dtype=torch.bool)
        for r, (s, pl) in enumerate(part):
            sel[r, decision_select(len(s), pl, k, m, start)] = True
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        yield {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "select": sel.to(dev)}


def compute_subspaces(
    model: nn.Module,
    modules: dict[str, nn.Module],
    groups: dict[str, list[str]],
    seqs: list[tuple[list[int], int]],
    heldout: list[tuple[list[int], int]],
    *,
    k: int,
    m: int,
    start: int,
    energy: float,
    center: bool,
    pad: int,
    progress: Callable[[str], None] = print,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One V per group from the inputs of its first module at the decision positions of ``seqs`` (θ₀ must be
    active: call under :func:`~safeft.defenses.cwac.common.theta0`). Groups are captured in passes whose
    float32 rows fit ``ROWS_BUDGET_BYTES``; each pass stops the forward after its deepest layer. Returns
    ``({group: V [d_in, r]}, meta)`` with per-group rank, d_in, rows, method and the energy of the held-out
    anchors' decision rows inside span(V) (how well V generalises to anchors it never saw)."""
    dev = next(model.parameters()).device
    n_rows = sum(len(decision_select(len(s), pl, k, m, start)) for s, pl in seqs)
    n_held = sum(len(decision_select(len(s), pl, k, m, start)) for s, pl in heldout)
    if n_rows == 0:
        raise SafeFTError(
            "CWAC: no decision positions in the anchors (prompts shorter than the shared template prefix?); "
            "raise defense.cwac.subspace_prompt_tokens / subspace_refusal_tokens"
        )
    order = sorted(groups, key=lambda g: int(g.split(".", 1)[0]))
    passes = budget_passes(order, lambda g: (n_rows + n_held) * d_in(modules[groups[g][0]]) * 4, ROWS_BUDGET_BYTES)
    Vs: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for pi, part in enumerate(passes):
        reps = {g: modules[groups[g][0]] for g in part}
        deepest = max(int(g.split(".", 1)[0]) for g in part)
        rows = capture_module_rows(model, reps, _select_batches(seqs, k, m, start, pad, dev), deepest)
        held = (
            capture_module_rows(model, reps, _select_batches(heldout, k, m, start, pad, dev), deepest)
            if heldout
            else {}
        )
        for g in part:
            X = torch.cat(rows.pop(g))
            V, inf = basis_from_rows(X, energy, center=center)
            del X
            if held:
                Xh = torch.cat(held.pop(g))
                inf["heldout_energy_kept"] = energy_inside(Xh, V) if Xh.shape[0] else None
            inf["d_in"] = int(V.shape[0])
            Vs[g] = V
            info[g] = inf
        if len(passes) > 1:
            progress(f"CWAC subspace: pass {pi + 1}/{len(passes)} done ({len(part)} inputs)")
    meta = {
        "groups": {g: list(groups[g]) for g in order},
        "info": info,
        "ranks": {n: int(Vs[g].shape[1]) for g in order for n in groups[g]},
        "d_in": {n: int(Vs[g].shape[0]) for g in order for n in groups[g]},
        "rows": n_rows,
        "heldout_rows": n_held,
        "passes": len(passes),
    }
    return Vs, meta


def per_layer_lines(meta: dict[str, Any]) -> list[str]:
    """One line per layer: ``layer 3: self_attn.q_proj+k_proj+v_proj 41/576 (held-out 0.87), ...``."""
    by_layer: dict[int, list[str]] = {}
    for g, inf in meta["info"].items():
        layer, rest = g.split(".", 1)
        held = inf.get("heldout_energy_kept")
        by_layer.setdefault(int(layer), []).append(
            f"{rest} {inf['rank']}/{inf['d_in']}" + (f" (held-out {held:.2f})" if held is not None else "")
        )
    return [f"  layer {i}: " + ", ".join(v) for i, v in sorted(by_layer.items())]


def decision_start(seqs: Sequence[Sequence[int]], template_prefix: int) -> int:
    """First position that may enter C: after the prefix shared by every anchor (and the template's own prefix),
    never position 0."""
    return max(1, template_prefix, common_prefix_len(seqs))
