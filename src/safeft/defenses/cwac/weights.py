"""Weight constraint, training part: keep ΔW·V = 0 exactly after every optimizer step (AdamW included).

LoRA (ΔW = B A, A: ``[r, d_in]``): A ← A − (A V)Vᵀ, so ΔW V = B A V = 0. Full fine-tuning: W ← W − (W V − W₀V)Vᵀ
with W₀V (``[d_out, k]``) stored instead of W₀. Modules that read the same input (q/k/v, gate/up) share one V
tensor on the device. For 16-bit tensors the projection runs on an fp32 master copy of the constrained tensor
(exact to fp32 precision), and the parameter is that master rounded to its dtype each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from safeft.components.projection import project_rows_out, project_update_out_w0v

_LOW = (torch.bfloat16, torch.float16)


@dataclass
class _Entry:
    name: str
    kind: str  # "lora" (rows of A) or "full" (update of W)
    param: nn.Parameter
    V: torch.Tensor  # [d_in, k] float32 on the param's device, shared by a group
    w0v: torch.Tensor | None = None  # full FT: W₀V [d_out, k] float32
    master: torch.Tensor | None = None  # fp32 copy of a 16-bit param (None: the param is the master)
    lora_B: nn.Parameter | None = None


class WeightConstraint:
    """The installed projections. ``install`` once after ``prepare``; ``apply`` after every optimizer step (every
    rank under DDP: a pure function of identical parameters); ``leak`` for the final report."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []

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
                    e = _Entry(name, "lora", A, dev_v(V, A.device), lora_B=mod.lora_B[adapter].weight)
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
    def apply(self) -> None:
        for e in self.entries:
            p = e.param
            if e.master is None:
                if e.kind == "lora":
                    p.copy_(project_rows_out(p, e.V))
                else:
                    p.copy_(project_update_out_w0v(p, e.w0v, e.V))
                continue
            m = e.master
            m.add_(p.float() - m.to(p.dtype).float())  # the optimizer's change to the rounded copy
            if e.kind == "lora":
                m.sub_((m @ e.V) @ e.V.T)
            else:
                m.sub_((m @ e.V - e.w0v) @ e.V.T)
            p.copy_(m.to(p.dtype))

    @torch.no_grad()
    def leak(self) -> dict[str, float]:
        """Largest relative leak over the constrained tensors. LoRA: ‖ΔW V‖/‖ΔW‖ with ΔW = B A (the fp32 master
        of A when there is one); full FT: ‖(W − W₀)V‖/‖W₀V‖ (how far the module's response to its safety
        subspace moved; W₀ itself is not kept). ``..._param``: the same on the stored (16-bit) parameters,
        rounding included, when masters are used."""
        out: dict[str, float] = {}
        worst = worst_param = 0.0
        for e in self.entries:
            for src, is_param in ((e.master, False), (e.param, True)):
                if src is None:
                    continue
                t = src.float()
                if e.kind == "lora":
                    dw = e.lora_B.float() @ t
                    val = float((dw @ e.V).norm() / dw.norm().clamp_min(1e-30))
                else:
                    val = float((t @ e.V - e.w0v).norm() / e.w0v.norm().clamp_min(1e-30))
                if is_param and e.master is not None:
                    worst_param = max(worst_param, val)
                else:
                    worst = max(worst, val)
        if self.entries:
            out["cwac_max_relative_leak"] = worst
            if any(e.master is not None for e in self.entries):
                out["cwac_max_relative_leak_param"] = worst_param
        return out
