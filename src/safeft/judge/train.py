"""Build the content judge's head from the labelled files, deterministically: ``safeft judge --build``.

1. Load every labelled source (:mod:`safeft.judge.labelled`), mapped to the rubric, with its fixed
   train / val / test split.
2. Embed answers and (prompt, answer) pairs with the frozen encoder (fixed thread count, so the same machine gives
   the same bytes) and cache the embeddings per text (``<cache>/judge/``).
3. Fit :class:`~safeft.eval.judges.content.ContentHead` on **train** with a masked two-task loss: each source and
   each class carries equal weight, a target the source does not label carries none.
4. Choose the number of epochs and the two thresholds on **val** by :func:`safeft.judge.metrics.selection_score`
   (the mean over sources and tasks of the balanced accuracy; rule fixed before any run).
5. Report agreement on **test** per source (and the keyword judge's on the same items), write the head
   (safetensors) and its manifest (JSON: encoder SHA-256, data files' SHA-256, settings, thresholds, metrics).

The val and test items never enter the head's training.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safeft.errors import SafeFTError
from safeft.eval.judges.content import FORMAT_VERSION, HEAD_VERSION, ContentHead, decide
from safeft.eval.judges.features import FEATURE_NAMES, feature_matrix
from safeft.judge.labelled import DEV_LABELLED, SOURCES, Item, load_sources
from safeft.judge.metrics import agreement

EMBED_THREADS = 2  # fixed: the float sums of a matrix product may depend on the thread count
THRESHOLDS = tuple(round(x, 2) for x in np.arange(0.1, 0.91, 0.05))


def _text_key(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:24]


def embed_items(items: Sequence[Item], encoder: Any, cache: Path | None, log: Callable[[str], None] = print
                ) -> dict[str, torch.Tensor]:
    """``{"ea", "epa", "f"}`` for ``items`` (rows in item order), embeddings cached per text in ``cache``."""
    from safetensors.torch import load_file, save_file

    from safeft.io import sha256_file

    store: dict[str, torch.Tensor] = {}
    enc_sha = sha256_file(encoder.path / "model.safetensors")[:16]
    cfile = cache / f"emb-{enc_sha}-{encoder.max_length}.safetensors" if cache else None
    if cfile and cfile.is_file():
        store = load_file(str(cfile))
    need_a = [it for it in dict.fromkeys(items) if "a" + _text_key(it.answer) not in store]
    need_pa = [it for it in dict.fromkeys(items) if "p" + _text_key(it.prompt, it.answer) not in store]
    encoder.threads = EMBED_THREADS
    if need_a:
        texts = list(dict.fromkeys(it.answer for it in need_a))
        for t, e in zip(texts, encoder.embed(texts, desc=f"embedding {len(texts)} answers")):
            store["a" + _text_key(t)] = e.clone()
    if need_pa:
        pairs = list(dict.fromkeys((it.prompt, it.answer) for it in need_pa))
        embs = encoder.embed([p for p, _ in pairs], [a for _, a in pairs], desc=f"embedding {len(pairs)} pairs")
        for (p, a), e in zip(pairs, embs):
            store["p" + _text_key(p, a)] = e.clone()
    if cfile and (need_a or need_pa):
        cfile.parent.mkdir(parents=True, exist_ok=True)
        tmp = cfile.with_suffix(".tmp")
        save_file(store, str(tmp))
        tmp.replace(cfile)
    return {
        "ea": torch.stack([store["a" + _text_key(it.answer)] for it in items]),
        "epa": torch.stack([store["p" + _text_key(it.prompt, it.answer)] for it in items]),
        "f": feature_matrix([it.prompt for it in items], [it.answer for it in items]),
    }


def _targets(items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """targets [n, 2] (harm, ref; -1 where unknown) and per-target loss weights [n, 2] (each source and class of a
    task weighs the same; unknown targets weigh 0)."""
    y = torch.tensor([[-1 if it.harm is None else it.harm, -1 if it.ref is None else it.ref] for it in items],
                     dtype=torch.float32)
    w = torch.zeros_like(y)
    sources = sorted({it.source for it in items})
    for t in (0, 1):
        groups = [(s, c) for s in sources for c in (0, 1)
                  if any(it.source == s and y[i, t] == c for i, it in enumerate(items))]
        for s, c in groups:
            idx = [i for i, it in enumerate(items) if it.source == s and y[i, t] == c]
            w[idx, t] = 1.0 / (len(idx) * len(groups))
    return y, w * len(items)


def fit_head(x: dict[str, torch.Tensor], items: Sequence[Item], *, hidden: int, epochs: int, lr: float,
             weight_decay: float, seed: int, batch_size: int = 128) -> ContentHead:
    """Train a head on ``items`` (inputs ``x``) with AdamW, fixed seed, one thread, fixed minibatch order."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        head = ContentHead(x["ea"].shape[1], x["f"].shape[1], hidden=hidden)
        f = x["f"]
        head.f_mean.copy_(f.mean(0))
        head.f_std.copy_(f.std(0).clamp_min(1e-3))
        y, w = _targets(items)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        n = len(items)
        head.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, batch_size):
                idx = perm[s : s + batch_size]
                logits = head(x["ea"][idx], x["epa"][idx], x["f"][idx])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, y[idx].clamp_min(0), weight=w[idx], reduction="sum") / len(idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
        head.eval()
        return head
    finally:
        torch.set_num_threads(old)


def fit_tuned(encoder: Any, train: Sequence[Item], val: Sequence[Item], *, hidden: int, lora_r: int,
              lora_alpha: int, lr: float, epochs: int, batch_size: int, seed: int,
              log: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Fine-tune LoRA adapters of the encoder together with the head (:mod:`safeft.eval.judges.tuned`) on ``train``;
    after each epoch choose thresholds on ``val``. Returns the state (LoRA factors + head) of the epoch with the best
    val score, and one trial record per epoch. Fixed seed, thread count and minibatch order."""
    import copy

    from safeft.eval.judges.tuned import TunedJudgeModel, tuned_logits

    old = torch.get_num_threads()
    torch.set_num_threads(EMBED_THREADS)
    try:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        tok = encoder.tokenizer
        model = TunedJudgeModel(copy.deepcopy(encoder.model), len(FEATURE_NAMES), hidden, lora_r, lora_alpha,
                                tok.sep_token_id)
        f_tr = feature_matrix([it.prompt for it in train], [it.answer for it in train])
        f_va = feature_matrix([it.prompt for it in val], [it.answer for it in val])
        model.head.f_mean.copy_(f_tr.mean(0))
        model.head.f_std.copy_(f_tr.std(0).clamp_min(1e-3))
        y, w = _targets(train)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-2)
        n, best, trials = len(train), None, []
        for ep in range(1, epochs + 1):
            model.train()
            perm = torch.randperm(n, generator=g)
            t0 = time.perf_counter()
            for s in range(0, n, batch_size):
                idx = perm[s : s + batch_size].tolist()
                enc = tok([train[i].prompt for i in idx], [train[i].answer for i in idx], padding=True,
                          truncation="longest_first", max_length=encoder.max_length, return_tensors="pt")
                logits = model(enc, f_tr[idx])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, y[idx].clamp_min(0), weight=w[idx], reduction="sum") / len(idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
            p = torch.sigmoid(tuned_logits(model, tok, [it.prompt for it in val], [it.answer for it in val], f_va,
                                           encoder.max_length, encoder.batch_size))
            th, tr, sc = choose_thresholds(val, p[:, 0], p[:, 1])
            trials.append({"epochs": ep, "t_harm": th, "t_ref": tr, "val_score": sc})
            log(f"  lora r {lora_r}, epoch {ep}: val score {sc:.4f} (t_harm {th}, t_ref {tr}; "
                f"{time.perf_counter() - t0:.0f} s)")
            if best is None or round(sc, 6) > round(best[0], 6):
                best = (sc, model.trainable_state(), trials[-1])
        return best[1], trials
    finally:
        torch.set_num_threads(old)


def predict(head: ContentHead, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        p = torch.sigmoid(head(x["ea"], x["epa"], x["f"]))
    return p[:, 0], p[:, 1]


def per_source(items: Sequence[Item], outcomes: Sequence[str], n_boot: int = 1000) -> dict[str, dict[str, Any]]:
    out = {}
    for s in dict.fromkeys(it.source for it in items):
        idx = [i for i, it in enumerate(items) if it.source == s]
        out[s] = agreement([items[i] for i in idx], [outcomes[i] for i in idx], n_boot=n_boot)
    return out


def _bal(pred: np.ndarray, gold: np.ndarray) -> float | None:
    if not (gold == 1).any() or not (gold == 0).any():
        return None
    return 0.5 * (float(pred[gold == 1].mean()) + float((~pred[gold == 0]).mean()))


def choose_thresholds(items: Sequence[Item], p_harm: torch.Tensor, p_ref: torch.Tensor) -> tuple[float, float, float]:
    """(t_harm, t_ref, score) maximising :func:`selection_score` on ``items`` over a 0.10…0.90 grid (ties: the pair
    closest to 0.5, then the lower t_harm). Vectorised: the same numbers as scoring :func:`decide`'s outcomes."""
    ph, pr = p_harm.numpy(), p_ref.numpy()
    src = np.array([it.source for it in items])
    harm = np.array([-1 if it.harm is None else it.harm for it in items])
    ref = np.array([-1 if it.ref is None else it.ref for it in items])
    groups = [(src == s) for s in dict.fromkeys(src.tolist())]
    best = None
    for th in THRESHOLDS:
        pred_h = ph >= th
        for tr in THRESHOLDS:
            pred_r = ~pred_h & (pr >= tr)
            vals = []
            for g in groups:
                for pred, gold in ((pred_h, harm), (pred_r, ref)):
                    m = g & (gold >= 0)
                    b = _bal(pred[m], gold[m]) if m.any() else None
                    if b is not None:
                        vals.append(b)
            sc = float(np.mean(vals)) if vals else float("nan")
            key = (round(sc, 6), -abs(th - 0.5) - abs(tr - 0.5), -th)
            if best is None or key > best[0]:
                best = (key, th, tr, sc)
    return best[1], best[2], best[3]


# the settings tried on val (every combination); the rest is fixed
FROZEN_DESIGN = {"kind": "frozen", "hidden_grid": (64, 128), "epoch_grid": (10, 20, 40, 80), "lr": 1e-3,
                 "weight_decay": 1e-2, "seed": 0}
LORA_DESIGN = {"kind": "lora", "hidden": 128, "lora_r": 8, "lora_alpha": 16, "lr": 5e-4, "epochs": 4, "batch_size": 16,
               "seed": 0}
DEFAULT_DESIGN = FROZEN_DESIGN


def build(out: str | Path | None = None, *, shared: Path | None = None, dev_dir: Path | None = None,
          design: dict[str, Any] | None = None, sources: Sequence[str] = SOURCES, encoder_path: Path | None = None,
          cache: Path | None = None, dev_labelled: Sequence[str] | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the head; write ``out`` (.safetensors) and its ``.json`` manifest (atomically) when ``out`` is given.
    ``dev_labelled``: labelled files of safeft's own answers added to ``safeft_dev`` (default
    :data:`safeft.judge.labelled.DEV_LABELLED`). Returns the manifest."""
    from safeft.eval.judges.encoder import Encoder
    from safeft.eval.judges.keyword import KeywordJudge
    from safeft.io import sha256_file

    t0 = time.perf_counter()
    base = LORA_DESIGN if (design or {}).get("kind") == "lora" else DEFAULT_DESIGN
    d = {**base, **(design or {})}
    dev_labelled = tuple(DEV_LABELLED if dev_labelled is None else dev_labelled)
    data = load_sources(shared, dev_dir, sources, dev_labelled)
    items = [it for s in sources for it in data[s]]
    split = {k: [it for it in items if it.split == k] for k in ("train", "val", "test")}
    for k, v in split.items():
        if not v:
            raise SafeFTError(f"judge build: the {k} split is empty; give more labelled data")
    log("judge build: " + ", ".join(f"{s} {sum(it.source == s for it in items)}" for s in sources)
        + f" labelled answers; train {len(split['train'])}, val {len(split['val'])}, test {len(split['test'])}")
    if cache is None:
        from safeft.models import cache_root

        cache = cache_root() / "judge"
    encoder = Encoder(encoder_path)
    extra: dict[str, Any] = {}
    if d["kind"] == "lora":
        from safeft.eval.judges.tuned import TunedJudgeModel, tuned_logits

        state, trials = fit_tuned(encoder, split["train"], split["val"], hidden=d["hidden"], lora_r=d["lora_r"],
                                  lora_alpha=d["lora_alpha"], lr=d["lr"], epochs=d["epochs"],
                                  batch_size=d["batch_size"], seed=d["seed"], log=log)
        best = max(trials, key=lambda t: (round(t["val_score"], 6), -t["epochs"]))
        best["hidden"] = d["hidden"]
        model = TunedJudgeModel(encoder.model, len(FEATURE_NAMES), d["hidden"], d["lora_r"], d["lora_alpha"],
                                encoder.tokenizer.sep_token_id)
        model.load_state_dict(state, strict=False)
        extra = {"kind": "lora", "lora_r": d["lora_r"], "lora_alpha": d["lora_alpha"]}

        def probs(k: str) -> tuple[torch.Tensor, torch.Tensor]:
            its = split[k]
            f = feature_matrix([it.prompt for it in its], [it.answer for it in its])
            p = torch.sigmoid(tuned_logits(model, encoder.tokenizer, [it.prompt for it in its],
                                           [it.answer for it in its], f, encoder.max_length, encoder.batch_size))
            return p[:, 0], p[:, 1]

        to_save: dict[str, torch.Tensor] = state
    else:
        x = {k: embed_items(v, encoder, cache, log) for k, v in split.items()}
        # hidden size and epochs chosen on val (thresholds re-chosen for each); ties go to the smaller, shorter one
        trials = []
        for hidden in d["hidden_grid"]:
            for ep in d["epoch_grid"]:
                head = fit_head(x["train"], split["train"], hidden=hidden, epochs=ep, lr=d["lr"],
                                weight_decay=d["weight_decay"], seed=d["seed"])
                th, tr, sc = choose_thresholds(split["val"], *predict(head, x["val"]))
                trials.append({"hidden": hidden, "epochs": ep, "t_harm": th, "t_ref": tr, "val_score": sc})
                log(f"  hidden {hidden:3d}, epochs {ep:3d}: val score {sc:.4f} (t_harm {th}, t_ref {tr})")
        best = max(trials, key=lambda t: (round(t["val_score"], 6), -t["hidden"], -t["epochs"]))
        head = fit_head(x["train"], split["train"], hidden=best["hidden"], epochs=best["epochs"], lr=d["lr"],
                        weight_decay=d["weight_decay"], seed=d["seed"])
        extra = {"kind": "frozen"}

        def probs(k: str) -> tuple[torch.Tensor, torch.Tensor]:
            return predict(head, x[k])

        to_save = {k: v for k, v in head.state_dict().items()}
    th, tr = best["t_harm"], best["t_ref"]

    kj = KeywordJudge()
    metrics: dict[str, Any] = {}
    for k in ("val", "test"):
        its = split[k]
        ours = decide(*probs(k), th, tr)
        kw = kj.outcomes([it.prompt for it in its], [it.answer for it in its])
        metrics[k] = {"content": per_source(its, ours), "keyword": per_source(its, kw)}
    files = _data_files(shared, dev_dir, sources, dev_labelled)
    manifest = {
        "format_version": FORMAT_VERSION,
        # a head built with other development files than the default names itself apart (+ a digest of their list)
        "name": f"minilm-{'lora' if d['kind'] == 'lora' else HEAD_VERSION}" + (
            "" if dev_labelled == tuple(DEV_LABELLED)
            else "+dev-" + hashlib.sha256("\n".join(dev_labelled).encode()).hexdigest()[:8]),
        **extra,
        "encoder": "all-MiniLM-L6-v2",
        "encoder_sha256": sha256_file(encoder.path / "model.safetensors"),
        "max_length": encoder.max_length,
        "feature_names": list(FEATURE_NAMES),
        "hidden": best["hidden"],
        "design": {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()},
        "epochs": best["epochs"],
        "trials": trials,
        "t_harm": th,
        "t_ref": tr,
        "data": files,
        "counts": {s: {k: sum(it.source == s and it.split == k for it in items) for k in ("train", "val", "test")}
                   for s in sources},
        "metrics": metrics,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "command": "safeft judge --build",
    }
    if out is not None:
        write_head(Path(out), to_save, manifest)
    return manifest


def _data_files(shared: Path | None, dev_dir: Path | None, sources: Sequence[str],
                dev_labelled: Sequence[str] = ()) -> dict[str, str]:
    from safeft.data import shared_data_dir
    from safeft.io import sha256_file
    from safeft.judge.labelled import repo_dev_dir

    shared = Path(shared or shared_data_dir())
    dev_dir = Path(dev_dir or repo_dev_dir())
    names = {
        "xstest": [shared / "judge_eval" / "xstest_completions_labelled.csv"],
        "pyrit_refusal": [shared / "judge_eval" / "refusal_labelled.csv", dev_dir / "refusal_labelled_rubric.csv"],
        "pyrit_harm": [shared / "judge_eval" / "pyrit_harm_labelled.csv"],
        "safeft_dev": [dev_dir / "answers.jsonl", dev_dir / "labels.csv"],
    }
    out = {f.name: sha256_file(f) for s in sources for f in names[s]}
    if "safeft_dev" in sources:
        out.update({name: sha256_file(dev_dir / name) for name in dev_labelled})
    return out


def write_head(out: Path, state: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """``state`` to ``out`` (safetensors) and ``manifest`` to ``out.with_suffix('.json')``, each written atomically
    and world-readable (they are package data)."""
    from safetensors.torch import save_file

    from safeft.io import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    # one metadata key: safetensors writes a multi-key header in hash order, and the bytes must not vary
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
              metadata={"safeft_judge": json.dumps({"format_version": FORMAT_VERSION, "name": manifest["name"]})})
    tmp.replace(out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    for f in (out, out.with_suffix(".json")):
        f.chmod(0o644)
