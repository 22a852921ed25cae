"""SafeTrainer invariants: the null defense is plain SFT exactly; terms are added and logged; hooks run per step."""

from __future__ import annotations

import torch
from helpers_models import Rows, make_tiny_model, make_tiny_tokenizer, tiny_task_rows, tiny_training_args
from transformers import Trainer

from safeft.data import CompletionCollator
from safeft.defenses import Defense, build_defenses
from safeft.models import setup_trainable
from safeft.trainer import SafeTrainer


def _data(tok, n=12):
    return Rows(tiny_task_rows(tok, n))


def _train(tmp_path, trainer_cls, method="lora", **kw):
    tok = make_tiny_tokenizer()
    model = setup_trainable(make_tiny_model(seed=0), method=method, lora_r=4, lora_alpha=8)
    extra = {"defenses": kw.pop("defenses")} if "defenses" in kw else {}
    tr = trainer_cls(model=model, args=tiny_training_args(tmp_path, **kw), train_dataset=_data(tok),
                     data_collator=CompletionCollator(tok), processing_class=tok, **extra)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    return tr, losses


def test_null_defense_equals_plain_trainer_exactly(tmp_path):
    plain, l_plain = _train(tmp_path / "a", Trainer)
    safe, l_safe = _train(tmp_path / "b", SafeTrainer, defenses=build_defenses("sft"))
    assert l_plain == l_safe  # bit-identical per-step losses
    for (n1, p1), (n2, p2) in zip(plain.model.named_parameters(), safe.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_null_defense_equals_plain_trainer_with_grad_accum(tmp_path):
    _, l_plain = _train(tmp_path / "a", Trainer, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    _, l_safe = _train(tmp_path / "b", SafeTrainer, defenses=build_defenses("sft"), gradient_accumulation_steps=2,
                       per_device_train_batch_size=2)
    assert l_plain == l_safe


class _ConstTerm(Defense):
    name = "const-test"

    def __init__(self):
        super().__init__()
        self.after = 0

    def loss_terms(self, model, inputs, outputs):
        return {"const/term": torch.tensor(0.25, requires_grad=False) + 0 * outputs.logits.sum()}

    def after_step(self, model):
        self.after += 1


def test_terms_are_added_logged_and_after_step_runs_per_optimizer_step(tmp_path):
    _, l_plain = _train(tmp_path / "a", Trainer, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    d = _ConstTerm()
    tr, l_def = _train(tmp_path / "b", SafeTrainer, defenses=[d], gradient_accumulation_steps=2,
                       per_device_train_batch_size=2)
    assert d.after == 3  # one call per optimizer step, not per micro-batch
    # a constant term has no gradient: same trajectory, loss shifted by exactly the term
    for a, b in zip(l_plain, l_def):
        assert abs((b - a) - 0.25) < 1e-6
    logged = [h for h in tr.state.log_history if "const/term" in h]
    assert logged and all(abs(h["const/term"] - 0.25) < 1e-9 for h in logged)
    assert all("task_loss" in h for h in logged)


def test_lora_trains_only_adapters(tmp_path):
    torch.manual_seed(0)
    tr, _ = _train(tmp_path, SafeTrainer, defenses=[])
    ref = setup_trainable(make_tiny_model(seed=0), method="lora", lora_r=4, lora_alpha=8)
    changed_lora = changed_base = 0
    for (n, p), (_, q) in zip(tr.model.named_parameters(), ref.named_parameters()):
        if torch.equal(p, q):
            continue
        if "lora_" in n:
            changed_lora += 1
        else:
            changed_base += 1
    assert changed_lora > 0 and changed_base == 0


def test_full_finetuning_changes_base_weights(tmp_path):
    tr, losses = _train(tmp_path, SafeTrainer, method="full", defenses=[], learning_rate=1e-3)
    ref = make_tiny_model(seed=0)
    changed = sum(not torch.equal(p, q) for (_, p), (_, q) in zip(tr.model.named_parameters(), ref.named_parameters()))
    assert changed > 10
    assert losses[-1] < losses[0]


class _ConstTerm2(_ConstTerm):
    name = "const-test-2"

    def loss_terms(self, model, inputs, outputs):
        return {"const2/term": torch.tensor(0.5) + 0 * outputs.logits.sum()}


def test_composed_defenses_sum_their_terms_and_all_hooks_run(tmp_path):
    _, l_plain = _train(tmp_path / "a", Trainer)
    d1, d2 = _ConstTerm(), _ConstTerm2()
    tr, l_comp = _train(tmp_path / "b", SafeTrainer, defenses=[d1, d2])
    assert d1.after == 3 and d2.after == 3
    for a, b in zip(l_plain, l_comp):
        assert abs((b - a) - 0.75) < 1e-6


def test_registry_composition_rules():
    import pytest

    from safeft.cli import main
    from safeft.defenses.base import parse_defense_spec
    from safeft.errors import SafeFTError

    assert parse_defense_spec("cwac+pact") == ["cwac", "pact"]
    assert parse_defense_spec("sft+asft") == ["asft"]  # the null defense adds nothing
    with pytest.raises(SafeFTError, match="variants of one method"):
        parse_defense_spec("cwac+cwac-weight")
    with pytest.raises(SafeFTError, match="listed twice"):
        parse_defense_spec("pact+pact")
    assert main(["list"]) == 0


def test_list_shows_every_defense_with_paper(capsys):
    from safeft.cli import main
    from safeft.defenses import defense_names

    main(["list"])
    out = capsys.readouterr().out
    for name in ["sft", "cwac", "cwac-weight", "cwac-activation", "pact", "asft", "safelora", "safeinstr", "lisa"]:
        assert name in defense_names() and f"  {name} " in out
    assert "arXiv 2604.12384" in out and "arXiv 2603.07445" in out and "2506.08473" in out
