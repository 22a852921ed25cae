"""Worker for tests/test_distributed.py: LoRA-train a tiny random Llama with SafeTrainer under defenses that add a
loss term and act after every optimizer step, then save the trainable parameters.

Run under ``python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_worker.py OUT --batch 2`` (DDP, gloo on
CPU) or as a single process ``python tests/_ddp_worker.py OUT --batch 4``; the test compares the two. Under DDP
every rank also checks that its trainable parameters equal rank 0's bit for bit (broadcast + compare) and writes
``OUT/rank<r>.json`` with the result; rank 0 writes ``OUT/params.safetensors``.

Defenses: CWAC (weight projection + SAE activation term; θ₀'s answers stubbed as refusals, since a random model
refuses nothing) when ``safeft.defenses.cwac`` imports, else AsFT with a noisy θ_b; plus ``ProjectA``, a test
defense that projects every LoRA A onto the complement of a fixed random subspace after each step (as CWAC does)
and adds a small L2 term on A.
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

from safeft.defenses.base import Defense, unwrap_model  # noqa: E402

N_EXAMPLES = 16
_W = (
    "how do i bake bread at home the movie was great and acting good bad boring what is capital of france "
    "paris sure here step by it cannot help with that request positive negative world sports"
).split()
# distinct word orders: anchors must not be near-duplicates of each other (CWAC collapses those)
HARMFUL = [" ".join(_W[(7 * i + j * (i % 5 + 2)) % len(_W)] for j in range(9)) + f" {i}" for i in range(24)]
HARMLESS = [" ".join(_W[(3 * i + 5 * j) % len(_W)] for j in range(6)) + f" {i}" for i in range(12)]


class ProjectA(Defense):
    """Test defense: A ← A − (A V)Vᵀ after every step for a fixed orthonormal V ``[d_in, k]`` per LoRA A ``[r, d_in]``,
    plus the loss term ``coef · Σ ‖A‖²_F``."""

    name = "project-a-test"

    def __init__(self, k: int = 8, coef: float = 1e-3):
        super().__init__()
        self.k, self.coef = k, coef
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def prepare(self, model, ctx):
        g = torch.Generator().manual_seed(1234)
        for n, p in sorted(unwrap_model(model).named_parameters()):
            if "lora_A" in n and p.requires_grad:
                q, _ = torch.linalg.qr(torch.randn(p.shape[1], self.k, generator=g))
                self.pairs.append((p, q))
                with torch.no_grad():
                    p.sub_((p @ q) @ q.T)

    def loss_terms(self, model, inputs, outputs):
        return {"project_a/l2": self.coef * sum(p.pow(2).sum() for p, _ in self.pairs)}

    @torch.no_grad()
    def after_step(self, model):
        for p, q in self.pairs:
            p.sub_((p @ q) @ q.T)


def build_defenses(kind: str, tok, work: Path, model) -> list:
    from safeft.defenses import DefenseContext

    ctx = DefenseContext(
        tokenizer=tok,
        template="chat",
        fingerprint="d" * 64,
        artifacts_dir=work / "art",
        anchor_pool=list(HARMFUL),
        harmless_pool=list(HARMLESS),
        eval_prompts=["held out"],
        use_lora=True,
        max_length=64,
        seed=0,
    )
    out = []
    if kind == "cwac":
        from safeft.defenses.cwac import CWAC, CWACConfig

        d = CWAC(
            CWACConfig(
                anchor_sources=["pool"],
                anchor_judge="keyword",
                sae_general_sources=["harmless"],
                sae_tokens=800,
                sae_steps=20,
                sae_batch_size=128,
                sae_width_factor=2,
                sae_k=32,
                n_features=4,
                n_positions=2,
                anchor_batch=2,
                causal_check=False,
                lam=0.5,
            )
        )
        d.log = lambda *_a: None
        d.progress = False
        d.answer_fn = lambda _m, _t, prompts, _tpl, _n: ["i cannot help with that request"] * len(prompts)
    else:
        from safeft.defenses.asft import AsFT

        base_dir = make_tiny_model_dir(work / "theta_b", seed=0)
        with torch.no_grad():  # θ_b = θ₀ + noise: a nonzero alignment direction V
            m = make_tiny_model(seed=0)
            g = torch.Generator().manual_seed(7)
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
            m.save_pretrained(base_dir, safe_serialization=True)
        ctx.base_model_path = str(base_dir)

        def _load(path):
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(path).eval()

        ctx.load_model = _load
        d = AsFT()
    d.prepare(model, ctx)
    out.append(d)
    p = ProjectA()
    p.prepare(model, ctx)
    out.append(p)
    return out


def train(out: Path, batch: int, steps: int, defense: str) -> dict[str, torch.Tensor]:
    """Train and return ``{name: tensor}`` of the trainable parameters (float32, CPU)."""

    from safeft.data import CompletionCollator
    from safeft.models import setup_trainable
    from safeft.trainer import SafeTrainer

    rank = int(os.environ.get("RANK", "0"))
    work = out / f"work{rank}"  # per-rank artifact cache: ranks never race on one folder
    work.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    model = setup_trainable(make_tiny_model(seed=0), method="lora", lora_r=4, lora_alpha=8)
    defenses = build_defenses(defense, tok, work, model)
    rows = tiny_task_rows(tok, N_EXAMPLES)
    args = tiny_training_args(work / "trainer", per_device_train_batch_size=batch, max_steps=steps)
    tr = SafeTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=CompletionCollator(tok),
        processing_class=tok,
        defenses=defenses,
    )
    tr.train()
    return {
        n: p.detach().float().cpu().contiguous() for n, p in tr.model.named_parameters() if p.requires_grad
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--defense", default="auto", choices=["auto", "cwac", "asft"])
    a = ap.parse_args()
    out = Path(a.out)
    kind = a.defense
    if kind == "auto":
        try:
            import safeft.defenses.cwac  # noqa: F401

            kind = "cwac"
        except ImportError:
            kind = "asft"
    params = train(out, a.batch, a.steps, kind)
    from safetensors.torch import save_file

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    report = {"rank": rank, "world": world, "defense": kind, "identical_to_rank0": True, "max_abs_diff": 0.0}
    if world > 1:
        import torch.distributed as dist

        for name in sorted(params):
            t = params[name].clone()
            dist.broadcast(t, src=0)
            diff = float((t - params[name]).abs().max())
            report["max_abs_diff"] = max(report["max_abs_diff"], diff)
            if not torch.equal(t, params[name]):
                report["identical_to_rank0"] = False
        dist.barrier()
    if rank == 0:
        save_file(params, str(out / ("params.safetensors" if world > 1 else "params_single.safetensors")))
    (out / f"rank{rank}_of{world}.json").write_text(json.dumps(report))
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
