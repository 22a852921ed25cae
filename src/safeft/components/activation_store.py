"""Activation rows on disk: written in shards (safetensors), read back in chunks, never all in memory.

A store is a folder::

    progress.json            {"key", "layers", "d", "dtype", "shards": [{"file", "rows", "docs_done"}], "complete"}
    shard_00000.safetensors  one tensor per layer, "layer_<L>": [rows, d]
    ...

``ShardWriter`` appends whole documents (all layers' rows of a document go into the same shard) and writes a shard
when its buffer passes ``shard_rows``; ``progress.json`` is rewritten after every shard, so a crash loses at most
the unwritten buffer and a new writer with the same ``key`` resumes after ``docs_done`` documents. ``ShardReader``
reads a complete store: row counts, shuffled training batches from a few shards at a time, and chunks of a held-out
row range (the tail of the stream).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safeft.errors import SafeFTError
from safeft.io import atomic_write_json

PROGRESS = "progress.json"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _canon(key: Any) -> str:
    return json.dumps(key, sort_keys=True, default=str)


class ShardWriter:
    """Resumable writer of activation rows for several layers at once.

    layers: the layer ids (tensor names ``layer_<L>``); d: row width; shard_rows: rows buffered before a shard is
    written; dtype: storage dtype (bfloat16 by default: the residual stream's range, half the disk of float32).
    An existing folder with another ``key`` (or no progress file) is wiped; one with the same key is resumed."""

    def __init__(
        self,
        directory: str | Path,
        layers: Sequence[int],
        d: int,
        key: Any,
        shard_rows: int = 65536,
        dtype: torch.dtype = torch.bfloat16,
    ):
        self.dir = Path(directory)
        self.layers = [int(x) for x in layers]
        self.d = int(d)
        self.key = json.loads(_canon(key))
        self.shard_rows = max(1, int(shard_rows))
        self.dtype = dtype
        self._buf: dict[int, list[torch.Tensor]] = {L: [] for L in self.layers}
        self._buf_rows = 0
        self._docs_done = 0
        prog = self._read_progress()
        if (
            prog is not None
            and _canon(prog.get("key")) == _canon(self.key)
            and prog.get("layers") == self.layers
        ):
            self.progress = prog
            self._docs_done = int(prog["shards"][-1]["docs_done"]) if prog["shards"] else 0
        else:
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            self.progress = {
                "key": self.key,
                "layers": self.layers,
                "d": self.d,
                "dtype": str(dtype).replace("torch.", ""),
                "shards": [],
                "complete": False,
            }
            self._write_progress()
        self._pending_docs = self._docs_done

    def _read_progress(self) -> dict | None:
        p = self.dir / PROGRESS
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    def _write_progress(self) -> None:
        atomic_write_json(self.dir / PROGRESS, self.progress)

    @property
    def complete(self) -> bool:
        return bool(self.progress.get("complete"))

    @property
    def docs_done(self) -> int:
        """Documents whose rows are safely on disk (resume after this many)."""
        return self._docs_done

    @property
    def rows_done(self) -> int:
        return sum(int(s["rows"]) for s in self.progress["shards"]) + self._buf_rows

    def add(self, rows: dict[int, torch.Tensor], docs_done: int) -> None:
        """Append one batch of whole documents: ``rows[L]: [n, d]`` (same n for every layer); ``docs_done`` is the
        number of documents of the stream fully consumed after this batch."""
        n = {int(v.shape[0]) for v in rows.values()}
        if len(n) != 1 or set(rows) != set(self.layers):
            raise SafeFTError(
                f"ShardWriter.add: need rows for layers {self.layers} with one row count, got {n}"
            )
        for L, v in rows.items():
            self._buf[L].append(v.detach().to("cpu", self.dtype))
        self._buf_rows += n.pop()
        self._pending_docs = int(docs_done)
        if self._buf_rows >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if self._buf_rows == 0:
            return
        name = f"shard_{len(self.progress['shards']):05d}.safetensors"
        tensors = {f"layer_{L}": torch.cat(self._buf[L]).contiguous() for L in self.layers}
        save_file(tensors, str(self.dir / name))
        self.progress["shards"].append(
            {"file": name, "rows": self._buf_rows, "docs_done": self._pending_docs}
        )
        self._write_progress()
        self._docs_done = self._pending_docs
        self._buf = {L: [] for L in self.layers}
        self._buf_rows = 0

    def close(self, meta: dict[str, Any] | None = None) -> None:
        """Write the last shard and mark the store complete."""
        self.flush()
        self.progress["complete"] = True
        self.progress["meta"] = meta or {}
        self._write_progress()


class ShardReader:
    """Reads a complete store written by :class:`ShardWriter`. Rows are addressed globally in stream order."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        p = self.dir / PROGRESS
        if not p.is_file():
            raise SafeFTError(f"{p}: activation store not found")
        self.progress = json.loads(p.read_text(encoding="utf-8"))
        if not self.progress.get("complete"):
            raise SafeFTError(f"{self.dir}: activation store is incomplete (capture was interrupted)")
        self.layers: list[int] = list(self.progress["layers"])
        self.d: int = int(self.progress["d"])
        self.shards: list[dict] = list(self.progress["shards"])
        self.starts: list[int] = []
        total = 0
        for s in self.shards:
            self.starts.append(total)
            total += int(s["rows"])
        self.n_rows = total

    def _load(self, shard: int, layer: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows ``[start, end)`` of one shard as float32 (only those rows are read from disk)."""
        with safe_open(str(self.dir / self.shards[shard]["file"]), framework="pt") as f:
            sl = f.get_slice(f"layer_{layer}")
            end = int(self.shards[shard]["rows"]) if end is None else end
            return sl[start:end].float()

    def iter_range(self, layer: int, start: int, end: int, chunk: int = 65536) -> Iterator[torch.Tensor]:
        """Rows ``[start, end)`` of the stream in chunks of at most ``chunk`` rows (float32, cpu)."""
        for i, s0 in enumerate(self.starts):
            s1 = s0 + int(self.shards[i]["rows"])
            a, b = max(start, s0), min(end, s1)
            for c in range(a, b, chunk):
                yield self._load(i, layer, c - s0, min(b, c + chunk) - s0)

    def batches(
        self,
        layer: int,
        end: int,
        batch_size: int,
        generator: torch.Generator,
        buffer_rows: int = 262144,
    ) -> Iterator[torch.Tensor]:
        """One epoch over rows ``[0, end)`` in shuffled batches ``[batch_size, d]`` (float32, cpu): shards in a
        random order, about ``buffer_rows`` rows loaded at a time and shuffled together. The last partial batch of
        each buffer is carried into the next, so every row is used once."""
        order = torch.randperm(len(self.shards), generator=generator).tolist()
        carry: torch.Tensor | None = None
        group: list[torch.Tensor] = []
        rows = 0

        def emit(parts: list[torch.Tensor], carry: torch.Tensor | None):
            x = torch.cat(([carry] if carry is not None else []) + parts)
            x = x[torch.randperm(x.shape[0], generator=generator)]
            full = (x.shape[0] // batch_size) * batch_size
            return [x[i : i + batch_size] for i in range(0, full, batch_size)], (
                x[full:] if full < x.shape[0] else None
            )

        for i in order:
            s0 = self.starts[i]
            n = min(int(self.shards[i]["rows"]), max(0, end - s0))
            if n <= 0:
                continue
            group.append(self._load(i, layer, 0, n))
            rows += n
            if rows >= buffer_rows:
                out, carry = emit(group, carry)
                yield from out
                group, rows = [], 0
        if group or carry is not None:
            out, carry = emit(group, carry)
            yield from out
            if carry is not None and carry.shape[0] > 0:
                yield carry
