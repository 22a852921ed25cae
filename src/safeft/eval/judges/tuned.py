"""The content judge's fine-tuned design: the sentence encoder with LoRA adapters, trained end to end with the head.

One forward pass per (prompt, answer) two-segment input; the token states are mean-pooled twice — over the whole
pair and over the answer's tokens only (the answer read in the light of the prompt) — and fed with the surface
features to the same two-head network as the frozen design (:class:`~safeft.eval.judges.content.ContentHead`). Only
the LoRA factors (r × 384 per adapted matrix) and the head are stored: ≈ 1.5 MB.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

LORA_TARGETS = ("query", "key", "value", "dense")  # attention q/k/v and every dense layer of each block


def pool_pair(hidden: torch.Tensor, enc: dict[str, torch.Tensor], sep_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean pooling of ``hidden`` [batch, len, dim] over the attended tokens and over the answer segment (token type
    1, its closing [SEP] excluded). Returns ``(pair, answer)``, each [batch, dim], L2-normalised; an answer cut to
    nothing falls back to the pair pooling."""
    m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    seg = ((enc["token_type_ids"] == 1) & (enc["input_ids"] != sep_id)).unsqueeze(-1).to(hidden.dtype)
    e_pair = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    na = seg.sum(1)
    e_ans = torch.where(na > 0, (hidden * seg).sum(1) / na.clamp_min(1.0), e_pair)
    return nn.functional.normalize(e_pair, dim=-1), nn.functional.normalize(e_ans, dim=-1)


class TunedJudgeModel(nn.Module):
    """LoRA-adapted encoder + :class:`ContentHead`. ``forward(enc, f)`` → logits [batch, 2] (harm, refusal)."""

    def __init__(self, encoder_model: nn.Module, n_features: int, hidden: int, lora_r: int, lora_alpha: int,
                 sep_id: int, lora_dropout: float = 0.1):
        from peft import LoraConfig, get_peft_model

        from safeft.eval.judges.content import ContentHead

        super().__init__()
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                         target_modules=list(LORA_TARGETS))
        self.encoder = get_peft_model(encoder_model, cfg)
        self.head = ContentHead(int(encoder_model.config.hidden_size), n_features, hidden=hidden)
        self.sep_id = sep_id

    def forward(self, enc: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         token_type_ids=enc["token_type_ids"]).last_hidden_state
        e_pair, e_ans = pool_pair(h, enc, self.sep_id)
        return self.head(e_ans, e_pair, f)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The LoRA factors and the head (what a build stores), detached copies."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if "lora_" in k or k.startswith("head.")}


def tuned_logits(model: TunedJudgeModel, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                 f: torch.Tensor, max_length: int, batch_size: int = 32, desc: str | None = None) -> torch.Tensor:
    """Logits [n, 2] for pairs, in input order (batches sorted by length; the model's train flag is restored)."""
    from safeft.eval.judges.encoder import _bar

    n = len(prompts)
    out = torch.zeros(n, 2)
    order = sorted(range(n), key=lambda i: -(len(prompts[i]) + len(answers[i])))
    was = model.training
    model.eval()
    bar = _bar(n, desc)
    try:
        with torch.inference_mode():
            for s in range(0, n, batch_size):
                idx = order[s : s + batch_size]
                enc = tokenizer([prompts[i] for i in idx], [answers[i] for i in idx], padding=True,
                                truncation="longest_first", max_length=max_length, return_tensors="pt")
                out[idx] = model(enc, f[idx]).float()
                if bar is not None:
                    bar.update(len(idx))
    finally:
        model.train(was)
        if bar is not None:
            bar.close()
    return out
