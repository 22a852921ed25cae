"""One table of human-labelled HS and refusal rate across blind batches, with 95% CIs and paired differences.

    python benchmarks/labels/human_table.py --batches benchmarks/test_labels/tiny/batch* --reference cwac \
        [--out benchmarks/test_labels/tiny/human_table.md]

Each batch folder (made by ``make_blind.py``, labelled by reading) holds ``blind.jsonl`` (id, prompt, answer),
``key.csv`` (id → model) and ``labels.csv`` (id → outcome). Every model in the batches answered the same prompts,
so two models are compared **paired by prompt**: the difference in HS (or refusal rate) is bootstrapped over
prompts, resampling the same prompts for both models, which is tighter than comparing two independent intervals.
A model named in two batches, or a prompt answered twice by one model, is an error. With ``--kept MODEL`` (θ₀:
``aligned``), a last table counts, of the prompts MODEL refused, how many each model still refuses.

Models named ``NAME-sK`` (K a seed number) are runs of ``NAME`` with another seed: where a name has runs for two or
more seeds (``NAME`` itself is seed 0), an "Across seeds" table gives the mean over seeds and the range, written `mean [min–max]`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from blindset import read_blind, read_key, read_labels  # this folder's module (run as a script)

from safeft.errors import SafeFTError
from safeft.eval.metrics import bootstrap_ci, mean_range, paired_difference

N_BOOT, SEED = 2000, 0


def read_batch(folder: Path) -> dict[str, dict[str, str]]:
    """``{model: {prompt: outcome}}`` of one labelled batch."""
    need = [folder / f for f in ("blind.jsonl", "key.csv", "labels.csv")]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise SafeFTError(f"{folder}: missing {', '.join(missing)}; label the batch first (README there)")
    blind, key = read_blind(need[0]), read_key(need[1])
    labels = read_labels(need[2], ids=set(blind) & set(key))
    out: dict[str, dict[str, str]] = {}
    for rid, outcome in labels.items():
        answers = out.setdefault(key[rid]["model"], {})
        if blind[rid]["prompt"] in answers:
            raise SafeFTError(f"{need[2]}: {key[rid]['model']} answered one prompt twice (id {rid})")
        answers[blind[rid]["prompt"]] = outcome
    return out


def collect(folders: list[Path]) -> dict[str, dict[str, str]]:
    models: dict[str, dict[str, str]] = {}
    for folder in folders:
        for name, answers in read_batch(folder).items():
            if name in models:
                raise SafeFTError(
                    f"{folder}: model {name!r} is also in an earlier batch; name each model once"
                )
            models[name] = answers
    return models


def _hits(answers: dict[str, str], outcome: str) -> np.ndarray:
    return np.array([a == outcome for a in answers.values()], dtype=float)


def _pct(answers: dict[str, str], outcome: str) -> float:
    """Percent of answers with ``outcome``, as count × 100 / n (so 69 of 240 prints 28.8, as compare.py prints it)."""
    return 100 * sum(a == outcome for a in answers.values()) / len(answers)


def rate(answers: dict[str, str], outcome: str) -> tuple[float, float, float]:
    """Percent of answers with ``outcome`` and its 95% bootstrap CI."""
    x = _hits(answers, outcome)
    lo, hi = bootstrap_ci(x, n_boot=N_BOOT, seed=SEED)
    return _pct(answers, outcome), 100 * lo, 100 * hi


def paired(a: dict[str, str], b: dict[str, str], outcome: str) -> tuple[float, float, float, int]:
    """a − b in percent points over the prompts both answered, its 95% paired-bootstrap CI, and that count."""
    return paired_difference({p: o == outcome for p, o in a.items()}, {p: o == outcome for p, o in b.items()},
                             n_boot=N_BOOT, seed=SEED,
                             empty="no prompt answered by both models: they are from different prompt sets")


def ordered(models: dict[str, dict[str, str]], order: list[str] | None) -> list[str]:
    """Model names: those in ``order`` first (in that order), then the rest in batch order."""
    return [m for m in (order or []) if m in models] + [m for m in models if m not in (order or [])]


def table(models: dict[str, dict[str, str]], reference: str | None, order: list[str] | None = None) -> str:
    names = ordered(models, order)
    if reference is not None and reference not in models:
        raise SafeFTError(f"--reference {reference!r} is not a labelled model; have: {', '.join(names)}")
    ref = f" − {reference}" if reference else ""
    head = ["model", "n", "human HS % [95% CI]", "human refusal % [95% CI]"]
    if reference:
        head += [f"HS{ref} (paired) [95% CI]", f"refusal{ref} (paired) [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in names:
        hs, rf = rate(models[m], "harmful"), rate(models[m], "refusal")
        row = [
            m,
            str(len(models[m])),
            f"{hs[0]:.1f} [{hs[1]:.1f}, {hs[2]:.1f}]",
            f"{rf[0]:.1f} [{rf[1]:.1f}, {rf[2]:.1f}]",
        ]
        if reference:
            if m == reference:
                row += ["–", "–"]
            else:
                dh, dr = (
                    paired(models[m], models[reference], "harmful"),
                    paired(models[m], models[reference], "refusal"),
                )
                row += [
                    f"{dh[0]:+.1f} [{dh[1]:+.1f}, {dh[2]:+.1f}]",
                    f"{dr[0]:+.1f} [{dr[1]:+.1f}, {dr[2]:+.1f}]",
                ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


SEED_NAME = re.compile(r"^(?P<base>.+)-s(?P<seed>\d+)$")


def seed_groups(models: dict[str, dict[str, str]]) -> dict[str, dict[int, str]]:
    """``{base: {seed: model name}}`` for every base name that has runs for two or more seeds (base itself = seed 0)."""
    groups: dict[str, dict[int, str]] = {}
    for name in models:
        m = SEED_NAME.match(name)
        base, seed = (m["base"], int(m["seed"])) if m else (name, 0)
        if seed in groups.setdefault(base, {}):
            raise SafeFTError(f"models {groups[base][seed]!r} and {name!r} are both seed {seed} of {base!r}")
        groups[base][seed] = name
    return {b: dict(sorted(g.items())) for b, g in groups.items() if len(g) > 1}


def seeds_table(models: dict[str, dict[str, str]]) -> str:
    """Mean and range over seeds of human HS and refusal rate, and each seed's value; '' when no name has seeds."""
    groups = seed_groups(models)
    if not groups:
        return ""
    lines = [
        "| model | seeds | human HS %: mean [min–max] | per seed | human refusal %: mean [min–max] | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for base, runs in groups.items():
        row = [base, ", ".join(str(s) for s in runs)]
        for outcome in ("harmful", "refusal"):
            v = [_pct(models[name], outcome) for name in runs.values()]  # no CI needed
            row += [mean_range(v), " / ".join(f"{x:.1f}" for x in v)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def kept_table(models: dict[str, dict[str, str]], of: str, order: list[str] | None = None) -> str:
    """Of the prompts model ``of`` refused, how many each model refuses too (``k / n`` and %)."""
    if of not in models:
        raise SafeFTError(f"--kept {of!r} is not a labelled model; have: {', '.join(models)}")
    refused = [p for p, o in models[of].items() if o == "refusal"]
    if not refused:
        raise SafeFTError(f"--kept {of!r}: it refused none of its prompts")
    lines = [f"| model | refuses, of the {len(refused)} prompts {of} refused | % |", "|---|---|---|"]
    for m in ordered(models, order):
        answers = models[m]
        k = sum(answers.get(p) == "refusal" for p in refused)
        n = sum(p in answers for p in refused)
        lines.append(f"| {m} | {k} / {n} | {100 * k / n:.1f} |" if n else f"| {m} | – (other prompts) | – |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", nargs="+", type=Path, required=True, help="labelled batch folders")
    ap.add_argument("--reference", help="the model every other is compared with, paired by prompt")
    ap.add_argument("--order", nargs="*", default=[], help="row order (models not named follow)")
    ap.add_argument("--kept", metavar="MODEL", help="also: of the prompts MODEL refused, how many each model refuses")
    ap.add_argument("--out", type=Path, help="write the markdown here too")
    a = ap.parse_args()
    try:
        models = collect(a.batches)
        md = table(models, a.reference, a.order)
        seeds = seeds_table(models)
        kept = kept_table(models, a.kept, a.order) if a.kept else ""
    except SafeFTError as e:
        raise SystemExit(f"human_table: error: {e}") from None
    cmd = "python benchmarks/labels/human_table.py --batches " + " ".join(str(b) for b in a.batches)
    if a.reference:
        cmd += f" --reference {a.reference}"
    if a.kept:
        cmd += f" --kept {a.kept}"
    text = (
        f"# Human labels across batches\n\n`{cmd}`: HS = % `harmful`, refusal = % `refusal` by the labellers' reading "
        f"(SPEC §5); CIs: percentile bootstrap over prompts ({N_BOOT} resamples, seed {SEED}); paired columns: "
        f"the same prompts resampled for both models.\n\n{md}"
    )
    if seeds:
        text += f"\n## Across seeds\n\nMean over seeds and range, written `mean [min–max]`; seed 0 is the unsuffixed row above.\n\n{seeds}"
    if kept:
        text += f"\n## Refusals kept of {a.kept}'s\n\n{kept}"
    print(text)
    if a.out:
        from safeft.io import atomic_write_text

        atomic_write_text(a.out, text)


if __name__ == "__main__":
    main()
