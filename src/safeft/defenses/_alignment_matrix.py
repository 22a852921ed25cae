"""The alignment matrices V = W(θ₀) − W(θ_b) that AsFT and SafeLoRA build their safety projection from.

For every LoRA-targeted linear module (a peft ``LoraLayer``) we take the frozen base weight W(θ₀) from the model
being trained and the weight of the same module in the unaligned base θ_b, and keep V = W(θ₀) − W(θ_b)
(``[d_out, d_in]``, float32). Both defenses use Ĉ = V Vᵀ / ‖V‖_F, but never build it: Ĉ X = V (Vᵀ X) / ‖V‖_F.

θ_b is read once: when ``base_model_path`` holds safetensors files only the targeted tensors are read
(``safe_open``), so θ_b is never materialised in full; otherwise ``ctx.load_model`` loads it, the targeted
weights are copied out and the model is freed. V is not cached on disk: it is as large as the targeted weights of
θ_b, so reading those weights again costs what reading a cache would.

On a 4-bit (QLoRA) base the in-memory W(θ₀) is the quantized weight, whose rounding error (NF4: ~10% of a weight's
size) would swamp the alignment direction; W(θ₀) is then read from θ₀'s own files (``ctx.aligned_model_path``)
the same way as θ_b's. Under FSDP2 a defense keeps only the rows of V that match its rank's rows of LoRA B
(:meth:`AlignmentMatrix.shard_like`): Ĉ X = V (Vᵀ X)/‖V‖_F then runs as DTensor ops (an all-reduce of Vᵀ X).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from safeft.components.sharding import distribute_like, is_dtensor, is_quantized_4bit, whole_model_loading
from safeft.defenses.base import DefenseContext, unwrap_model
from safeft.errors import SafeFTError

PEFT_PREFIXES = ("base_model.model.", "base_model.")


@dataclass
class AlignmentMatrix:
    """V = W(θ₀) − W(θ_b) of one module, ``[d_out, d_in]`` float32, and its Frobenius norm (0.0 if V = 0)."""

    v: torch.Tensor
    norm: float

    def c_hat_times(self, x: torch.Tensor) -> torch.Tensor:
        """Ĉ X = V (Vᵀ X) / ‖V‖_F for X ``[d_out, k]`` -> ``[d_out, k]``; Ĉ is never built (it is d_out × d_out).
        Returns zeros when V = 0 (Ĉ = 0). X and V both plain tensors, or both DTensors sharded alike."""
        if self.norm == 0.0:
            return torch.zeros_like(x)
        v = self.v if is_dtensor(self.v) else self.v.to(device=x.device)
        return (v @ (v.T @ x.to(v.dtype))) / self.norm

    def shard_like(self, b: torch.Tensor) -> None:
        """Keep only the rows of V that this rank holds of ``b`` (LoRA B ``[d_out, r]``, an FSDP2 DTensor), as a
        DTensor sharded like it; nothing to do when ``b`` is not sharded."""
        if is_dtensor(b) and not is_dtensor(self.v):
            self.v = distribute_like(self.v, b)


def strip_peft_prefix(name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj`` -> ``model.layers.0.self_attn.q_proj``."""
    for p in PEFT_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The peft ``LoraLayer`` modules of ``model`` that carry the active adapter, keyed by module name with the
    peft prefixes stripped (the name the weight has in θ_b, without ``.weight``)."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.nn.Module] = {}
    for name, mod in unwrap_model(model).named_modules():
        if isinstance(mod, LoraLayer):
            adapter = active_adapter(mod)
            if adapter in getattr(mod, "lora_A", {}):
                out[strip_peft_prefix(name)] = mod
    return out


def active_adapter(mod: torch.nn.Module) -> str:
    """Name of the (single) active adapter of a LoraLayer."""
    a = mod.active_adapter
    if isinstance(a, (list, tuple)):
        if len(a) != 1:
            raise SafeFTError(
                f"LoRA layer has {len(a)} active adapters {list(a)}; activate exactly one adapter"
            )
        a = a[0]
    return a


def lora_factors(mod: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B ``[d_out, r]``, A ``[r, d_in]``, scaling α/r) of a LoraLayer's active adapter (the live parameters)."""
    a = active_adapter(mod)
    return mod.lora_B[a].weight, mod.lora_A[a].weight, float(mod.scaling[a])


def base_weight(mod: torch.nn.Module) -> torch.Tensor:
    """The frozen W(θ₀) ``[d_out, d_in]`` of a LoraLayer (transposed for fan_in_fan_out Conv1D layers)."""
    if getattr(mod, "merged", False):
        raise SafeFTError("LoRA adapters are merged into the base weights; unmerge them before training")
    w = mod.get_base_layer().weight
    if getattr(mod, "fan_in_fan_out", False):
        w = w.T
    return w


def _safetensors_index(path: Path) -> dict[str, Path]:
    files = [path] if path.is_file() and path.suffix == ".safetensors" else sorted(path.glob("*.safetensors"))
    if not files:
        return {}
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                index[k] = f
    return index


def _match_key(name: str, keys: list[str] | set[str]) -> str | None:
    """θ_b key for module ``name``: exact ``name.weight`` else the unique key that ends with it (prefix differences
    such as a missing ``model.``); None if absent or ambiguous."""
    want = f"{name}.weight"
    if want in keys:
        return want
    hits = [k for k in keys if k.endswith("." + want) or want.endswith("." + k)]
    return hits[0] if len(hits) == 1 else None


def _read_base_weights(
    names: list[str], ctx: DefenseContext, model_path: str | None = None
) -> dict[str, torch.Tensor]:
    """Targeted weights of θ_b (or of the model at ``model_path``) by module name (float32, CPU)."""
    path = Path(str(model_path or ctx.base_model_path))
    if not path.exists():
        raise SafeFTError(
            f"base model θ_b not found at {path}; pass --base-model PATH (a local model directory)"
        )
    out: dict[str, torch.Tensor] = {}
    index = _safetensors_index(path)
    if index:
        from safetensors import safe_open

        keys = set(index)
        for n in names:
            k = _match_key(n, keys)
            if k is None:
                raise SafeFTError(
                    f"{path}: no weight for LoRA-targeted module {n!r} in θ_b's safetensors; θ_b must be the base "
                    f"model θ₀ was aligned from (same architecture)"
                )
            with safe_open(str(index[k]), framework="pt") as fh:
                out[n] = fh.get_tensor(k).float()
        return out
    if ctx.load_model is None:
        raise SafeFTError(
            f"{path}: holds no *.safetensors files and no model loader was given; convert θ_b first"
        )
    with whole_model_loading():  # DeepSpeed ZeRO-3: not partitioned by zero.Init
        base = ctx.load_model(str(path))
    params = dict(base.named_parameters())
    for n in names:
        k = _match_key(n, set(params))
        if k is None:
            raise SafeFTError(f"{path}: θ_b has no module {n!r}; θ_b must have θ₀'s architecture")
        out[n] = params[k].detach().float().cpu().clone()
    del base, params
    gc.collect()
    return out


def compute_alignment_matrices(
    model: torch.nn.Module, ctx: DefenseContext, device: torch.device | str | None = None
) -> dict[str, AlignmentMatrix]:
    """V = W(θ₀) − W(θ_b) for every LoRA-targeted module of ``model``, keyed by stripped module name.

    ``device``: where the V's live (default: each module's weight device). Raises :class:`SafeFTError` when the
    model has no LoRA layers, θ_b lacks a module or its shape differs, or θ_b equals θ₀ on every targeted weight
    (V = 0 everywhere: the known peer-library bug of passing θ₀ as both models, which silently turns AsFT into
    plain SFT)."""
    if not ctx.base_model_path:
        raise SafeFTError(
            "the unaligned base model θ_b is required: pass --base-model PATH (model.base in the config)"
        )
    if (
        ctx.aligned_model_path
        and Path(ctx.aligned_model_path).resolve() == Path(ctx.base_model_path).resolve()
    ):
        raise SafeFTError(
            f"θ_b equals θ₀: base model path {ctx.base_model_path} is the aligned model itself; pass the unaligned "
            f"base model θ₀ was aligned from (with θ₀ twice the safety matrix is 0 and the defense is plain SFT)"
        )
    mods = lora_modules(model)
    if not mods:
        raise SafeFTError("the model has no LoRA layers; AsFT/SafeLoRA need training.method: lora")
    base = _read_base_weights(sorted(mods), ctx)
    aligned: dict[str, torch.Tensor] = {}
    if is_quantized_4bit(model):
        if not ctx.aligned_model_path:
            raise SafeFTError(
                "4-bit (QLoRA) base: W(θ₀) in memory is quantized; AsFT/SafeLoRA read θ₀'s own weights from its "
                "folder, but none was given (DefenseContext.aligned_model_path): pass --model PATH"
            )
        aligned = _read_base_weights(sorted(mods), ctx, model_path=ctx.aligned_model_path)
    out: dict[str, AlignmentMatrix] = {}
    for n, mod in mods.items():
        w0 = aligned.pop(n) if n in aligned else base_weight(mod).detach()
        wb = base.pop(n)
        if tuple(wb.shape) != tuple(w0.shape):
            raise SafeFTError(
                f"{ctx.base_model_path}: module {n!r} has shape {tuple(wb.shape)} in θ_b but {tuple(w0.shape)} in θ₀; "
                f"θ_b must be the base model θ₀ was aligned from"
            )
        v = w0.float().cpu() - wb
        dev = torch.device(device) if device is not None else lora_factors(mod)[1].device
        out[n] = AlignmentMatrix(v=v.to(dev), norm=float(torch.linalg.matrix_norm(v).item()))
    if all(m.norm == 0.0 for m in out.values()):
        raise SafeFTError(
            f"θ_b equals θ₀: W(θ₀) − W(θ_b) is 0 on every LoRA-targeted module ({len(out)} modules) with base model "
            f"{ctx.base_model_path}; pass the unaligned base model θ₀ was aligned from (with θ₀ twice the defense "
            f"would silently be plain SFT)"
        )
    return out
