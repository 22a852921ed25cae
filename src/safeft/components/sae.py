"""TopK sparse autoencoder (SAELens naming and on-disk format), its trainer, and a reader for pretrained SAEs.

Shapes (SAELens convention): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``.

    encode: z = TopK_k(ReLU((x − b_dec) W_enc + b_enc))      x: [..., d_in] → z: [..., d_sae]
    decode: x̂ = z W_dec + b_dec                              z: [..., d_sae] → x̂: [..., d_in]

Our SAEs train on inputs scaled to unit mean norm (``input_scale`` s, kept in the SAE: encode reads s·x, decode
returns x̂/s), with the AuxK dead-latent loss of Gao et al. 2024 and a warmup/decay schedule, streaming rows from
disk when they do not fit in memory; quality is measured on held-out rows. Decoder rows are kept at unit norm
during training. On disk: ``sae_weights.safetensors`` (s folded into the weights) + ``cfg.json`` with the
SAELens keys (``architecture``, ``d_in``, ``d_sae``, ``k``, ``dtype``, ``hook_name``, ...). ``load_sae`` also reads
SAELens ``standard`` (ReLU) and ``jumprelu`` SAEs (Gemma Scope) so pretrained ones can be used for feature scoring.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
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
    """A TopK SAE; ``architecture`` is ``"topk"`` (default), ``"standard"`` (ReLU) or ``"jumprelu"`` (loaded).

    ``input_scale`` (a buffer, 1 unless trained here) multiplies inputs before encoding and divides outputs after
    decoding: our SAEs train on inputs scaled to unit mean norm, and the scale travels with the weights (folded
    into them by :func:`save_sae`, so the SAELens copy works on raw activations)."""

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
        self.register_buffer("input_scale", torch.ones(()))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, ``W_enc = W_decᵀ`` (Gao et al. 2024), zero biases. ``generator``: a
        seeded generator (never the global RNG, so building an SAE does not shift anyone's random stream)."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        bound = 1.0 / math.sqrt(self.d_in)
        self.W_dec.copy_(torch.rand(self.d_sae, self.d_in, generator=g) * 2 * bound - bound)
        self.normalize_decoder()
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows ``W_dec[i]`` to unit L2 norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``(s·x − b_dec) W_enc + b_enc``: ``[..., d_in] → [..., d_sae]`` (computed in the SAE's dtype)."""
        x = x.to(self.W_enc.dtype) * self.input_scale
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Sparse codes from pre-activations (TopK of the ReLU for topk)."""
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        acts = torch.relu(pre)
        vals, idx = acts.topk(self.k, dim=-1)
        return torch.zeros_like(acts).scatter(-1, idx, vals)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse codes ``z: [..., d_sae]`` (at most ``k`` non-zeros per row for topk)."""
        return self.activate(self.pre_acts(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``x̂ = (z W_dec + b_dec) / s``: ``[..., d_sae] → [..., d_in]``."""
        return (z @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss_terms(
        self, x: torch.Tensor, dead: torch.Tensor | None = None, aux_k: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Named loss terms on a batch ``x: [N, d_in]`` in the scaled space (s·x), as trained:

        ``mse``: mean_n ‖s·x − x̂_s‖²; ``auxk`` (only when ``dead: [d_sae] bool`` has a True): the AuxK loss of
        Gao et al. 2024 — the top ``aux_k`` dead latents (by pre-activation) reconstruct the detached residual
        e = s·x − x̂_s through the decoder alone, mean_n ‖e − z_aux W_dec‖², scaled by min(1, n_dead / aux_k) as in
        SAELens (z_aux: the dead latents' raw pre-activations, no ReLU, so negative ones get a gradient too). Also ``z`` (the codes, detached) for dead-latent bookkeeping."""
        xs = x.to(self.W_enc.dtype) * self.input_scale
        pre = (xs - self.b_dec) @ self.W_enc + self.b_enc
        z = self.activate(pre)
        x_hat = z @ self.W_dec + self.b_dec
        err = xs - x_hat
        out = {"mse": err.pow(2).sum(-1).mean(), "z": z.detach()}
        if dead is not None and bool(dead.any()):
            n_dead = int(dead.sum())
            k_aux = aux_k if aux_k is not None else max(1, self.d_in // 2)
            kk = min(k_aux, n_dead)
            # pre-activations of dead latents only, no ReLU (as SAELens): a dead latent's pre-activation is often
            # negative, and a ReLU would give it no gradient at all
            masked = torch.where(dead, pre, torch.full_like(pre, float("-inf")))
            vals, idx = masked.topk(kk, dim=-1)
            z_aux = torch.zeros_like(pre).scatter(-1, idx, vals)
            e_hat = z_aux @ self.W_dec
            out["auxk"] = min(1.0, n_dead / k_aux) * (err.detach() - e_hat).pow(2).sum(-1).mean()
        return out


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


class TensorRows:
    """A :class:`RowSource` over an in-memory matrix ``x: [N, d]``: a seeded permutation, its last
    ``heldout_fraction`` of rows held out (at least one row when N ≥ 2)."""

    def __init__(self, x: torch.Tensor, heldout_fraction: float = 0.05, seed: int = 0):
        x = _as_matrix(x)
        n = x.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        n_held = min(n - 1, max(1, round(heldout_fraction * n))) if n >= 2 and heldout_fraction > 0 else 0
        self.x_train, self.x_held = x[perm[: n - n_held]], x[perm[n - n_held :]]
        self.d, self.n_train, self.n_heldout = x.shape[1], self.x_train.shape[0], n_held

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        perm = torch.randperm(self.n_train, generator=generator)
        for i in range(0, self.n_train, batch_size):
            yield self.x_train[perm[i : i + batch_size]]

    def heldout_chunks(self, chunk: int = 65536) -> Iterator[torch.Tensor]:
        for i in range(0, self.n_heldout, chunk):
            yield self.x_held[i : i + chunk]

    def head(self, n: int) -> torch.Tensor:
        return self.x_train[:n]


# Host memory for streamed rows is bounded in bytes, not rows: up to d = 1024 these are 262,144 and 65,536 fp32 rows
# (the sizes every SAE so far was trained with); above, fewer rows (d = 8192: 32,768 and 8,192), so the shuffle buffer
# (held about three times while shuffling) stays near 3 GiB whatever the model's width.
BUFFER_BYTES = 1 << 30
CHUNK_BYTES = 1 << 28


def rows_within(nbytes: int, d: int, most: int, least: int = 1024) -> int:
    """How many fp32 rows of width ``d`` fit in ``nbytes``, between ``least`` and ``most``."""
    return max(least, min(int(most), int(nbytes) // (4 * max(1, int(d)))))


class StoreRows:
    """A :class:`RowSource` over one layer of an on-disk activation store (``ShardReader``): rows are streamed,
    never all loaded. The tail of the stream (``heldout_fraction`` of the rows, whole documents in shuffled
    document order, so a random sample of documents) is held out."""

    def __init__(self, reader: Any, layer: int, heldout_fraction: float = 0.05, buffer_rows: int | None = None):
        self.reader, self.layer = reader, int(layer)
        self.buffer_rows = int(buffer_rows) if buffer_rows else rows_within(BUFFER_BYTES, reader.d, 262144)
        n = reader.n_rows
        n_held = min(n - 1, max(1, round(heldout_fraction * n))) if n >= 2 and heldout_fraction > 0 else 0
        self.d, self.n_train, self.n_heldout = reader.d, n - n_held, n_held

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        return self.reader.batches(self.layer, self.n_train, batch_size, generator, self.buffer_rows)

    def heldout_chunks(self, chunk: int | None = None) -> Iterator[torch.Tensor]:
        chunk = chunk or rows_within(CHUNK_BYTES, self.d, 65536)
        return self.reader.iter_range(self.layer, self.n_train, self.n_train + self.n_heldout, chunk)

    def head(self, n: int) -> torch.Tensor:
        return torch.cat(list(self.reader.iter_range(self.layer, 0, min(n, self.n_train))))


@torch.no_grad()
def sae_stats(
    sae: TopKSAE, x: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 4096
) -> dict[str, float]:
    """Quality of ``sae`` on rows ``x`` (``[N, d_in]`` or an iterable of such chunks, streamed): explained variance
    (1 − SSE / total variance about the rows' mean; FVU = 1 − that), mean L0 (active latents per row), dead
    fraction (latents never active on these rows) and MSE (mean ‖x − x̂‖²), all in the SAE's input space."""
    chunks = [x] if isinstance(x, torch.Tensor) else x
    dev = sae.W_enc.device
    n = 0
    s1 = torch.zeros(sae.d_in, dtype=torch.float64, device=dev)
    s2 = 0.0
    sse = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=dev)
    for chunk in chunks:
        for i in range(0, chunk.shape[0], batch_size):
            xb = chunk[i : i + batch_size].to(dev).float()
            z = sae.encode(xb)
            xh = sae.decode(z)
            sse += float((xb - xh).double().pow(2).sum())
            s1 += xb.double().sum(0)
            s2 += float(xb.double().pow(2).sum())
            l0 += float((z > 0).sum())
            fired |= (z > 0).any(0)
            n += xb.shape[0]
    n = max(1, n)
    tot = s2 - float(s1.pow(2).sum()) / n  # Σ‖x − x̄‖²
    ev = 1.0 - sse / max(tot, 1e-12)
    return {
        "explained_variance": ev,
        "fvu": 1.0 - ev,
        "l0": l0 / n,
        "dead_fraction": float((~fired).float().mean()),
        "mse": sse / n,
    }


def _lr_lambda(total: int, warmup: float, decay: float):
    """Linear warmup over the first ``warmup`` fraction of steps, constant, linear decay to 0 over the last
    ``decay`` fraction (the schedule of SAELens's defaults)."""
    w = max(1, round(warmup * total))
    dstart = total - max(1, round(decay * total)) if decay > 0 else total

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        if step >= dstart:
            return max(0.0, (total - step) / max(1, total - dstart))
        return 1.0

    return f


def train_sae(
    activations: torch.Tensor | Iterable[torch.Tensor] | Any,
    d_sae: int,
    k: int,
    steps: int | None = None,
    lr: float = 5e-4,
    batch_size: int = 4096,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    aux_k: int | None = None,
    aux_coef: float = 1 / 32,
    dead_after: int | None = None,
    warmup: float = 0.05,
    decay: float = 0.2,
    heldout_fraction: float = 0.05,
    normalize: bool = True,
    desc: str = "training SAE",
) -> tuple[TopKSAE, dict[str, float]]:
    """Train a TopK SAE (Gao et al. 2024) on rows ``[N, d_in]``: a tensor, an iterable of chunks, or a row
    source (:class:`StoreRows` streams an on-disk store; :class:`TensorRows` wraps a tensor).

    - inputs scaled by s = 1 / mean ‖x‖ (unit mean norm; estimated on up to 65 536 training rows), stored in the
      SAE as ``input_scale``; ``b_dec`` starts at the scaled mean, ``W_enc = W_decᵀ`` with unit decoder rows;
    - loss: mean ‖s·x − x̂‖² + ``aux_coef`` · AuxK (``aux_k`` dead latents reconstruct the residual; default
      d_in / 2; a latent is dead when it has not fired on the last ``dead_after`` training rows, default
      max(4·batch, N_train / 10)); ``aux_coef=0`` turns AuxK off;
    - Adam (0.9, 0.999), lr ``lr`` with linear warmup (``warmup`` of the steps) and linear decay to 0 (the last
      ``decay``); decoder rows renormalised after every step (their gradient's radial part removed first);
    - ``steps`` (default: one pass over the training rows) cycles through epochs of shuffled batches.

    Returns ``(sae, stats)``: :func:`sae_stats` on the **held-out** rows (``heldout_fraction`` of a tensor input,
    the store's tail for :class:`StoreRows`), plus ``train_dead_fraction`` (dead by the window above at the end),
    ``steps``, ``rows_train``, ``rows_heldout`` and ``input_scale``."""
    from tqdm.auto import tqdm

    src = (
        activations
        if hasattr(activations, "train_batches")
        else TensorRows(activations, heldout_fraction, seed)
    )
    d_in, n_train = int(src.d), int(src.n_train)
    if n_train == 0:
        raise SafeFTError("train_sae: no activation rows to train on")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(int(seed))
    sae = TopKSAE(d_in, d_sae, min(k, d_sae))
    sae.reset_parameters(torch.Generator().manual_seed(int(seed)))
    sae.to(dev)
    with torch.no_grad():
        head = src.head(rows_within(CHUNK_BYTES, d_in, 65536)).to(dev).float()
        scale = 1.0 / float(head.norm(dim=-1).mean().clamp_min(1e-12)) if normalize else 1.0
        sae.input_scale.fill_(scale)
        sae.b_dec.copy_(head.mean(0) * scale)
        del head
    per_epoch = math.ceil(n_train / batch_size)
    total = int(steps) if steps is not None else per_epoch
    window = int(dead_after) if dead_after is not None else max(4 * batch_size, n_train // 10)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup, decay))
    since = torch.zeros(d_sae, dtype=torch.long, device=dev)  # training rows since each latent last fired
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    step = 0
    last: dict[str, float] = {}
    while step < total:
        for xb in src.train_batches(batch_size, gen):
            if step >= total:
                break
            xb = xb.to(dev, non_blocking=True).float()
            dead = since >= window if aux_coef > 0 else None
            with torch.enable_grad():  # callers may hold torch.no_grad() for the model's forward passes
                terms = sae.loss_terms(xb, dead=dead, aux_k=aux_k)
                loss = terms["mse"] + (aux_coef * terms["auxk"] if "auxk" in terms else 0.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            with torch.no_grad():  # keep the gradient tangent to the unit-norm decoder rows
                g, w = sae.W_dec.grad, sae.W_dec
                g.sub_((g * w).sum(1, keepdim=True) * w)
            opt.step()
            sched.step()
            sae.normalize_decoder()
            with torch.no_grad():
                since += xb.shape[0]
                since[(terms["z"] > 0).any(0)] = 0
            step += 1
            bar.update(1)
            if progress and step % 10 == 0:  # .item() syncs: only when a bar shows it
                last = {"mse": float(terms["mse"].detach()), "dead": float((since >= window).float().mean())}
                bar.set_postfix(last)
    bar.close()
    sae.eval()
    stats = sae_stats(sae, src.heldout_chunks()) if src.n_heldout else sae_stats(sae, src.head(rows_within(CHUNK_BYTES, d_in, 65536)))
    stats.update(
        {
            "train_dead_fraction": float((since >= window).float().mean()),
            "steps": float(total),
            "rows_train": float(n_train),
            "rows_heldout": float(src.n_heldout),
            "input_scale": float(sae.input_scale),
        }
    )
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
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items() if k != "input_scale"}
    s = float(sae.input_scale)
    if (
        s != 1.0
    ):  # fold the input scale into the weights: the saved SAE reads raw activations (SAELens "none")
        tensors["W_enc"] = (tensors["W_enc"] * s).contiguous()
        tensors["W_dec"] = (tensors["W_dec"] / s).contiguous()
        tensors["b_dec"] = (tensors["b_dec"] / s).contiguous()
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
    want = {name: tuple(p.shape) for name, p in sae.state_dict().items() if name != "input_scale"}
    for name, shape in want.items():
        if name not in state:
            raise SafeFTError(f"{w_path}: tensor {name!r} missing (found {sorted(state)})")
        if tuple(state[name].shape) != shape:
            raise SafeFTError(
                f"{w_path}: tensor {name!r} has shape {tuple(state[name].shape)}, expected {shape}"
            )
    sae.load_state_dict({k2: state[k2].to(torch.float32) for k2 in want}, strict=False)
    meta = cfg.get("meta") or {}
    sae.hook_name = meta.get("hook_name") or cfg.get("hook_name")
    sae.hook_layer = meta.get("hook_layer", cfg.get("hook_layer"))
    return sae.to(device=device, dtype=dtype).eval()


def ablate_latents_hook(sae: TopKSAE, latents: torch.Tensor):
    """A forward hook for a decoder block that subtracts the selected latents' decoder contribution
    ``z[..., S] W_dec[S] / s`` from the block's output (residual stream ``[B, T, d_in]``), at every position."""

    def hook(_mod: nn.Module, _args: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, (tuple, list)) else output
        with torch.no_grad():
            z = sae.encode(h.float())[..., latents.to(h.device)]
            contrib = (z @ sae.W_dec[latents.to(sae.W_dec.device)]) / sae.input_scale
        new_h = h - contrib.to(h.dtype)
        if isinstance(output, tuple):
            return (new_h, *output[1:])
        if isinstance(output, list):
            return [new_h, *output[1:]]
        return new_h

    return hook
