"""TRL integration: SafeSFTTrainer runs the defense machinery of SafeTrainer on TRL's SFTTrainer.

One run through SafeTrainer and through SafeSFTTrainer on the same batches gives the same weights (null defense,
a loss term, an after-step projection, a term that reads the logits); checkpoint + resume restores defense state;
bad names, settings and unsupported defenses fail before training with a message naming what to change."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from helpers_models import SENTENCES, make_tiny_model, make_tiny_tokenizer
from transformers import TrainerCallback

from safeft.data import CompletionCollator, Example
from safeft.defenses import Defense, build_defenses
from safeft.defenses.base import DefenseContext
from safeft.errors import SafeFTError
from safeft.models import setup_trainable
from safeft.trainer import DEFENSE_STATE, SafeTrainer

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from safeft.trl import SafeSFTTrainer, defense_context, resolve_defenses  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run faster on one thread


def _dataset(n: int = 12) -> Dataset:
    words = ["the movie was great", "the movie was bad and boring", "what is the capital of france"]
    return Dataset.from_list(
        [
            {"prompt": f"{words[i % 3]} {i % 10}", "completion": " positive" if i % 2 else " negative"}
            for i in range(n)
        ]
    )


def _args(out, **kw) -> SFTConfig:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        max_length=64,
        bf16=False,
        gradient_checkpointing=False,
        lr_scheduler_type="constant",
    )
    base.update(kw)
    return SFTConfig(**base)


def _lora_model(seed: int = 0):
    return setup_trainable(
        make_tiny_model(seed=seed, num_hidden_layers=4),
        method="lora",
        lora_r=4,
        lora_alpha=8,
        target_modules=TARGETS,
    )


def _pair(
    tmp_path, trl_kwargs: dict, safe_defenses: list[Defense], model_fn=_lora_model, ref_setup=None, **args_kw
):
    """The same run through SafeSFTTrainer and SafeTrainer: SafeTrainer gets TRL's tokenised dataset and collator,
    so both see the same batches; ``ref_setup(trl_trainer)`` runs before SafeTrainer is built (to prepare its
    defenses on TRL's rows); returns the two trainers after training."""
    tok = make_tiny_tokenizer()
    trl_kwargs = dict(trl_kwargs)
    ref_model = trl_kwargs.pop("_ref_model", None)
    trl_tr = SafeSFTTrainer(
        model_fn(),
        args=_args(tmp_path / "trl", **args_kw),
        train_dataset=_dataset(),
        processing_class=tok,
        **trl_kwargs,
    )
    rows = trl_tr.train_dataset.select_columns(["input_ids", "labels"])  # TRL's tokens and masked labels
    if ref_setup is not None:
        ref_setup(trl_tr)
    ref = SafeTrainer(
        model=ref_model or model_fn(),
        args=_args(tmp_path / "ref", remove_unused_columns=False, **args_kw),
        train_dataset=rows,
        data_collator=trl_tr.data_collator,
        processing_class=tok,
        defenses=safe_defenses,
    )
    trl_tr.train()
    ref.train()
    return trl_tr, ref


def _assert_same_weights(a, b, atol=1e-6, rtol=1e-5):
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], atol=atol, rtol=rtol, msg=lambda m, n=n: f"{n}: {m}")


def _losses(tr):
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


# ---- the same run through both trainers --------------------------------------------------------------------------
def test_null_defense_equals_plain_sft_trainer_exactly(tmp_path):
    tok = make_tiny_tokenizer()
    plain = SFTTrainer(
        _lora_model(), args=_args(tmp_path / "a"), train_dataset=_dataset(), processing_class=tok
    )
    safe = SafeSFTTrainer(
        _lora_model(),
        args=_args(tmp_path / "b"),
        train_dataset=_dataset(),
        processing_class=tok,
        defense="sft",
    )
    plain.train()
    safe.train()
    assert _losses(plain) == _losses(safe)  # bit-identical per-step losses
    for (n1, p1), (n2, p2) in zip(plain.model.named_parameters(), safe.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert any("mean_token_accuracy" in h for h in safe.state.log_history)  # TRL's own metrics still logged


def test_sft_same_weights_as_safetrainer(tmp_path):
    trl_tr, ref = _pair(tmp_path, {"defense": "sft"}, build_defenses("sft"))
    _assert_same_weights(trl_tr, ref)
    assert _losses(trl_tr) == pytest.approx(_losses(ref), rel=1e-5)


def _perturbed_base(tmp_path):
    """θ₀ (the tiny model) and θ_b = θ₀ + small noise, both saved as safetensors dirs."""
    aligned = make_tiny_model(seed=0, num_hidden_layers=4)
    base = copy.deepcopy(aligned)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    aligned.save_pretrained(tmp_path / "aligned")
    make_tiny_tokenizer().save_pretrained(tmp_path / "aligned")
    base.save_pretrained(tmp_path / "base")
    return tmp_path / "aligned", tmp_path / "base"


def test_loss_term_defense_by_name_same_weights_as_safetrainer(tmp_path):
    """AsFT (a loss term on the LoRA factors), given by name + config + a run-config context to SafeSFTTrainer."""
    aligned, base = _perturbed_base(tmp_path)
    settings = {
        "model.aligned": str(aligned),
        "model.base": str(base),
        "data.harmful_source": "demo",
        "eval.harmful_source": "demo",
        "artifacts_dir": str(tmp_path / "art"),
    }
    ref_model = _lora_model()
    ref_def = build_defenses("asft", {"asft": {"lam": 5.0}})
    ref_def[0].prepare(ref_model, defense_context(ref_model, make_tiny_tokenizer(), settings))
    trl_tr, ref = _pair(
        tmp_path,
        {
            "defense": "asft",
            "defense_config": {"lam": 5.0},
            "defense_context": settings,
            "_ref_model": ref_model,
        },
        ref_def,
    )
    _assert_same_weights(trl_tr, ref)
    logged = [h for h in trl_tr.state.log_history if "asft/penalty" in h]
    assert len(logged) == 3 and all("task_loss" in h for h in logged)
    # LoRA starts at B = 0 (ΔW = 0: no penalty); the penalty is on from the second step
    assert logged[0]["asft/penalty"] == 0.0 and all(h["asft/penalty"] > 0 for h in logged[1:])
    assert "mean_token_accuracy" in logged[0]  # TRL's fused loss path: its metrics are kept
    ref_pen = [h["asft/penalty"] for h in ref.state.log_history if "asft/penalty" in h]
    assert [h["asft/penalty"] for h in logged] == pytest.approx(ref_pen, rel=1e-4)


def _demo_settings(tmp_path, aligned) -> dict:
    return {
        "model.aligned": str(aligned),
        "data.harmful_source": "demo",
        "eval.harmful_source": "demo",
        "artifacts_dir": str(tmp_path / "art"),
    }


# The losses of the two trainers agree to float32 rounding (TRL's loss path vs the model's); Adam's step divides by
# √v, so where a gradient is ~0 (q_proj's, on a random model) that rounding moves one weight by up to ~1e-5, where a
# frozen block or a missing hook moves weights by ~lr = 1e-2
ADAM_ATOL = 5e-5
SALORA_FAST = {"safety_rank": 4, "task_rank": 4, "n_safety": 16, "n_task": 8, "niter": 2, "batch_size": 8}


def test_salora_by_name_same_weights_as_safetrainer_and_finalize_saves_the_trained_model(tmp_path):
    """SaLoRA under TRL: its task-specific init from TRL's tokenised rows (use_tokenised_data), the fixed projection
    and init-term hooks in TRL's steps; finalize_defenses() folds into a plain rank-2r LoRA that save_model writes
    and PeftModel reloads on θ₀ to the trained logits."""
    from peft import PeftModel

    aligned, _ = _perturbed_base(tmp_path)
    settings = _demo_settings(tmp_path, aligned)
    ref_model = _lora_model()
    (ref_def,) = build_defenses("salora", {"salora": SALORA_FAST})

    def ref_setup(trl_tr):  # SafeTrainer's SaLoRA sees the same task rows, collated the same way
        ref_def.use_tokenised_data(trl_tr.train_dataset, trl_tr.data_collator)
        ref_def.prepare(ref_model, defense_context(ref_model, make_tiny_tokenizer(), settings))

    trl_tr, ref = _pair(
        tmp_path,
        {"defense": "salora", "defense_config": SALORA_FAST, "defense_context": settings, "_ref_model": ref_model},
        [ref_def],
        ref_setup=ref_setup,
    )
    (d,) = trl_tr.defenses
    for n, f in d.fixed.items():  # task init ran (A₀, C B₀ kept) on the same rows as SafeTrainer's
        assert f.a0 is not None and f.b0c.abs().sum() > 0
        for t, t_ref in ((f.v, ref_def.fixed[n].v), (f.a0, ref_def.fixed[n].a0), (f.b0c, ref_def.fixed[n].b0c)):
            torch.testing.assert_close(t, t_ref, atol=1e-6, rtol=1e-5)
    _assert_same_weights(trl_tr, ref, atol=ADAM_ATOL)

    ids = torch.randint(8, 200, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained = trl_tr.model(input_ids=ids).logits
    summary = trl_tr.finalize_defenses()["salora"]
    assert summary["lora_rank_saved"] == 8 and summary["salora_max_relative_leak"] < 1e-5
    trl_tr.save_model()
    reloaded = PeftModel.from_pretrained(make_tiny_model(seed=0, num_hidden_layers=4), trl_tr.args.output_dir)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, atol=1e-5, rtol=1e-4)


def test_salora_task_init_refuses_packed_rows(tmp_path):
    aligned, _ = _perturbed_base(tmp_path)
    with pytest.raises(SafeFTError, match="'salora' reads your training examples one by one.*packing=False"):
        _trainer(
            tmp_path,
            args=_args(tmp_path / "p", packing=True),
            defense="salora",
            defense_config=SALORA_FAST,
            defense_context=_demo_settings(tmp_path, aligned),
        )


def test_sppft_explicit_layers_same_weights_as_safetrainer(tmp_path):
    """SPPFT with explicit ``layers`` (a random model has no safety-layer signal to search): blocks 1-2 frozen in
    prepare, before TRL builds its optimizer; their adapters stay at θ₀, the others train, as under SafeTrainer."""
    quiet = {"layers": [1, 2]}
    ref_model = _lora_model()
    (ref_def,) = build_defenses("sppft", {"sppft": quiet})
    ref_def.log = lambda *_a: None
    ctx = DefenseContext(tokenizer=make_tiny_tokenizer(), use_lora=True)
    ref_def.prepare(ref_model, ctx)
    trl_tr, ref = _pair(
        tmp_path,
        {"defense": "sppft", "defense_config": quiet, "defense_context": ctx, "_ref_model": ref_model},
        [ref_def],
    )
    _assert_same_weights(trl_tr, ref, atol=ADAM_ATOL)
    start = dict(_lora_model().named_parameters())
    for n, p in trl_tr.model.named_parameters():
        if "lora_B" in n:
            frozen = ".layers.1." in n or ".layers.2." in n
            assert torch.equal(p, start[n]) == frozen, n
    assert trl_tr.finalize_defenses()["sppft"]["trainable_in_safety_layers"] == 0


VOCAB = sorted({w for s in SENTENCES for w in s.split()})
ANCHORS = [" ".join(random.Random(i).sample(VOCAB, 7)) for i in range(40)]
HARMLESS = [" ".join(random.Random(100 + i).sample(VOCAB, 7)) for i in range(16)]
CWAC_FAST = dict(
    anchor_sources=["pool"],
    sae_general_sources=["harmless"],
    n_positions=3,
    anchor_batch=3,
    causal_check=False,
    activation=False,
)


def _cwac(model, tmp_path):
    """A CWAC (weight constraint only) prepared on ``model``; θ₀'s greedy answers are stood in by a refusal (the
    tiny model is random)."""
    from safeft.defenses.cwac import CWAC, CWACConfig

    d = CWAC(CWACConfig(**CWAC_FAST))
    d.log = lambda *_a: None
    d.progress = False
    d.answer_fn = lambda _m, _t, ps, _tpl, _n: ["i cannot help with that request"] * len(ps)
    ctx = DefenseContext(
        tokenizer=make_tiny_tokenizer(),
        fingerprint="f" * 64,
        artifacts_dir=tmp_path / "art",
        anchor_pool=list(ANCHORS),
        harmless_pool=list(HARMLESS),
        eval_prompts=["a held out prompt"],
        use_lora=True,
        max_length=64,
        seed=0,
    )
    d.prepare(model, ctx)
    return d


def test_after_step_projection_prepared_object_same_weights_as_safetrainer(tmp_path):
    """CWAC's weight constraint (a projection after every optimizer step), passed as a prepared Defense object."""
    trl_model, ref_model = _lora_model(), _lora_model()
    d_trl, d_ref = _cwac(trl_model, tmp_path), _cwac(ref_model, tmp_path)
    trl_tr, ref = _pair(
        tmp_path, {"defense": d_trl, "_ref_model": ref_model}, [d_ref], model_fn=lambda: trl_model
    )
    _assert_same_weights(trl_tr, ref)
    leak = trl_tr.finalize_defenses()["cwac"]["cwac_max_relative_leak"]
    assert leak < 1e-5  # ΔW V = 0 held after every step


class _LogitTerm(Defense):
    """A term on the task forward's logits (as PACT's): the TRL path then computes the task loss from full logits."""

    name = "logit-test"
    needs_logits = True

    def loss_terms(self, model, inputs, outputs):
        return {"logit/l2": 1e-3 * outputs.logits.float().pow(2).mean()}


def test_logits_term_same_weights_as_safetrainer(tmp_path):
    trl_tr, ref = _pair(
        tmp_path,
        {"defense": _LogitTerm()},
        [_LogitTerm()],
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    _assert_same_weights(trl_tr, ref)
    assert all("logit/l2" in h for h in trl_tr.state.log_history if "loss" in h)


class _Hooks(Defense):
    name = "hooks-test"

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def on_train_begin(self, model, backend):
        self.calls.append(("begin", backend))

    def after_step(self, model):
        self.calls.append("step")


def test_hooks_per_optimizer_step_and_sharding_refusal_as_in_safetrainer(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from safeft.defenses.cwac import CWAC

    d = _Hooks()
    args = _args(tmp_path / "a", gradient_accumulation_steps=2, per_device_train_batch_size=2)
    _trainer(tmp_path / "a", defense=d, args=args).train()
    assert d.calls == [
        ("begin", None),
        "step",
        "step",
        "step",
    ]  # once per optimizer step, not per micro-batch
    # the refusal SafeTrainer gives before the first step, under FSDP version 1 as accelerate reports it
    tr = _trainer(tmp_path / "b", defense=CWAC())
    monkeypatch.setattr(tr, "is_fsdp_enabled", True)
    monkeypatch.setattr(tr.accelerator.state, "fsdp_plugin", SimpleNamespace(fsdp_version=1), raising=False)
    with pytest.raises(
        SafeFTError, match=r"defense 'cwac' does not run under FSDP \(version 1\): FSDP version 1 flattens"
    ):
        tr.train()
    assert tr.state.global_step == 0


# ---- checkpoint + resume -------------------------------------------------------------------------------------------
def _lisa_context(tok) -> DefenseContext:
    from safeft.data.rows import tokenize_all

    align = [Example(p, "i cannot help with that request", "refusal") for p in ANCHORS[:8]]
    collator = CompletionCollator(tok)
    return DefenseContext(
        tokenizer=tok,
        alignment_examples=align,
        seed=0,
        use_lora=True,
        collate=lambda exs: collator(tokenize_all(tok, exs, "chat", 64, "alignment data")),
    )


class _StopAt(TrainerCallback):
    """Stops training after optimizer step ``step`` (an interrupted run; its checkpoint is already written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def _lisa_run(out, callbacks=(), resume=None):
    from peft import LoraConfig

    tok = make_tiny_tokenizer()
    tr = SafeSFTTrainer(
        make_tiny_model(seed=0),
        args=_args(out, max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=_dataset(),
        processing_class=tok,
        callbacks=list(callbacks),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS),
        defense="lisa",
        defense_config={"align_steps": 1, "user_steps": 2, "rho": 0.5},
        defense_context=_lisa_context(tok),
    )
    tr.train(resume_from_checkpoint=resume)
    return tr


def test_checkpoint_and_resume_restore_defense_state(tmp_path):
    full = _lisa_run(tmp_path / "full")
    part = _lisa_run(tmp_path / "part", callbacks=[_StopAt(2)])
    assert part.state.global_step == 2 and (tmp_path / "part" / "checkpoint-2" / DEFENSE_STATE).is_file()
    # resume_from_checkpoint=True: the last checkpoint of output_dir, as TRL scripts write it
    resumed = _lisa_run(tmp_path / "part", resume=True)
    lisa_full, lisa_res = full.defenses[0], resumed.defenses[0]
    assert resumed.state.global_step == 4
    # Lisa's schedule continued from the checkpoint (a fresh state would be at step 2 of its schedule)
    assert (
        (lisa_res.global_step, lisa_res.phase, lisa_res.phase_step)
        == (lisa_full.global_step, lisa_full.phase, lisa_full.phase_step)
        == (4, "user", 0)
    )
    for n in lisa_full.snapshot:
        torch.testing.assert_close(lisa_res.snapshot[n], lisa_full.snapshot[n], atol=1e-6, rtol=1e-5)
    _assert_same_weights(resumed, full)


# ---- clear errors ----------------------------------------------------------------------------------------------------
def test_bad_names_and_settings_fail_before_any_model_is_built():
    with pytest.raises(SafeFTError, match="unknown defense 'nope'; choose from"):
        SafeSFTTrainer("no/such-model", defense="nope")
    with pytest.raises(SafeFTError, match=r"defense.asft: unknown key\(s\) \['lamda'\]"):
        SafeSFTTrainer("no/such-model", defense="asft", defense_config={"lamda": 1.0})
    with pytest.raises(SafeFTError, match=r"defense.asft.lam: must be a number ≥ 0"):
        resolve_defenses("asft", {"lam": -1.0})
    with pytest.raises(SafeFTError, match=r"give \{name: options\}"):
        resolve_defenses("asft+lisa", {"lam": 1.0})
    with pytest.raises(SafeFTError, match="configure a Defense object with its config"):
        resolve_defenses(_LogitTerm(), {"lam": 1.0})
    with pytest.raises(SafeFTError, match="lists a defense twice"):
        resolve_defenses([_LogitTerm(), _LogitTerm()])
    asft, lisa = resolve_defenses("asft+lisa", {"asft": {"lam": 2.0}, "lisa": {"rho": 0.5}})
    assert (asft.config.lam, lisa.config.rho) == (2.0, 0.5)


def _trainer(tmp_path, args=None, **kw):
    return SafeSFTTrainer(
        _lora_model(),
        args=args or _args(tmp_path),
        train_dataset=_dataset(),
        processing_class=make_tiny_tokenizer(),
        **kw,
    )


def test_missing_context_unsupported_defenses_and_missing_trl(tmp_path, monkeypatch):
    with pytest.raises(SafeFTError, match="asft prepare artifacts .* pass defense_context="):
        _trainer(tmp_path, defense="asft")
    with pytest.raises(SafeFTError, match="give 'model.aligned'"):
        _trainer(tmp_path, defense="asft", defense_context={"data.harmful_source": "demo"})
    with pytest.raises(SafeFTError, match="'safeinstr' changes the training examples"):
        _trainer(tmp_path, defense="safeinstr")
    with pytest.raises(SafeFTError, match="packing=False"):
        _trainer(tmp_path, defense=_LogitTerm(), args=_args(tmp_path, packing=True))
    with pytest.raises(SafeFTError, match="Defense objects come prepared"):
        _trainer(tmp_path, defense=_LogitTerm(), defense_context={"model.aligned": "x"})

    import sys

    import safeft.trl

    monkeypatch.setattr(safeft.trl, "_CLASSES", {})
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(SafeFTError, match="needs TRL: pip install trl"):
        from safeft.trl import SafeSFTTrainer as _  # noqa: F401


class _ConstTerm(Defense):
    name = "const-test"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss_terms(self, model, inputs, outputs):
        self.calls += 1
        return {"const/term": torch.tensor(100.0)}


def test_evaluation_is_the_task_loss_alone(tmp_path):
    """eval_dataset / evaluate(): no defense term in eval_loss, none drawn, none carried into the training log."""
    tok = make_tiny_tokenizer()
    d = _ConstTerm()
    tr = SafeSFTTrainer(_lora_model(), args=_args(tmp_path / "e", max_steps=1), train_dataset=_dataset(),
                        eval_dataset=_dataset(), processing_class=tok, defense=[d])  # fmt: skip
    plain = SFTTrainer(_lora_model(), args=_args(tmp_path / "p", max_steps=1), train_dataset=_dataset(),
                       eval_dataset=_dataset(), processing_class=tok)  # fmt: skip
    got, want = tr.evaluate()["eval_loss"], plain.evaluate()["eval_loss"]
    assert abs(got - want) < 1e-6, (got, want)
    assert d.calls == 0 and not tr._term_counts
    tr.train()
    assert d.calls >= 1
