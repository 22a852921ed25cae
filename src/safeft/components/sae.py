"""TopK sparse autoencoder (SAELens naming and on-disk format), its trainer, and a reader for pretrained SAEs.

Shapes (SAELens convention): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``.

    encode: z = TopK_k(ReLU((x − b_dec) W_enc + b_enc))      x: [..., d_in] → z: [..., d_sae]
    decode: x̂ = z W_dec + b_dec                              z: [..., d_sae] → x̂: [..., d_in]

Decoder rows are kept at unit norm during training. On disk: ``sae_weights.safetensors`` + ``cfg.json`` with the
SAELens keys (``architecture``, ``d_in``, ``d_sae``, ``k``, ``dtype``, ``hook_name``, ...). ``load_sae`` also reads
SAELens ``standard`` (ReLU) and ``jumprelu`` SAEs (Gemma Scope) so pretrained ones can be used for feature scoring.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from safeft.errors import SafeFTError

SAE_WEIGHTS = "sae_weights.safetensors"
SAE_CFG = "cfg.json"
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class TopKSAE(nn.Module):
    """A TopK SAE; ``architecture`` is ``"topk"`` (default), ``"standard"`` (ReLU) or ``"jumprelu"`` (loaded)."""

    def __init__(self, d_in: int, d_sae: int, k: int, architecture: str = "topk"):
        super().__init__()
        if architecture not in ("topk", "standard", "jumprelu"):
            raise SafeFTError(
                f"SAE architecture {architecture!r} is not supported; use topk, standard or jumprelu"
            )
        if architecture == "topk" and not 1 <= k <= d_sae:
            raise SafeFTError(f"SAE k={k} must be in [1, d_sae={d_sae}]")
        self.d_in, self.d_sae, self.k, self.architecture = int(d_in), int(d_sae), int(k), architecture
        self.hook_name: str | None = None
        self.hook_layer: int | None = None
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))
        nn.init.kaiming_uniform_(self.W_dec)
        self.normalize_decoder()
        with torch.no_grad():
            self.W_enc.copy_(self.W_dec.T)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows ``W_dec[i]`` to unit L2 norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``(x − b_dec) W_enc + b_enc``: ``[..., d_in] → [..., d_sae]`` (computed in the SAE's dtype)."""
        x = x.to(self.W_enc.dtype)
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse codes ``z: [..., d_sae]`` (at most ``k`` non-zeros per row for topk)."""
        pre = self.pre_acts(x)
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        acts = torch.relu(pre)
        vals, idx = acts.topk(self.k, dim=-1)
        return torch.zeros_like(acts).scatter(-1, idx, vals)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``x̂ = z W_dec + b_dec``: ``[..., d_sae] → [..., d_in]``."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms for a batch ``x: [N, d_in]``: ``{"mse": mean_n ‖x − x̂‖²}``."""
        x = x.to(self.W_enc.dtype)
        x_hat = self(x)
        return {"mse": (x - x_hat).pow(2).sum(-1).mean()}


def check_sae_fits(sae: TopKSAE, hidden_size: int, source: str = "SAE") -> None:
    """Raise SafeFTError when the SAE's ``d_in`` differs from the model's hidden size."""
    if sae.d_in != hidden_size:
        raise SafeFTError(
            f"{source}: SAE d_in={sae.d_in} does not match the model's hidden size {hidden_size}; "
            f"use an SAE trained on this model's residual stream"
        )


def _as_matrix(activations: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    if isinstance(activations, torch.Tensor):
        x = activations
    else:
        parts = [a.detach().reshape(-1, a.shape[-1]) for a in activations]
        if not parts:
            raise SafeFTError("train_sae: no activations given")
        x = torch.cat(parts)
    return x.detach().reshape(-1, x.shape[-1]).float()


@torch.no_grad()
def sae_stats(sae: TopKSAE, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Quality of ``sae`` on rows ``x: [N, d_in]``: explained variance (1 − SSE / total variance about the mean),
    mean L0 (active latents per row), dead fraction (latents never active on x), and MSE (mean ‖x − x̂‖²)."""
    x = x.float()
    mean = x.mean(0)
    sse = 0.0
    tot = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    dev = sae.W_enc.device
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].to(dev)
        z = sae.encode(xb)
        xh = sae.decode(z)
        sse += float((xb - xh).pow(2).sum())
        tot += float((xb - mean.to(dev)).pow(2).sum())
        l0 += float((z > 0).sum())
        fired |= (z > 0).any(0).to(fired.device)
    n = max(1, x.shape[0])
    return {
        "explained_variance": 1.0 - sse / max(tot, 1e-12),
        "l0": l0 / n,
        "dead_fraction": float((~fired).float().mean()),
        "mse": sse / n,
    }


def train_sae(
    activations: torch.Tensor | Iterable[torch.Tensor],
    d_sae: int,
    k: int,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 1024,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[TopKSAE, dict[str, float]]:
    """Train a TopK SAE on rows of ``activations`` (``[N, d_in]`` or an iterable of ``[..., d_in]`` chunks).

    Adam on the reconstruction loss ``mean ‖x − x̂‖²``; ``b_dec`` starts at the data mean, ``W_enc`` at ``W_decᵀ``;
    decoder rows are renormalised to unit norm after each step (and their gradient's radial part removed first).
    Returns ``(sae, stats)`` with stats from :func:`sae_stats` on all rows (train-set quality)."""
    from tqdm.auto import tqdm

    x = _as_matrix(activations)
    n, d_in = x.shape
    if n == 0:
        raise SafeFTError("train_sae: no activation rows to train on")
    dev = torch.device(device) if device is not None else x.device
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        sae = TopKSAE(d_in, d_sae, min(k, d_sae))
    sae.to(dev)
    # scale-free init: inputs are centred by b_dec; encoder scaled to the data's typical norm
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0).to(dev))
        scale = (x - x.mean(0)).norm(dim=-1).mean().clamp_min(1e-6)
        sae.W_enc.mul_(1.0 / float(scale) * math.sqrt(d_in) / math.sqrt(max(k, 1)))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    bar = tqdm(range(int(steps)), desc="training SAE", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        xb = x[idx].to(dev)
        with torch.enable_grad():  # callers may hold torch.no_grad() for the model's forward passes
            loss = sae.loss_terms(xb)["mse"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with torch.no_grad():  # keep the gradient tangent to the unit-norm decoder rows
            g, w = sae.W_dec.grad, sae.W_dec
            g.sub_((g * w).sum(1, keepdim=True) * w)
        opt.step()
        sae.normalize_decoder()
        bar.set_postfix(mse=loss.item())
    sae.eval()
    stats = sae_stats(sae, x.to(dev))
    return sae, stats


def save_sae(
    sae: TopKSAE,
    directory: str | Path,
    hook_name: str | None = None,
    hook_layer: int | None = None,
    model_name: str | None = None,
) -> Path:
    """Write ``sae_weights.safetensors`` + ``cfg.json`` in SAELens's on-disk format into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    hook_name = (
        hook_name
        or sae.hook_name
        or (f"blocks.{hook_layer}.hook_resid_post" if hook_layer is not None else None)
    )
    hook_layer = hook_layer if hook_layer is not None else sae.hook_layer
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    save_file(tensors, str(d / SAE_WEIGHTS))
    dtype = str(sae.W_enc.dtype).replace("torch.", "")
    meta = {
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_layer": hook_layer,
        "hook_head_index": None,
        "prepend_bos": True,
        "context_size": None,
        "dataset_path": None,
    }
    cfg = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "meta": meta,
        # older SAELens versions read these at the top level
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_layer": hook_layer,
        "activation_fn_str": "topk" if sae.architecture == "topk" else "relu",
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.k
        cfg["activation_fn_kwargs"] = {"k": sae.k}
    (d / SAE_CFG).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return d


def load_sae(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TopKSAE:
    """Read an SAE in SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``), ours or pretrained
    (Gemma Scope / Llama Scope exports). Raises SafeFTError on a missing file, unknown architecture or bad shape."""
    d = Path(directory)
    cfg_path, w_path = d / SAE_CFG, d / SAE_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise SafeFTError(
                f"{p}: not found; an SAE folder needs {SAE_CFG} and {SAE_WEIGHTS} (SAELens format)"
            )
    try:
        cfg: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SafeFTError(f"{cfg_path}: invalid JSON ({e})") from None
    arch = cfg.get("architecture", "standard")
    if arch == "topk" or cfg.get("activation_fn_str") == "topk":
        arch = "topk"
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise SafeFTError(f"{cfg_path}: key {key!r} missing or not an integer")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 1
    if arch == "topk" and "k" not in cfg and "k" not in (cfg.get("activation_fn_kwargs") or {}):
        raise SafeFTError(f"{cfg_path}: topk SAE without 'k'")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SafeFTError(
            f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
            f"fold the scaling into the weights first"
        )
    sae = TopKSAE(cfg["d_in"], cfg["d_sae"], int(k), architecture=arch)
    state = load_file(str(w_path))
    want = {name: tuple(p.shape) for name, p in sae.state_dict().items()}
    for name, shape in want.items():
        if name not in state:
            raise SafeFTError(f"{w_path}: tensor {name!r} missing (found {sorted(state)})")
        if tuple(state[name].shape) != shape:
            raise SafeFTError(
                f"{w_path}: tensor {name!r} has shape {tuple(state[name].shape)}, expected {shape}"
            )
    sae.load_state_dict({k2: state[k2].to(torch.float32) for k2 in want})
    meta = cfg.get("meta") or {}
    sae.hook_name = meta.get("hook_name") or cfg.get("hook_name")
    sae.hook_layer = meta.get("hook_layer", cfg.get("hook_layer"))
    return sae.to(device=device, dtype=dtype).eval()


def ablate_latents_hook(sae: TopKSAE, latents: torch.Tensor):
    """A forward hook for a decoder block that subtracts the selected latents' decoder contribution
    ``z[..., S] W_dec[S]`` from the block's output (residual stream ``[B, T, d_in]``)."""

    def hook(_mod: nn.Module, _args: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, (tuple, list)) else output
        with torch.no_grad():
            z = sae.encode(h.float())[..., latents.to(h.device)]
            contrib = z @ sae.W_dec[latents.to(sae.W_dec.device)]
        new_h = h - contrib.to(h.dtype)
        if isinstance(output, tuple):
            return (new_h, *output[1:])
        if isinstance(output, list):
            return [new_h, *output[1:]]
        return new_h

    return hook
