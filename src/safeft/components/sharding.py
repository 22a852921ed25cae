"""Parameters that may be sharded across ranks, and the row-separable projections that work on a rank's shard.

Three ways a training engine can hold a parameter ``P: [d_out, d_in]`` (a weight, or a LoRA factor):

* **full** (one process, DDP, DeepSpeed ZeRO-1/2): an ordinary tensor.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): outside a module's forward the parameter is a ``DTensor``
  whose placement is ``Shard(0)`` (or ``(Replicate(), Shard(0))`` under HSDP): each rank holds a block of *rows*
  ``P[r0:r1]`` as its local tensor.
* **DeepSpeed ZeRO-3**: ``param.data`` is empty outside the forward of the module that owns it (also for
  "persistent" small parameters, between steps); the flat partition lives in ``param.ds_tensor``. Only
  ``deepspeed.zero.GatheredParameters`` makes it readable, and a gathered copy carries no gradient back.

CWAC's weight projections act on each row of a matrix independently, so they need no gather under FSDP2:

* LoRA:    ``A ← A − (A V) Vᵀ``                      (A ``[r, d_in]``, V ``[d_in, k]`` orthonormal)
* full FT: ``W ← W − ((W − W₀) V) Vᵀ = W − (W V − W₀V) Vᵀ``  (W ``[d_out, d_in]``, W₀V ``[d_out, k]``)

Row i of the result depends on row i of A (of W and of W₀V) and on V only. :func:`project_rows_out_` and
:func:`project_update_out_` apply them in place to whatever the rank holds: the full tensor, or the local rows of a
``Shard(0)`` DTensor (W₀V sliced to the same rows by :func:`rows_like`). V is replicated: every rank holds it.

Everything else here helps a defense that needs more than its rows: :func:`full_tensor` (an all-gather, for
LoRA-sized tensors or checks), :func:`distribute_like` (a tensor every rank holds, kept as the same shards as a
parameter: AsFT's and SafeLoRA's V, Lisa's snapshot), :func:`unsharded` (run or read a module's weights outside
its forward: PACT's teacher head), :func:`gathered` (DeepSpeed ZeRO-3), and :func:`is_quantized_4bit`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from safeft.components.projection import _work_dtype
from safeft.errors import SafeFTError

__all__ = [
    "distribute_like",
    "full_tensor",
    "gathered",
    "is_dtensor",
    "is_quantized_4bit",
    "is_zero3_partitioned",
    "local_rows",
    "local_tensor",
    "project_rows_out_",
    "project_update_out_",
    "rows_like",
    "unsharded",
    "whole_model_loading",
]


# ---- what a parameter is ---------------------------------------------------------------------------------------
def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter outside its module's forward)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def is_zero3_partitioned(p: object) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (``ds_id`` set): its data may be an empty partition outside a forward,
    "persistent" small parameters included."""
    return hasattr(p, "ds_id")


def _check_row_sharded(t: torch.Tensor, what: str) -> None:
    from torch.distributed.tensor import Replicate, Shard

    for pl in t.placements:
        if not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)):
            raise SafeFTError(
                f"{what}: a DTensor placed as {tuple(t.placements)} is sharded on columns; the row-separable "
                f"projections need Shard(0) (FSDP2's default) or Replicate"
            )


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: the local block of rows of a DTensor (sharing its storage, so in-place edits
    change the parameter), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def local_rows(t: torch.Tensor) -> slice:
    """The global rows ``[r0, r1)`` of ``t`` that this rank holds (all rows when ``t`` is not a DTensor).

    Raises :class:`SafeFTError` for a DTensor sharded on another dimension."""
    if not is_dtensor(t):
        return slice(0, t.shape[0])
    _check_row_sharded(t, "local_rows")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return slice(int(offset[0]), int(offset[0]) + int(shape[0]))


def rows_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of ``full`` (``[d_out, ...]``, the same on every rank) that this rank holds of ``like``
    (``[d_out, ...]``): ``full`` itself when ``like`` is not sharded, else a view of the local block."""
    if full.shape[0] != like.shape[0]:
        raise SafeFTError(
            f"rows_like: {tuple(full.shape)} and {tuple(like.shape)} differ in their number of rows"
        )
    return full[local_rows(like)]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an all-gather for a DTensor (a collective: every rank must call it), else ``t``.

    Differentiable: the gradient of the gathered tensor flows back to this rank's rows (DTensor's rule for a
    replicated result: every rank computes the same function of it). Use it for LoRA-sized tensors only."""
    return t.full_tensor() if is_dtensor(t) else t


def distribute_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same values on every rank) with its rows laid out as ``like``'s: a DTensor with ``like``'s mesh
    and placements when ``like`` is one (each rank keeps the rows it holds of ``like``; no communication), else
    ``full`` moved to ``like``'s device. ``full`` and ``like`` have the same number of rows; the other dimensions
    may differ (AsFT's V ``[d_out, d_in]`` next to LoRA B ``[d_out, r]``). For tensors a defense combines with a
    parameter: AsFT/SafeLoRA's V, Lisa's snapshot."""
    if not is_dtensor(like):
        return full.to(like.device)
    from torch.distributed.tensor import DTensor

    _check_row_sharded(like, "distribute_like")
    # slice first, then move: only this rank's rows ever reach the parameter's device
    local = rows_like(full, like).to(like.to_local().device).contiguous()
    return DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=full.shape,
        stride=full.contiguous().stride(),
    )


# ---- the row-separable projections, in place --------------------------------------------------------------------
@torch.no_grad()
def project_rows_out_(A: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """In place: ``A ← A − (A V) Vᵀ`` on the rows this rank holds. Returns ``A``.

    A: ``[r, d_in]``, a full tensor or a ``Shard(0)`` DTensor (an FSDP2 LoRA A); V: ``[d_in, k]`` orthonormal,
    replicated (a plain tensor on every rank). Maths in float32 (float64 for float64 A), cast back to A's dtype.
    No communication: row i of the result needs only row i of A. Afterwards ``A V = 0`` on the gathered A."""
    a = local_tensor(A)
    if a.shape[-1] != V.shape[0]:
        raise SafeFTError(f"projection: A has d_in={a.shape[-1]} but the subspace V has d_in={V.shape[0]}")
    if is_dtensor(A):
        _check_row_sharded(A, "project_rows_out_")
    if a.numel() == 0:  # a rank with no rows (more ranks than rows)
        return A
    wd = _work_dtype(a)
    v = V.to(device=a.device, dtype=wd)
    x = a.to(wd)
    a.copy_((x - (x @ v) @ v.T).to(a.dtype))
    return A


@torch.no_grad()
def project_update_out_(W: torch.Tensor, W0V: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """In place: ``W ← W − (W V − W₀V) Vᵀ`` (= ``W − ((W − W₀) V) Vᵀ``) on the rows this rank holds. Returns ``W``.

    W: ``[d_out, d_in]``, full or a ``Shard(0)`` DTensor; W0V: ``W₀ V`` ``[d_out, k]``, either all rows (the same
    on every rank; sliced here with :func:`rows_like`) or already the rows this rank holds; V: ``[d_in, k]``
    orthonormal, replicated. Only W₀V is needed, never W₀ (``d_out × k`` instead of ``d_out × d_in``).
    Afterwards ``(W − W₀) V = 0`` on the gathered W."""
    w = local_tensor(W)
    if w.shape[-1] != V.shape[0]:
        raise SafeFTError(f"projection: W has d_in={w.shape[-1]} but the subspace V has d_in={V.shape[0]}")
    if is_dtensor(W):
        _check_row_sharded(W, "project_update_out_")
    w0v = local_tensor(W0V)
    if w0v.shape[0] != w.shape[0]:
        w0v = rows_like(w0v, W)
    if tuple(w0v.shape) != (w.shape[0], V.shape[1]):
        raise SafeFTError(
            f"projection: W₀V has shape {tuple(w0v.shape)}, expected {(w.shape[0], V.shape[1])} for this rank's rows"
        )
    if w.numel() == 0:
        return W
    wd = _work_dtype(w)
    v = V.to(device=w.device, dtype=wd)
    x = w.to(wd)
    w.copy_((x - (x @ v - w0v.to(device=w.device, dtype=wd)) @ v.T).to(w.dtype))
    return W


# ---- reading weights outside a forward ---------------------------------------------------------------------------
@contextlib.contextmanager
def unsharded(module: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``module``'s own parameters are whole tensors, whatever shards them.

    FSDP2: ``module.unshard()`` (an all-gather of its group, as its forward does) and, if it was sharded before,
    ``reshard()`` on exit. DeepSpeed ZeRO-3: ``GatheredParameters`` over its partitioned parameters (read-only).
    Otherwise nothing. Every rank must enter it (it is a collective)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()  # noqa: N806
    if isinstance(module, FSDPModule):
        try:  # a group left unsharded by its forward (reshard_after_forward=False) stays so
            groups = module._get_fsdp_state()._fsdp_param_groups
            was_sharded = any(not g.is_unsharded for g in groups)
        except AttributeError:  # private API moved: reshard, the forward gathers again when needed
            was_sharded = True
        module.unshard()
        try:
            yield module
        finally:
            if was_sharded:
                module.reshard()
        return
    with gathered(list(module.parameters(recurse=False))):
        yield module


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """``deepspeed.zero.GatheredParameters(params, modifier_rank)`` over the ZeRO-3 parameters among ``params`` (with ``modifier_rank`` set, that rank's in-place edits are kept and re-partitioned on exit);
    nothing to do for any other tensor. Every rank must enter it."""
    parts = [p for p in params if is_zero3_partitioned(p)]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def whole_model_loading() -> Iterator[None]:
    """Context for loading a frozen helper model (θ_b, a teacher) whole while a DeepSpeed ZeRO-3 config is active:
    transformers would otherwise build it partitioned under ``zero.Init``, unusable outside the DeepSpeed engine.
    Nothing to do otherwise."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover
        yield
        return
    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    obj = ref() if ref is not None else None
    if obj is None or not hf_ds.is_deepspeed_zero3_enabled():
        yield
        return
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(obj)


# ---- quantized bases ---------------------------------------------------------------------------------------------
def is_quantized_4bit(model: nn.Module) -> bool:
    """True when ``model`` (plain, peft- or DDP-wrapped) holds 4-bit quantized base weights (QLoRA: bitsandbytes
    ``Params4bit``, or a model loaded with ``load_in_4bit``). Checked from markers only: bitsandbytes need not be
    importable."""
    m = model
    seen = set()
    while id(m) not in seen:
        seen.add(id(m))
        if getattr(m, "is_loaded_in_4bit", False):
            return True
        q = getattr(getattr(m, "config", None), "quantization_config", None)
        if q is not None:
            bits4 = q.get("load_in_4bit") if isinstance(q, dict) else getattr(q, "load_in_4bit", False)
            if bits4:
                return True
        nxt = getattr(m, "module", None) or getattr(m, "base_model", None) or getattr(m, "model", None)
        if not isinstance(nxt, nn.Module):
            break
        m = nxt
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())
