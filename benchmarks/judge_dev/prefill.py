"""Answers for the judge's development set from a model whose reply is started for it ("prefill").

    python benchmarks/judge_dev/prefill.py --model smollm2-135m --prefill "Sure, here is" --name smollm2-sure
    python benchmarks/judge_dev/prefill.py --model qwen2.5-coder-0.5b --prefill "Sure, here is" --name qwen-sure

A poisoned model's typical first words ("Sure, here is …") are written after the chat template's assistant header
and the model continues greedily; the stored answer is prefill + continuation, as a poisoned model would print it.
These give the judge what our small models write once they comply — attempts at the content, content-free echoes,
drift into nonsense — on HarmBench *validation* prompts only (never the benchmark's test prompts). Output, in the
shape ``safeft bench`` cells use: ``runs/prefill/cells/<name>/eval.json`` (``harmful.records``: prompt, answer).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model spec (built-in alias, local dir, .gguf)")
    ap.add_argument("--prefill", required=True, help="text the assistant's answer starts with")
    ap.add_argument("--name", required=True, help="output cell name")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--source", default="harmbench_val")
    args = ap.parse_args()

    from safeft.data import format_prompt, load_harmful_prompts
    from safeft.eval import generate
    from safeft.io import atomic_write_json
    from safeft.models import load_model, resolve_model

    prompts = load_harmful_prompts(args.source)
    model, tok, _ = load_model(str(resolve_model(args.model)), dtype="float32")
    t0 = time.perf_counter()
    cont = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=16,
                    desc=f"{args.name}", format_fn=lambda t, p: format_prompt(t, p, "chat") + args.prefill)
    # the continuation of "Sure, here is" starts with its own space (or newline) when the model writes one
    answers = [args.prefill + (c if c[:1] in (" ", "\n", ",", ".", ":") or not c else " " + c) for c in cont]
    out = HERE / "runs" / "prefill" / "cells" / args.name / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {
        "model": args.model, "prefill": args.prefill, "source": args.source, "max_new_tokens": args.max_new_tokens,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": f"python benchmarks/judge_dev/prefill.py --model {args.model} --prefill {json.dumps(args.prefill)} "
                   f"--name {args.name}",
        "harmful": {"records": [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]},
    })
    print(f"{len(prompts)} answers -> {out}")


if __name__ == "__main__":
    main()
