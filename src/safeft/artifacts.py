"""Cached per-model artifacts (CWAC subspaces and SAE, PACT token weights, ...).

Layout: ``<root>/<name>/`` holds ``*.safetensors`` files and ``manifest.json``::

    {"name", "fingerprint", "config", "meta", "files": {"tensors.safetensors": "<sha256>"}, "created"}

``<root>/<name>/`` is the artifact the last ``prepare`` used (what ``--export`` shares). Saving one computed with
another config moves the earlier one aside to ``<root>/.versions/<name>/<config digest>/`` instead of deleting it,
and a later ``exists``/``load`` with that config swaps it back: runs that alternate settings (benchmark seeds,
evaluation sets, poison fractions) reuse every version they made. The newest ``KEEP_VERSIONS`` are kept per name.

An artifact is computed once per aligned model θ₀ and keyed by the fingerprint of its weights. Loading refuses a
missing, truncated or tampered file (sha256), an artifact of another model (fingerprint) or one computed with
another config, each with a clear message. Writes are atomic: files first, the manifest last, so a crash leaves
no manifest and the artifact is simply recomputed.

:func:`session` records which artifacts a ``prepare`` loaded or saved (what ``safeft prepare --export`` shares)
and, for a store filled from a shared folder (``--from``), refuses to compute: an artifact that is missing there
or was computed with other settings raises instead of being silently recomputed (see safeft.share).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
VERSIONS = ".versions"  # earlier configs' artifacts, one folder per config digest (see the module docstring)
KEEP_VERSIONS = 8  # per artifact name, besides the one in use


def _canonical(config: dict[str, Any] | None) -> str:
    return json.dumps(config or {}, sort_keys=True, default=str)


def _config_digest(config: dict[str, Any] | None) -> str:
    return hashlib.sha256(_canonical(config).encode("utf-8")).hexdigest()[:16]


def _read_manifest(d: Path) -> dict | None:
    """A folder's manifest, or None when absent or unreadable (a version folder left half-written)."""
    try:
        return json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


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

    def _matches(self, m: dict | None, config: dict[str, Any] | None) -> bool:
        return (
            m is not None
            and m.get("fingerprint") == self.fingerprint
            and (config is None or _canonical(m.get("config")) == _canonical(config))
        )

    def exists(self, name: str, config: dict[str, Any] | None = None) -> bool:
        """True when a complete artifact for this model (and, if given, this config) is cached — in its folder, or
        set aside there by a run with other settings (then it is swapped back into its folder)."""
        m = self._manifest(name)
        ok = self._matches(m, config) or (config is not None and self._restore(name, config))
        if not ok:
            self._refuse_compute(name, m, config)
        return ok

    def _version_path(self, name: str, config: dict[str, Any] | None) -> Path:
        return self.root / VERSIONS / name / _config_digest(config)

    def _set_aside(self, name: str) -> None:
        """Move the artifact in ``<name>/`` (complete: it has a manifest) to its version folder."""
        d = self.path(name)
        m = _read_manifest(d)
        if m is None:  # absent or half-written: nothing to keep
            return
        dest = self._version_path(name, m.get("config"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(d, dest)
        kept = sorted(
            (p for p in dest.parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True
        )
        for old in kept[KEEP_VERSIONS:]:
            shutil.rmtree(old, ignore_errors=True)

    def _restore(self, name: str, config: dict[str, Any]) -> bool:
        """Swap the version computed with ``config`` back into ``<name>/``; False when there is none."""
        v = self._version_path(name, config)
        if not self._matches(_read_manifest(v), config):
            return False
        self._set_aside(name)
        shutil.rmtree(self.path(name), ignore_errors=True)  # a half-written folder without a manifest
        os.replace(v, self.path(name))
        os.utime(self.path(name))
        return True

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
        prev = _read_manifest(d)
        if prev is not None and _canonical(prev.get("config")) != _canonical(config):
            self._set_aside(name)  # another config's artifact: kept, not overwritten
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
        if config is not None and not self._matches(m, config) and self._restore(name, config):
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
