"""Batched greedy generation for evaluation.

Prompts are formatted (chat template or alpaca), tokenised one by one, sorted by length so each batch carries
little padding, left-padded by hand, decoded greedily with the KV cache, and returned in the input order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from safeft.errors import SafeFTError

# End-of-turn tokens of common chat formats (ChatML, Llama-3, Gemma); used as stop tokens when in the vocab.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")

FormatFn = Callable[[Any, str], str]


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [int(i) for i in x]


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the generation config's eos ids, the tokenizer's eos, and the end-of-turn
    tokens of ChatML / Llama-3 / Gemma when the vocab has them. Sorted, unique."""
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        ids.update(_as_list(getattr(gen_cfg, "eos_token_id", None)))
    ids.update(_as_list(tokenizer.eos_token_id))
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != unk:
            ids.add(tid)
    return sorted(ids)


def _default_format_fn(template: str) -> FormatFn:
    from safeft.data import format_prompt  # lazy: data/ is a sibling package

    return lambda tok, prompt: format_prompt(tok, prompt, template)


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    template: str = "chat",
    max_new_tokens: int = 128,
    batch_size: int = 16,
    desc: str = "generating",
    format_fn: FormatFn | None = None,
) -> list[str]:
    """Greedy answers to ``prompts``, one string per prompt, in the input order.

    ``model``: a causal LM (``transformers`` or ``peft`` wrapped); ``prompts``: raw user turns. Each prompt is
    turned into text by ``format_fn(tokenizer, prompt)`` (default: ``safeft.data.format_prompt(tokenizer, prompt,
    template)``); a BOS token is added only when that text does not already start with one. Batches of at most
    ``batch_size`` prompts, sorted by token length, are left-padded (input_ids/attention_mask: [batch, max_len]).
    Decoding is greedy with the KV cache, at most ``max_new_tokens`` new tokens, stopping at any of
    :func:`stop_token_ids`. The answer is the text of the new tokens before the first stop token, decoded with
    ``skip_special_tokens=True`` and stripped. The model runs in eval mode under ``torch.inference_mode`` and
    every module's train/eval flag is restored afterwards; the tokenizer's ``padding_side`` is restored too.
    """
    if batch_size < 1:
        raise SafeFTError(f"generate: batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise SafeFTError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = list(prompts)
    if not prompts:
        return []
    fmt = format_fn if format_fn is not None else _default_format_fn(template)
    stops = stop_token_ids(model, tokenizer)
    if not stops:
        raise SafeFTError("generate: the tokenizer and model define no eos token; set tokenizer.eos_token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    bos = getattr(tokenizer, "bos_token", None)

    encoded: list[list[int]] = []
    for p in prompts:
        text = fmt(tokenizer, p)
        add_special = not (bos and text.startswith(bos))
        encoded.append(list(tokenizer(text, add_special_tokens=add_special)["input_ids"]))
    # Longest first: an out-of-memory error shows up in the first batch, not the last.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    answers: list[str | None] = [None] * len(prompts)

    device = _model_device(model)
    modes = [(m, m.training) for m in model.modules()]
    old_side = getattr(tokenizer, "padding_side", None)
    stop_set = set(stops)
    try:
        tokenizer.padding_side = "left"
        model.eval()
        with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids = encoded[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids) :] = 1
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    num_beams=1,
                    use_cache=True,
                    eos_token_id=stops,
                    pad_token_id=pad_id,
                )
                new = out[:, width:].tolist()  # [batch, <= max_new_tokens]
                for row, i in enumerate(idx):
                    toks = new[row]
                    cut = next((k for k, t in enumerate(toks) if t in stop_set), len(toks))
                    answers[i] = tokenizer.decode(toks[:cut], skip_special_tokens=True).strip()
                bar.update(len(idx))
    finally:
        if old_side is not None:
            tokenizer.padding_side = old_side
        for m, was_training in modes:
            m.training = was_training
    return [a if a is not None else "" for a in answers]
