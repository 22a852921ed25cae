"""Activation capture: the residual stream at one decoder block with an early exit, and streaming covariances of
linear modules' inputs.

Works on plain Hugging Face causal LMs (Llama / Qwen2 / Gemma / Mistral-like: a ``ModuleList`` of decoder blocks)
and on peft-wrapped ones: hooks sit on the real submodules, whichever wrapper the forward goes through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from safeft.errors import SafeFTError


def _find_layers(model: nn.Module) -> nn.ModuleList | None:
    """Fallback search: the longest ``ModuleList`` whose attribute name is ``layers``/``h``/``blocks``."""
    best: nn.ModuleList | None = None
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.ModuleList) and leaf in ("layers", "h", "blocks") and len(mod) > 0:
            if best is None or len(mod) > len(best):
                best = mod
    return best


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model`` (plain, peft-wrapped or DDP-wrapped), in order.

    Uses ``safeft.models.transformer_layers`` when available. Raises SafeFTError when none are found."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    try:
        from safeft.models import transformer_layers  # lazy: written in parallel
    except ImportError:
        transformer_layers = None
    if transformer_layers is not None:
        try:
            return transformer_layers(model)
        except SafeFTError:
            raise
        except Exception:  # an unexpected shape: fall back to the search below
            pass
    layers = _find_layers(model)
    if layers is None:
        raise SafeFTError(
            f"model {type(model).__name__} has no decoder layers (looked for a ModuleList named 'layers'); "
            f"CWAC supports Llama / Qwen2 / Gemma / Mistral-like causal LMs"
        )
    return layers


class _StopForward(Exception):
    """Raised by the capture hook to stop a forward pass right after the wanted block."""


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def run_to_layers(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: Sequence[int],
    **forward_kwargs: Any,
) -> dict[int, torch.Tensor]:
    """Residual streams after decoder blocks ``layers`` (0-based), running no block after the deepest of them.

    input_ids: ``[B, T]``; attention_mask: ``[B, T]`` (or a prepared 4-D mask, passed through to the model);
    ``forward_kwargs`` go to the model (e.g. ``position_ids`` for packed rows). Returns ``{layer: [B, T, d]}`` in
    the model's dtype, each equal to ``output_hidden_states[layer + 1]`` of a full forward (for a layer below the
    last block: the last entry of ``hidden_states`` has the final norm applied; ours never does). Gradients flow
    to the parameters of blocks ``0..max(layers)`` and the embeddings. Forward hooks store the blocks' outputs and
    the next block's pre-hook raises a private exception caught here, so the rest of the network (later blocks,
    final norm, LM head) never runs."""
    blocks = decoder_layers(model)
    want = sorted({int(x) for x in layers})
    if not want or not all(0 <= x < len(blocks) for x in want):
        raise SafeFTError(
            f"layer(s) {list(layers)} out of range: the model has {len(blocks)} decoder layers (0-based)"
        )
    store: dict[int, torch.Tensor] = {}
    deepest = want[-1]
    last = deepest == len(blocks) - 1

    def keeper(i: int):
        def keep(_mod: nn.Module, _args: Any, output: Any) -> None:
            store[i] = _block_output(output)
            if last and i == deepest:
                raise _StopForward

        return keep

    def stop(_mod: nn.Module, _args: Any) -> None:
        raise _StopForward

    # Stop in the *next* block's pre-hook rather than in this block's hook: under gradient checkpointing this
    # block is re-run during backward, and its hook must not raise then (it only re-stores the output). The stop
    # runs before any other pre-hook of that block (prepend): a sharding engine's hook (FSDP2's unshard, ZeRO-3's
    # fetch) never gathers a block that will not run. The keepers run after the engine's own post-forward hooks
    # (registered at wrap time), so a kept output carries the engine's pre-backward hooks.
    handles = [blocks[i].register_forward_hook(keeper(i)) for i in want]
    if not last:
        handles.append(blocks[deepest + 1].register_forward_pre_hook(stop, prepend=True))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in want if i not in store]
    if missing:
        raise SafeFTError(
            f"decoder layer(s) {missing} never ran during the forward pass; is this a decoder-only LM?"
        )
    return store


def run_to_layer(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    **forward_kwargs: Any,
) -> torch.Tensor:
    """Residual stream after decoder block ``layer`` (0-based), without running any later block:
    :func:`run_to_layers` for one layer. Returns ``[B, T, d_model]``."""
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise SafeFTError(
            f"layer {layer} is out of range: the model has {len(blocks)} decoder layers (0-based)"
        )
    return run_to_layers(model, input_ids, attention_mask, [layer], **forward_kwargs)[layer]


def _first_arg(args: Any, kwargs: Any) -> torch.Tensor | None:
    if args:
        return args[0]
    kwargs = kwargs or {}
    return kwargs.get("x", kwargs.get("input", kwargs.get("hidden_states")))


@torch.no_grad()
def shared_input_groups(
    model: nn.Module, modules: dict[str, nn.Module], input_ids: torch.Tensor
) -> list[list[str]]:
    """Group modules that receive **the same input tensor** in a forward pass (q/k/v read one normed hidden
    state; gate/up another): one probe forward on ``input_ids [1, T]`` records each module's first input and
    modules whose inputs are the same tensor object (or equal values of the same shape, for wrappers that copy)
    share a group. Modules that never run form their own groups. Groups keep the order of ``modules``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def make(name: str):
        def pre(_m: nn.Module, args: Any, kwargs: Any = None) -> None:
            x = _first_arg(args, kwargs)
            if isinstance(x, torch.Tensor) and name not in seen:
                seen[name] = x

        return pre

    for name, mod in modules.items():
        handles.append(mod.register_forward_pre_hook(make(name), with_kwargs=True))
    try:
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    reps: list[torch.Tensor | None] = []
    for name in modules:
        x = seen.get(name)
        for g, r in zip(groups, reps):
            if x is not None and r is not None and (x is r or (x.shape == r.shape and torch.equal(x, r))):
                g.append(name)
                break
        else:
            groups.append([name])
            reps.append(x)
    return groups


@torch.no_grad()
def budget_passes(order: Sequence[str], size_of: Callable[[str], int], budget: int) -> list[list[str]]:
    """``order`` cut into consecutive passes whose summed ``size_of`` (bytes of captured rows) stays within
    ``budget``; an item larger than the budget gets a pass of its own. One capture per pass keeps the rows of
    all modules from being held at once."""
    passes: list[list[str]] = [[]]
    used = 0
    for name in order:
        size = size_of(name)
        if passes[-1] and used + size > budget:
            passes.append([])
            used = 0
        passes[-1].append(name)
        used += size
    return passes


def capture_module_rows(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    stop_after_layer: int | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Each module's **input rows at selected positions**, float32 on cpu.

    batches: dicts with ``input_ids``, ``attention_mask`` ``[B, T]`` and ``select`` ``[B, T]`` (bool: the
    positions to keep). Returns ``{name: [rows [n_b, d_in] per batch]}``. ``stop_after_layer`` stops each forward
    after that decoder block (the deepest block holding a module)."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    box: dict[str, torch.Tensor] = {}
    handles = []

    def make(name: str):
        def pre(_m: nn.Module, args: Any, kwargs: Any = None) -> None:
            x = _first_arg(args, kwargs)
            if x is None:
                return
            sel = box["select"].to(x.device)
            if x.shape[:-1] != sel.shape:
                raise SafeFTError(f"capture: module {name} got input {tuple(x.shape)}, expected [B, T, d]")
            out[name].append(x[sel].float().cpu())

        return pre

    for name, mod in modules.items():
        handles.append(mod.register_forward_pre_hook(make(name), with_kwargs=True))
    try:
        for batch in batches:
            box["select"] = batch["select"].bool()
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if stop_after_layer is not None:
                run_to_layer(model, ids, mask, stop_after_layer)
            else:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


