"""SaLoRA's offline part: θ₀'s output features of every LoRA-targeted module and the subspaces taken from them.

For a module y = W₀ x, the rows X (``[N, d_in]``) are its inputs at the **response** positions of a set of
(prompt, response) pairs, run teacher-forced through θ₀ (the authors' ``labels != -100`` mask); its output features
are Y = X W₀ᵀ (``[N, d_out]``, no bias, as in the authors' ``lora_train_act.py``). The top-k right singular vectors
of Y span the output directions that data drives hardest:

- on (harmful prompt, safety response) pairs they are the safety features V_s ``[d_out, r_s]``: the fixed safety
  module is C = I − V_s V_sᵀ;
- on the task data they are the task features V_t ``[d_out, r_t]`` of the task-specific initialisation.

Decompositions use ``torch.svd_lowrank`` as the authors do (q = k, ``niter`` power iterations), under a fixed seed so
that the same inputs give the same subspace on the same hardware. Rows are captured with
:func:`safeft.components.capture.capture_module_rows` in passes whose float32 rows fit ``ROWS_BUDGET_BYTES``; each
pass stops the forward after the deepest decoder block it needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from safeft.components.capture import budget_passes, capture_module_rows, decoder_layers
from safeft.defenses.cwac.common import theta0
from safeft.errors import SafeFTError

ROWS_BUDGET_BYTES = 2 * 2**30  # float32 module-input rows held at once while capturing
IGNORE = -100


def layer_index(name: str) -> int | None:
    """Decoder-block index in a module name (``model.layers.3.self_attn.q_proj`` -> 3), None if there is none."""
    m = re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def response_batches(
    collate: Callable[[list[Any]], dict], examples: Sequence[Any], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Collated batches (cpu) with ``select`` = the response positions (``labels != -100``)."""
    out = []
    for i in range(0, len(examples), batch_size):
        b = collate(list(examples[i : i + batch_size]))
        out.append(
            {
                "input_ids": b["input_ids"],
                "attention_mask": b["attention_mask"],
                "select": b["labels"] != IGNORE,
            }
        )
    return out


def _on(batches: list[dict[str, torch.Tensor]], dev: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    for b in batches:
        yield {k: v.to(dev) for k, v in b.items()}


def seeded_svd_lowrank(
    a: torch.Tensor, q: int, niter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.svd_lowrank(a, q, niter)`` (U ``[m, q]``, S ``[q]``, V ``[n, q]``, float32) with the random test
    matrix drawn from ``seed``: deterministic for the same input on the same device."""
    devices = [a.device] if a.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(a.float(), q=q, niter=niter)
    return u.contiguous(), s.contiguous(), v.contiguous()


def top_output_directions(x: torch.Tensor, w: torch.Tensor, k: int, niter: int, seed: int) -> torch.Tensor:
    """Top-k right singular vectors of Y = X Wᵀ: ``[d_out, k]`` float32, orthonormal columns, on W's device.

    x: rows ``[N, d_in]``; w: the frozen weight ``[d_out, d_in]``. Requires k ≤ min(N, d_out)."""
    y = x.to(device=w.device, dtype=torch.float32) @ w.detach().float().T
    _, _, v = seeded_svd_lowrank(y, k, niter, seed)
    return v[:, :k].contiguous()


def module_output_subspaces(
    model: nn.Module,
    modules: dict[str, nn.Module],
    weights: dict[str, torch.Tensor],
    batches: list[dict[str, torch.Tensor]],
    ranks: dict[str, int],
    *,
    niter: int,
    seed: int,
    what: str,
    budget_bytes: int = ROWS_BUDGET_BYTES,
) -> tuple[dict[str, torch.Tensor], int]:
    """``({name: V [d_out, k]}, rows)``: per module, the top ``ranks[name]`` output directions of θ₀ on the
    response positions of ``batches`` (θ₀ = adapters disabled). ``what`` names the data in errors. Raises
    :class:`SafeFTError` when there are fewer response rows than a requested rank."""
    n_rows = int(sum(int(b["select"].sum()) for b in batches))
    need = max(ranks.values())
    if n_rows == 0 or n_rows < need:
        raise SafeFTError(
            f"defense salora: the {what} give only {n_rows} response tokens, fewer than the rank {need} asked of "
            f"them; use more examples or a lower rank"
        )
    dev = next(model.parameters()).device
    n_blocks = len(decoder_layers(model))
    order = sorted(modules, key=lambda n: (layer_index(n) if layer_index(n) is not None else n_blocks, n))
    passes = budget_passes(order, lambda name: n_rows * int(weights[name].shape[1]) * 4, budget_bytes)
    out: dict[str, torch.Tensor] = {}
    for part in passes:
        idx = [layer_index(n) for n in part]
        stop = None if any(i is None for i in idx) else max(i for i in idx if i is not None)
        with theta0(model):
            rows = capture_module_rows(model, {n: modules[n] for n in part}, _on(batches, dev), stop)
        for name in part:
            x = torch.cat(rows.pop(name))
            out[name] = top_output_directions(x, weights[name], ranks[name], niter, seed + order.index(name))
            del x
    return out, n_rows
