"""Prompt formatting and tokenisation with prompt masking, plus the padding collator.

Two templates: ``"chat"`` (the tokenizer's own chat template) and ``"alpaca"``
(``"### Instruction:\\n{prompt}\\n\\n### Response:\\n"``). A custom format string holding ``{prompt}`` also works.
Only the response (and the end-of-turn token(s) that close it) is learned; prompt positions get label -100.
"""

from __future__ import annotations

from typing import Any

import torch

from safeft.errors import SafeFTError

IGNORE_INDEX = -100
ALPACA_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def _tok_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise SafeFTError(
            f"tokenizer of {_tok_name(tokenizer)} has no chat template; pass --template alpaca or a template"
        )


def _apply_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text


def _plain_template(template: str) -> str | None:
    """Format string for a non-chat template, or None for "chat"."""
    if template == "chat":
        return None
    if template == "alpaca":
        return ALPACA_TEMPLATE
    if "{prompt}" in template:
        return template
    raise SafeFTError(
        f"template={template!r} is unknown; use 'chat', 'alpaca' or a format string containing '{{prompt}}'"
    )


def format_prompt(tokenizer: Any, prompt: str, template: str = "chat") -> str:
    """Text of the prompt up to and including the assistant header, ready for generation.

    ``template="chat"`` uses the tokenizer's chat template with ``add_generation_prompt=True``; ``"alpaca"`` gives
    ``"### Instruction:\\n{prompt}\\n\\n### Response:\\n"``. Raises SafeFTError when the tokenizer has no chat
    template and ``template="chat"``."""
    fmt = _plain_template(template)
    if fmt is not None:
        return fmt.replace("{prompt}", prompt)
    _require_chat_template(tokenizer)
    return _apply_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def _response_text(tokenizer: Any, prompt: str, response: str, template: str, prompt_text: str) -> str:
    """The text after ``prompt_text`` in the full conversation, end-of-turn token(s) included."""
    eos = tokenizer.eos_token or ""
    if _plain_template(template) is not None:
        return response + eos
    full = _apply_chat(
        tokenizer,
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        add_generation_prompt=False,
    )
    if full.startswith(prompt_text) and len(full) > len(prompt_text):
        return full[len(prompt_text) :]
    # Templates that rewrite earlier turns (e.g. strip reasoning) break the prefix property: fall back.
    return response + eos


def tokenize_example(
    tokenizer: Any,
    ex: Any,
    template: str = "chat",
    max_length: int = 512,
    index: int | None = None,
) -> dict[str, list[int]]:
    """Tokenise one :class:`~safeft.data.Example` for causal-LM training with prompt masking.

    Returns ``{"input_ids", "attention_mask", "labels"}``, each a list of ``L ≤ max_length`` ints. The prompt part
    (``format_prompt``) and the response part (the rest of the templated conversation, end-of-turn included) are
    tokenised separately with ``add_special_tokens=False`` (a BOS the template does not write is not added), then
    concatenated and truncated from the right. ``labels`` is -100 on prompt positions and equals ``input_ids``
    on response positions. Raises SafeFTError if every label is masked (``index`` names the example)."""
    if max_length < 1:
        raise SafeFTError(f"max_length={max_length} must be ≥ 1")
    prompt_text = format_prompt(tokenizer, ex.prompt, template)
    resp_text = _response_text(tokenizer, ex.prompt, ex.response, template, prompt_text)
    p_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    r_ids = list(tokenizer(resp_text, add_special_tokens=False)["input_ids"])
    input_ids = (p_ids + r_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_length]
    if all(lab == IGNORE_INDEX for lab in labels):
        where = f"example {index}" if index is not None else "an example"
        raise SafeFTError(
            f"{where}: every label is masked (prompt has {len(p_ids)} tokens, response {len(r_ids)}, "
            f"max_length={max_length}); raise max_length or shorten the prompt"
        )
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


class CompletionCollator:
    """Right-pads a list of ``tokenize_example`` dicts into LongTensors of shape ``(batch, max_len)``.

    ``input_ids`` are padded with the tokenizer's pad id (eos id when it has none), ``attention_mask`` with 0,
    ``labels`` with -100. Extra keys are ignored."""

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None):
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise SafeFTError(
                f"tokenizer of {_tok_name(tokenizer)} has neither a pad nor an eos token; set one"
            )
        self.pad_id = int(pad)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise SafeFTError("CompletionCollator got an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        if m:
            width = -(-width // m) * m
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            pad = width - len(ids)
            out["input_ids"].append(ids + [self.pad_id] * pad)
            out["attention_mask"].append(list(f.get("attention_mask", [1] * len(ids))) + [0] * pad)
            out["labels"].append(list(f.get("labels", ids)) + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
