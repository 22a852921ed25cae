"""Cached per-model artifacts (CWAC subspaces and SAE, PACT token weights, ...).

Layout: ``<root>/<name>/`` holds ``*.safetensors`` files and ``manifest.json``::

    {"name", "fingerprint", "config", "meta", "files": {"tensors.safetensors": "<sha256>"}, "created"}

An artifact is computed once per aligned model θ₀ and keyed by the fingerprint of its weights. Loading refuses a
missing, truncated or tampered file (sha256), an artifact of another model (fingerprint) or one computed with
another config, each with a clear message. Writes are atomic: files first, the manifest last, so a crash leaves
no manifest and the artifact is simply recomputed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from safeft.errors import SafeFTError
from safeft.io import atomic_write_bytes, atomic_write_json, sha256_file

MANIFEST = "manifest.json"


def _canonical(config: dict[str, Any] | None) -> str:
    return json.dumps(config or {}, sort_keys=True, default=str)


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
            raise SafeFTError(f"{mpath}: corrupted manifest ({e}); delete {mpath.parent} to recompute it") from None

    def exists(self, name: str, config: dict[str, Any] | None = None) -> bool:
        """True when a complete artifact for this model (and, if given, this config) is cached."""
        m = self._manifest(name)
        if m is None or m.get("fingerprint") != self.fingerprint:
            return False
        if config is not None and _canonical(m.get("config")) != _canonical(config):
            return False
        return True

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
                raise SafeFTError(f"artifact file {fpath} cannot be read ({e}); delete {d} and rerun") from None
        return tensors, m.get("meta", {})
