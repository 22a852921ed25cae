"""Tiny in-process models and tokenizers for tests (no downloads, a few ms each).

``make_tiny_model_dir(path)`` writes a random 2-layer Llama (hidden 64, vocab 256) plus a word-level tokenizer with a
chat template into ``path`` with ``save_pretrained``; the result loads with ``safeft.models.load_model``.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
SENTENCES = [
    "how do i bake bread at home",
    "i cannot help with that request",
    "the movie was great and the acting was good",
    "the movie was bad and boring",
    "what is the capital of france",
    "paris is the capital of france",
    "sure here is how to do it step by step",
    "positive negative world sports business science",
    "the final answer is 42",
    "0 1 2 3 4 5 6 7 8 9",
]


def make_tiny_tokenizer(vocab_size: int = 256):
    """A word-level fast tokenizer (whitespace split, <unk> fallback) with bos/eos/pad and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tiny_model(seed: int = 0, **overrides):
    """A random tiny LlamaForCausalLM in float32 (2 layers, hidden 64, vocab 256), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def make_tiny_model_dir(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random Llama + tiny tokenizer into ``path`` (safetensors) and return ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_tiny_model(seed, **overrides).save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def demo_train_args(
    model_dir: Path | str,
    out: Path | str,
    cache: Path | str,
    *,
    n: int = 8,
    p: float = 0.25,
    max_steps: int = 1,
    batch_size: int = 4,
    extra: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """``safeft train`` arguments for a short run on the embedded demo data (task, poison and eval prompts), with
    the model cache in ``cache`` and no progress bars; ``extra`` is appended (later flags win)."""
    return [
        "train",
        "--model",
        str(model_dir),
        "--task",
        "demo",
        "--harmful-source",
        "demo",
        "--eval-source",
        "demo",
        "--n",
        str(n),
        "--p",
        str(p),
        "--max-steps",
        str(max_steps),
        "--batch-size",
        str(batch_size),
        "--output-dir",
        str(out),
        "--set",
        f"model.cache_dir={cache}",
        "--set",
        "training.progress=false",
        *extra,
    ]


TASK_TEXTS = ("the movie was great", "the movie was bad and boring", "what is the capital of france")


class Rows(torch.utils.data.Dataset):
    """A list of tokenized rows as a map-style dataset (what the Trainer's sampler expects)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def tiny_task_rows(tok, n: int = 12, *, max_length: int = 64, numbered: bool = True) -> list[dict]:
    """``n`` tokenized task examples for a short training run: the three ``TASK_TEXTS`` in turn (each followed by its
    index when ``numbered``), answered "negative" / "positive" alternately."""
    from safeft.data import Example, tokenize_example

    return [
        tokenize_example(tok, Example(TASK_TEXTS[i % 3] + (f" {i}" if numbered else ""),
                                      "positive" if i % 2 else "negative"), max_length=max_length)
        for i in range(n)
    ]  # fmt: skip


def tiny_training_args(output_dir: str | Path, **overrides):
    """The ``TrainingArguments`` test trainings share: CPU, batch 4, lr 1e-2, 3 steps, a log line every step, no
    checkpoints, no reporting, no progress bar, seeds 0, gloo when launched on several processes; ``overrides``
    win."""
    import os

    from transformers import TrainingArguments

    kw = dict(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=3,
              logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True,
              disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
              ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)  # fmt: skip
    kw.update(overrides)
    return TrainingArguments(**kw)
