"""Weight constraint, training part: keep ΔW·V = 0 exactly after every optimizer step (AdamW included).

LoRA (ΔW = B A, A: ``[r, d_in]``): A ← A − (A V)Vᵀ, so ΔW V = B A V = 0. Full fine-tuning: W ← W − (W V − W₀V)Vᵀ
with W₀V (``[d_out, k]``) stored instead of W₀. Modules that read the same input (q/k/v, gate/up) share one V
tensor on the device. For 16-bit tensors the projection runs on an fp32 master copy of the constrained tensor
(exact to fp32 precision), and the parameter is that master rounded to its dtype each step.

Both projections act on every row independently, so under sharding they run on what each rank holds
(:mod:`safeft.components.sharding`):

* **FSDP2**: a parameter is a ``Shard(0)`` DTensor; :meth:`WeightConstraint.rebind` (from ``on_train_begin``, once
  the model is wrapped) takes the parameters again by name and keeps only this rank's rows of W₀V and of the fp32
  masters; ``apply`` edits the local rows in place. No communication; V is replicated.
* **DeepSpeed ZeRO-3** (LoRA only): each LoRA A is gathered for the edit (``GatheredParameters``, a LoRA-sized
  tensor; rank 0's result kept); masters stay whole (LoRA-sized too).
* one process, DDP, ZeRO-1/2: whole tensors, identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from safeft.components.sharding import (
    full_tensor,
    gathered,
    is_dtensor,
    local_tensor,
    project_rows_out_,
    project_update_out_,
    rows_like,
)
from safeft.errors import SafeFTError

_LOW = (torch.bfloat16, torch.float16)


@dataclass
class _Entry:
    name: str  # "<layer>.<path in the block>"
    kind: str  # "lora" (rows of A) or "full" (update of W)
    param: nn.Parameter
    V: torch.Tensor  # [d_in, k] float32 on the param's device, shared by a group (replicated on every rank)
    w0v: torch.Tensor | None = None  # full FT: W₀V [d_out, k] float32 (this rank's rows once sharded)
    master: torch.Tensor | None = (
        None  # fp32 copy of a 16-bit param, this rank's rows (None: the param is it)
    )
    lora_B: nn.Parameter | None = None
    adapter: str | None = None  # LoRA adapter name
    local: bool = False  # w0v / master already hold only this rank's rows


def _module(blocks: nn.ModuleList, name: str) -> nn.Module:
    layer, path = name.split(".", 1)
    try:
        return blocks[int(layer)].get_submodule(path)
    except (AttributeError, IndexError) as e:
        raise SafeFTError(
            f"CWAC: constrained module {name!r} is missing from the wrapped model ({e})"
        ) from None


class WeightConstraint:
    """The installed projections. ``install`` once after ``prepare``; ``rebind`` once the training engine has
    wrapped the model; ``apply`` after every optimizer step (every rank: a pure function of what the rank holds);
    ``leak`` for the final report (a collective under sharding: every rank calls it)."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.backend: str | None = None  # "fsdp2", "zero3" or None (whole tensors)

    def __bool__(self) -> bool:
        return bool(self.entries)

    @torch.no_grad()
    def install(
        self,
        modules: dict[str, nn.Module],
        Vs: dict[str, torch.Tensor],
        use_lora: bool,
        master_weights: bool | None = None,
    ) -> None:
        """``modules``: ``{name: module}``; ``Vs``: ``{name: V}`` (modules of a group map to the same V object,
        moved to the device once). ``master_weights``: None = fp32 masters for 16-bit tensors only."""
        self.entries = []
        self.backend = None
        on_dev: dict[tuple[int, torch.device], torch.Tensor] = {}

        def dev_v(V: torch.Tensor, device: torch.device) -> torch.Tensor:
            key = (id(V), device)
            if key not in on_dev:
                on_dev[key] = V.to(device=device, dtype=torch.float32).contiguous()
            return on_dev[key]

        def wants_master(p: torch.Tensor) -> bool:
            return bool(master_weights) if master_weights is not None else p.dtype in _LOW

        for name, mod in modules.items():
            V = Vs[name]
            if use_lora:
                for adapter in mod.lora_A:
                    A = mod.lora_A[adapter].weight  # [r, d_in]
                    e = _Entry(
                        name,
                        "lora",
                        A,
                        dev_v(V, A.device),
                        lora_B=mod.lora_B[adapter].weight,
                        adapter=adapter,
                    )
                    if wants_master(A):
                        e.master = A.detach().float().clone()
                    self.entries.append(e)
            else:
                W = mod.weight  # [d_out, d_in]
                v = dev_v(V, W.device)
                e = _Entry(name, "full", W, v, w0v=W.detach().float() @ v)
                if wants_master(W):
                    e.master = W.detach().float().clone()
                self.entries.append(e)
        self.apply()  # LoRA: project A once now (B = 0, so θ is unchanged); full FT: a no-op at step 0

    @torch.no_grad()
    def rebind(self, blocks: nn.ModuleList, backend: str | None) -> None:
        """Take every constrained parameter again from ``blocks`` (the decoder blocks of the model as the engine
        wrapped it: FSDP2 swaps each parameter for a DTensor, a device move may copy it) and lay the per-row
        state out like it: W₀V and the masters keep this rank's rows, V moves to the parameter's device."""
        if backend == "zero3" and any(e.kind == "full" for e in self.entries):
            raise SafeFTError(
                "CWAC with full fine-tuning does not run under DeepSpeed ZeRO-3: its projection would gather every "
                "constrained weight after each step; use FSDP2 (fsdp_version: 2), where each rank projects its own "
                "rows, or LoRA"
            )
        self.backend = backend
        on_dev: dict[tuple[int, torch.device], torch.Tensor] = {}
        for e in self.entries:
            mod = _module(blocks, e.name)
            if e.kind == "lora":
                p, b = mod.lora_A[e.adapter].weight, mod.lora_B[e.adapter].weight
                e.lora_B = b
            else:
                p = mod.weight
            if tuple(p.shape) != tuple(e.param.shape):
                raise SafeFTError(
                    f"CWAC: {e.name} changed shape after prepare(): {tuple(e.param.shape)} → {tuple(p.shape)}"
                )
            dev = local_tensor(p).device
            key = (id(e.V), dev)
            if key not in on_dev:
                on_dev[key] = e.V.to(dev)
            e.V = on_dev[key]
            cut = is_dtensor(p) and not e.local  # FSDP2: keep the rows this rank holds
            for attr in ("w0v", "master"):
                t = getattr(e, attr)
                if t is not None:
                    setattr(e, attr, (rows_like(t, p).clone() if cut else t).to(dev).contiguous())
            e.local = e.local or cut
            e.param = p

    @torch.no_grad()
    def apply(self) -> None:
        for e in self.entries:
            with gathered(
                [e.param], modifier_rank=0
            ):  # ZeRO-3: the LoRA A whole for the edit; no-op otherwise
                self._apply_one(e)

    @staticmethod
    def _apply_one(e: _Entry) -> None:
        p = e.param
        if e.master is None:
            if e.kind == "lora":
                project_rows_out_(p, e.V)
            else:
                project_update_out_(p, e.w0v, e.V)
            return
        x = local_tensor(p)  # the rows this rank holds (all of them when p is not sharded)
        m = e.master
        if x.shape != m.shape:
            raise SafeFTError(
                f"CWAC: {e.name}: master rows {tuple(m.shape)} do not match the parameter's {tuple(x.shape)}"
            )
        m.add_(x.float() - m.to(x.dtype).float())  # the optimizer's change to the rounded copy
        if e.kind == "lora":
            m.sub_((m @ e.V) @ e.V.T)
        else:
            m.sub_((m @ e.V - e.w0v) @ e.V.T)
        x.copy_(m.to(x.dtype))

    @torch.no_grad()
    def leak(self) -> dict[str, float]:
        """Largest relative leak over the constrained tensors. LoRA: ‖ΔW V‖/‖ΔW‖ with ΔW = B A (the fp32 master
        of A when there is one); full FT: ‖(W − W₀)V‖/‖W₀V‖ (how far the module's response to its safety
        subspace moved; W₀ itself is not kept). ``..._param``: the same on the stored (16-bit) parameters,
        rounding included, when masters are used.

        Under sharding every rank must call it: LoRA A is gathered (LoRA-sized), B's rows stay local, and the
        squared norms are summed over ranks (one all-reduce); full FT needs only the local rows."""
        rows: list[tuple[bool, torch.Tensor]] = []  # (is_param of a mastered entry, [num², den²])
        for e in self.entries:
            with gathered([e.param, e.lora_B] if e.lora_B is not None else [e.param]):
                for src, is_param in ((e.master, False), (e.param, True)):
                    if src is None:
                        continue
                    if is_param:
                        t = local_tensor(src).float()
                    else:
                        t = src
                    if e.kind == "lora":
                        a = self._whole_rows(t, e.param)  # A [r, d_in], whole
                        b = local_tensor(e.lora_B).float()  # this rank's rows of B
                        dw = b @ a.to(b.device)
                        num, den = (dw @ e.V.to(dw.device)).pow(2).sum(), dw.pow(2).sum()
                    else:
                        num, den = (t @ e.V - e.w0v).pow(2).sum(), e.w0v.pow(2).sum()
                    rows.append((is_param and e.master is not None, torch.stack([num, den]).double().cpu()))
        if not rows:
            return {}
        sums = torch.stack([r for _, r in rows])  # [n, 2]
        if self._sharded():
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dev = local_tensor(self.entries[0].param).device
                s = sums.to(dev)
                dist.all_reduce(s)  # rows held on several ranks (HSDP replicas) count alike in num and den
                sums = s.cpu()
        worst = worst_param = 0.0
        for (is_param, _), (num, den) in zip(rows, sums.tolist()):
            val = float((num / max(den, 1e-60)) ** 0.5) if num > 0 else 0.0
            if is_param:
                worst_param = max(worst_param, val)
            else:
                worst = max(worst, val)
        out = {"cwac_max_relative_leak": worst}
        if any(e.master is not None for e in self.entries):
            out["cwac_max_relative_leak_param"] = worst_param
        return out

    def _sharded(self) -> bool:
        return any(is_dtensor(e.param) for e in self.entries)

    @staticmethod
    def _whole_rows(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The whole tensor from this rank's rows ``local`` of ``like`` (an all-gather when ``like`` is a
        DTensor: every rank calls it), else ``local``."""
        if not is_dtensor(like):
            return local
        from torch.distributed.tensor import DTensor

        d = DTensor.from_local(
            local.to(like.to_local().device).contiguous(),
            like.device_mesh,
            like.placements,
            run_check=False,
            shape=like.shape,
            stride=torch.empty(like.shape, device="meta").stride(),
        )
        return full_tensor(d).float()
