"""Shareable artifact folders (issue 16): CWAC / PACT artifacts computed once for θ₀, exported as a self-describing
folder, loaded back by anyone with the same θ₀ (local folder, offline; or a Hugging Face Hub repo), pushed to the Hub.

A shared folder::

    README.md                  generated card: θ₀'s fingerprint, defenses, settings, data sources, sizes, how to use
    safeft-artifacts.json      the index: format, θ₀'s fingerprint, settings, artifacts, sha256 of every other file
    config.yaml                the run settings that produced the artifacts (a valid ``--config``)
    <artifact>/manifest.json   each artifact exactly as cached (ArtifactStore layout: safetensors + manifest)
    <artifact>/*.safetensors
    sae_lens/layer_<L>/        CWAC's SAEs in SAELens format (cfg.json + sae_weights.safetensors), when present

Loading (:func:`load_shared`) refuses a folder made for another model (fingerprints differ: both are named), a
file whose sha256 differs from the index (tampered or truncated), a path outside the folder and any file that is
not safetensors / JSON / YAML (no pickle is ever read). It then copies the artifacts into θ₀'s cache, tensors
first and each manifest last, so the defenses load them as if computed here. Export is atomic too: the folder is
built beside its destination and renamed into place. README.md is documentation and is not hashed (Hub users
edit cards); everything else is. The hashes give integrity (a file changed after export is caught), not
authenticity: trust a folder as much as its source.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from safeft.artifacts import MANIFEST
from safeft.errors import SafeFTError
from safeft.io import atomic_write_json, atomic_write_text, sha256_file

INDEX = "safeft-artifacts.json"
CARD = "README.md"
CONFIG = "config.yaml"
SAE_LENS = "sae_lens"
FORMAT = "safeft-artifacts"
FORMAT_VERSION = 1
_ALLOWED = (".safetensors", ".json", ".yaml")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")  # an artifact folder or file name: no separators, no ".."


# ---- export ----------------------------------------------------------------------------------------------------------
def export_shared(
    store_dir: str | Path,
    fingerprint: str,
    out: str | Path,
    names: list[str] | None = None,
    settings: dict[str, Any] | None = None,
    model: str | None = None,
    defenses: list[str] | None = None,
) -> Path:
    """Write the artifacts ``names`` (default: every artifact of θ₀ in ``store_dir``) as a shared folder ``out``.

    store_dir: θ₀'s artifact folder (``<cache>/artifacts/<fingerprint[:16]>``); fingerprint: θ₀'s full sha256;
    settings: the run config that produced them (written to config.yaml and the card); model: θ₀ as the user named
    it. ``out`` is replaced atomically; an existing ``out`` must be empty or an earlier shared folder."""
    store_dir, out = Path(store_dir), Path(out).expanduser()
    if names is None:
        names = sorted(p.parent.name for p in store_dir.glob(f"*/{MANIFEST}"))
    artifacts = {}
    for name in dict.fromkeys(names):
        m = _read_json(store_dir / name / MANIFEST)
        if m.get("fingerprint") != fingerprint:
            continue  # another model's leftovers in the same folder are never shared
        artifacts[name] = m
    if not artifacts:
        raise SafeFTError(
            f"no artifacts of this model in {store_dir} to share: run `safeft prepare` with a defense that computes "
            f"some (cwac, pact) first"
        )
    if out.exists() and not out.is_dir():
        raise SafeFTError(f"--export {out}: exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX).is_file():
        raise SafeFTError(f"--export {out}: not empty and not a shared artifact folder; choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _build(store_dir, stage, fingerprint, artifacts, settings or {}, model, defenses or [])
        _swap_into_place(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _build(
    store_dir: Path,
    stage: Path,
    fingerprint: str,
    artifacts: dict[str, dict],
    settings: dict[str, Any],
    model: str | None,
    defenses: list[str],
) -> dict[str, Any]:
    import yaml

    from safeft import __version__

    entries: dict[str, Any] = {}
    sae_lens: dict[str, str] = {}
    for name, m in artifacts.items():
        (stage / name).mkdir()
        size = 0
        for fname, digest in m.get("files", {}).items():
            src, dst = store_dir / name / fname, stage / name / fname
            if src.is_file():
                shutil.copyfile(src, dst)
            if not dst.is_file() or sha256_file(dst) != digest:  # the copy itself must match the manifest
                raise SafeFTError(
                    f"cached artifact file {src} is missing or corrupted (sha256 mismatch); delete {src.parent} "
                    f"and rerun `safeft prepare` before sharing it"
                )
            size += dst.stat().st_size
        atomic_write_json(stage / name / MANIFEST, m)
        entries[name] = {"config": m.get("config", {}), "files": sorted(m.get("files", {})), "bytes": size}
        if name.startswith("cwac-sae"):
            sae_lens.update(_export_sae_lens(store_dir, name, m, stage / SAE_LENS, model or fingerprint[:16]))
    atomic_write_text(stage / CONFIG, yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "model": model,
        "defenses": defenses,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "safeft_version": __version__,
        "settings": settings,
        "artifacts": entries,
        "sae_lens": sae_lens,
    }
    index["files"] = {
        str(p.relative_to(stage).as_posix()): sha256_file(p)
        for p in sorted(stage.rglob("*"))
        if p.is_file() and p.name != CARD
    }
    atomic_write_text(stage / CARD, card(index))
    atomic_write_json(stage / INDEX, index)  # last: a folder without its index is not a shared folder
    _readable(stage)
    return index


def _readable(root: Path) -> None:
    """Give the folder the permissions of any new file (mkdtemp / mkstemp create it private to the user)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _export_sae_lens(store_dir: Path, name: str, m: dict, root: Path, model_name: str) -> dict[str, str]:
    """Each layer's SAE of a ``cwac-sae`` artifact (tensors ``sae.<L>.<param>``, meta ``layers``) in SAELens's
    on-disk format under ``root/layer_<L>`` (the input scale folded into the weights: it reads raw activations)."""
    from safetensors.torch import load_file

    from safeft.components.sae import TopKSAE, save_sae

    tensors: dict[str, Any] = {}
    for fname in m.get("files", {}):
        tensors.update(load_file(str(store_dir / name / fname)))
    out = {}
    for L, lm in sorted(m.get("meta", {}).get("layers", {}).items(), key=lambda kv: int(kv[0])):
        sae = TopKSAE(int(lm["d_in"]), int(lm["d_sae"]), int(lm["k"]))
        prefix = f"sae.{L}."
        sae.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        save_sae(sae, root / f"layer_{L}", hook_layer=int(L), model_name=model_name)
        out[f"layer_{L}"] = f"{SAE_LENS}/layer_{L}"
    return out


def _swap_into_place(stage: Path, out: Path) -> None:
    """Rename the finished ``stage`` folder to ``out``; a previous ``out`` is moved aside first, removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- the card --------------------------------------------------------------------------------------------------------
def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _sources(settings: dict[str, Any]) -> list[str]:
    """The data sources in the settings: task, poison, refusal and evaluation sets, each defense's text sources."""
    lines = []
    data, ev = settings.get("data", {}), settings.get("eval", {})
    if data:
        lines.append(
            f"task data: `{data.get('task')}`" + (f" from `{data['task_path']}`" if data.get("task_path") else "")
            + f", n = {data.get('n')}, poisoned fraction p = {data.get('p')} from `{data.get('harmful_source')}`"
            + (f" (`{data['harmful_path']}`)" if data.get("harmful_path") else "")
            + (f", a stable-hash share {data['poison_share']:g} of its prompts"
               if float(data.get("poison_share", 1.0)) < 1 else "")
            + "; the anchors are kept disjoint from these poison prompts"
        )  # fmt: skip
    if ev:
        lines.append(
            f"evaluation prompts (kept out of every artifact): `{ev.get('harmful_source')}`, "
            f"n = {ev.get('n_harmful')}" + (f", XSTest {ev['n_xstest']}" if ev.get("n_xstest") else "")
        )
    for name, opts in (settings.get("defense", {}).get("options") or {}).items():
        for k, v in (opts or {}).items():
            if "source" in k or k.endswith("_path"):
                lines.append(f"{name}.{k}: `{v}`")
    return lines


def card(index: dict[str, Any]) -> str:
    """The README.md of a shared folder, from its index."""
    import yaml

    fp, defs = index["fingerprint"], ", ".join(index.get("defenses") or []) or "?"
    total = sum(a["bytes"] for a in index["artifacts"].values())
    out = [
        "---",
        "library_name: safeft",
        "tags: [safeft, safety, fine-tuning" + (", sae, saelens" if index.get("sae_lens") else "") + "]",
        "---",
        "",
        f"# safeft artifacts ({defs}) for θ₀ `{fp[:16]}`",
        "",
        "Safety artifacts computed once by `safeft prepare` for one aligned model θ₀ and shared so that others can "
        "fine-tune the same θ₀ under the same defense without recomputing them.",
        "",
        "| | |",
        "|---|---|",
        f"| θ₀ fingerprint | `{fp}` |",
        f"| θ₀ | `{index.get('model') or 'a local model (path not shared): see its fingerprint'}` |",
        f"| defenses | {defs} |",
        f"| artifacts | {len(index['artifacts'])}, {_size(total)} |",
        f"| created | {index.get('created')} by safeft {index.get('safeft_version')} |",
        "",
        "The fingerprint is the sha256 of θ₀'s weights (tensor names, dtypes, shapes, bytes; "
        "`safeft.models.fingerprint`). safeft refuses this folder for any other model, and refuses any file whose "
        f"sha256 differs from `{INDEX}`.",
        "",
        "## Artifacts",
        "",
        "| artifact | files | size |",
        "|---|---|---|",
    ]
    for name, a in index["artifacts"].items():
        out.append(f"| `{name}` | {', '.join(f'`{f}`' for f in a['files'])} | {_size(a['bytes'])} |")
    if "cwac-anchors" in index["artifacts"]:
        out += [
            "",
            "`cwac-anchors/manifest.json` holds the anchor prompts (harmful requests θ₀ refused) and θ₀'s refusals "
            "as text.",
        ]
    if index.get("sae_lens"):
        out += [
            "",
            "CWAC's SAEs are also in SAELens format (`cfg.json` + `sae_weights.safetensors`, TopK, input scale "
            "folded in, hook `blocks.<L>.hook_resid_post` = the output of decoder layer L): "
            + ", ".join(f"`{p}`" for p in index["sae_lens"].values())
            + ".",
        ]
    out += ["", "## Data sources", ""]
    out += [f"- {line}" for line in _sources(index.get("settings") or {})] or ["- (not recorded)"]
    out += [
        "",
        "## Settings",
        "",
        "The artifacts are keyed by these settings (`config.yaml`); a run with other data or defense settings "
        "would need other artifacts, and `--from` then stops with the differing keys instead of recomputing.",
        "",
        "```yaml",
        yaml.safe_dump(index.get("settings") or {}, sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
        "## How to use",
        "",
        "```bash",
        "# load this folder (or the Hub repo that holds it) into the cache of your copy of θ₀, then train",
        "safeft prepare --config config.yaml --model PATH_TO_THETA0 --from THIS_FOLDER_OR_REPO_ID",
        "safeft train   --config config.yaml --model PATH_TO_THETA0",
        "```",
    ]
    if index.get("sae_lens"):
        first = next(iter(index["sae_lens"].values()))
        out += [
            "",
            "```python",
            "from sae_lens import SAE  # optional: pip install sae-lens",
            f'sae = SAE.load_from_disk("{first}")',
            "```",
            "",
            f"As a pretrained SAE for CWAC: `--set defense.options.cwac.sae_path=THIS_FOLDER/{SAE_LENS}`.",
        ]
    out += ["", "See safeft's docs/artifacts.md.", ""]
    return "\n".join(out)


# ---- load ------------------------------------------------------------------------------------------------------------
def resolve_source(src: str, log: Any = print) -> Path:
    """A local folder, else a Hub repo id fetched with ``snapshot_download`` (its local cache works offline)."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise SafeFTError(f"--from {src}: not a folder; give a shared artifact folder or a Hub repo id")
        return p
    if not _REPO_ID.fullmatch(src):
        raise SafeFTError(f"--from {src}: no such folder (and not a Hub repo id owner/name); check the path")
    try:
        from huggingface_hub import snapshot_download

        log(f"downloading shared artifacts {src} from the Hugging Face Hub")
        return Path(
            snapshot_download(repo_id=src, allow_patterns=["*.json", "*.yaml", "*.safetensors", "*.md"])
        )
    except Exception as e:  # offline, no such repo, no access: one line either way
        raise SafeFTError(
            f"--from {src}: no such local folder, and fetching it from the Hugging Face Hub failed "
            f"({_first_line(e)}); give a local folder (works offline) or check the repo id and the network"
        ) from None


def verify_shared(folder: str | Path, fingerprint: str) -> dict[str, Any]:
    """The index of a shared folder, after checking its format, θ₀'s fingerprint and every file's sha256."""
    folder = Path(folder)
    ipath = folder / INDEX
    if not ipath.is_file():
        raise SafeFTError(
            f"{folder}: not a shared artifact folder (no {INDEX}); export one with `safeft prepare --export`"
        )
    index = _read_json(ipath)
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("files"), dict):
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise SafeFTError(f"{ipath}: not a safeft artifact index (format {got!r})")
    version, arts = index.get("format_version", 0), index.get("artifacts", {})
    if not isinstance(version, int) or isinstance(version, bool):
        raise SafeFTError(f"{ipath}: field format_version must be an integer, got {version!r}")
    if not isinstance(arts, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("files", []), list) for e in arts.values()
    ):
        raise SafeFTError(f"{ipath}: field artifacts must map each name to {{files: [...]}}; refusing the folder")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in index["files"].items()):
        raise SafeFTError(f"{ipath}: field files must map each path to its sha256; refusing the folder")
    if version > FORMAT_VERSION:
        raise SafeFTError(
            f"{ipath}: format version {index['format_version']} is newer than this safeft reads "
            f"({FORMAT_VERSION}); upgrade safeft"
        )
    theirs = str(index.get("fingerprint"))
    if theirs != fingerprint:
        raise SafeFTError(
            f"{folder} was made for another model: its θ₀ fingerprint is {theirs[:16]}, this model's is "
            f"{fingerprint[:16]}; load it with the exact θ₀ it was made for ({index.get('model') or 'fingerprint ' + theirs[:16]}), or drop --from and "
            f"compute the artifacts for this model"
        )
    root = folder.resolve()
    for rel, digest in index["files"].items():
        p = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not p.resolve().is_relative_to(root):
            raise SafeFTError(f"{ipath}: file {rel!r} points outside the folder; refusing it")
        if not rel.endswith(_ALLOWED):
            raise SafeFTError(
                f"{ipath}: file {rel!r} is not safetensors, JSON or YAML; refusing it (no pickle)"
            )
        if not p.is_file():
            raise SafeFTError(f"{p}: missing from the shared folder; download or copy it again")
        if sha256_file(p) != digest:
            raise SafeFTError(
                f"{p}: corrupted or modified (sha256 differs from {INDEX}); refusing the shared folder: get a "
                f"fresh copy from its author"
            )
    for name, entry in arts.items():
        files = [str(f) for f in entry.get("files", [])]
        if not _NAME.fullmatch(name) or not all(
            _NAME.fullmatch(f) and f.endswith(".safetensors") for f in files
        ):
            raise SafeFTError(f"{ipath}: artifact {name!r} has a bad name or file names {files}; refusing it")
        mrel = f"{name}/{MANIFEST}"
        if mrel not in index["files"] or any(
            f"{name}/{f}" not in index["files"] for f in entry.get("files", [])
        ):
            raise SafeFTError(
                f"{ipath}: artifact {name!r} lists files that the index does not hash; refusing it"
            )
        m = _read_json(folder / mrel)
        files = m.get("files", {})
        if not isinstance(files, dict):
            raise SafeFTError(f"{folder / mrel}: field files must map each file to its sha256; refusing it")
        if (
            m.get("fingerprint") != fingerprint
            or sorted(files) != sorted(entry.get("files", []))
            or any(index["files"][f"{name}/{f}"] != digest for f, digest in files.items())
        ):
            raise SafeFTError(f"{folder / mrel}: does not match {INDEX} (fingerprint or files); refusing it")
    return index


def load_shared(src: str, store_dir: str | Path, fingerprint: str, log: Any = print) -> dict[str, Any]:
    """Verify the shared folder or Hub repo ``src`` for θ₀ (``fingerprint``) and copy its artifacts into
    ``store_dir`` (θ₀'s cache); returns the index. Nothing is copied unless every file checks out."""
    folder = resolve_source(src, log)
    index = verify_shared(folder, fingerprint)
    store_dir = Path(store_dir)
    for name in index["artifacts"]:
        d = store_dir / name
        d.mkdir(parents=True, exist_ok=True)
        (d / MANIFEST).unlink(missing_ok=True)  # invalid until the new files are complete
        m = _read_json(folder / name / MANIFEST)
        for fname in m.get("files", {}):
            _atomic_copy(folder / name / fname, d / fname)
        m["imported_from"] = str(src)
        atomic_write_json(d / MANIFEST, m)
    log(f"loaded {len(index['artifacts'])} shared artifact(s) from {src}: {', '.join(index['artifacts'])}")
    return index


def _atomic_copy(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- push ------------------------------------------------------------------------------------------------------------
def push_shared(folder: str | Path, repo: str) -> str:
    """Upload a shared folder to the Hub model repo ``repo`` (created if needed); returns its URL. Any failure (no
    network, offline mode, no token, no access) is one SafeFTError line; the folder stays where it is."""
    folder = Path(folder)
    keep = (
        f"the shared folder is kept in {folder}: push it later with `huggingface-cli upload {repo} {folder}`"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise SafeFTError(f"--push-to {repo}: offline (HF_HUB_OFFLINE is set); {keep}")
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id=repo, exist_ok=True, private=True)  # private until its owner publishes it
        api.upload_folder(
            folder_path=str(folder), repo_id=repo, commit_message=f"safeft artifacts for θ₀ {_fp_of(folder)}"
        )
    except Exception as e:  # network, HTTP, auth: all end the same way for the user
        raise SafeFTError(f"--push-to {repo}: upload failed ({_first_line(e)}); {keep}") from None
    return f"https://huggingface.co/{repo}"


# ---- helpers ---------------------------------------------------------------------------------------------------------
def _fp_of(folder: Path) -> str:
    try:
        return str(_read_json(folder / INDEX).get("fingerprint", ""))[:16]
    except SafeFTError:
        return ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SafeFTError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafeFTError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SafeFTError(f"{path}: expected a JSON object")
    return data
