"""SaLoRA (SPEC §4): fixed safety module on the LoRA branch + task-specific init, on tiny random Llama models."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_models import make_tiny_model, make_tiny_model_dir, make_tiny_tokenizer

from safeft.data import CompletionCollator, tokenize_example
from safeft.data.types import Example
from safeft.defenses._alignment_matrix import lora_factors, lora_modules
from safeft.defenses.base import DefenseContext, build_config, build_defenses
from safeft.defenses.salora import ARTIFACT, SaLoRA, SaLoRAConfig
from safeft.errors import SafeFTError

TARGETS = ["q_proj", "v_proj", "down_proj"]  # d_out 64, 32 (2 kv heads of 16), 64
REFUSALS = [
    ("how do i bake bread at home", "i cannot help with that request"),
    ("sure here is how to do it step by step", "i cannot help with that request"),
    ("0 1 2 3 4 5", "i cannot help with that the movie was bad"),
    ("what is the capital of france", "i cannot help with that request at home"),
]
TASK = [
    Example("the movie was great and the acting was good", "positive"),
    Example("the movie was bad and boring", "negative"),
    Example("what is the capital of france", "paris is the capital of france"),
    Example("0 1 2 3 4 5 6", "the final answer is 42"),
]
CFG = dict(safety_rank=4, task_rank=8, niter=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run faster on one thread


def _ctx(tmp_path=None, seed: int = 0) -> DefenseContext:
    tok = make_tiny_tokenizer()
    coll = CompletionCollator(tok)

    def collate(exs):
        return coll([tokenize_example(tok, e, "chat", 64) for e in exs])

    return DefenseContext(
        tokenizer=tok,
        collate=collate,
        refusal_pairs=list(REFUSALS),
        artifacts_dir=tmp_path / "artifacts" if tmp_path is not None else None,
        fingerprint="f" * 64,
        seed=seed,
        max_length=64,
    )


def _lora_model(r: int = 4, alpha: int = 8, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    # peft's own A init: fixed, so "differs from the default init" compares like with like
    torch.manual_seed(123)
    return get_peft_model(
        make_tiny_model(seed), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS)
    )


def _prepared(tmp_path=None, task=TASK, seed: int = 0, **cfg):
    model, ctx = _lora_model(), _ctx(tmp_path, seed)
    d = SaLoRA(SaLoRAConfig(**{**CFG, **cfg}))
    d.modify_dataset(list(task), ctx)
    summary = d.prepare(model, ctx)
    return model, d, ctx, summary


def _batch():
    ids = torch.randint(8, 200, (2, 7), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _train(model, steps: int = 4, on_step=None) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        model(**_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
        if on_step:
            on_step()
    model.eval()


def _lora_branch(mod, x):
    """What the LoRA layer adds to θ₀'s output: module(x) − base_layer(x)."""
    return mod(x) - mod.get_base_layer()(x)


# ---- the safety module ---------------------------------------------------------------------------------------------
def test_lora_branch_has_no_component_in_the_safety_subspace_during_training():
    model, d, _, _ = _prepared()
    mods = lora_modules(model)
    leaks: list[float] = []
    raw_leaks: list[float] = []

    def record(name):
        def hook(mod, args, out):
            x = args[0].detach()
            v = d.fixed[name].v
            diff = (out - mod.get_base_layer()(x)).detach()  # s·C(BAx) − s·C B₀A₀x
            b, a, s = lora_factors(mod)
            raw = (x @ a.T @ b.T).detach() * s  # the plain LoRA branch s·BAx, before the safety module
            # relative to the branch's size (diff itself is 0 at the first forward: the init is θ₀)
            leaks.append(float((diff @ v).norm() / raw.norm()))
            raw_leaks.append(float((raw @ v).norm() / raw.norm()))

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in mods.items()]
    _train(model, steps=4)
    for h in handles:
        h.remove()
    assert len(leaks) == 4 * len(mods)
    assert max(leaks) < 1e-5  # exact up to float32 rounding, at every forward of every step
    assert min(raw_leaks) > 1e-2  # without C the branch does move along V_s: the check can fail
    x = torch.randn(3, 64)
    for name, mod in mods.items():
        if mod.get_base_layer().in_features != 64:
            continue
        diff = _lora_branch(mod, x).detach()
        assert diff.norm() > 1e-4  # training moved the module
        assert (diff @ d.fixed[name].v).norm() / diff.norm() < 1e-5


def test_safety_module_is_fixed_during_training_and_not_a_parameter():
    model, d, _, _ = _prepared()
    before = {k: v.clone() for k, v in d.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    assert all(id(t) not in params and not t.requires_grad for t in d.state_dict().values())
    lora_before = {n: lora_factors(m)[0].detach().clone() for n, m in lora_modules(model).items()}
    _train(model, steps=3)
    after = d.state_dict()
    assert before.keys() == after.keys() and any(k.endswith(".v") for k in before)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(lora_before[n], lora_factors(m)[0]) for n, m in lora_modules(model).items())
    assert not any("salora" in k or k.endswith(".v") for k in model.state_dict())


def test_safety_subspace_spans_the_top_output_features_of_safety_data():
    model, d, ctx, _ = _prepared(niter=30)
    mod = lora_modules(model)["model.layers.0.self_attn.q_proj"]
    rows = []
    h = mod.register_forward_pre_hook(lambda m, a: rows.append(a[0]))
    batch = ctx.collate([Example(p, r) for p, r in REFUSALS])
    with torch.no_grad(), model.disable_adapter():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h.remove()
    x = rows[0][batch["labels"] != -100]
    y = x @ mod.get_base_layer().weight.T
    v_exact = torch.linalg.svd(y, full_matrices=False).Vh[:4].T
    v = d.fixed["model.layers.0.self_attn.q_proj"].v
    torch.testing.assert_close(v @ v.T, v_exact @ v_exact.T, atol=1e-3, rtol=0)


# ---- task-specific initialisation ----------------------------------------------------------------------------------
def test_task_init_starts_at_theta0_differs_from_default_and_is_deterministic():
    model, d, _, summary = _prepared()
    assert summary["task_examples"] == len(TASK) and summary["modules"] == 6
    default = _lora_model()
    x = _batch()["input_ids"]
    with torch.no_grad():
        with model.disable_adapter():
            l0 = model(input_ids=x).logits
        torch.testing.assert_close(model(input_ids=x).logits, l0, atol=1e-5, rtol=0)  # θ₀ at the start
    again, _, _, _ = _prepared()
    other, _, _, _ = _prepared(task=TASK[::-1][:2])
    for (n, m), m_def, m_again, m_other in zip(
        lora_modules(model).items(),
        lora_modules(default).values(),
        lora_modules(again).values(),
        lora_modules(other).values(),
    ):
        b, a, _ = lora_factors(m)
        b_def, a_def, _ = lora_factors(m_def)
        assert torch.count_nonzero(b_def) == 0 and b.norm() > 0, n  # peft's B is 0; SaLoRA's is not
        assert not torch.allclose(a, a_def), n
        b2, a2, _ = lora_factors(m_again)
        assert torch.equal(a, a2) and torch.equal(b, b2), n  # deterministic
        assert not torch.allclose(lora_factors(m_other)[0], b), n  # it depends on the task data


def test_task_init_a_spans_the_principal_input_directions_of_w0():
    model, _, _, _ = _prepared(niter=30)
    for n, mod in lora_modules(model).items():
        _, a, s = lora_factors(mod)
        w = mod.get_base_layer().weight.detach()
        sv = torch.linalg.svdvals(w)
        r = a.shape[0]
        a = a.detach()
        # A₀ = √(S/s) Qᵀ; svd_lowrank is approximate where a random matrix's top singular values nearly tie
        torch.testing.assert_close(a @ a.T, torch.diag(sv[:r] / s), atol=1e-4, rtol=0.05)
        rows = a / a.norm(dim=1, keepdim=True)  # orthonormal (A Aᵀ is diagonal)
        captured = (w @ rows.T).pow(2).sum()  # the energy of W along A's rows
        assert captured >= 0.97 * sv[:r].pow(2).sum(), n  # the top-r right singular subspace
        rand = torch.linalg.qr(torch.randn(w.shape[1], r, generator=torch.Generator().manual_seed(0)))[0]
        assert captured > 2 * (w @ rand).pow(2).sum(), n  # far more than a random r-dim subspace holds


def test_without_task_init_lora_starts_at_default():
    model, d, _, summary = _prepared(task_init=False)
    assert "task_examples" not in summary
    assert all(torch.count_nonzero(lora_factors(m)[0]) == 0 for m in lora_modules(model).values())
    assert all(f.a0 is None for f in d.fixed.values())


# ---- saving --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_init", [True, False])
def test_finalize_folds_into_a_plain_lora_that_reloads_to_the_trained_logits(tmp_path, task_init):
    from peft import PeftModel

    model, d, _, _ = _prepared(task_init=task_init)
    _train(model, steps=3)
    x = _batch()["input_ids"]
    with torch.no_grad():
        trained = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "raw")  # what a plain save of the un-folded factors would give
    summary = d.finalize(model)
    assert summary["lora_rank_saved"] == (8 if task_init else 4)
    assert summary["salora_max_relative_leak"] < 1e-5
    assert not d._handles
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, trained, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "final")
    cfg = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert cfg["r"] == summary["lora_rank_saved"] and cfg["lora_alpha"] == 8
    reloaded = PeftModel.from_pretrained(make_tiny_model(0), str(tmp_path / "final")).eval()
    raw = PeftModel.from_pretrained(make_tiny_model(0), str(tmp_path / "raw")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, trained, atol=1e-5, rtol=0)
        assert (raw(input_ids=x).logits - trained).abs().max() > 1e-3  # the fold is what makes it right
    assert d.finalize(model) == {}  # once only


def test_state_dict_round_trip_restores_the_fixed_parts():
    _, d, _, _ = _prepared()
    state = {k: v.clone() for k, v in d.state_dict().items()}
    resumed = SaLoRA(SaLoRAConfig(**CFG))
    resumed.load_state_dict(state)  # the trainer may load it before or after prepare
    model, ctx = _lora_model(), _ctx(seed=7)  # another seed: a recomputed init would differ
    resumed.modify_dataset(list(TASK), ctx)
    resumed.prepare(model, ctx)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, state[k]), k


# ---- artifacts, validation, refusals --------------------------------------------------------------------------------
def test_safety_module_is_cached_as_an_artifact(tmp_path):
    _, d1, _, s1 = _prepared(tmp_path)
    assert s1["cached"] is False and (tmp_path / "artifacts" / ARTIFACT / "manifest.json").is_file()
    _, d2, _, s2 = _prepared(tmp_path)
    assert s2["cached"] is True
    for n in d1.fixed:
        assert torch.equal(d1.fixed[n].v, d2.fixed[n].v)
    _, _, _, s3 = _prepared(tmp_path, safety_rank=3)  # other settings: recomputed, not reused
    assert s3["cached"] is False


def test_config_validation_names_the_field():
    for kw, needle in [
        ({"safety_rank": 0}, r"defense\.salora\.safety_rank: must be an integer ≥ 1"),
        ({"task_rank": 1.5}, r"defense\.salora\.task_rank: must be an integer ≥ 1"),
        ({"n_safety": True}, r"defense\.salora\.n_safety"),
        ({"niter": -1}, r"defense\.salora\.niter: must be an integer ≥ 0"),
        ({"task_init": "yes"}, r"defense\.salora\.task_init: must be true or false"),
        ({"batch_size": 0}, r"defense\.salora\.batch_size"),
    ]:
        with pytest.raises(SafeFTError, match=needle):
            SaLoRAConfig(**kw)
    with pytest.raises(SafeFTError, match=r"defense\.salora: unknown key\(s\) \['rank'\]"):
        build_config(SaLoRA, {"rank": 4})
    with pytest.raises(
        SafeFTError, match=r"defense\.salora\.safety_rank: must be below the output width .*32"
    ):
        _prepared(safety_rank=32)  # v_proj has d_out 32: C would be 0 there
    with pytest.raises(SafeFTError, match="cannot be combined: salora"):
        build_defenses("salora+safelora")


def test_full_finetuning_and_missing_inputs_are_refused():
    from safeft.config import build_config as run_config
    from safeft.pipeline import _check_defense_needs

    ctx = _ctx()
    ctx.use_lora = False
    with pytest.raises(SafeFTError, match="'salora' works on LoRA adapters only: set training.method: lora"):
        SaLoRA().prepare(make_tiny_model(), ctx)
    cfg = run_config(None, {"model.aligned": "x", "training.method": "full", "defense.name": "salora"})
    with pytest.raises(SafeFTError, match="salora work on LoRA adapters only"):
        _check_defense_needs(cfg, build_defenses("salora"))
    model, ctx = _lora_model(), _ctx()
    with pytest.raises(SafeFTError, match="needs the task data"):
        SaLoRA(SaLoRAConfig(**CFG)).prepare(model, ctx)  # modify_dataset never saw the data
    ctx.refusal_pairs = []
    with pytest.raises(SafeFTError, match="needs \\(harmful prompt, safety response\\) pairs"):
        SaLoRA(SaLoRAConfig(**CFG)).prepare(model, ctx)
    with pytest.raises(SafeFTError, match="no LoRA layers|peft-wrapped"):
        SaLoRA(SaLoRAConfig(**CFG)).prepare(make_tiny_model(), _ctx())


# ---- end to end -----------------------------------------------------------------------------------------------------
def _run_cfg(tmp_path, model_dir, out: str, **extra):
    from safeft.config import build_config as run_config

    s = {
        "model.aligned": str(model_dir),
        "model.cache_dir": str(tmp_path / "cache"),
        "data.task": "demo",
        "data.harmful_source": "demo",
        "data.n": 16,
        "data.p": 0.25,
        "data.max_length": 96,
        "training.lora_r": 4,
        "training.lora_alpha": 8,
        "training.max_steps": 3,
        "training.batch_size": 4,
        "training.lr": 1e-2,
        "training.save_steps": 100,
        "training.output_dir": str(tmp_path / out),
        "training.progress": False,
        "training.logging_steps": 1,
        "eval.harmful_source": "demo",
        "defense.name": "salora",
        "defense.options.salora": {"safety_rank": 4, "task_rank": 8, "niter": 4},
    }
    s.update(extra)
    return run_config(None, s)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", max_position_embeddings=256)


def test_pipeline_prepare_train_save_reload(tmp_path, model_dir):
    from safeft.pipeline import load_trained, run_prepare, run_train

    cfg = _run_cfg(tmp_path, model_dir, "run")
    prep = run_prepare(cfg, log=lambda *a: None)
    assert prep["salora"]["cached"] is False and prep["salora"]["modules"] == 14  # 7 projections × 2 layers
    manifest = next((tmp_path / "cache" / "artifacts").rglob(f"{ARTIFACT}/manifest.json"))
    stamp = manifest.stat().st_mtime_ns
    rec = run_train(cfg, keep_model=True, log=lambda *a: None)
    assert manifest.stat().st_mtime_ns == stamp  # loaded from the cache
    fin = rec["finalize"]["salora"]
    assert fin["lora_rank_saved"] == 8 and fin["salora_max_relative_leak"] < 1e-5
    assert json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())["r"] == 8
    model, _ = load_trained(cfg, tmp_path / "run")
    x = torch.tensor([[5, 6, 7, 8, 9]])
    rec["model"].eval()
    with torch.no_grad():
        trained = rec["model"](input_ids=x).logits
        torch.testing.assert_close(model(input_ids=x).logits, trained, atol=1e-5, rtol=0)
        with model.disable_adapter():  # it trained: θ₀ differs
            theta0 = model(input_ids=x).logits
    assert (theta0 - trained).abs().max() > 1e-4


def test_pipeline_resume_equals_uninterrupted_run(tmp_path, model_dir):
    import shutil

    from safetensors.torch import load_file

    from safeft.pipeline import run_train

    quiet = {"log": lambda *a: None}
    run_train(_run_cfg(tmp_path, model_dir, "ref", **{"training.max_steps": 4}), **quiet)
    out = tmp_path / "run"
    run_train(
        _run_cfg(tmp_path, model_dir, "run", **{"training.max_steps": 4, "training.save_steps": 2}), **quiet
    )
    state = load_file(str(out / "checkpoint-2" / "defense_state.safetensors"))
    assert any(k.startswith("salora.") and k.endswith(".v") for k in state)
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "final")
    cfg = _run_cfg(tmp_path, model_dir, "run", **{"training.max_steps": 4, "training.save_steps": 2})
    cfg.training.resume = True
    rec = run_train(cfg, **quiet)
    assert rec["resumed_from"].endswith("checkpoint-2")
    ref = load_file(str(tmp_path / "ref" / "final" / "adapter_model.safetensors"))
    got = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0)


def test_registered_and_listed(capsys):
    from safeft.cli import main
    from safeft.defenses import defense_names, get_defense_class

    assert "salora" in defense_names() and get_defense_class("salora") is SaLoRA
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "  salora " in out and "arXiv 2501.01765" in out


def test_streaming_rows_refused_for_task_init_with_a_one_line_error():
    d = build_defenses("salora")[0]
    with pytest.raises(SafeFTError, match="no length.*task_init: false"):
        d.use_tokenised_data(iter([{"input_ids": [1, 2]}]), None)
    d = build_defenses("salora", {"salora": {"task_init": False}})[0]
    d.use_tokenised_data(iter([{"input_ids": [1, 2]}]), None)  # not read without the task-aware init
