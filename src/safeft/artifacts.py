"""Cached per-model artifacts (CWAC subspaces and SAE, PACT token weights, ...).

Layout: ``<root>/<name>/`` holds ``*.safetensors`` files and ``manifest.json``::

    {"name", "fingerprint", "config", "meta", "files": {"tensors.safetensors": "<sha256>"}, "created"}

An artifact is computed once per aligned model θ₀ and keyed by the fingerprint of its weights. Loading refuses a
missing, truncated or tampered file (sha256), an artifact of another model (fingerprint) or one computed with
another config, each with a clear message. Writes are atomic: files first, the manifest last, so a crash leaves
no manifest and the artifact is simply recomputed.

:func:`session` records which artifacts a ``prepare`` loaded or saved (what ``safeft prepare --export`` shares)
and, for a store filled from a shared folder (``--from``), refuses to compute: an artifact that is missing there
or was computed with other settings raises instead of being silently recomputed (see safeft.share).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from safeft.errors import SafeFTError
from safeft.io import atomic_write_bytes, atomic_write_json, sha256_file

MANIFEST = "manifest.json"


def _canonical(config: dict[str, Any] | None) -> str:
    return json.dumps(config or {}, sort_keys=True, default=str)


@dataclass
class Session:
    """What one ``prepare`` did with the stores: ``used`` artifact folders (loaded or saved, in order); ``strict``
    a store root filled from a shared folder ``source`` where nothing may be computed."""

    used: list[Path] = field(default_factory=list)
    strict: Path | None = None
    source: str = ""


_SESSION: ContextVar[Session | None] = ContextVar("safeft_artifact_session", default=None)


@contextmanager
def session(strict: str | Path | None = None, source: str = "") -> Iterator[Session]:
    """Record the artifacts loaded or saved inside the block; with ``strict`` (a store root), an artifact of that
    store that would be computed (missing, or cached with another config) raises a SafeFTError naming ``source``."""
    s = Session(strict=Path(strict).resolve() if strict is not None else None, source=source)
    token = _SESSION.set(s)
    try:
        yield s
    finally:
        _SESSION.reset(token)


def _record(d: Path) -> None:
    s = _SESSION.get()
    if s is not None and d not in s.used:
        s.used.append(d)


def _differences(shared: dict[str, Any], wanted: dict[str, Any]) -> str:
    def short(v: Any) -> str:
        t = json.dumps(v, sort_keys=True, default=str)
        return t if len(t) <= 40 else t[:37] + "..."

    keys = sorted(set(shared) | set(wanted), key=str)
    diff = [k for k in keys if _canonical({"v": shared.get(k)}) != _canonical({"v": wanted.get(k)})]
    return "; ".join(
        f"{k}: shared {short(shared.get(k))}, this run {short(wanted.get(k))}" for k in diff[:4]
    ) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")


class ArtifactStore:
    """Artifacts of one aligned model, identified by ``fingerprint``."""

    def __init__(self, root: str | Path, fingerprint: str):
        self.root = Path(root)
        self.fingerprint = fingerprint

    def path(self, name: str) -> Path:
        return self.root / name

    def _manifest(self, name: str) -> dict | None:
        mpath = self.path(name) / MANIFEST
        if not mpath.is_file():
            return None
        try:
            return json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafeFTError(
                f"{mpath}: corrupted manifest ({e}); delete {mpath.parent} to recompute it"
            ) from None

    def exists(self, name: str, config: dict[str, Any] | None = None) -> bool:
        """True when a complete artifact for this model (and, if given, this config) is cached."""
        m = self._manifest(name)
        ok = m is not None and m.get("fingerprint") == self.fingerprint
        if ok and config is not None and _canonical(m.get("config")) != _canonical(config):
            ok = False
        if not ok:
            self._refuse_compute(name, m, config)
        return ok

    def _refuse_compute(self, name: str, m: dict | None, config: dict[str, Any] | None) -> None:
        s = _SESSION.get()
        if s is None or s.strict is None or self.root.resolve() != s.strict:
            return
        if m is None or m.get("fingerprint") != self.fingerprint:
            raise SafeFTError(
                f"the shared artifacts {s.source} have no {name!r}, which this run needs; share a folder exported "
                f"with this defense, or drop --from to compute it (the artifacts already loaded stay cached)"
            )
        diff = _differences(m.get("config") or {}, config or {})
        raise SafeFTError(
            f"artifact {name!r} in {s.source} was computed with other settings ({diff}); use the settings in "
            f"its config.yaml / README.md, or drop --from to compute it afresh"
        )

    def save(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        file: str = "tensors.safetensors",
    ) -> Path:
        d = self.path(name)
        d.mkdir(parents=True, exist_ok=True)
        (d / MANIFEST).unlink(missing_ok=True)  # invalid until the new files are complete
        blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        atomic_write_bytes(d / file, blob)
        manifest = {
            "name": name,
            "fingerprint": self.fingerprint,
            "config": json.loads(_canonical(config)),
            "meta": meta or {},
            "files": {file: sha256_file(d / file)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_json(d / MANIFEST, manifest)
        _record(d)
        return d

    def load(self, name: str, config: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        d = self.path(name)
        m = self._manifest(name)
        if m is None:
            raise SafeFTError(f"artifact {name!r} not found in {d}; run `safeft prepare` first")
        if m.get("fingerprint") != self.fingerprint:
            raise SafeFTError(
                f"artifact {d} belongs to another model (fingerprint {str(m.get('fingerprint'))[:12]}, this model "
                f"{self.fingerprint[:12]}); run `safeft prepare` for this model or point --artifacts elsewhere"
            )
        if config is not None and _canonical(m.get("config")) != _canonical(config):
            raise SafeFTError(
                f"artifact {d} was computed with another config ({_canonical(m.get('config'))}); "
                f"rerun `safeft prepare` or use the same settings"
            )
        tensors: dict[str, torch.Tensor] = {}
        for fname, digest in m.get("files", {}).items():
            fpath = d / fname
            if not fpath.is_file():
                raise SafeFTError(f"artifact file {fpath} is missing; delete {d} and rerun `safeft prepare`")
            if sha256_file(fpath) != digest:
                raise SafeFTError(
                    f"artifact file {fpath} is corrupted or was modified (sha256 mismatch); "
                    f"delete {d} and rerun `safeft prepare`"
                )
            try:
                tensors.update(load_file(str(fpath)))
            except Exception as e:  # safetensors raises its own error types
                raise SafeFTError(
                    f"artifact file {fpath} cannot be read ({e}); delete {d} and rerun"
                ) from None
        _record(d)
        return tensors, m.get("meta", {})
