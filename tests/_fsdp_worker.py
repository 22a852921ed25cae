"""Worker for tests/test_fsdp.py: train a tiny random Llama with SafeTrainer under FSDP2 (2 gloo processes on CPU)
or in one process, for one defense after another, and save the gathered trainable parameters of each.

FSDP2 here is the Trainer's own path: ``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})`` →
accelerate's ``fsdp2_prepare_model`` → ``torch.distributed.fsdp.fully_shard`` on every decoder layer, the embedding,
the [norm, lm_head] tail and the root. One line differs from a GPU run: accelerate enables FSDP only for GPU-like
process groups, so on CPU its gate is lifted (``_allow_fsdp_on_cpu``: the process group is reported as multi-GPU
before the Trainer builds its Accelerator; devices, gloo and the sharding are untouched).

    python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py OUT --batch 2 --kinds sft,asft
    python tests/_fsdp_worker.py OUT --batch 4 --kinds sft,asft          # the one-process reference

Writes ``OUT/<kind>.safetensors`` (rank 0; every trainable parameter, gathered, float32) and
``OUT/<kind>.rank<r>.json`` (backend seen by the trainer, DTensor count, finalize summary, extra checks).

Kinds: ``sft``; ``asft`` (θ_b = θ₀ + noise); ``pact`` (LoRA; teacher = adapters disabled); ``lisa`` (align 1 /
user 1 steps); ``safelora`` (top_k 2, post-hoc); ``rows`` (LoRA, A ← A − (AV)Vᵀ after each step with
``project_rows_out_`` on each rank's shard); ``rows-full`` (full FT of every down_proj, W ← W − (W V − W₀V)Vᵀ with
``project_update_out_`` on each rank's shard, W₀V only); ``helpers`` (no training: the helpers on an uneven
shard, ``OUT/helpers.rank<r>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_dist import teardown  # noqa: E402
from helpers_models import (  # noqa: E402
    make_tiny_model,
    make_tiny_model_dir,
    make_tiny_tokenizer,
    tiny_task_rows,
    tiny_training_args,
)

from safeft.components.sharding import (  # noqa: E402
    full_tensor,
    gathered,
    is_dtensor,
    project_rows_out_,
    project_update_out_,
)
from safeft.defenses.base import Defense, unwrap_model  # noqa: E402
from safeft.errors import SafeFTError  # noqa: E402

N_EXAMPLES = 16
REFUSALS = [(f"how do i bake bread at home {i}", "i cannot help with that request") for i in range(8)]
KINDS = ("sft", "asft", "pact", "lisa", "safelora", "rows", "rows-full", "cwac", "cwac-full", "helpers")
_W = (
    "how do i bake bread at home the movie was great and acting good bad boring what is capital of france "
    "paris sure here step by it cannot help with that request positive negative world sports"
).split()
# CWAC's anchors and harmless prompts (distinct word orders: anchors must not be near-duplicates of each other)
HARMFUL = [" ".join(_W[(7 * i + j * (i % 5 + 2)) % len(_W)] for j in range(9)) + f" {i}" for i in range(24)]
HARMLESS = [" ".join(_W[(3 * i + 5 * j) % len(_W)] for j in range(6)) + f" {i}" for i in range(12)]
# CWAC as small as tests/test_cwac.py's FAST: both constraints, every layer. SAE layers: [0] for LoRA (the forward
# stops in block 1's pre-hook, before the engine gathers block 1), [0, 1] for full FT (stops after the last block)
CWAC_OPTIONS = dict(
    anchor_sources=["pool"],
    anchor_judge="keyword",
    sae_general_sources=["harmless"],
    sae_tokens=800,
    sae_steps=20,
    sae_batch_size=128,
    sae_width_factor=2,
    sae_k=16,
    n_features=4,
    n_positions=2,
    anchor_batch=4,
    layers="all",
    causal_check=False,
    lam=0.5,
)


def _allow_fsdp_on_cpu() -> None:
    """accelerate turns on FSDP only for multi-GPU-like process groups; report the CPU/gloo group as one so the
    Trainer's FSDP2 path runs unchanged (test-only: a GPU run needs nothing of the sort)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU


class ProjectRows(Defense):
    """Test defense on the sharding helpers: after every step, LoRA ``A ← A − (AV)Vᵀ`` (``method="lora"``) or full-FT
    ``W ← W − (W V − W₀V)Vᵀ`` on every down_proj (``method="full"``), on each rank's local rows, V fixed and seeded."""

    name = "project-rows-test"
    needs_full_params = True
    sharded_backends = ("fsdp2", "zero3")  # ZeRO-3: each tensor gathered for the edit, rank 0's result kept

    def __init__(self, method: str, k: int = 8):
        super().__init__()
        self.method, self.k = method, k
        self.v: dict[str, torch.Tensor] = {}
        self.w0v: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.nn.Parameter] = {}

    def _targets(self, model):
        want = "lora_A" if self.method == "lora" else "down_proj.weight"
        return {
            n: p for n, p in sorted(unwrap_model(model).named_parameters()) if want in n and p.requires_grad
        }

    def prepare(self, model, ctx):
        g = torch.Generator().manual_seed(1234)
        for n, p in self._targets(model).items():
            self.v[n], _ = torch.linalg.qr(torch.randn(p.shape[1], self.k, generator=g))
            if self.method == "full":
                self.w0v[n] = p.detach() @ self.v[n]  # W₀V [d_out, k]: all the projection needs of W₀
        self.params = self._targets(model)
        self.after_step(model)

    def on_train_begin(self, model, backend):
        self.params = self._targets(model)  # FSDP2 swapped every parameter for a DTensor

    @torch.no_grad()
    def after_step(self, model):
        for n, p in self.params.items():
            with gathered([p], modifier_rank=0):
                if self.method == "lora":
                    project_rows_out_(p, self.v[n])
                else:
                    project_update_out_(p, self.w0v[n], self.v[n])


def _context(kind: str, tok, work: Path):
    from safeft.defenses import DefenseContext

    ctx = DefenseContext(
        tokenizer=tok,
        template="chat",
        fingerprint="f" * 64,
        artifacts_dir=work / "art",
        refusal_pairs=list(REFUSALS),
        use_lora=not kind.endswith("-full"),
        max_length=64,
        seed=0,
    )
    if kind.startswith("cwac"):
        ctx.anchor_pool, ctx.harmless_pool, ctx.eval_prompts = list(HARMFUL), list(HARMLESS), ["held out"]
    if kind in ("asft", "pact", "safelora"):
        ctx.base_model_path = str(work.parent / f"theta_b-{os.environ.get('RANK', '0')}")

        def _load(path):
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(path).eval()

        ctx.load_model = _load
    if kind == "lisa":
        from safeft.data import CompletionCollator, Example, tokenize_example

        collator = CompletionCollator(tok)
        ctx.alignment_examples = [Example(p, r, kind="refusal") for p, r in REFUSALS]
        ctx.collate = lambda exs: collator([tokenize_example(tok, e, max_length=64) for e in exs])
    return ctx


def make_theta_b(path: Path) -> Path:
    """θ_b = θ₀ + noise (a nonzero alignment direction V), saved with save_pretrained. Call it before the process
    group exists: save_pretrained writes on the main process only once one does."""
    make_tiny_model_dir(path, seed=0)
    with torch.no_grad():
        m = make_tiny_model(seed=0)
        g = torch.Generator().manual_seed(7)
        for p in m.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
        m.save_pretrained(path, safe_serialization=True)
    return path


def _defenses(kind: str, model, ctx) -> list[Defense]:
    from safeft.defenses import build_defenses

    if kind in ("rows", "rows-full"):
        d = ProjectRows("lora" if kind == "rows" else "full")
        d.prepare(model, ctx)
        return [d]
    if kind.startswith("cwac"):
        from safeft.defenses.cwac import CWAC, CWACConfig

        sae_layers = [0] if kind == "cwac" else [0, 1]
        d = CWAC(CWACConfig(**{**CWAC_OPTIONS, "sae_layers": sae_layers}))
        d.log, d.progress = (lambda *_a: None), False
        # θ₀ is a random tiny model: stand in its greedy answers (the real path generates and judges them)
        d.answer_fn = lambda _m, _t, prompts, _tpl, _n: ["i cannot help with that request"] * len(prompts)
        d.prepare(model, ctx)
        return [d]
    options = {
        "pact": {"k": 8, "n_pairs": 8, "response_tokens": 8},
        "lisa": {
            "align_steps": 2,
            "user_steps": 1,
        },  # step 2 of an alignment phase has a nonzero proximal term
        "safelora": {"top_k": 2},
    }
    out = build_defenses(kind, options)
    for d in out:
        d.prepare(model, ctx)
    return out


def _zero3_config(persistence_threshold: int | None) -> dict:
    zero = {"stage": 3}
    if persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,  # the Trainer's torch SGD (optim="sgd"), as in the other runs
    }


def train(
    out: Path,
    kind: str,
    batch: int,
    steps: int,
    engine: str | None,
    lr: float = 1.0,
    threshold: int | None = None,
) -> dict:
    """Train ``kind`` (engine "fsdp2", "zero3" or None); return ``{"params": {name: full float32 tensor},
    "report": {...}}`` (on every rank)."""

    from safeft.data import CompletionCollator
    from safeft.models import setup_trainable
    from safeft.trainer import SafeTrainer

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    work = out / f"work-{kind}-{rank}"  # per-rank artifact cache: ranks never race on one folder
    work.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    method = "full" if kind.endswith("-full") else "lora"
    model = make_tiny_model(seed=0)
    if method == "full":  # rows-full: every down_proj; cwac-full: every linear module of the decoder layers
        want = ("down_proj",) if kind == "rows-full" else ("_proj",)
        for n, p in model.named_parameters():
            p.requires_grad_(any(w in n for w in want) and "layers." in n)
    else:
        model = setup_trainable(model, method="lora", lora_r=4, lora_alpha=8)
    ctx = _context(kind, tok, work)
    defenses = _defenses(kind, model, ctx)
    rows = tiny_task_rows(tok, N_EXAMPLES)
    extra = {}
    if engine == "zero3":
        extra = dict(deepspeed=_zero3_config(threshold))
    if engine == "fsdp2":
        extra = dict(
            fsdp=True,
            fsdp_config={
                "version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "reshard_after_forward": True,
            },
        )
    args = tiny_training_args(
        work / "trainer",
        per_device_train_batch_size=batch,
        # plain SGD: parameter differences then reflect gradient differences only. AdamW divides each gradient
        # entry by √v + ε, so a 1e-9 rounding difference on a near-zero entry can move that entry by ~lr·1e-9/ε
        # (measured: 5.5e-5 on one entry of one LoRA A for asft at lr 1e-2, ≤ 1e-6 everywhere else)
        optim="sgd",
        learning_rate=lr,
        max_steps=steps,
        **extra,
    )
    if engine == "fsdp2":
        _allow_fsdp_on_cpu()  # after TrainingArguments (which sets up the process group), before the Trainer
    tr = SafeTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=CompletionCollator(tok),
        processing_class=tok,
        defenses=defenses,
    )
    try:
        tr.train()
    except SafeFTError as e:  # a refusal is a result (the test checks its message)
        return {
            "params": {},
            "report": {"kind": kind, "rank": rank, "refused": str(e), "step": tr.state.global_step},
        }
    finalize = {}
    for d in defenses:
        s = d.finalize(tr.model)
        if s:
            finalize[d.name] = s
    named = [(n, p) for n, p in tr.model.named_parameters() if p.requires_grad]
    report = {
        "kind": kind,
        "rank": rank,
        "world": world,
        "backend": tr.sharding_backend(),
        "dtensor_params": sum(is_dtensor(p) for _, p in named),
        "trainable": len(named),
        "finalize": finalize,
        "losses": [h["loss"] for h in tr.state.log_history if "loss" in h],
    }
    with gathered([p for _, p in named]):  # ZeRO-3: whole tensors (FSDP2: full_tensor below)
        params = {
            n: full_tensor(p.detach()).float().cpu().contiguous().clone() for n, p in named
        }  # a collective
    for d in defenses:
        if getattr(d, "name", "") == "cwac":  # ΔW·V on the gathered weights, with the V / W₀V kept at prepare
            report["max_leak"] = _cwac_leak(d, params, tr.model)
            report["cwac_terms"] = [h.get("cwac/safety") for h in tr.state.log_history if "loss" in h]
        if isinstance(d, ProjectRows):  # the constraint on the gathered weights
            leak = 0.0
            for n, v in d.v.items():
                w = params[n]
                dw = w if d.method == "lora" else w - (d.w0v[n] @ v.T)  # (W − W₀)V = WV − W₀V
                leak = max(leak, float((dw @ v).abs().max()))
            report["max_leak"] = leak
    return {"params": params, "report": report}


def _cwac_leak(d, params: dict[str, torch.Tensor], model) -> float:
    """max |ΔW V| over CWAC's constrained tensors, on the gathered parameters: LoRA ΔW = B A (|B A V|),
    full FT (W − W₀)V = W V − W₀V with this rank's rows of W₀V gathered back (a collective)."""
    from safeft.components.sharding import local_tensor

    names = {id(p): n for n, p in model.named_parameters()}
    leak = 0.0
    for e in d.weights.entries:
        name = names[id(e.param)]
        V = e.V.cpu()
        if e.kind == "lora":
            A = params[name]
            B = params[names[id(e.lora_B)]]
            leak = max(leak, float((B @ (A @ V)).abs().max()))
        else:
            w0v = d.weights._whole_rows(local_tensor(e.w0v), e.param).cpu()  # rows of W₀V, gathered
            leak = max(leak, float((params[name] @ V - w0v).abs().max()))
    return leak


def check_helpers() -> dict:
    """The sharding helpers on an uneven FSDP2 shard (5 rows over 2 ranks: 3 + 2) without the Trainer: in-place
    projections on local rows against the same maths on the whole tensor, W₀V rows, distribute_like,
    unsharded()."""
    from torch.distributed.fsdp import fully_shard

    from safeft.components.sharding import distribute_like, local_rows, local_tensor, unsharded

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    lin = torch.nn.Linear(7, 5, bias=False)
    w_full = lin.weight.detach().clone()
    w0 = w_full + 0.1 * torch.randn(5, 7)
    v, _ = torch.linalg.qr(torch.randn(7, 3))
    holder = torch.nn.Sequential(lin)
    fully_shard(holder)
    w = lin.weight
    rows = local_rows(w)
    out = {
        "dtensor": is_dtensor(w),
        "rows": [rows.start, rows.stop],
        "local_shape": list(local_tensor(w).shape),
    }
    project_update_out_(w, w0 @ v, v)  # W₀V given whole: sliced to this rank's rows
    got = full_tensor(w.detach())
    ref = w_full - ((w_full - w0) @ v) @ v.T
    out["update_vs_whole"] = float((got - ref).abs().max())
    out["update_leak"] = float(((got - w0) @ v).abs().max())
    project_rows_out_(w, v)
    out["rows_leak"] = float((full_tensor(w.detach()) @ v).abs().max())
    wide = torch.randn(5, 11)  # same rows as w, other columns (AsFT's V next to LoRA B)
    d = distribute_like(wide, w)
    out["distribute_local_rows_ok"] = bool(torch.equal(d.to_local(), wide[rows]))
    out["distribute_roundtrip"] = float((d.full_tensor() - wide).abs().max())
    with unsharded(holder):
        out["unsharded_inside"] = [type(lin.weight).__name__, list(lin.weight.shape)]
    out["resharded_after"] = is_dtensor(lin.weight)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--engine", default="fsdp2", choices=["fsdp2", "zero3"], help="used with 2+ processes")
    ap.add_argument("--persistence-threshold", type=int, default=None, help="ZeRO-3 only")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    from safetensors.torch import save_file

    make_theta_b(out / f"theta_b-{rank}")
    for kind in a.kinds.split(","):
        if kind == "helpers":
            (out / f"helpers.rank{rank}.json").write_text(json.dumps(check_helpers()))
            continue
        engine = a.engine if world > 1 else None
        res = train(out, kind, a.batch, a.steps, engine, threshold=a.persistence_threshold)
        if rank == 0 and res["params"]:
            save_file(res["params"], str(out / f"{kind}.safetensors"))
        (out / f"{kind}.rank{rank}.json").write_text(json.dumps(res["report"]))
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
