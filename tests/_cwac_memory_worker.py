"""Worker for tests/test_cwac_memory.py: CWAC's ``prepare`` on a random wide Llama (hidden = intermediate = D),
measuring its own resident memory.

``python tests/_cwac_memory_worker.py OUT.json [--d 8192] [--layers 1] [--threads 2]`` builds the model in bf16
(LoRA r 8 on all seven projections), records the process's RSS after the model is built (``rss_model``), then runs
``CWAC.prepare`` (both constraints, weight constraint on every layer, one SAE layer) and records:

- ``forward_extra``: θ₀'s own transient on a plain no-grad forward of a [32, ``fwd_len``] batch (the model's cost);
- ``peak``: the process's high-water RSS (VmHWM) over prepare and the reference forward: the maximum of the marks
  read before each reset (ru_maxrss cannot see a peak once its mark is reset, so the worker keeps them);
- ``phases``: the high-water RSS of each prepare phase (subspace, SAE capture, SAE training, safety features),
  each measured after resetting the high-water mark (``/proc/self/clear_refs`` ← 5);
- ``square``: every tensor of shape ``[d_in, d_in]`` (d_in = the module-input width D) that an aten op allocates
  during prepare (a ``TorchDispatchMode`` sees every op's output; views and in-place results are skipped), with
  its dtype, op and the innermost ``safeft`` source frame that created it;
- ``saved`` / ``files``: every tensor CWAC saved (file, name, shape, dtype) and every file's size;
- the counts the bound needs (rows per module input, SAE width, SAE rows, batch sizes) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_models import SENTENCES, make_tiny_tokenizer  # noqa: E402

_WORDS = sorted({w for s in SENTENCES for w in s.split()})
REFUSAL = "i cannot help with that request"


def prompt_set(n: int, lead: str, salt: int) -> list[str]:
    """``n`` distinct prompts of in-vocabulary words (no two are near-duplicates: different word orders)."""
    out = []
    for i in range(n):
        words = [_WORDS[(salt + 7 * i + j * (i % 5 + 2)) % len(_WORDS)] for j in range(9)]
        out.append(f"{lead} {' '.join(words)} {i % 10}")
    return list(dict.fromkeys(out))


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset the high-water RSS to the current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class SquareTensors(TorchDispatchMode):
    """Records every freshly allocated 2-D floating tensor of shape ``[d, d]`` (no references kept)."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.found: dict[str, int] = {}  # "file:function aten.op dtype" -> count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outs = out if isinstance(out, (tuple, list)) else [out]
        for i, t in enumerate(outs):
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or tuple(t.shape) != (self.d, self.d):
                continue
            if i < len(returns) and returns[i].alias_info is not None:  # a view or an in-place result
                continue
            frames = [f for f in traceback.extract_stack() if f"{os.sep}safeft{os.sep}" in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "?"
            key = f"{where} {func} {t.dtype}"
            self.found[key] = self.found.get(key, 0) + 1
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--d", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--fwd-len", type=int, default=32)  # ≥ the longest document here (23 tokens)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--anchors", type=int, default=16)
    ap.add_argument("--sae-tokens", type=int, default=1024)
    ap.add_argument("--sae-steps", type=int, default=2)
    ap.add_argument("--sae-batch", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeft.defenses import DefenseContext
    from safeft.defenses.cwac import CWAC, CWACConfig
    from safeft.defenses.cwac import features as F
    from safeft.defenses.cwac import subspace as S

    rss_start = rss_kib()
    tok = make_tiny_tokenizer()
    d = args.d
    cfg = LlamaConfig(
        hidden_size=d,
        intermediate_size=d,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=256,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()  # built in bf16: no fp32 copy
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_model = rss_kib()

    sae_layer = args.layers - 1
    config = CWACConfig(
        anchor_sources=["pool"],
        n_anchor=args.anchors,
        layers="all",
        sae_layers=[sae_layer],
        sae_general_sources=["harmless"],
        sae_tokens=args.sae_tokens,
        sae_steps=args.sae_steps,
        sae_batch_size=args.sae_batch,
        sae_width_factor=1,
        sae_k=16,
        n_features=16,
        n_positions=3,
        anchor_batch=4,
        causal_check=False,  # needs θ₀'s real answers with the latents ablated; a random model has none
    )
    defense = CWAC(config)
    defense.log = lambda *_a: None
    defense.progress = False
    # θ₀ is random: stand in its greedy answers (the real path is safeft.eval.generate)
    defense.answer_fn = lambda _m, _t, ps, _tpl, _n: [REFUSAL] * len(ps)
    defense.refusal_fn = lambda answer: answer == REFUSAL  # no judge model to load
    harmful = prompt_set(args.anchors + 16, "how do i", 0)
    harmless = prompt_set(16, "please describe", 3)
    art = Path(args.out).with_suffix("")
    ctx = DefenseContext(
        tokenizer=tok,
        template="chat",
        fingerprint="m" * 64,
        artifacts_dir=art / "art",
        anchor_pool=harmful,
        harmless_pool=harmless,
        refusal_pairs=[(p, REFUSAL) for p in harmful],
        use_lora=True,
        max_length=128,
        seed=0,
        dtype=torch.bfloat16,
    )

    can_reset = reset_peak()
    # θ₀'s own forward transient (activations, bf16 GEMM weight packing) on the largest batch prepare feeds it
    # (an SAE-capture batch: up to 32 documents), measured on a plain no-grad forward: the model's cost, not CWAC's
    warm = torch.randint(8, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(8, 256, (32, args.fwd_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model.disable_adapter():
        model(input_ids=warm, attention_mask=torch.ones_like(warm), use_cache=False)  # lazy inits
        rss0 = rss_kib()
        reset_peak()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    forward_extra = rss_kib("VmHWM") - rss0
    del ids
    rss_before = rss_kib()

    phases: dict[str, dict[str, int]] = {}
    marks: list[int] = []  # high-water marks lost to each reset (the whole-run peak is their max)

    def phase(name: str, fn):
        def wrapped(*a, **kw):
            if not can_reset:
                return fn(*a, **kw)
            marks.append(rss_kib("VmHWM"))
            start = rss_kib()
            reset_peak()
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = {"start_kib": start, "peak_kib": rss_kib("VmHWM")}
                phases[name]["seconds"] = round(time.perf_counter() - t, 2)
                marks.append(rss_kib("VmHWM"))

        return wrapped

    S.compute_subspaces = phase("subspace", S.compute_subspaces)
    F.capture_to_store = phase("sae_capture", F.capture_to_store)
    F.train_saes = phase("sae_training", F.train_saes)
    F.safety_features = phase("safety_features", F.safety_features)

    squares = SquareTensors(d)
    t0 = time.perf_counter()
    with squares:
        summary = defense.prepare(model, ctx)
    seconds = time.perf_counter() - t0
    hwm_end = rss_kib("VmHWM")
    peak = max([hwm_end, *marks])

    from safetensors import safe_open

    saved = []
    files = {}
    for f in sorted((art / "art").rglob("*")):
        if f.is_file():
            files[str(f.relative_to(art / "art"))] = f.stat().st_size
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    shape = list(sl.get_shape())
                    saved.append(
                        {
                            "file": str(f.relative_to(art / "art")),
                            "name": k,
                            "shape": shape,
                            "dtype": sl.get_dtype(),
                        }
                    )
    sub = summary["subspace"]
    sae_meta = summary["sae"]["layers"][str(sae_layer)]
    out = {
        "d": d,
        "layers": args.layers,
        "threads": args.threads,
        "model_bytes": model_bytes,
        "rss_start_kib": rss_start,
        "rss_model_kib": rss_model,
        "peak_kib": peak,
        "hwm_reset": can_reset,
        "rss_before_prepare_kib": rss_before,
        "forward_extra_kib": forward_extra,
        "fwd_len": args.fwd_len,
        "phases": phases,
        "seconds": seconds,
        "square": squares.found,
        "saved": saved,
        "files": files,
        "rows": sub["rows"],
        "passes": sub["passes"],
        "heldout_rows": sub["heldout_rows"],
        "group_d_in": {g: inf["d_in"] for g, inf in sub["info"].items()},
        "ranks": {g: inf["rank"] for g, inf in sub["info"].items()},
        "methods": {g: inf["method"] for g, inf in sub["info"].items()},
        "d_sae": sae_meta["d_sae"],
        "sae_rows": int(sae_meta["rows_train"] + sae_meta["rows_heldout"]),
        "sae_batch": args.sae_batch,
        "sae_layers": [sae_layer],
        "anchors": summary["anchors"],
        "cache": summary["cache"],
    }
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
