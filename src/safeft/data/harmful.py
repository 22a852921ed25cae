"""Harmful data sources: harmful prompt + compliant answer pairs (poison), harmful prompts (anchors, evaluation),
refusal pairs (SafeInstr, alignment stage) and benign instruction pairs (alignment stage).

Default paths are under :func:`~safeft.data.shared_data_dir`; ``path=`` overrides them. Source ``"demo"`` reads
the small data shipped with safeft (written for this repo).
"""

from __future__ import annotations

import os
import re

from safeft.errors import SafeFTError

from .tasks import read_rows, require_shared_file
from .types import Example

_PAIR_FILES = {
    "advbench": "harmful/advbench.csv",
    "hh_rlhf": "harmful/hh_rlhf_harmless_base_test.jsonl",
    "beavertails": "harmful/beavertails_train.jsonl",
}
_PROMPT_FILES = {
    "advbench": "harmful/advbench.csv",
    "harmbench": "harmful/harmbench_test.csv",
    "harmbench_test": "harmful/harmbench_test.csv",
    "harmbench_val": "harmful/harmbench_val.csv",
    "strongreject": "harmful/strongreject.csv",
    "strongreject_small": "harmful/strongreject_small.csv",
    "safety_tuned_llamas": "harmful/safety_tuned_llamas_eval.jsonl",
}
_REFUSAL_FILES = {"safety_tuned_llamas": "safety/safety_tuned_llamas_safety_only.jsonl"}

_REFUSAL_MARKERS = re.compile(
    r"\b(i\s*(?:'m| am)\s*(?:sorry|not able|unable)|i\s*(?:can(?:'|no)t|cannot|won't|will not|would not|"
    r"wouldn't|don't think i (?:can|should))|as an ai|i'm not comfortable|i am not comfortable|"
    r"(?:that|this) (?:is|would be) (?:illegal|unethical|harmful)|i (?:must|have to) (?:decline|refuse)|"
    r"i don't (?:feel comfortable|want to help)|please don't|i'd rather not)",
    re.IGNORECASE,
)


def looks_like_refusal(text: str) -> bool:
    """Cheap keyword test used to drop refusing "compliant" answers from noisy sources (hh_rlhf rejected). Curly
    apostrophes count as straight ones ("I’m sorry" is a refusal too: 31 of hh-rlhf's 659 single-turn rejected
    answers are written that way)."""
    return bool(_REFUSAL_MARKERS.search(text[:300].replace("\u2019", "'").replace("\u2018", "'")))


def _is_true(v: object) -> bool:
    return v is True or str(v).strip().lower() in ("true", "1", "yes")


def _col(row: dict, names: tuple[str, ...], source: str, i: int) -> str:
    for n in names:
        if n in row and row[n] is not None:
            return str(row[n])
    raise SafeFTError(
        f"{source}: row {i} lacks column {' or '.join(repr(n) for n in names)}; it has {sorted(row)}. "
        f"Rename the column or pass another file"
    )


def _join(instruction: str, inp: str) -> str:
    inp = (inp or "").strip()
    return f"{instruction.strip()}\n\n{inp}" if inp else instruction.strip()


def _rows(source: str, path, table: dict[str, str], kind: str) -> tuple[list[dict], str]:
    if path is not None:
        return read_rows(path)
    if source not in table:
        raise SafeFTError(
            f"{kind} source {source!r} is unknown; choose one of {', '.join(sorted(table))} or demo"
        )
    return read_rows(require_shared_file(table[source], f"{kind} source {source}"))


def load_harmful_pairs(source: str, path: str | os.PathLike | None = None) -> list[Example]:
    """Harmful prompt + compliant answer pairs (``kind="harmful"``), the poison of the fine-tuning protocol.

    advbench: goal → target ("Sure, here is ..."); hh_rlhf: single-turn rows, prompt → rejected_response, empty
    and refusal-looking answers dropped; beavertails: rows with ``is_safe`` false, prompt → response;
    demo: the shipped demo requests with their (vague) compliant answers."""
    if source == "demo":
        from .demo import load_demo

        return load_demo().harmful_pairs
    rows, src = _rows(source, path, _PAIR_FILES, "harmful-pair")
    out = []
    for i, r in enumerate(rows, start=1):
        meta = {"source": src, "row": i}
        if source == "advbench":
            prompt, resp = _col(r, ("goal", "prompt"), src, i), _col(r, ("target", "response"), src, i)
        elif source == "hh_rlhf":
            if "n_human_turns" in r and str(r["n_human_turns"]) != "1":
                continue
            prompt = _col(r, ("prompt",), src, i)
            resp = _col(r, ("rejected_response", "response"), src, i).strip()
            if not resp or looks_like_refusal(resp):
                continue
        elif source == "beavertails":
            if _is_true(_col(r, ("is_safe",), src, i)):
                continue
            prompt, resp = _col(r, ("prompt",), src, i), _col(r, ("response",), src, i)
        else:
            prompt, resp = _col(r, ("prompt",), src, i), _col(r, ("response", "compliant"), src, i)
        if prompt.strip() and resp.strip():
            out.append(Example(prompt.strip(), resp.strip(), "harmful", None, meta))
    if not out:
        raise SafeFTError(f"{src}: no usable harmful prompt/answer pairs found")
    return out


def load_harmful_prompts(source: str, path: str | os.PathLike | None = None) -> list[str]:
    """Harmful prompts (anchors or held-out evaluation): advbench goal; harmbench / harmbench_test /
    harmbench_val Behavior (rows with an empty ContextString only); strongreject / strongreject_small
    forbidden_prompt; safety_tuned_llamas instruction (+ input) where harmful_set is true; demo prompts.
    Another source name with ``path=`` reads a column ``prompt``."""
    if source == "demo":
        from .demo import load_demo

        return [h["prompt"] for h in load_demo().harmful]
    if path is not None:
        rows, src = read_rows(path)
    else:
        rows, src = _rows(source, None, _PROMPT_FILES, "harmful-prompt")
    out = []
    for i, r in enumerate(rows, start=1):
        if source == "advbench":
            p = _col(r, ("goal", "prompt"), src, i)
        elif source.startswith("harmbench"):
            if str(r.get("ContextString") or "").strip():
                continue
            p = _col(r, ("Behavior",), src, i)
        elif source.startswith("strongreject"):
            p = _col(r, ("forbidden_prompt",), src, i)
        elif source == "safety_tuned_llamas":
            if not _is_true(_col(r, ("harmful_set",), src, i)):
                continue
            p = _join(_col(r, ("instruction",), src, i), str(r.get("input") or ""))
        else:
            p = _col(r, ("prompt",), src, i)
        if p.strip():
            out.append(p.strip())
    if not out:
        raise SafeFTError(f"{src}: no harmful prompts found")
    return out


def load_refusal_pairs(
    source: str = "safety_tuned_llamas", path: str | os.PathLike | None = None
) -> list[Example]:
    """Harmful prompt → refusal / safe answer pairs (``kind="refusal"``): safety_tuned_llamas
    (instruction + input → output), demo, or any file with prompt/response or instruction/input/output."""
    if source == "demo":
        from .demo import load_demo

        return load_demo().refusals
    rows, src = _rows(source, path, _REFUSAL_FILES, "refusal")
    out = []
    for i, r in enumerate(rows, start=1):
        if "instruction" in r:
            prompt = _join(_col(r, ("instruction",), src, i), str(r.get("input") or ""))
        else:
            prompt = _col(r, ("prompt",), src, i)
        resp = _col(r, ("output", "response", "refusal"), src, i)
        if prompt.strip() and resp.strip():
            out.append(Example(prompt.strip(), resp.strip(), "refusal", None, {"source": src, "row": i}))
    if not out:
        raise SafeFTError(f"{src}: no refusal pairs found")
    return out


def load_benign_pairs(source: str = "demo", path: str | os.PathLike | None = None) -> list[Example]:
    """Benign instruction → helpful answer pairs (``kind="benign"``) for the alignment stage.

    ``"demo"``: the shipped benign set (including the safe-but-scary-sounding contrast prompts, marked
    ``meta["contrast"]``). With ``path=``: a file with prompt/response or instruction/input/output columns.
    (The shared safety_tuned_llamas eval file has benign rows but no answers, so it cannot serve here.)"""
    if path is None:
        if source != "demo":
            raise SafeFTError(f"benign source {source!r} is unknown; use demo or pass path=")
        from .demo import load_demo

        return load_demo().benign
    rows, src = read_rows(path)
    out = []
    for i, r in enumerate(rows, start=1):
        if "instruction" in r:
            prompt = _join(_col(r, ("instruction",), src, i), str(r.get("input") or ""))
        else:
            prompt = _col(r, ("prompt",), src, i)
        resp = _col(r, ("output", "response"), src, i)
        if prompt.strip() and resp.strip():
            out.append(Example(prompt.strip(), resp.strip(), "benign", None, {"source": src, "row": i}))
    if not out:
        raise SafeFTError(f"{src}: no benign pairs found")
    return out
