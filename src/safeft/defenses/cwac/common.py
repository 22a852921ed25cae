"""Small helpers shared by CWAC's parts: text keys and digests, θ₀ mode, tokenisation, padding, positions, ranks.

Pure functions except :func:`theta0` (a context manager that switches a model to θ₀ and back).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

# Bumped whenever a change alters what an artifact holds: part of every artifact key, so artifacts written by an
# older CWAC are recomputed rather than silently reused.
ARTIFACT_VERSION = 2


def ranges(idx: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → "0–2, 5, 7–8"."""
    idx = list(idx)
    out, start = [], None
    for k, i in enumerate(idx):
        if start is None:
            start = i
        if k + 1 == len(idx) or idx[k + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}–{i}")
            start = None
    return ", ".join(out)


def norm_text(text: str) -> str:
    """``safeft.data.normalize_text`` (NFKC, lower case, single spaces, no edge punctuation)."""
    from safeft.data import normalize_text

    return normalize_text(text)


def digest(items: Sequence[str]) -> str:
    """Short sha256 of a sequence of strings (order matters)."""
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def theta0(model: nn.Module) -> Iterator[None]:
    """θ₀ in eval mode under no_grad: adapters disabled for peft models (full FT: the model is θ₀ before step 1).
    Every module's train/eval flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    ctx = model.disable_adapter() if is_peft(model) else contextlib.nullcontext()
    try:
        with ctx, torch.no_grad():
            yield
    finally:
        for m, t in modes:
            m.train(t)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def prompt_ids(tokenizer: Any, template: str, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each prompt formatted for generation (user turn + assistant header), truncated on the left
    so the generation header — where the decision is made — is always kept."""
    from safeft.data import format_prompt

    out = []
    for p in prompts:
        ids = list(tokenizer(format_prompt(tokenizer, p, template), add_special_tokens=False)["input_ids"])
        out.append(ids[-max_length:] if len(ids) > max_length else ids)
    return out


def first_token_gap(logprobs: torch.Tensor, target: int) -> tuple[list[float], list[float], list[bool]]:
    """Per row of ``logprobs`` [n, vocab] (log-softmax at the generation header): the gap
    log p(top) − log p(target) (0 when the target is the top token), p(target), and whether it is the top token."""
    top = logprobs.max(dim=-1).values
    tgt = logprobs[:, target]
    return (top - tgt).tolist(), tgt.exp().tolist(), (logprobs.argmax(dim=-1) == target).tolist()


def first_token_gaps(
    model: nn.Module, seqs: Sequence[Sequence[int]], target: int, desc: str | None = None
) -> tuple[list[float], list[float], list[bool]]:
    """:func:`first_token_gap` of ``model`` at the end of each token list (a formatted prompt, see
    :func:`prompt_ids`): one prompt a forward pass (no padding), one vocabulary row held at a time. ``desc``: a
    progress bar's label (none when ``None``)."""
    from tqdm.auto import tqdm

    dev = device_of(model)
    gap: list[float] = []
    p: list[float] = []
    top: list[bool] = []
    with torch.no_grad():
        for s in tqdm(seqs, desc=desc, disable=desc is None):
            logits = model(input_ids=torch.tensor([list(s)], device=dev)).logits[0, -1:].float()
            g, q, t = first_token_gap(torch.log_softmax(logits, -1).cpu(), target)
            gap += g
            p += q
            top += t
    return gap, p, top


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every sequence (0 for fewer than two sequences)."""
    if len(seqs) < 2:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def template_prefix_len(tokenizer: Any, template: str) -> int:
    """Tokens the prompt template puts before any user text (system prompt, role header): the common prefix of
    three unrelated formatted prompts. These positions carry no information about the request."""
    probes = ["Hello there.", "What is 2 + 2?", "Zebras sleep standing up"]
    return common_prefix_len(prompt_ids(tokenizer, template, probes, 10**9))


def pad_right(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists → ``input_ids [N, T]`` and ``lengths [N]`` (real tokens start at position 0, so
    positions and activations equal the unpadded ones)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[N, width]`` attention mask (1 on real tokens) for right-padded rows."""
    return (torch.arange(width)[None, :] < lengths[:, None]).long()


def last_positions(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Indices ``[N, n]`` of the last ``n`` real tokens of right-padded rows (clamped at 0 for short rows)."""
    return (lengths[:, None] - n + torch.arange(n)[None, :]).clamp_min(0)


def batches(
    seqs: Sequence[Sequence[int]], pad: int, dev: torch.device, bs: int = 8
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Right-padded batches of ``bs`` sequences: ``({"input_ids", "attention_mask"}, lengths)``."""
    for i in range(0, len(seqs), bs):
        ids, lengths = pad_right(seqs[i : i + bs], pad)
        yield (
            {"input_ids": ids.to(dev), "attention_mask": length_mask(lengths, ids.shape[1]).to(dev)},
            lengths,
        )


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed when initialised, else RANK / WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def environment(dev: torch.device | None = None) -> dict[str, Any]:
    """Where an artifact was computed (float sums depend on the thread count and kernels): kept in its meta."""
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": str(dev) if dev is not None else "cpu",
    }
