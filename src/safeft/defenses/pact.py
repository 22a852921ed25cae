"""PACT: keep the aligned model's confidence on a few safety tokens (Wang et al., arXiv 2603.07445).

Offline, once per (θ₀, θ_b) pair and cached: teacher-force θ₀ (chat template) and θ_b (plain ``User:/Assistant:``
prompt) on the first ``response_tokens`` tokens of ``n_pairs`` refusals; average the next-token distributions over
positions and samples into ``p̄₀`` and ``d = mean(p₀ − p_b)`` (both ``[V]``). The safety tokens ``S`` are the
top-``k`` ids by ``p̄₀``; their weights are ``w = max(v, 0)`` with ``v = L2normalise(zscore(d[S]))``.

Training, on the task batch itself, at every response token ``t`` (0-based within the response)::

    z_full  = θ₀ logits on S, full context (prompt + response prefix)        [N_resp, k]
    z_post  = θ₀ logits on S, post-only context (assistant header + prefix)  [N_resp, k]
    c_t     = σ(α (I_θ,t − I_post,t − b)) · exp(−max(0, t − N) / τ)           [N_resp]
    q_t     = normalise(softmax(((1 − c_t) z_full + c_t z_post) / T) ⊙ w)
    term    = λ T² mean_t KL(q_t ‖ softmax(z_θ,t[S] / T))

``I = cumulative_mass_fraction(softmax(z[S]), 0.9)``: the fraction of S needed to hold 90% of the subset mass.
``I_θ,t`` is computed from the *student's* current logits ``z_θ,t[S]`` (detached: it is a gate, a count, with no
gradient), ``I_post,t`` from the teacher's post-only logits ``z_post``; both at temperature 1, as the authors' code.
θ₀ is the LoRA model with its adapters disabled (free) or, for full fine-tuning, a frozen copy of the aligned model.
Only ``[N_resp, k]`` slices of teacher logits are ever built (hidden states times ``lm_head.weight[S]``).

Sharded parameters (LoRA only): the teacher runs the same sharded model with adapters disabled. Its decoder blocks
gather their weights in their own forward (FSDP2 and ZeRO-3 put hooks on every block); the head's rows S are read
inside :func:`~safeft.components.sharding.unsharded` (the gather the head's own forward would do). With full
fine-tuning the frozen θ₀ copy would be a whole second model on every rank, which sharding exists to avoid: refused.
On a 4-bit (QLoRA) base the teacher is the quantized θ₀ (adapters off), as the offline step's θ₀ is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safeft.components.kl import cumulative_mass_fraction, subset_kl
from safeft.components.sharding import unsharded, whole_model_loading
from safeft.defenses.base import (
    Defense,
    DefenseConfig,
    DefenseContext,
    check_int,
    check_number,
    config_error,
    register_defense,
    unwrap_model,
)
from safeft.errors import SafeFTError

log = logging.getLogger(__name__)

ARTIFACT = "pact_safety_tokens"
ARTIFACT_VERSION = 1
GATE_MASS = 0.9  # cumulative mass that defines the concentration index I (paper and code: 0.9)
_EPS = 1e-6  # z-score / L2 guards, as in the authors' code
_OFFLINE_BATCH = 8  # refusal pairs per teacher-forced forward in the offline step
# config attributes that change how hidden states become logits; with any of them set we take the slow path
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "final_logit_softcapping")


# ------------------------------------------------------------------------------------------------------------
# config


# θ_b's prompt in the offline step, exactly the authors' (Glresearch1/PACT compute_safety_tokens/
# compute_safety_tokens_pact.py: `base_prompt += f"User: {m.get('content', '')}\n\n"` then `+= "Assistant: "`, two
# newlines; the same text as the chat template they set on the base tokenizer).
BASE_PROMPT_FORMAT = "User: {prompt}\n\nAssistant: "


@dataclass
class PACTConfig(DefenseConfig):
    """PACT settings (defaults: the paper and the authors' README).

    k: number of safety tokens S. n_pairs: refusal pairs used offline. response_tokens: tokens of each refusal
    teacher-forced offline. lam: weight λ of the KL term. T: distillation temperature. alpha, b: gate slope and
    bias. N, tau: gate stays undamped for the first N response tokens, then decays with time constant tau.
    base_prompt_format: prompt for θ_b offline; ``{prompt}`` is replaced by the harmful prompt (default: the
    authors' ``"User: {prompt}\\n\\nAssistant: "``, two newlines).
    """

    k: int = 50
    n_pairs: int = 512
    response_tokens: int = 64
    lam: float = 1.0
    T: float = 2.0
    alpha: float = 2.0
    b: float = 0.0
    N: int = 8
    tau: float = 8.0
    base_prompt_format: str = BASE_PROMPT_FORMAT

    def __post_init__(self) -> None:
        for name in ("k", "n_pairs", "response_tokens"):
            check_int("pact", name, getattr(self, name), 1)
        check_int("pact", "N", self.N, 0)
        self.lam = check_number("pact", "lam", self.lam, lo=0)
        self.alpha = check_number("pact", "alpha", self.alpha, lo=0)
        self.T = check_number("pact", "T", self.T, lo=0, open_lo=True)
        self.tau = check_number("pact", "tau", self.tau, lo=0, open_lo=True)
        self.b = check_number("pact", "b", self.b)
        if not isinstance(self.base_prompt_format, str) or "{prompt}" not in self.base_prompt_format:
            raise config_error(
                "pact",
                "base_prompt_format",
                self.base_prompt_format,
                "a string containing '{prompt}', e.g. 'User: {prompt}\\n\\nAssistant: '",
            )


# ------------------------------------------------------------------------------------------------------------
# model helpers


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


@contextlib.contextmanager
def reference_view(model: nn.Module) -> Iterator[nn.Module]:
    """Context giving the causal LM that computes θ₀ from the training model: eval mode (no dropout) and, for a
    peft model, adapters disabled. Every module's train/eval flag is restored on exit."""
    m = unwrap_model(model)
    modes = [(mod, mod.training) for mod in m.modules()]
    m.eval()
    try:
        if _is_peft(m):
            with m.disable_adapter():
                yield m.get_base_model()
        else:
            yield m
    finally:
        for mod, mode in modes:
            mod.training = mode


def position_logits(
    causal_lm: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    positions: Tensor,
    token_ids: Tensor | None = None,
) -> Tensor:
    """Logits of ``causal_lm`` at selected positions, restricted to selected vocabulary columns, as float32.

    Args:
        input_ids, attention_mask: ``[B, L]`` (right padding).
        positions: ``[B, L]`` bool; rows of the result follow ``positions``' row-major order.
        token_ids: ``[k]`` vocabulary ids, or None for the whole vocabulary.

    Returns:
        ``[N, k]`` (or ``[N, V]``) with ``N = positions.sum()``. For plain linear heads only the decoder runs and
        ``hidden[positions] @ lm_head.weight[token_ids]ᵀ`` is formed, so the ``[B, L, V]`` logits never exist;
        models that rescale or cap their logits fall back to the full forward.
    """
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    cfg = getattr(causal_lm, "config", None)
    decoder = None
    if isinstance(head, nn.Linear) and not any(getattr(cfg, a, None) for a in _LOGIT_TRANSFORMS):
        try:
            decoder = causal_lm.get_decoder()
        except (AttributeError, ValueError, NotImplementedError):
            decoder = None
        if decoder is causal_lm:
            decoder = None
    if decoder is not None:
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        h = hidden[positions]
        with unsharded(head):  # FSDP2 / ZeRO-3: the head's weight outside its forward
            weight = (
                head.weight
                if token_ids is None
                else head.weight.index_select(0, token_ids.to(head.weight.device))
            )
            z = h.to(weight.dtype) @ weight.T
            if head.bias is not None:
                z = z + (
                    head.bias if token_ids is None else head.bias.index_select(0, token_ids.to(z.device))
                )
        return z.float()
    logits = causal_lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    z = logits[positions]
    if token_ids is not None:
        z = z.index_select(-1, token_ids.to(z.device))
    return z.float()


def _fingerprint_path(path: str) -> str:
    """Fingerprint of a model directory (safeft.models.fingerprint: hash of the weights), else the path text."""
    if Path(path).expanduser().is_dir():
        try:
            from safeft.models import fingerprint

            return fingerprint(path)
        except (ImportError, SafeFTError):
            pass
    return f"path:{path}"


def _tokenizer_id(tok: Any) -> str:
    """The tokenizer's content (vocabulary, size, chat template) as a short hash, not its path: a shared artifact
    (safeft.share) keyed by it loads on any machine with the same tokenizer."""
    vocab = sorted(tok.get_vocab().items())
    blob = json.dumps([vocab, len(tok), getattr(tok, "chat_template", None)], ensure_ascii=False, default=str)
    return f"sha256:{hashlib.sha256(blob.encode()).hexdigest()[:16]}|{len(tok)}"


def _pair(item: Any) -> tuple[str, str]:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return str(item[0]), str(item[1])
    if hasattr(item, "prompt") and hasattr(item, "response"):
        return str(item.prompt), str(item.response)
    raise SafeFTError(f"defense.pact: refusal pair {item!r} is neither (prompt, response) nor an Example")


def _header_text(tokenizer: Any, template: str) -> str:
    """Text of the assistant header (see :func:`assistant_header_ids`); "" when none can be found."""
    from safeft.data import format_prompt

    if template == "chat" and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": "hello"}]
        plain = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        gen = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if (
            isinstance(plain, str)
            and isinstance(gen, str)
            and gen.startswith(plain)
            and len(gen) > len(plain)
        ):
            return gen[len(plain) :]
    marker = "\u2063PACT\u2063"
    text = format_prompt(tokenizer, marker, template)
    return text.split(marker, 1)[1] if marker in text else ""


def _bos_prefix(tokenizer: Any, template: str) -> list[int]:
    """``[bos_id]`` when the θ₀ template writes a BOS token of its own in front of the conversation (Llama-2/3
    style), else ``[]``. A "BOS" that is the template's turn marker (ChatML models whose bos is ``<|im_start|>``)
    is not a sequence start and is not added."""
    from safeft.data import format_prompt

    bos = getattr(tokenizer, "bos_token", None)
    if not bos or getattr(tokenizer, "bos_token_id", None) is None:
        return []
    if format_prompt(tokenizer, "x", template).startswith(bos) and not _header_text(
        tokenizer, template
    ).startswith(bos):
        return [int(tokenizer.bos_token_id)]
    return []


def assistant_header_ids(tokenizer: Any, template: str = "chat") -> list[int]:
    """Token ids of the assistant header that opens the post-only view.

    Chat templates: the text that ``add_generation_prompt=True`` appends (e.g. ``<|im_start|>assistant\\n``), as in
    the authors' code; other templates (and chat templates where that difference is empty or not a suffix): what
    ``format_prompt`` writes after the user content (alpaca: ``\\n\\n### Response:\\n``). A sequence-start BOS that the
    template writes (see ``_bos_prefix``) is put in front."""
    header = _header_text(tokenizer, template)
    ids = list(tokenizer(header, add_special_tokens=False)["input_ids"]) if header else []
    if not ids:
        raise SafeFTError(
            f"defense.pact: cannot find the assistant header of template {template!r} (needed for the post-only "
            f"view); use a chat template with a generation prompt or a template like 'alpaca'"
        )
    return _bos_prefix(tokenizer, template) + ids


# ------------------------------------------------------------------------------------------------------------
# offline step: safety tokens and weights


def _forward_mean_probs(
    causal_lm: nn.Module, seqs: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device
) -> Tensor:
    """Per-sample mean next-token distribution over the response positions.

    ``seqs``: (prompt ids, response ids) per sample. Returns ``[n, V]`` float64: row i is the mean over the
    response tokens of sample i of softmax(logits) at the positions predicting them."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pos = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (p, r) in enumerate(seqs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        pos[i, len(p) - 1 : len(p) + len(r) - 1] = True  # logits at j predict token j + 1
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    probs = F.softmax(position_logits(causal_lm, ids, mask, pos), dim=-1).double()  # [sum R, V]
    sample = torch.arange(len(seqs), device=device).unsqueeze(1).expand_as(pos)[pos]
    sums = torch.zeros((len(seqs), probs.shape[1]), dtype=torch.float64, device=device).index_add_(
        0, sample, probs
    )
    counts = torch.tensor([len(r) for _, r in seqs], dtype=torch.float64, device=device)
    return sums / counts.unsqueeze(1)


@torch.no_grad()
def compute_safety_tokens(
    reference: nn.Module,
    base: nn.Module,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    *,
    k: int,
    response_tokens: int,
    template: str = "chat",
    base_prompt_format: str = BASE_PROMPT_FORMAT,
    batch_size: int = _OFFLINE_BATCH,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """PACT's offline step: safety tokens S and their weights w from θ₀ (``reference``) and θ_b (``base``).

    Each refusal's first ``response_tokens`` tokens (raw text, stripped, no end-of-turn) are teacher-forced after
    ``format_prompt(prompt, template)`` for θ₀ and after ``base_prompt_format`` for θ_b. Per sample the
    vocabulary distributions are averaged over response positions, then over samples (each sample weighs the same).

    Returns ``(tensors, meta)``; tensors: ``ids`` ``[k]`` int64 (S, by decreasing p̄₀), ``p0`` ``[k]`` mean θ₀
    probability of each, ``d`` ``[k]`` mean(p₀ − p_b), ``v`` ``[k]`` z-scored + L2-normalised d, ``w`` ``[k]`` =
    max(v, 0); all float32 but ids. meta: counts, vocabulary size and the decoded tokens.
    """
    from safeft.data import format_prompt

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    bos = _bos_prefix(tokenizer, template)
    device = next(reference.parameters()).device
    base_device = next(base.parameters()).device
    rows: list[tuple[list[int], list[int], list[int]]] = []  # (θ₀ prompt, θ_b prompt, response)
    for prompt, response in pairs:
        resp = list(tokenizer(response.strip(), add_special_tokens=False)["input_ids"])[:response_tokens]
        if not resp:
            continue
        p_ref = list(
            tokenizer(format_prompt(tokenizer, prompt, template), add_special_tokens=False)["input_ids"]
        )
        p_base = bos + list(
            tokenizer(base_prompt_format.replace("{prompt}", prompt), add_special_tokens=False)["input_ids"]
        )
        if p_ref and p_base:
            rows.append((p_ref, p_base, resp))
    if not rows:
        raise SafeFTError(
            "defense.pact: no usable refusal pair (every response is empty); check the refusal data"
        )
    sum_p0 = sum_d = None
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        p0 = _forward_mean_probs(reference, [(a, r) for a, _, r in chunk], pad_id, device)
        pb = _forward_mean_probs(base, [(b, r) for _, b, r in chunk], pad_id, base_device).to(device)
        if p0.shape[1] != pb.shape[1]:
            raise SafeFTError(
                f"defense.pact: θ₀ has {p0.shape[1]} output tokens but θ_b has {pb.shape[1]}; the base model "
                f"must share θ₀'s vocabulary (pass the base θ₀ was aligned from)"
            )
        sum_p0 = p0.sum(0) if sum_p0 is None else sum_p0 + p0.sum(0)
        sum_d = (p0 - pb).sum(0) if sum_d is None else sum_d + (p0 - pb).sum(0)
    n = len(rows)
    mean_p0, mean_d = sum_p0 / n, sum_d / n
    vocab = mean_p0.shape[0]
    if k > vocab:
        raise SafeFTError(f"defense.pact.k={k}: larger than the vocabulary ({vocab}); lower it")
    ids = torch.topk(mean_p0, k).indices
    d = mean_d[ids]
    v = (d - d.mean()) / (d.std() + _EPS) if k > 1 else torch.zeros_like(d)
    v = v / (v.norm() + _EPS)
    w = v.clamp_min(0.0)
    tensors = {
        "ids": ids.long().cpu(),
        "p0": mean_p0[ids].float().cpu(),
        "d": d.float().cpu(),
        "v": v.float().cpu(),
        "w": w.float().cpu(),
    }
    meta = {
        "n_pairs_used": n,
        "n_positions": sum(len(r) for _, _, r in rows),
        "vocab_size": vocab,
        "tokens": [tokenizer.decode([int(i)]) for i in ids.tolist()],
        "n_positive_weights": int((w > 0).sum()),
    }
    return tensors, meta


# ------------------------------------------------------------------------------------------------------------
# the defense


@register_defense
class PACT(Defense):
    """Safety-token confidence distillation from θ₀ on the task batch (see the module docstring)."""

    # 2 (2026-12-01): the default θ_b prompt has the authors' two newlines (was one)
    defaults_revision = 2

    name = "pact"
    config_class = PACTConfig
    paper = "Wang et al., Few Tokens, Big Leverage (PACT), arXiv 2603.07445"
    artifacts = "safety tokens S and weights w (from θ₀ vs θ_b on refusals), cached per model pair"
    needs_base_model = True
    needs_full_params = True  # its teacher forward runs θ₀ outside the training forward and reads the head
    needs_logits = True  # the KL term reads the student's logits of the task forward
    sharded_backends = ("fsdp2", "zero3")  # LoRA only (see sharding_refusal)
    supports_4bit_base = True  # the teacher is the quantized θ₀ with adapters off
    config: PACTConfig

    def __init__(self, config: PACTConfig | None = None):
        super().__init__(config)
        self.safety_ids: Tensor | None = None  # [k] int64
        self.weights: Tensor | None = None  # [k] float32, w = max(v, 0)
        self.header_ids: list[int] = []
        self.meta: dict[str, Any] = {}
        self._teacher: nn.Module | None = None  # frozen θ₀ copy (full FT); None with LoRA (adapters disabled)
        self._pad_id = 0

    def sharding_refusal(self, backend: str) -> str | None:
        if self._teacher is not None and backend in ("fsdp2", "zero3"):
            return (
                "with full fine-tuning its θ₀ teacher is a whole second model on every rank: train LoRA (the "
                "teacher is then the sharded model with adapters disabled) or use DDP / ZeRO-2"
            )
        return super().sharding_refusal(backend)

    # ---- prepare -------------------------------------------------------------------------------------------
    def _artifact_config(self, ctx: DefenseContext, pairs: list[tuple[str, str]]) -> dict[str, Any]:
        c = self.config
        pairs_hash = hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()
        tok = ctx.tokenizer
        return {
            "version": ARTIFACT_VERSION,
            "k": c.k,
            "n_pairs": c.n_pairs,
            "response_tokens": c.response_tokens,
            "base_prompt_format": c.base_prompt_format,
            "template": ctx.template,
            "base_model": _fingerprint_path(str(ctx.base_model_path)),
            "refusal_pairs_sha256": pairs_hash,
            "tokenizer": _tokenizer_id(tok),
        }

    def prepare(self, model: nn.Module, ctx: DefenseContext) -> None:
        """Check requirements, load or compute the safety tokens, set up the θ₀ teacher. Fails before any work
        when θ_b, the refusal pairs or (full fine-tuning) the aligned model path are missing."""
        super().prepare(model, ctx)  # θ_b missing -> SafeFTError, first
        if not ctx.refusal_pairs:
            raise SafeFTError(
                "defense 'pact' needs refusal pairs (harmful prompt, refusal) for its offline step; none were "
                "given: set data.refusal (e.g. safety_tuned_llamas) in the config"
            )
        m = unwrap_model(model)
        peft = _is_peft(m)
        if ctx.use_lora and not peft:
            raise SafeFTError(
                "defense 'pact' with LoRA needs the peft-wrapped model (adapters give θ₀ when off)"
            )
        if not peft and not ctx.aligned_model_path:
            raise SafeFTError(
                "defense 'pact' with full fine-tuning needs the aligned model θ₀ on disk as a frozen teacher "
                "(DefenseContext.aligned_model_path is empty); pass --model PATH"
            )
        if ctx.load_model is None:
            raise SafeFTError("defense 'pact': the pipeline gave no model loader (DefenseContext.load_model)")
        tok = ctx.tokenizer
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.header_ids = assistant_header_ids(tok, ctx.template)

        pairs = [_pair(p) for p in ctx.refusal_pairs[: self.config.n_pairs]]
        key = self._artifact_config(ctx, pairs)
        store = None
        if ctx.artifacts_dir is not None:
            from safeft.artifacts import ArtifactStore

            store = ArtifactStore(ctx.artifacts_dir, ctx.fingerprint)
        if store is not None and store.exists(ARTIFACT, key):
            tensors, meta = store.load(ARTIFACT, key)
            log.info("pact: loaded safety tokens from %s", store.path(ARTIFACT))
        else:
            tensors, meta = self._compute(model, ctx, pairs)
            if store is not None:
                store.save(ARTIFACT, tensors, meta=meta, config=key)
            else:
                log.warning("pact: no artifacts_dir, the safety tokens are not cached")
        self.safety_ids, self.weights, self.meta = tensors["ids"].long(), tensors["w"].float(), meta
        if not bool((self.weights > 0).any()):
            log.warning("pact: every safety-token weight is 0; the target falls back to softmax(z_mix / T)")

        if not peft:  # full FT: a frozen θ₀ copy, the only second model held during training
            teacher = ctx.load_model(ctx.aligned_model_path)
            teacher.eval()
            teacher.requires_grad_(False)
            self._teacher = teacher

    def _compute(
        self, model: nn.Module, ctx: DefenseContext, pairs: list[tuple[str, str]]
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """θ₀ = the training model at step 0 (adapters disabled); θ_b loaded, used, freed."""
        with whole_model_loading():  # DeepSpeed ZeRO-3: θ_b whole, not partitioned by zero.Init
            base = ctx.load_model(ctx.base_model_path)
        try:
            with reference_view(model) as reference:
                return compute_safety_tokens(
                    reference,
                    base,
                    ctx.tokenizer,
                    pairs,
                    k=self.config.k,
                    response_tokens=self.config.response_tokens,
                    template=ctx.template,
                    base_prompt_format=self.config.base_prompt_format,
                )
        finally:
            del base
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # ---- training ------------------------------------------------------------------------------------------
    def post_only_batch(self, input_ids: Tensor, resp_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The post-only view: per row, assistant header ids followed by that row's response tokens.

        Args:
            input_ids: ``[B, L]`` task batch.
            resp_pos: ``[B, L]`` bool, positions of the response tokens that are predicted (labels != -100, and
                position ≥ 1).

        Returns:
            ``post_ids`` ``[B, L']`` (right-padded with the pad id), ``post_mask`` ``[B, L']`` and ``post_pos``
            ``[B, L']`` bool: the positions whose logits predict the response tokens (``len(header) − 1 + j``
            for the j-th), in the same row-major order as ``resp_pos``.
        """
        header = torch.tensor(self.header_ids, dtype=torch.long, device=input_ids.device)
        h = header.numel()
        rows = [torch.cat([header, input_ids[b][resp_pos[b]]]) for b in range(input_ids.shape[0])]
        width = max(r.numel() for r in rows)
        post_ids = input_ids.new_full((len(rows), width), self._pad_id)
        post_mask = torch.zeros_like(post_ids)
        post_pos = torch.zeros_like(post_ids, dtype=torch.bool)
        for b, r in enumerate(rows):
            post_ids[b, : r.numel()] = r
            post_mask[b, : r.numel()] = 1
            post_pos[b, h - 1 : r.numel() - 1] = True
        return post_ids, post_mask, post_pos

    def loss_terms(self, model: nn.Module, inputs: dict, outputs: Any) -> dict[str, Tensor]:
        """``{"pact/kl": λ T² mean_t KL(q_t ‖ softmax(z_θ,t[S]/T))}`` over every response token of the batch."""
        if self.safety_ids is None or self.weights is None:
            raise SafeFTError("defense 'pact': loss_terms called before prepare()")
        logits = getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, dict):
            logits = outputs.get("logits")
        if logits is None:
            raise SafeFTError(
                "defense 'pact' needs the task forward's logits (a fused-loss kernel dropped them)"
            )
        c = self.config
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        S = self.safety_ids.to(logits.device)
        w = self.weights.to(logits.device)

        # Same alignment as HF's causal-LM loss: logits[:, j] predict token j + 1, so response token j (labels[j]
        # != -100, j ≥ 1) is scored at position j - 1. pred_pos marks positions in logits, resp_pos in tokens.
        resp_pos = torch.zeros_like(labels, dtype=torch.bool)
        resp_pos[:, 1:] = labels[:, 1:] != -100
        pred_pos = torch.zeros_like(resp_pos)
        pred_pos[:, :-1] = resp_pos[:, 1:]
        if not bool(resp_pos.any()):
            return {"pact/kl": logits.sum() * 0.0}
        # t = 0-based index of each response token within its row's response, row-major like the masks
        t = (resp_pos.long().cumsum(dim=1) - 1)[resp_pos].float()  # [N_resp]

        z_student = logits[pred_pos].index_select(-1, S).float()  # [N_resp, k], differentiable
        with torch.no_grad():
            post_ids, post_mask, post_pos = self.post_only_batch(input_ids, resp_pos)
            if self._teacher is not None:
                ctx_mgr = contextlib.nullcontext(self._teacher)
            else:
                ctx_mgr = reference_view(model)
            with ctx_mgr as teacher:
                z_full = position_logits(teacher, input_ids, attention_mask, pred_pos, S)  # [N_resp, k]
                z_post = position_logits(teacher, post_ids, post_mask, post_pos, S)  # [N_resp, k]
            z_full, z_post = z_full.to(logits.device), z_post.to(logits.device)
            # gate: I_θ from the student's current subset distribution (detached), I_post from the teacher's
            # post-only one; softmax over S at temperature 1, then the 0.9-mass index
            i_student = cumulative_mass_fraction(F.softmax(z_student.detach(), dim=-1), GATE_MASS)
            i_post = cumulative_mass_fraction(F.softmax(z_post, dim=-1), GATE_MASS)
            gate = torch.sigmoid(c.alpha * (i_student - i_post - c.b)) * torch.exp(
                -(t - c.N).clamp_min(0) / c.tau
            )
            z_mix = (1.0 - gate).unsqueeze(1) * z_full + gate.unsqueeze(1) * z_post
            p_mix = F.softmax(z_mix / c.T, dim=-1)
            if bool((w > 0).any()):
                q = p_mix * w
                q = q / q.sum(dim=-1, keepdim=True).clamp_min(1e-12)
            else:  # no token is more likely under θ₀ than θ_b: plain subset distillation (documented)
                q = p_mix
        term = c.lam * c.T**2 * subset_kl(q, z_student, c.T)
        return {"pact/kl": term}

    # ---- resume: the artifact is reloaded by prepare; nothing mutable to carry ---------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {}
