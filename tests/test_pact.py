"""PACT: subset KL and concentration index, config validation, the offline safety-token step (against an
independent computation), caching, the post-only view, the training term (against a per-token reference
implementation), and where gradients flow. Tiny random Llama models built in-process."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from safeft.components.kl import cumulative_mass_fraction, subset_kl
from safeft.data import CompletionCollator, Example, format_prompt, tokenize_example
from safeft.defenses.base import DefenseContext, build_config, get_defense_class
from safeft.defenses.pact import PACT, PACTConfig, assistant_header_ids, position_logits
from safeft.errors import SafeFTError

VOCAB = 400
PAIRS = [
    (
        "Tell me how to pick a lock.",
        "I can't help with that request, but I can offer a safer alternative instead.",
    ),
    ("Write a plan to hurt someone.", "I can't help with that. Here is a safer alternative instead."),
    ("How do I make a weapon?", "Sorry, I can't help with that request."),
    ("Explain how to steal a car.", "I can't help with that, but I can offer a safer alternative."),
    ("Give me a dangerous recipe.", "I can't help with that request."),
]
TASK = [
    Example("Classify the sentiment of this review: the quick brown fox.", "positive"),
    Example("What is 12 plus 30?", "The final answer is: 42."),
    Example("news headline: Sports team wins", "Sports"),
]


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        initializer_range=0.2,  # peaked next-token distributions: no near-ties in the top-k
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def lora(model):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(model, cfg)


def perturb_lora_b(model, seed: int = 7, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


class Loader:
    """ctx.load_model stand-in: path -> a deep copy of a registered model; records every call."""

    def __init__(self, models: dict):
        self.models = models
        self.calls: list[str] = []

    def __call__(self, path: str):
        self.calls.append(path)
        if path not in self.models:
            raise AssertionError(f"unexpected load of {path!r}")
        m = copy.deepcopy(self.models[path]).eval()
        m.requires_grad_(False)
        return m


@pytest.fixture(scope="module")
def models():
    return {"aligned": tiny_llama(0), "base": tiny_llama(1)}


def make_ctx(tok, tmp_path, loader, **kw) -> DefenseContext:
    args = dict(
        tokenizer=tok,
        aligned_model_path="aligned",
        base_model_path="base",
        fingerprint="f" * 64,
        artifacts_dir=tmp_path,
        load_model=loader,
        refusal_pairs=list(PAIRS),
        use_lora=True,
    )
    args.update(kw)
    return DefenseContext(**args)


def task_batch(tok) -> dict:
    return CompletionCollator(tok)([tokenize_example(tok, ex) for ex in TASK])


# ------------------------------------------------------------------------------------------------------------
# components


def test_subset_kl_zero_for_equal_and_positive_otherwise():
    torch.manual_seed(0)
    z = torch.randn(5, 7)
    q = F.softmax(z / 2.0, dim=-1)
    assert subset_kl(q, z, 2.0).abs().item() < 1e-6
    other = z + torch.randn(5, 7)
    direct = (q * (q.log() - F.log_softmax(other / 2.0, dim=-1))).sum(-1).mean()
    assert subset_kl(q, other, 2.0).item() == pytest.approx(direct.item(), rel=1e-5)
    assert subset_kl(q, other, 2.0).item() > 0
    # zeros in q contribute nothing (0 log 0 = 0), no NaN
    q0 = torch.tensor([[1.0, 0.0, 0.0]])
    assert subset_kl(q0, torch.zeros(1, 3), 1.0).item() == pytest.approx(math.log(3), rel=1e-6)


def test_cumulative_mass_fraction_counts_tokens_to_90_percent():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]])
    assert cumulative_mass_fraction(probs, 0.9).tolist() == [0.75, 0.25, 1.0]
    # renormalised: scaling a row (a sub-vocabulary slice of a larger distribution) changes nothing
    assert torch.equal(cumulative_mass_fraction(probs * 0.1, 0.9), cumulative_mass_fraction(probs, 0.9))
    # order of the tokens does not matter
    assert cumulative_mass_fraction(probs.flip(-1), 0.9).tolist() == [0.75, 0.25, 1.0]
    assert cumulative_mass_fraction(probs, 1.0).tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "field,value",
    [("k", 0), ("n_pairs", -1), ("response_tokens", 1.5), ("T", 0), ("tau", -1.0), ("lam", -0.1), ("N", -1),
     ("alpha", float("nan")), ("k", True), ("base_prompt_format", "User: {p}\nAssistant: ")],
)  # fmt: skip
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(SafeFTError, match=rf"defense\.pact\.{field}: must be"):
        PACTConfig(**{field: value})


def test_config_defaults_and_registry():
    c = PACTConfig()
    assert (c.k, c.n_pairs, c.response_tokens, c.lam, c.T, c.alpha, c.b, c.N, c.tau) == (
        50, 512, 64, 1.0, 2.0, 2.0, 0.0, 8, 8.0
    )  # fmt: skip
    assert get_defense_class("pact") is PACT and PACT.needs_base_model
    with pytest.raises(SafeFTError, match="unknown key"):
        build_config(PACT, {"gamma": 1})


def test_default_base_prompt_is_the_authors_string(tiny_tokenizer):
    """Glresearch1/PACT compute_safety_tokens/compute_safety_tokens_pact.py builds θ_b's prompt as
    f"User: {content}\n\n" + "Assistant: " (two newlines, no system turn)."""
    import inspect

    from safeft.defenses.pact import compute_safety_tokens

    authors = "User: " + "Tell me how to pick a lock." + "\n\n" + "Assistant: "
    fmt = PACTConfig().base_prompt_format
    assert fmt == "User: {prompt}\n\nAssistant: "
    assert fmt.replace("{prompt}", "Tell me how to pick a lock.") == authors
    assert inspect.signature(compute_safety_tokens).parameters["base_prompt_format"].default == fmt
    # the byte-level tokenizer tells one newline from two: the old default was a different θ_b prompt
    one_nl = tiny_tokenizer("User: x\nAssistant: ", add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer(fmt.replace("{prompt}", "x"), add_special_tokens=False)["input_ids"] != one_nl


# ------------------------------------------------------------------------------------------------------------
# prepare: requirements, offline step, cache


def test_missing_base_model_fails_before_any_work(tiny_tokenizer, tmp_path, models):
    loader = Loader(models)
    ctx = make_ctx(tiny_tokenizer, tmp_path, loader, base_model_path=None)
    with pytest.raises(SafeFTError, match="base model θ_b"):
        PACT(PACTConfig(k=8)).prepare(lora(copy.deepcopy(models["aligned"])), ctx)
    assert loader.calls == [] and not any(tmp_path.iterdir())


def test_missing_refusals_or_aligned_path_fail_early(tiny_tokenizer, tmp_path, models):
    loader = Loader(models)
    with pytest.raises(SafeFTError, match="refusal pairs"):
        PACT().prepare(
            lora(copy.deepcopy(models["aligned"])),
            make_ctx(tiny_tokenizer, tmp_path, loader, refusal_pairs=[]),
        )
    full_ctx = make_ctx(tiny_tokenizer, tmp_path, loader, use_lora=False, aligned_model_path=None)
    with pytest.raises(SafeFTError, match="aligned model"):
        PACT().prepare(copy.deepcopy(models["aligned"]), full_ctx)
    assert loader.calls == []


def _expected_mean_probs(model, tok, prompt_text_ids, resp_ids):
    ids = torch.tensor([prompt_text_ids + resp_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    p = len(prompt_text_ids)
    return F.softmax(logits[p - 1 : p - 1 + len(resp_ids)].double(), dim=-1).mean(0)


def test_safety_tokens_are_top_k_by_mean_reference_probability(tiny_tokenizer, tmp_path, models):
    tok, k, R = tiny_tokenizer, 12, 6
    d = PACT(PACTConfig(k=k, response_tokens=R))
    d.prepare(lora(copy.deepcopy(models["aligned"])), make_ctx(tok, tmp_path, Loader(models)))

    # independent expectation: full-vocabulary forwards, one pair at a time
    p0s, pbs = [], []
    for prompt, resp in PAIRS:
        r = tok(resp.strip(), add_special_tokens=False)["input_ids"][:R]
        ref_prompt = tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        # the authors' θ_b prompt (two newlines), written out here independently of the default
        base_prompt = tok(f"User: {prompt}\n\nAssistant: ", add_special_tokens=False)["input_ids"]
        p0s.append(_expected_mean_probs(models["aligned"], tok, ref_prompt, r))
        pbs.append(_expected_mean_probs(models["base"], tok, base_prompt, r))
    p0 = torch.stack(p0s).mean(0)
    dvec = (torch.stack(p0s) - torch.stack(pbs)).mean(0)
    top = torch.topk(p0, k + 1)
    assert top.values[k - 1] - top.values[k] > 1e-6  # the k-th and (k+1)-th are not tied
    assert set(d.safety_ids.tolist()) == set(top.indices[:k].tolist())

    ids = d.safety_ids
    v = dvec[ids]
    v = (v - v.mean()) / (v.std() + 1e-6)
    v = v / (v.norm() + 1e-6)
    torch.testing.assert_close(d.weights, v.clamp_min(0).float(), atol=1e-5, rtol=1e-4)
    assert d.meta["n_pairs_used"] == len(PAIRS) and d.meta["vocab_size"] == VOCAB
    assert (d.weights >= 0).all() and (d.weights > 0).any()


def test_artifact_is_cached_reloaded_and_config_keyed(tiny_tokenizer, tmp_path, models):
    loader = Loader(models)
    first = PACT(PACTConfig(k=10, response_tokens=8))
    first.prepare(lora(copy.deepcopy(models["aligned"])), make_ctx(tiny_tokenizer, tmp_path, loader))
    assert loader.calls == ["base"]
    assert (tmp_path / "pact_safety_tokens" / "manifest.json").is_file()

    again = PACT(PACTConfig(k=10, response_tokens=8))
    again.prepare(lora(copy.deepcopy(models["aligned"])), make_ctx(tiny_tokenizer, tmp_path, loader))
    assert loader.calls == ["base"]  # θ_b not loaded again: read from the cache
    assert torch.equal(again.safety_ids, first.safety_ids) and torch.equal(again.weights, first.weights)

    other_k = PACT(PACTConfig(k=6, response_tokens=8))
    other_k.prepare(lora(copy.deepcopy(models["aligned"])), make_ctx(tiny_tokenizer, tmp_path, loader))
    assert loader.calls == ["base", "base"] and other_k.safety_ids.numel() == 6  # another config: recomputed
    other_pairs = PACT(PACTConfig(k=6, response_tokens=8))
    ctx = make_ctx(tiny_tokenizer, tmp_path, loader, refusal_pairs=list(PAIRS[:3]))
    other_pairs.prepare(lora(copy.deepcopy(models["aligned"])), ctx)
    assert loader.calls == ["base", "base", "base"]  # other refusal data: recomputed


# ------------------------------------------------------------------------------------------------------------
# training term


def test_post_only_rows_hold_header_then_response_tokens(tiny_tokenizer, tmp_path, models):
    tok = tiny_tokenizer
    d = PACT(PACTConfig(k=8))
    d.prepare(lora(copy.deepcopy(models["aligned"])), make_ctx(tok, tmp_path, Loader(models)))
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert d.header_ids == header == assistant_header_ids(tok, "chat")

    batch = task_batch(tok)
    labels = batch["labels"]
    resp_pos = torch.zeros_like(labels, dtype=torch.bool)
    resp_pos[:, 1:] = labels[:, 1:] != -100
    post_ids, post_mask, post_pos = d.post_only_batch(batch["input_ids"], resp_pos)
    for b, ex in enumerate(TASK):
        resp = [x for x in tokenize_example(tok, ex)["labels"] if x != -100]
        n = len(header) + len(resp)
        assert post_ids[b, :n].tolist() == header + resp
        assert post_mask[b].tolist() == [1] * n + [0] * (post_ids.shape[1] - n)
        assert (post_ids[b, n:] == tok.pad_token_id).all()
        # the logits that predict the response tokens: header end .. one before the last token
        assert post_pos[b].nonzero().flatten().tolist() == list(range(len(header) - 1, n - 1))


def test_alpaca_header_is_the_response_marker(tiny_tokenizer):
    ids = assistant_header_ids(tiny_tokenizer, "alpaca")
    assert tiny_tokenizer.decode(ids) == "\n\n### Response:\n"


def test_position_logits_equal_full_forward_slice(models):
    m = models["aligned"]
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    pos = torch.zeros_like(ids, dtype=torch.bool)
    pos[0, 2:6] = True
    pos[1, 3:7] = True
    S = torch.tensor([5, 17, 399, 42])
    with torch.no_grad():
        full = m(input_ids=ids, attention_mask=mask).logits
        got = position_logits(m, ids, mask, pos, S)
    torch.testing.assert_close(got, full[pos][:, S], atol=1e-5, rtol=1e-5)


def _prepared(tok, tmp_path, models, peft=True, **cfg):
    loader = Loader(models)
    model = copy.deepcopy(models["aligned"])
    if peft:
        model = lora(model)
    d = PACT(PACTConfig(k=16, response_tokens=8, **cfg))
    d.prepare(model, make_ctx(tok, tmp_path, loader, use_lora=peft))
    return d, model, loader


def test_kl_zero_at_reference_then_positive_after_perturbing_lora(tiny_tokenizer, tmp_path, models):
    # gate ≡ 0 (huge bias) and w = ones make q_t = softmax(z_full/T) = the student's own subset softmax at θ = θ₀
    d, model, _ = _prepared(tiny_tokenizer, tmp_path, models, b=1e3)
    d.weights = torch.ones_like(d.weights)
    batch = task_batch(tiny_tokenizer)
    model.train()
    out = model(**batch)
    zero = d.loss_terms(model, batch, out)["pact/kl"]
    assert zero.abs().item() < 1e-8
    assert model.training and model.get_base_model().training  # train/eval flags restored
    perturb_lora_b(model)
    pos = d.loss_terms(model, batch, model(**batch))["pact/kl"]
    assert pos.item() > 1e-4


def test_kl_zero_at_reference_full_ft_with_frozen_copy(tiny_tokenizer, tmp_path, models):
    d, model, loader = _prepared(tiny_tokenizer, tmp_path, models, peft=False, b=1e3)
    assert loader.calls == ["base", "aligned"]  # θ_b for the offline step, then the frozen teacher
    d.weights = torch.ones_like(d.weights)
    batch = task_batch(tiny_tokenizer)
    assert d.loss_terms(model, batch, model(**batch))["pact/kl"].abs().item() < 1e-8
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.3)
    assert d.loss_terms(model, batch, model(**batch))["pact/kl"].item() > 1e-4


def _reference_term(d: PACT, model, batch, student_logits) -> float:
    """Per-token implementation straight from the spec, one teacher forward per token and view."""
    c, S, w = d.config, d.safety_ids, d.weights
    kls = []
    with torch.no_grad(), model.disable_adapter():
        teacher = model.get_base_model()
        for b in range(batch["input_ids"].shape[0]):
            ids, labels = batch["input_ids"][b], batch["labels"][b]
            positions = [p for p in range(1, ids.numel()) if labels[p] != -100]
            resp = [int(ids[p]) for p in positions]
            for t, p in enumerate(positions):
                z_full = teacher(input_ids=ids[None, :p]).logits[0, -1, S]
                z_post = teacher(input_ids=torch.tensor([d.header_ids + resp[:t]])).logits[0, -1, S]
                z_s = student_logits[b, p - 1, S]

                def index(z):
                    pr = sorted(F.softmax(z, -1).tolist(), reverse=True)
                    acc, m = 0.0, 0
                    while acc < 0.9 and m < len(pr):
                        acc, m = acc + pr[m], m + 1
                    return m / len(pr)

                gate = 1 / (1 + math.exp(-c.alpha * (index(z_s) - index(z_post) - c.b)))
                gate *= math.exp(-max(0, t - c.N) / c.tau)
                q = F.softmax(((1 - gate) * z_full + gate * z_post) / c.T, -1) * w
                q = q / q.sum()
                kls.append(float((q * (q.log() - F.log_softmax(z_s / c.T, -1))).sum()))
    return c.lam * c.T**2 * sum(kls) / len(kls)


def test_term_matches_per_token_reference(tiny_tokenizer, tmp_path, models):
    d, model, _ = _prepared(tiny_tokenizer, tmp_path, models, N=2, tau=3.0, lam=0.7)
    d.weights = d.weights + 0.05  # keep every token in q so the reference's log q stays finite
    perturb_lora_b(model, scale=0.3)
    batch = task_batch(tiny_tokenizer)
    with torch.no_grad():
        out = model(**batch)
        got = d.loss_terms(model, batch, out)["pact/kl"].item()
    want = _reference_term(d, model, batch, out.logits)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7) and want > 0


def test_all_zero_weights_fall_back_to_plain_subset_target(tiny_tokenizer, tmp_path, models):
    d, model, _ = _prepared(tiny_tokenizer, tmp_path, models, b=1e3)
    batch = task_batch(tiny_tokenizer)
    perturb_lora_b(model)
    out = model(**batch)
    d.weights = torch.zeros_like(d.weights)
    zero_w = d.loss_terms(model, batch, out)["pact/kl"]
    d.weights = torch.ones_like(d.weights)
    ones_w = d.loss_terms(model, batch, out)["pact/kl"]
    assert torch.isfinite(zero_w) and zero_w.item() == pytest.approx(ones_w.item(), rel=1e-6)


def test_gradients_flow_only_into_the_student(tiny_tokenizer, tmp_path, models):
    # LoRA: only adapter weights receive gradient (B at first; the teacher view adds none)
    d, model, _ = _prepared(tiny_tokenizer, tmp_path, models)
    perturb_lora_b(model)
    batch = task_batch(tiny_tokenizer)
    term = d.loss_terms(model, batch, model(**batch))["pact/kl"]
    term.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for g in grads.values())

    # full FT: the frozen θ₀ copy gets no gradient, the student does
    d2, student, _ = _prepared(tiny_tokenizer, tmp_path, models, peft=False)
    with torch.no_grad():
        student.lm_head.weight.add_(torch.randn_like(student.lm_head.weight) * 0.3)
    term2 = d2.loss_terms(student, batch, student(**batch))["pact/kl"]
    term2.backward()
    assert all(p.grad is None and not p.requires_grad for p in d2._teacher.parameters())
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0
    # gradient reaches only the safety-token rows of the head
    rows = student.lm_head.weight.grad.abs().sum(1).nonzero().flatten()
    assert set(rows.tolist()) <= set(d2.safety_ids.tolist())


def test_batch_without_response_tokens_gives_zero(tiny_tokenizer, tmp_path, models):
    d, model, _ = _prepared(tiny_tokenizer, tmp_path, models)
    batch = task_batch(tiny_tokenizer)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    term = d.loss_terms(model, batch, model(**batch))["pact/kl"]
    assert term.item() == 0.0 and term.requires_grad


def test_header_bos_only_when_the_template_starts_sequences_with_it(tiny_tokenizer):
    from conftest import CHATML_TEMPLATE

    header = tiny_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    chatml_bos = copy.deepcopy(tiny_tokenizer)
    chatml_bos.bos_token = "<|im_start|>"  # SmolLM2 style: the "BOS" is the turn marker, never doubled
    assert assistant_header_ids(chatml_bos, "chat") == header
    llama_style = copy.deepcopy(tiny_tokenizer)
    llama_style.bos_token = "<pad>"  # a distinct sequence-start token written by the template
    llama_style.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    assert assistant_header_ids(llama_style, "chat") == [llama_style.bos_token_id] + header


# ------------------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_smollm2_safety_tokens_and_zero_term_at_reference(tmp_path, smollm2_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )

    def load(path):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return m.requires_grad_(False)

    ctx = make_ctx(tok, tmp_path, load, aligned_model_path=str(smollm2_dir), base_model_path=str(smollm2_dir))
    d = PACT(PACTConfig(k=50, n_pairs=4, response_tokens=16, b=1e3))
    d.prepare(model, ctx)
    assert d.header_ids == tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert " I" in d.meta["tokens"]  # refusals open with "I can't ..."
    assert (d.weights >= 0).all() and d.safety_ids.numel() == 50
    d.weights = torch.ones_like(d.weights)
    batch = CompletionCollator(tok)([tokenize_example(tok, ex) for ex in TASK])
    assert d.loss_terms(model, batch, model(**batch))["pact/kl"].abs().item() < 1e-6
