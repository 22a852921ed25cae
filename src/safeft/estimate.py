"""``safeft estimate``: what a defense will cost on a model, before any GPU hour is spent.

From the model's dimensions (a built-in preset, a ``config.json``, or a Hub id whose ``config.json`` is fetched) and
a cost model, per defense: the one-off artifact cost (size, peak memory and time of preparing it), the extra
training memory per GPU and the expected step-time ratio to plain SFT. All constants live in :data:`HARDWARE`
and :data:`COST`, each with the command that measured it (or "assumed" where nothing measured it yet).

CWAC is modelled as it stands after its memory rework (issue 15): one safety subspace V (``d_in × r``) per distinct
module input of each constrained layer (q/k/v share the block's attention input, gate/up the MLP input; o_proj and
down_proj have their own), r a parameter (it depends on ``energy``); for full fine-tuning W₀V (``d_out × r``) per
trained module instead of W₀; subspaces from the Gram matrix of the captured rows (never a d_in² matrix); a TopK SAE
of width M = ``sae_width_factor`` · hidden on each SAE layer, trained on rows streamed from disk.

Every number is an estimate of the dominant terms (weights, artifacts, optimizer state, FLOPs at an effective
throughput); ``benchmarks/estimate_check.py`` measures the ones we can measure on CPU and states the error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from safeft.errors import SafeFTError

GB = 1e9


# ---- model dimensions ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDims:
    """The dimensions the cost model needs (Llama-like decoder: q/k/v/o + gated MLP)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    tied_embeddings: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """``{projection: (d_out, d_in)}`` of one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.hd, self.kv_heads * self.hd
        return {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.module_shapes().values()) + 2 * self.hidden

    @property
    def params(self) -> int:
        emb = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.layer_params + emb + self.hidden


# Well-known configs (values of each model's config.json on the Hub).
PRESETS: dict[str, ModelDims] = {
    "smollm2-135m": ModelDims("smollm2-135m", 576, 1536, 30, 9, 3, 49152, tied_embeddings=True),
    "qwen2.5-0.5b": ModelDims("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, tied_embeddings=True),
    "qwen2.5-7b": ModelDims("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064),
    "llama-2-7b": ModelDims("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    "mistral-7b": ModelDims("mistral-7b", 4096, 14336, 32, 32, 8, 32000),
    "llama-3-8b": ModelDims("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
    "gemma-2-9b": ModelDims("gemma-2-9b", 3584, 14336, 42, 16, 8, 256000, head_dim=256, tied_embeddings=True),
    "llama-3-70b": ModelDims("llama-3-70b", 8192, 28672, 80, 64, 8, 128256),
}
# Hub ids answered from the presets (no download)
HUB_ALIASES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
    "HuggingFaceTB/SmolLM2-135M": "smollm2-135m",
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b",
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": "qwen2.5-0.5b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "meta-llama/Llama-2-7b-chat-hf": "llama-2-7b",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral-7b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3-8b",
    "google/gemma-2-9b-it": "gemma-2-9b",
    "meta-llama/Meta-Llama-3-70B-Instruct": "llama-3-70b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3-70b",
}
_KEYS = {
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "vocab": "vocab_size",
}


def dims_from_config(cfg: Any, source: str) -> ModelDims:
    """ModelDims from a parsed config.json (``text_config`` of a multimodal config is used when present)."""
    if not isinstance(cfg, dict):
        raise SafeFTError(
            f"{source}: expected a JSON object (a model's config.json), got {type(cfg).__name__}"
        )
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    values: dict[str, int] = {}
    for field_name, key in _KEYS.items():
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SafeFTError(
                f"{source}: '{key}' must be a positive integer, got {v!r}; give a decoder LLM's config.json "
                f"(Llama/Qwen/Mistral-like) or a preset ({', '.join(PRESETS)})"
            )
        values[field_name] = v
    kv = cfg.get("num_key_value_heads") or values["heads"]
    hd = cfg.get("head_dim") or 0
    if not isinstance(kv, int) or kv <= 0 or not isinstance(hd, int) or hd < 0:
        raise SafeFTError(f"{source}: 'num_key_value_heads' / 'head_dim' must be positive integers")
    return ModelDims(
        name=source,
        kv_heads=kv,
        head_dim=hd,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **values,
    )


def resolve_model(spec: str) -> ModelDims:
    """A preset name, a Hub id with a preset, a ``config.json`` (or a folder holding one), else a Hub id whose
    config.json is downloaded. One-line SafeFTError for anything else."""
    key = spec.strip()
    if key.lower() in PRESETS:
        return PRESETS[key.lower()]
    if key in HUB_ALIASES:
        return replace(PRESETS[HUB_ALIASES[key]], name=key)
    path = Path(key).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SafeFTError(
                f"{path}:{e.lineno}: not valid JSON ({e.msg}); give a model's config.json"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise SafeFTError(f"{path}: cannot read it ({e})") from None
        return dims_from_config(cfg, str(path))
    if path.suffix == ".json" or key.startswith((".", "/", "~")) or key.count("/") != 1:
        raise SafeFTError(
            f"--model {spec!r}: not a preset ({', '.join(PRESETS)}), a config.json, nor a Hub id (owner/name)"
        )
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(key, "config.json")
    except Exception as e:  # offline, gated, missing: one line
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise SafeFTError(
            f"--model {spec!r}: cannot fetch its config.json from the Hub ({reason}); pass a local config.json "
            f"or a preset ({', '.join(PRESETS)})"
        ) from None
    return dims_from_config(json.loads(Path(local).read_text(encoding="utf-8")), key)


# ---- the constants: the one place they live ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """Effective speeds of one device. ``measured_by``: the command that measured them (or "assumed")."""

    name: str
    tflops: float  # effective dense TFLOP/s in the training dtype
    hbm_gbps: float  # effective memory bandwidth, GB/s (decode, reading weights)
    disk_gbps: float  # reading safetensors
    per_layer_step_s: float  # fixed time per decoder layer per forward + backward (kernel launches / Python)
    per_module_step_s: float  # fixed time per constrained module per step (kernel launches / Python loop)
    measured_by: str


# fitted by `python benchmarks/estimate_check.py --repeats 3 --steps 10` on the 2-core CPU machine
# (benchmarks/results/estimate_check.json; the machine was shared and loaded, so these moved by ~3× between runs)
CPU_TFLOPS, CPU_PER_LAYER_S, CPU_PER_MODULE_S = 0.009967, 0.0, 3.49e-05

HARDWARE: dict[str, Hardware] = {
    # Assumed, to be replaced by `bash benchmarks/gpu_check.sh` results (benchmarks/results/gpu/): H200 bf16 dense
    # matmul measured at ~790 TFLOP/s on this workplace's machines (device KINDS.md), ~40% of it in LoRA training;
    # 4.3 TB/s device copy (KINDS.md) at ~80%; NVMe 2 GB/s; ~120 kernels of ~2 µs of launch per layer per step that
    # the GPU does not hide; ~4 small kernels of ~10 µs per constrained module per step.
    "h200": Hardware(
        "h200",
        320.0,
        3400.0,
        2.0,
        0.25e-3,
        40e-6,
        "assumed (no GPU measurement yet: benchmarks/gpu_check.sh)",
    ),
    # Measured on this repository's 2-core CPU machine (torch 2.13 CPU, float32) by
    # `python benchmarks/estimate_check.py` (benchmarks/results/estimate_check.json "fitted_cpu_constants": SFT step
    # times of its calib model at two batch sizes give FLOP/s and the per-layer cost, CWAC's after_step the
    # per-module cost).
    "cpu": Hardware(
        "cpu", CPU_TFLOPS, 8.0, 0.5, CPU_PER_LAYER_S, CPU_PER_MODULE_S, "benchmarks/estimate_check.py"
    ),
}


@dataclass(frozen=True)
class CostModel:
    """Constants of the cost model (not hardware speeds). Sources in the comments."""

    # bytes of saved activations per token per layer, as a multiple of hidden (Korthikanti et al. 2022, "Reducing
    # activation recomputation", 34·s·b·h per layer in 16-bit with flash attention; halved for LoRA where frozen
    # weights need no saved inputs for their weight gradient: we keep 34 as the upper bound)
    act_bytes_per_token_layer: float = 34.0
    # full fine-tuning state per parameter with bf16 mixed precision + AdamW: bf16 weight 2 + fp32 master 4 + Adam
    # m, v 8 + bf16 grad 2 (ZeRO paper's 16 bytes/param)
    full_ft_bytes_per_param: float = 16.0
    # LoRA: frozen bf16 weights; LoRA params fp32 with AdamW (4 + 8 + 4 grad)
    weight_bytes: float = 2.0
    lora_bytes_per_param: float = 16.0
    # artifacts' dtypes: V and W₀V in float32 (the projection's exactness), SAE float32
    artifact_bytes: float = 4.0
    # FLOPs of one anchor token's forward + backward through a layer relative to a task token's (the same layers and
    # LoRA adapters: 1.0 by construction)
    anchor_token_cost: float = 1.0
    # PACT: the teacher's two forward passes (full view + post-only view, no grad) cost 1/3 of a fwd+bwd each per
    # token; the post-only view holds the response tokens only (a fraction `response_fraction` of the sequence)
    response_fraction: float = 0.5


COST = CostModel()


# ---- what is being estimated ------------------------------------------------------------------------------------------
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# modules that read the same input (one V each group, after the CWAC rework)
INPUT_GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out"}
INPUT_GROUPS.update({"gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"})
DEFENSES = ("sft", "cwac", "asft", "pact", "safelora", "safeinstr", "lisa", "sppft", "salora")


@dataclass
class Setting:
    """The run being estimated. Defaults: the repository's run config and CWAC's defaults."""

    method: str = "lora"  # lora | full
    gpus: int = 1
    fsdp: bool = False  # parameters sharded over the GPUs (FSDP2 / ZeRO-3)
    lora_r: int = 8
    lora_targets: tuple[str, ...] = PROJECTIONS
    batch_size: int = 8  # per GPU
    seq_len: int = 512
    cwac_rank: int = 64  # r of each safety subspace V (depends on energy; measured ranks: see docs)
    cwac_layers: str = "all"  # all | middle
    sae_layers: int = 1
    sae_width_factor: int = 8
    sae_tokens: float = 1e6  # rows the SAE trains on (SPEC: ≥ 10⁶ tokens)
    sae_epochs: float = 1.0
    n_anchor: int = 200
    anchor_check_tokens: int = 48
    anchor_batch: int = 4
    anchor_len: int = 64  # tokens of an anchor prompt (with the chat template)
    n_features: int = 100
    n_positions: int = 4
    pact_pairs: int = 512
    pact_tokens: int = 128  # prompt + 64 response tokens of each refusal pair
    safeinstr_fraction: float = 0.1
    salora_rank: int = 32  # safety_rank r_s = task_rank r_t (authors' --rs 32 --ds 32)
    salora_n: int = 128  # n_safety = n_task examples of the feature captures
    salora_niter: int = 30  # power iterations of each svd_lowrank
    hardware: str = "h200"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Estimate:
    defense: str
    artifact_bytes: float = 0.0  # on disk / resident where kept
    prepare_peak_bytes: float = 0.0  # extra peak memory while preparing (beyond the model)
    prepare_seconds: float = 0.0
    train_extra_bytes: float = 0.0  # per GPU, beyond plain SFT
    step_ratio: float = 1.0  # step time / SFT step time
    notes: list[str] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)


def _constrained_layers(m: ModelDims, s: Setting) -> int:
    return m.layers if s.cwac_layers == "all" else max(1, m.layers // 2)


def cwac_parts(m: ModelDims, s: Setting) -> dict[str, float]:
    """Element counts of CWAC's artifacts: V (one per distinct input of each constrained layer, among the trained
    modules), W₀V (full FT: one per trained module), SAE, baselines."""
    shapes = m.module_shapes()
    trained = [p for p in PROJECTIONS if p in s.lora_targets] if s.method == "lora" else list(PROJECTIONS)
    groups = {INPUT_GROUPS[p]: shapes[p][1] for p in trained}
    n_layers = _constrained_layers(m, s)
    v = n_layers * sum(d_in * s.cwac_rank for d_in in groups.values())
    w0v = n_layers * sum(shapes[p][0] * s.cwac_rank for p in trained) if s.method == "full" else 0
    width = s.sae_width_factor * m.hidden
    sae = s.sae_layers * (2 * width * m.hidden + width + m.hidden)
    base = s.sae_layers * max(1, int(0.2 * s.n_anchor)) * s.n_positions * s.n_features
    return {"V": v, "W0V": w0v, "SAE": sae, "baselines": base, "modules": n_layers * len(trained)}


def salora_parts(m: ModelDims, s: Setting) -> dict[str, float]:
    """SaLoRA's fixed float32 tensors (element counts) and its extra FLOPs per task token, over the LoRA modules:
    V_s ``[d_out, r_s]`` (the cached artifact), A₀ ``[r, d_in]`` and C B₀ ``[d_out, r]`` (the task init); per token,
    fwd + bwd, C on the LoRA branch output (u − V_s(V_sᵀu): 2 matmuls of d_out·r_s each way) and the init term
    s·C B₀ A₀ x (2 matmuls of r·(d_in + d_out) each way; A₀, C B₀ frozen: x's gradient only)."""
    shapes = [sh for p, sh in m.module_shapes().items() if p in s.lora_targets]
    r, rs = s.lora_r, s.salora_rank
    return {
        "V_s": m.layers * sum(d_out * rs for d_out, _ in shapes),
        "init": m.layers * sum(r * (d_in + d_out) for d_out, d_in in shapes),
        "flops_per_token": m.layers * sum(8.0 * d * rs + 4.0 * r * (i + d) for d, i in shapes),
        "modules": m.layers * len(shapes),
    }


def _flops_per_token(m: ModelDims, s: Setting) -> float:
    """Forward + backward FLOPs per token: 6·P for full FT; LoRA skips the frozen weights' gradient (4·P)."""
    return (6.0 if s.method == "full" else 4.0) * m.params


def step_seconds(m: ModelDims, s: Setting, hw: Hardware, tokens: float | None = None) -> float:
    """Plain SFT step (per GPU): FLOPs at the effective throughput + a fixed cost per layer."""
    tokens = s.batch_size * s.seq_len if tokens is None else tokens
    return _flops_per_token(m, s) * tokens / (hw.tflops * 1e12) + m.layers * hw.per_layer_step_s


def estimate(m: ModelDims, defense: str, s: Setting, cost: CostModel = COST) -> Estimate:
    """The estimate of one defense on model ``m`` under setting ``s`` (see the module docstring)."""
    if defense not in DEFENSES:
        raise SafeFTError(f"--defense {defense!r}: choose one of {', '.join(DEFENSES)} or 'all'")
    hw = HARDWARE[s.hardware]
    shard = s.gpus if s.fsdp else 1
    step = step_seconds(m, s, hw)
    targets = {p: sh for p, sh in m.module_shapes().items() if p in s.lora_targets}
    lora_params = m.layers * sum((d_out + d_in) * s.lora_r for d_out, d_in in targets.values())
    e = Estimate(defense)
    ab = cost.artifact_bytes
    if defense == "cwac":
        parts = cwac_parts(m, s)
        e.parts = parts
        e.artifact_bytes = ab * (parts["V"] + parts["W0V"] + parts["SAE"] + parts["baselines"])
        # training: V replicated on every rank (row projections need all of V), W₀V row-sharded with W, SAE and
        # baselines replicated; activations of the anchor forward up to the SAE layer(s) (middle: half the layers)
        # fraction of the layers the anchor pass runs: up to the (deepest) SAE layer; one SAE layer sits in the
        # middle (CWAC's default sae_layer = L // 2), several spread to the last
        sae_depth = (m.layers // 2 + 1) / m.layers if s.sae_layers == 1 else 1.0
        act = cost.act_bytes_per_token_layer * m.hidden * s.anchor_batch * s.anchor_len * m.layers * sae_depth
        act *= cost.weight_bytes / 2
        e.train_extra_bytes = (
            ab * (parts["V"] + parts["W0V"] / shard + parts["SAE"] + parts["baselines"]) + act
        )
        # step: anchor tokens through sae_depth of the layers (fwd + bwd; FLOPs and the per-layer cost), + the
        # projections (FLOPs and a fixed per-module cost); the SAE encode is negligible
        t_anchor = cost.anchor_token_cost * _flops_per_token(m, s) * s.anchor_batch * s.anchor_len * sae_depth
        t_anchor = t_anchor / (hw.tflops * 1e12) + sae_depth * m.layers * hw.per_layer_step_s
        n_con = _constrained_layers(m, s)
        if s.method == "lora":  # A ← A − (AV)Vᵀ: 4·r_lora·d_in·r per LoRA A
            proj_flops = 4.0 * s.cwac_rank * n_con * sum(s.lora_r * d_in for _, d_in in targets.values())
        else:  # W ← W − (WV − W₀V)Vᵀ: 4·d_out·d_in·r per weight, on this rank's rows
            proj_flops = 4.0 * s.cwac_rank * n_con * (m.layer_params - 2 * m.hidden) / shard
        proj = proj_flops / (hw.tflops * 1e12) + hw.per_module_step_s * parts["modules"]
        e.step_ratio = 1.0 + (t_anchor + proj) / step
        # one-off: anchor check (greedy decode, weight-bandwidth bound, 16 prompts a batch), SAE rows (forward to
        # the SAE layer), SAE training (6 FLOPs per weight per row, fwd + bwd), subspace rows (Gram matrices: rows ≪
        # d_in, negligible); peak: SAE + Adam (4 copies) and one layer's captured rows
        decode_steps = math.ceil(s.n_anchor / 16) * s.anchor_check_tokens
        # prepare runs in one process on the whole θ₀ (the other ranks load the cached artifacts)
        t_check = decode_steps * m.params * cost.weight_bytes / (hw.hbm_gbps * 1e9)
        t_rows = 2.0 * m.params * sae_depth * s.sae_tokens / (hw.tflops * 1e12)
        t_sae = 6.0 * (parts["SAE"] / max(1, s.sae_layers)) * s.sae_tokens * s.sae_epochs * s.sae_layers
        t_sae /= hw.tflops * 1e12
        e.prepare_seconds = t_check + t_rows + t_sae
        e.prepare_peak_bytes = ab * 4 * parts["SAE"] / max(1, s.sae_layers) + 8 * 4096 * m.intermediate
        e.parts.update({"t_anchor_check": t_check, "t_sae_rows": t_rows, "t_sae_train": t_sae})
        disk = s.sae_layers * s.sae_tokens * m.hidden * cost.weight_bytes
        e.notes.append(f"SAE rows streamed from disk: {disk / GB:.1f} GB")
    elif defense in ("asft", "safelora"):
        if s.method != "lora":
            e.notes.append("LoRA only (refused with --method full)")
        vt = m.layers * sum(a * b for p, (a, b) in m.module_shapes().items() if p in s.lora_targets)
        e.parts = {"V": vt}
        e.artifact_bytes = ab * vt  # not cached: rebuilt from θ_b's files each run
        e.prepare_seconds = vt * cost.weight_bytes / (hw.disk_gbps * 1e9)
        e.prepare_peak_bytes = ab * vt
        if defense == "asft":  # V on the GPU, row-sharded under FSDP2; 4·r FLOPs per V element per step
            e.train_extra_bytes = ab * vt / shard
            if shard > 1:
                e.notes.append("prepare builds the whole V on every rank before keeping its rows")
            e.step_ratio = 1.0 + (4.0 * s.lora_r * vt / shard / (hw.tflops * 1e12)) / step
        else:  # V kept in CPU RAM until the post-hoc projection
            e.notes.append(f"V in CPU RAM during training: {ab * vt / GB:.1f} GB per process")
    elif defense == "pact":
        teacher = (1.0 + cost.response_fraction) / 3.0  # two no-grad forwards vs a fwd + bwd
        e.step_ratio = 1.0 + teacher * (1.5 if s.method == "lora" else 1.0)  # LoRA step costs 4·P, not 6·P
        e.artifact_bytes = 4 * 2 * 50
        e.prepare_seconds = 2 * 2.0 * m.params * s.pact_pairs * s.pact_tokens / (hw.tflops * 1e12)
        e.prepare_seconds += m.params * cost.weight_bytes / (hw.disk_gbps * 1e9)  # reading θ_b
        e.prepare_peak_bytes = m.params * cost.weight_bytes  # θ_b, loaded once, whole
        if s.method == "full":
            e.train_extra_bytes = m.params * cost.weight_bytes  # a frozen θ₀ copy (refused under sharding)
            e.notes.append("full FT keeps a frozen θ₀ teacher (refused under FSDP2/ZeRO-3)")
    elif defense == "lisa":
        snap = lora_params if s.method == "lora" else m.params
        e.train_extra_bytes = 4.0 * snap / shard
        e.notes.append("alternates alignment and task steps: more steps for the same task data")
    elif defense == "sppft":  # one forward of 2 × 100 prompts (~64 tokens) to locate the blocks, then frozen blocks
        e.prepare_seconds = 2.0 * m.params * 200 * 64 / (hw.tflops * 1e12)
        e.notes.append("frozen safety layers: no extra memory; a step costs at most plain SFT's")
    elif defense == "salora":
        if s.method != "lora":
            e.notes.append("LoRA only (refused with --method full)")
        if s.fsdp:
            e.notes.append("refused under FSDP2/ZeRO-3 (finalize rewrites whole LoRA factors)")
        p = salora_parts(m, s)
        e.parts = p
        e.artifact_bytes = ab * p["V_s"]  # cached per θ₀; A₀, C B₀ are per run (in the checkpoint's state)
        e.train_extra_bytes = ab * (p["V_s"] + p["init"])  # replicated; the hooks save no activations
        # step: the hooks' FLOPs + ~16 small kernels per module (two hooks, fwd + bwd; CWAC's after_step is ~4)
        hooks = p["flops_per_token"] * s.batch_size * s.seq_len / (hw.tflops * 1e12)
        e.step_ratio = 1.0 + (hooks + 4 * hw.per_module_step_s * p["modules"]) / step
        # prepare: θ₀ forwards over n safety pairs (pact_tokens, 64 of them response) and n task examples (seq_len),
        # rows X at the response tokens; per module Y = X W₀ᵀ and svd_lowrank(Y, k, niter) for V_s and V_t, and
        # svd_lowrank(W₀, r); each power iteration also costs a few small kernels (QR)
        n_rows = s.salora_n * (64 + s.seq_len * cost.response_fraction)
        it = 2.0 * s.salora_niter + 2.0  # products with Y or Yᵀ in one svd_lowrank
        svd = m.layers * sum(
            2.0 * n_rows * d_out * (d_in + it * s.salora_rank) + it * 2.0 * d_out * d_in * s.lora_r
            for d_out, d_in in targets.values()
        )
        fwd = 2.0 * m.params * s.salora_n * (s.pact_tokens + s.seq_len)
        kernels = 3 * (s.salora_niter + 1) * hw.per_module_step_s * p["modules"]
        e.prepare_seconds = (fwd + svd) / (hw.tflops * 1e12) + kernels
        # captured float32 task rows, in passes of ≤ 2 GiB (_salora_features.ROWS_BUDGET_BYTES), + one module's Y
        task_rows = s.salora_n * s.seq_len * cost.response_fraction
        rows = 4.0 * task_rows * m.layers * sum(d_in for _, d_in in targets.values())
        e.prepare_peak_bytes = min(rows, 2 * 2**30) + 4.0 * task_rows * max(d for d, _ in targets.values())
        e.notes.append(f"saves a rank-{2 * s.lora_r} LoRA (C and the init term folded in)")
    elif defense == "safeinstr":
        e.step_ratio = 1.0
        e.notes.append(
            f"{s.safeinstr_fraction:.0%} refusal rows: {1 / (1 - s.safeinstr_fraction):.2f}× the steps"
        )
    return e


def base_memory_bytes(m: ModelDims, s: Setting, cost: CostModel = COST) -> float:
    """Plain SFT training memory per GPU without activations: weights (+ optimizer state)."""
    shard = s.gpus if s.fsdp else 1
    if s.method == "full":
        return cost.full_ft_bytes_per_param * m.params / shard
    lora = m.layers * sum(
        (a + b) * s.lora_r for p, (a, b) in m.module_shapes().items() if p in s.lora_targets
    )
    return (cost.weight_bytes * m.params + cost.lora_bytes_per_param * lora) / shard


# ---- printing ---------------------------------------------------------------------------------------------------------
def _size(b: float) -> str:
    if b >= GB:
        return f"{b / GB:.1f} GB"
    if b >= 1e6:
        return f"{b / 1e6:.0f} MB"
    return f"{b / 1e3:.0f} kB" if b >= 1e3 else f"{b:.0f} B"


def _time(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.0f} min"
    return f"{s:.1f} s" if s >= 1 else "< 1 s"


def render(m: ModelDims, s: Setting, rows: list[Estimate]) -> str:
    hw = HARDWARE[s.hardware]
    shard = f"{s.gpus} GPUs, {'sharded (FSDP2)' if s.fsdp else 'replicated (DDP)'}" if s.gpus > 1 else "1 GPU"
    head = (
        f"{m.name}: {m.params / 1e9:.2f}B params (hidden {m.hidden}, intermediate {m.intermediate}, {m.layers} layers, "
        f"{m.heads}/{m.kv_heads} heads, vocab {m.vocab}); {s.method}"
        + (f" r={s.lora_r}" if s.method == "lora" else "")
        + f"; {shard}; batch {s.batch_size}×{s.seq_len} per GPU; hardware {hw.name} ({hw.measured_by})"
    )
    base = base_memory_bytes(m, s)
    lines = [head, f"plain SFT: weights + optimizer ≈ {_size(base)} per GPU (activations not counted)", ""]
    cols = ("defense", "artifacts", "prepare peak", "prepare time", "extra train mem/GPU", "step ×", "notes")
    table = [cols]
    for e in rows:
        table.append(
            (
                e.defense,
                _size(e.artifact_bytes) if e.artifact_bytes else "-",
                _size(e.prepare_peak_bytes) if e.prepare_peak_bytes else "-",
                _time(e.prepare_seconds) if e.prepare_seconds else "-",
                _size(e.train_extra_bytes) if e.train_extra_bytes else "-",
                f"{e.step_ratio:.2f}",
                "; ".join(e.notes),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    for r in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    cw = next((e for e in rows if e.defense == "cwac"), None)
    if cw is not None:
        p = cw.parts
        lines += [
            "",
            f"cwac: V {_size(COST.artifact_bytes * p['V'])} (r={s.cwac_rank}, one per distinct input, "
            f"{s.cwac_layers} layers), W₀V {_size(COST.artifact_bytes * p['W0V'])}, SAE "
            f"{_size(COST.artifact_bytes * p['SAE'])} (width {s.sae_width_factor}×{m.hidden}, {s.sae_layers} layer(s)); "
            f"a d_in² float64 covariance of down_proj would be {_size(8.0 * m.intermediate**2)} per module",
        ]
    return "\n".join(lines)


def run(
    model: str,
    defense: str = "cwac",
    method: str = "lora",
    gpus: int = 1,
    fsdp: bool = False,
    as_json: bool = False,
    **settings: Any,
) -> str:
    """Resolve the model, estimate ``defense`` ("all" for every defense), return the printed text (or JSON)."""
    if method not in ("lora", "full"):
        raise SafeFTError(f"--method {method!r}: choose lora or full")
    if not isinstance(gpus, int) or gpus < 1:
        raise SafeFTError(f"--gpus {gpus!r}: must be an integer ≥ 1")
    hw = settings.get("hardware") or "h200"
    if hw not in HARDWARE:
        raise SafeFTError(f"--hardware {hw!r}: choose one of {', '.join(HARDWARE)}")
    dims = resolve_model(model)
    s = Setting(method=method, gpus=gpus, fsdp=fsdp, **{k: v for k, v in settings.items() if v is not None})
    names = list(DEFENSES) if defense == "all" else [d.strip() for d in defense.split(",")]
    rows = [estimate(dims, d, s) for d in names]
    if as_json:
        return json.dumps(
            {
                "model": dims.__dict__ | {"params": dims.params},
                "setting": {k: v for k, v in s.__dict__.items() if k != "extra"},
                "base_memory_bytes": base_memory_bytes(dims, s),
                "estimates": [e.__dict__ for e in rows],
            },
            indent=2,
            default=list,
        )
    return render(dims, s, rows)
