"""Activation constraint, training part: the loss term L_safety on a few baseline anchors per step.

Per call: draw the global anchor batch (``anchor_batch`` indices from one seeded stream, the same on every rank),
keep this rank's share (every ``world``-th index, so ranks work on distinct anchors and DDP on W ranks equals one
process with the same global batch), run θ up to the deepest SAE layer on those prompts, encode the last
``n_positions`` prompt positions with every SAE, and compare the safety latents with θ₀'s baselines:

    L_safety = (1/B) Σ_b (1/|L|) Σ_ℓ ‖z_ℓ,b − z_ℓ,b^base‖² / mean_b′ ‖z_ℓ,b′^base‖²

Optionally (``hold_residual`` μ > 0, beyond the paper; docs/cwac.md) the same anchors, layers and positions also
hold the whole residual stream h, normalised the same way, with θ₀'s residuals taken once at install:

    L_residual = (1/B) Σ_b (1/|L|) Σ_ℓ ‖h_ℓ,b − h_ℓ,b^base‖² / mean_b′ ‖h_ℓ,b′^base‖²

The anchors are **packed**: their shared prefix (chat template) once, then every anchor's own tokens, in one row
with a block mask (each anchor sees the prefix and itself) and position ids that restart after the prefix — no
padding, the prefix encoded once. A check at install compares packed and padded activations on θ₀ and falls back
to padded batches when a model does not take the 4-D mask. Token tensors are built on the host and sent with
``non_blocking`` from pinned memory: no host synchronisation per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from safeft.components.capture import run_to_layers
from safeft.components.sae import TopKSAE
from safeft.defenses.cwac.common import (
    common_prefix_len,
    dist_rank_world,
    last_positions,
    length_mask,
    pad_right,
)
from safeft.errors import SafeFTError


def packed_batch(
    prefix: Sequence[int], suffixes: Sequence[Sequence[int]], n_positions: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One packed row for sequences ``prefix + suffix_i``.

    Returns ``input_ids [1, T]``, ``position_ids [1, T]``, ``segment [T]`` (0 for the prefix, i + 1 for suffix i)
    and ``gather [B, n_positions]``: the flat index, in the row, of the last ``n_positions`` tokens of each
    sequence (a position inside the prefix maps to the shared prefix token)."""
    P = len(prefix)
    ids = list(prefix)
    pos = list(range(P))
    seg = [0] * P
    gather = []
    for i, suf in enumerate(suffixes):
        off = len(ids)
        L = P + len(suf)
        ids.extend(suf)
        pos.extend(range(P, L))
        seg.extend([i + 1] * len(suf))
        row = []
        for t in range(L - n_positions, L):
            t = max(0, t)
            row.append(t if t < P else off + (t - P))
        gather.append(row)
    return (
        torch.tensor([ids], dtype=torch.long),
        torch.tensor([pos], dtype=torch.long),
        torch.tensor(seg, dtype=torch.long),
        torch.tensor(gather, dtype=torch.long),
    )


def block_mask(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask ``[1, 1, T, T]`` (0 = attend, dtype's min = blocked): token q sees token k ≤ q when
    k is in the prefix (segment 0) or in q's own segment."""
    T = segment.shape[0]
    idx = torch.arange(T, device=segment.device)
    ok = (idx[None, :] <= idx[:, None]) & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    mask = torch.zeros(T, T, dtype=dtype, device=segment.device)
    mask.masked_fill_(~ok, torch.finfo(dtype).min)
    return mask[None, None]


class ActivationTerm:
    """L_safety over the stored baselines. ``saes``/``features``/``z_base``/``norms`` are per SAE layer;
    ``seqs`` the baseline anchors' prompt token ids (the rows of ``z_base``)."""

    def __init__(
        self,
        saes: dict[int, TopKSAE],
        features: dict[int, torch.Tensor],
        z_base: dict[int, torch.Tensor],
        norms: dict[int, float],
        seqs: list[list[int]],
        n_positions: int,
        anchor_batch: int,
        pad: int,
        seed: int,
        packed: bool = True,
        log: Callable[[str], None] = print,
        every: int = 1,
    ):
        self.layers = sorted(saes)
        self.saes, self.features, self.z_base = saes, features, z_base
        self.inv_norm = {L: 1.0 / norms[L] for L in self.layers}
        self.seqs = seqs
        self.n_positions, self.anchor_batch, self.pad = n_positions, anchor_batch, pad
        self.prefix_len = common_prefix_len(seqs) if len(seqs) > 1 else 0
        self.packed = packed
        self.log = log
        self.gen = torch.Generator().manual_seed(int(seed))
        self.every = int(every)  # computed on every k-th call, weighted k
        self.calls = 0
        self.rank_world: tuple[int, int] | None = None  # set on first use (the process group exists by then)
        self.h_base: dict[int, torch.Tensor] = {}  # θ₀'s residuals, only when the residual is held
        self.h_inv_norm: dict[int, float] = {}

    def to(self, dev: torch.device) -> ActivationTerm:
        self.saes = {L: s.to(dev).eval().requires_grad_(False) for L, s in self.saes.items()}
        self.features = {L: f.long().to(dev) for L, f in self.features.items()}
        self.z_base = {L: z.float().to(dev) for L, z in self.z_base.items()}
        self.h_base = {L: h.to(dev) for L, h in self.h_base.items()}
        return self

    @torch.no_grad()
    def take_residual_baseline(self, model: nn.Module, batch: int = 16) -> dict[int, float]:
        """Store θ₀'s residual stream at the loss positions of every baseline anchor (the caller runs θ₀ in eval
        mode, after :meth:`check_packing`, so the baseline comes from the path training uses). Returns the
        normaliser per layer: mean_b ‖h_b^base‖² (over the anchor's ``n_positions`` positions)."""
        parts: dict[int, list[torch.Tensor]] = {L: [] for L in self.layers}
        for _, hs in self.every_anchor(model, batch):
            for L in self.layers:
                parts[L].append(hs[L].float())
        self.h_base = {L: torch.cat(parts[L]) for L in self.layers}
        norms = {L: float(h.pow(2).sum((1, 2)).mean()) for L, h in self.h_base.items()}
        bad = [L for L, v in norms.items() if not v > 0]
        if bad:
            raise SafeFTError(
                f"CWAC hold_residual: θ₀'s residual is zero at SAE layer(s) {bad} on every baseline anchor; set "
                f"defense.cwac.hold_residual: 0 or pick other sae_layers"
            )
        self.h_inv_norm = {L: 1.0 / v for L, v in norms.items()}
        return norms

    # ---- batches ---------------------------------------------------------------------------------------------
    def _send(self, t: torch.Tensor, dev: torch.device) -> torch.Tensor:
        if dev.type == "cuda":
            return t.pin_memory().to(dev, non_blocking=True)
        return t.to(dev)

    def hidden(self, model: nn.Module, idx: list[int]) -> dict[int, torch.Tensor]:
        """``{layer: h [len(idx), n_positions, d]}`` for baseline anchors ``idx`` under the current θ."""
        dev = next(model.parameters()).device
        seqs = [self.seqs[i] for i in idx]
        if self.packed:
            P = self.prefix_len
            ids, pos, seg, gather = packed_batch(self.seqs[0][:P], [s[P:] for s in seqs], self.n_positions)
            dtype = next(model.parameters()).dtype
            dtype = dtype if dtype.is_floating_point else torch.float32
            seg = self._send(seg, dev)
            hs = run_to_layers(
                model,
                self._send(ids, dev),
                block_mask(seg, dtype),
                self.layers,
                position_ids=self._send(pos, dev),
            )
            g = self._send(gather.flatten(), dev)
            return {L: h[0].index_select(0, g).view(len(idx), self.n_positions, -1) for L, h in hs.items()}
        ids, lengths = pad_right(seqs, self.pad)
        mask = length_mask(lengths, ids.shape[1])
        hs = run_to_layers(model, self._send(ids, dev), self._send(mask, dev), self.layers)
        pos = self._send(last_positions(lengths, self.n_positions), dev)
        return {L: torch.gather(h, 1, pos[..., None].expand(-1, -1, h.shape[-1])) for L, h in hs.items()}

    def every_anchor(self, model: nn.Module, batch: int) -> Iterator[tuple[list[int], dict[int, torch.Tensor]]]:
        """``(indices, hidden(model, indices))`` over every baseline anchor in order, ``batch`` at a time."""
        n = len(self.seqs)
        for start in range(0, n, batch):
            idx = list(range(start, min(n, start + batch)))
            yield idx, self.hidden(model, idx)

    @torch.no_grad()
    def check_packing(self, model: nn.Module) -> float:
        """Largest relative difference between packed and padded activations on a few anchors (θ₀ active);
        switches to padded batches when it exceeds the model dtype's tolerance. Returns the difference."""
        if not self.packed or len(self.seqs) < 2:
            self.packed = False
            return 0.0
        idx = list(range(min(3, len(self.seqs))))
        try:
            a = self.hidden(model, idx)
        except Exception as e:  # a model whose attention rejects a 4-D mask
            self.packed = False
            self.log(
                f"CWAC note: packed anchors not supported by this model ({type(e).__name__}); padded batches"
            )
            return float("inf")
        self.packed = False
        b = self.hidden(model, idx)
        worst = 0.0
        for L in self.layers:
            scale = float(b[L].float().abs().max().clamp_min(1.0))
            worst = max(worst, float((a[L].float() - b[L].float()).abs().max()) / scale)
        dtype = next(model.parameters()).dtype
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
        self.packed = worst <= tol
        if not self.packed:
            self.log(
                f"CWAC note: packed anchors differ from padded ones by {worst:.2g} (> {tol}); padded batches"
            )
        return worst

    # ---- the loss -------------------------------------------------------------------------------------------
    def draw(self) -> tuple[list[int], float]:
        """This rank's anchors of the next global batch, and the factor world / B that makes the DDP average
        of the ranks' terms equal the mean over the global batch."""
        if self.rank_world is None:
            self.rank_world = dist_rank_world()
        rank, world = self.rank_world
        n = len(self.seqs)
        B = min(self.anchor_batch, n)
        idx = torch.randperm(n, generator=self.gen)[:B].tolist()
        return idx[rank::world], world / B

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """L_safety on this micro-batch's anchors; with ``every`` = k only on every k-th call (counted across
        resumes), weighted k, and 0 on the others: the same regulariser in expectation over k micro-batches, at
        1/k of the anchors' forward and backward cost."""
        return self.terms(model)["safety"]

    def terms(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{"safety": L_safety}``, plus ``"residual": L_residual`` once :meth:`take_residual_baseline` ran —
        both from one forward on the same anchors (one draw from the stream per call either way)."""
        self.calls += 1
        dev = next(model.parameters()).device
        zero = torch.zeros((), device=dev)
        names = ["safety", "residual"] if self.h_base else ["safety"]
        if (self.calls - 1) % self.every:
            return dict.fromkeys(names, zero)
        own, scale = self.draw()
        scale *= self.every
        if not own:
            return dict.fromkeys(names, zero)
        hs = self.hidden(model, own)
        own_t = self._send(torch.tensor(own, dtype=torch.long), dev)
        total = torch.zeros((), device=dev)
        resid = torch.zeros((), device=dev)
        for L in self.layers:
            sae, S = self.saes[L], self.features[L]
            pre = sae.pre_acts(hs[L].float())  # [b, P, d_sae]
            z = sae.activate(pre)[..., S]  # the TopK codes: the loss value
            # Straight-through gradient: a safety latent that fell out of the top-k (or below 0) has zero gradient
            # under TopK, so the loss could never bring it back; route the gradient through its pre-activation.
            pre_s = pre[..., S]
            z = pre_s + (z - pre_s).detach()
            diff = z - self.z_base[L].index_select(0, own_t)
            total = total + diff.pow(2).sum() * self.inv_norm[L]
            if self.h_base:
                dh = hs[L].float() - self.h_base[L].index_select(0, own_t)
                resid = resid + dh.pow(2).sum() * self.h_inv_norm[L]
        out = {"safety": total * (scale / len(self.layers))}
        if self.h_base:
            out["residual"] = resid * (scale / len(self.layers))
        return out

    @torch.no_grad()
    def drift(self, model: nn.Module, batch: int = 16) -> dict[int, float]:
        """How far the safety latents have moved from θ₀'s baselines, on *every* baseline anchor, under the current
        θ: ``{layer: (1/n) Σ_b ‖z_b − z_b^base‖² / mean_b′ ‖z_b′^base‖²}`` — the per-layer quantity whose mean over
        layers L_safety samples each step (0 at θ₀; 1 = the latents moved by as much as their own size). For
        monitoring (:class:`safeft.monitor.SafetyMonitor`): no gradient, no draw from the anchor stream (training's
        random sequence is untouched), this process only (no collective). The caller sets eval mode."""
        total = dict.fromkeys(self.layers, 0.0)
        for idx, hs in self.every_anchor(model, batch):
            for L in self.layers:
                sae, S = self.saes[L], self.features[L]
                z = sae.activate(sae.pre_acts(hs[L].float()))[..., S]  # [b, n_positions, |S|]
                diff = z - self.z_base[L][idx[0] : idx[0] + len(idx)]
                total[L] += float(diff.pow(2).sum()) * self.inv_norm[L]
        return {L: v / max(1, len(self.seqs)) for L, v in total.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"anchor_rng": self.gen.get_state(), "calls": torch.tensor(self.calls, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "anchor_rng" in state:
            self.gen.set_state(state["anchor_rng"].to(torch.uint8).cpu())
        if "calls" in state:
            self.calls = int(state["calls"])
