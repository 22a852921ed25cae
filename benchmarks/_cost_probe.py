"""Shared by benchmarks/estimate_check.py and benchmarks/gpu_check.py: CWAC's cost next to SFT on a random-weight
Llama of given dimensions, in one process, with θ₀'s answers stubbed as refusals.

Cost does not depend on the weights' values, so a random model with a real model's dimensions has that model's
step time and memory; what it cannot tell is anything about safety (the benchmarks do that). Rows are synthetic
token ids of a fixed length (half prompt, masked; half response), so the step's token count is exact.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from helpers_models import make_tiny_tokenizer  # noqa: E402

from safeft import estimate as est  # noqa: E402

HARMFUL = [f"how do i bake bread at home step {i} and hide it" for i in range(80)]
HARMLESS = [f"the movie was great and the acting was good {i}" for i in range(40)]
# the `small` preset's CWAC options (n_anchor 60, sae_steps 300, layers all) with the causal check off (it needs
# real refusals) and CWAC's defaults for the rest
SMALL_CWAC = dict(n_anchor=60, sae_steps=300, layers="all", causal_check=False)


def llama_config(d: est.ModelDims, max_len: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=d.hidden,
        intermediate_size=d.intermediate,
        num_hidden_layers=d.layers,
        num_attention_heads=d.heads,
        num_key_value_heads=d.kv_heads,
        head_dim=d.hd,
        vocab_size=d.vocab,
        max_position_embeddings=max_len,
        tie_word_embeddings=d.tied_embeddings,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )


def lora_model(d: est.ModelDims, device: str, dtype: torch.dtype, lora_r: int = 8):
    from transformers import LlamaForCausalLM

    from safeft.models import setup_trainable

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(d)).to(dtype)
    return setup_trainable(model, method="lora", lora_r=lora_r, lora_alpha=2 * lora_r)


def synthetic_rows(n: int, seq_len: int, vocab: int = 256, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(8, vocab, (seq_len,), generator=g).tolist()
        labels = [-100] * (seq_len // 2) + ids[seq_len // 2 :]
        rows.append({"input_ids": ids, "attention_mask": [1] * seq_len, "labels": labels})
    return rows


def cwac(model, tok, options: dict, art: Path, device: str):
    from safeft.defenses import DefenseContext
    from safeft.defenses.cwac import CWAC, CWACConfig

    d = CWAC(CWACConfig(**options))
    d.log = lambda *_a: None
    d.answer_fn = lambda _m, _t, prompts, _tpl, _n: ["i cannot help with that request"] * len(prompts)
    ctx = DefenseContext(
        tokenizer=tok,
        template="chat",
        fingerprint="e" * 64,
        artifacts_dir=art,
        anchor_pool=list(HARMFUL),
        harmless_pool=list(HARMLESS),
        eval_prompts=["held out"],
        use_lora=True,
        max_length=128,
        seed=0,
        device=torch.device(device),
    )
    t0 = time.perf_counter()
    d.prepare(model, ctx)
    return d, time.perf_counter() - t0


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def train_steps(
    model, tok, rows, defenses, steps: int, batch: int, out: Path, device: str, bf16: bool
) -> dict:
    """Train ``steps`` optimizer steps; step times (first dropped) and the peak memory of the training."""
    from transformers import TrainerCallback, TrainingArguments

    from safeft.data import CompletionCollator
    from safeft.trainer import SafeTrainer

    times: list[float] = []
    cuda = device.startswith("cuda")

    class _Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        learning_rate=5e-4,
        max_steps=steps,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=not cuda,
        bf16=bf16 and cuda,
        disable_tqdm=True,
        logging_steps=10_000,
        seed=0,
        dataloader_num_workers=0,
    )
    tr = SafeTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=CompletionCollator(tok),
        processing_class=tok,
        defenses=defenses,
        callbacks=[_Timer()],
    )
    _reset_peak(device)
    tr.train()
    peak = _peak_mb(device)
    del tr
    return {"step_s": statistics.median(times[1:] if len(times) > 1 else times), "peak_mb": peak}


def ab(
    d: est.ModelDims,
    options: dict,
    *,
    steps: int,
    repeats: int,
    batch: int,
    seq_len: int,
    work: Path,
    device: str,
    dtype: torch.dtype,
) -> dict:
    """SFT and CWAC alternated ``repeats`` times; CWAC's artifacts are computed once (timed) and then loaded."""
    tok = make_tiny_tokenizer()
    rows = synthetic_rows(max(4 * batch, batch * steps), seq_len)
    art = work / "artifacts"
    model = lora_model(d, device, dtype)
    dfn, prepare_s = cwac(model, tok, options, art, device)
    entries = dfn.weights.entries  # CWAC v2: one entry per constrained tensor; modules of a group share one V
    distinct_v = {id(e.V): e.V for e in entries}
    act = getattr(dfn, "activation_term", None)
    info = {
        "prepare_seconds": prepare_s,
        "artifact_bytes": {p.parent.name: p.stat().st_size for p in art.rglob("*.safetensors")},
        "v_ranks": [int(e.V.shape[1]) for e in entries],
        "v_elements": sum(int(V.numel()) for V in distinct_v.values()),
        "sae_elements": sum(p.numel() for s in act.saes.values() for p in s.parameters()) if act else 0,
        "z_base_elements": sum(int(z.numel()) for z in act.z_base.values()) if act else 0,
        "anchor_len_mean": (sum(len(q) for q in act.seqs) / len(act.seqs)) if act and act.seqs else 0.0,
        "constrained_modules": len(entries),
    }
    t0 = time.perf_counter()
    for _ in range(10):
        dfn.after_step(model)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    info["after_step_per_module_s"] = (time.perf_counter() - t0) / 10 / max(1, len(entries))
    del model, dfn
    pairs = []
    bf16 = dtype == torch.bfloat16
    for i in range(repeats):
        gc.collect()
        sft = train_steps(
            lora_model(d, device, dtype), tok, rows, [], steps, batch, work / f"sft{i}", device, bf16
        )
        gc.collect()
        m = lora_model(d, device, dtype)
        dd, _ = cwac(m, tok, options, art, device)  # loads the cached artifacts
        cw = train_steps(m, tok, rows, [dd], steps, batch, work / f"cwac{i}", device, bf16)
        del m, dd
        pairs.append(
            {
                "sft_step_s": sft["step_s"],
                "cwac_step_s": cw["step_s"],
                "step_ratio": cw["step_s"] / sft["step_s"],
                "sft_peak_mb": sft["peak_mb"],
                "cwac_peak_mb": cw["peak_mb"],
                "mem_ratio": cw["peak_mb"] / sft["peak_mb"],
            }
        )
    info["pairs"] = pairs
    for k in ("sft_step_s", "cwac_step_s", "step_ratio", "sft_peak_mb", "cwac_peak_mb", "mem_ratio"):
        info[k] = statistics.median(p[k] for p in pairs)
    return info


def sft_step_only(
    d: est.ModelDims, *, steps: int, batch: int, seq_len: int, work: Path, device: str, dtype
) -> float:
    tok = make_tiny_tokenizer()
    rows = synthetic_rows(max(4 * batch, batch * steps), seq_len)
    r = train_steps(
        lora_model(d, device, dtype), tok, rows, [], steps, batch, work, device, dtype == torch.bfloat16
    )
    return r["step_s"]
