"""Judge answers that were already generated: an ``eval.json`` report (its ``harmful`` and ``over_refusal`` records)
or a JSONL file of ``{"prompt", "answer"}`` records. Nothing is regenerated: a judge change never needs the model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from safeft.errors import SafeFTError
from safeft.eval.evaluate import outcome_summary, over_refusal_summary
from safeft.eval.judges import Judge


def _pairs(records: Any, where: str) -> tuple[list[str], list[str]]:
    if not isinstance(records, list) or not records:
        raise SafeFTError(f"{where}: expected a non-empty list of records with 'prompt' and 'answer'")
    prompts, answers = [], []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise SafeFTError(f"{where}[{i}]: expected an object with 'prompt' and 'answer'")
        for f in ("prompt", "answer"):
            if not isinstance(r.get(f), str):
                raise SafeFTError(f"{where}[{i}]: field {f!r} must be a string")
        if not r["prompt"].strip():
            raise SafeFTError(f"{where}[{i}]: field 'prompt' is empty")
        prompts.append(r["prompt"])
        answers.append(r["answer"])
    return prompts, answers


def rejudge_report(report: dict[str, Any], judge: Judge, source: str = "eval.json") -> dict[str, Any]:
    """A copy of an ``eval.json`` report with its harmful-prompt section (and over-refusal section, when present)
    recomputed by ``judge`` from the stored answers; ``report["judge"]`` names the new judge and
    ``report["judged_from_stored_answers"]`` is true. Raises :class:`SafeFTError` naming ``source`` and the field for
    a report of another format."""
    if not isinstance(report, dict) or not isinstance(report.get("harmful"), dict):
        raise SafeFTError(f"{source}: not a safeft eval report (no 'harmful' section); pass an eval.json written by "
                          "`safeft eval` / `safeft train --eval`, or a JSONL of {{prompt, answer}} records")
    out = copy.deepcopy(report)
    prompts, answers = _pairs(report["harmful"].get("records"), f"{source}: harmful.records")
    out["harmful"] = outcome_summary(prompts, answers, judge.outcomes(prompts, answers), judge.name)
    orr = report.get("over_refusal")
    if isinstance(orr, dict):
        sp, sa = _pairs(orr.get("records"), f"{source}: over_refusal.records")
        out["over_refusal"] = over_refusal_summary(sp, sa, judge.outcomes(sp, sa), judge.name)
    cr = report.get("copyright")
    if isinstance(cr, dict):
        cp, ca = _pairs(cr.get("records"), f"{source}: copyright.records")
        out["copyright"] = outcome_summary(cp, ca, judge.outcomes(cp, ca), judge.name)
    out["judge"] = judge.name
    out["judged_from_stored_answers"] = True
    return out


def read_judge_input(path: str | Path) -> tuple[str, Any]:
    """``("eval", report)`` for an eval.json, ``("jsonl", records)`` for a JSONL of ``{prompt, answer}`` records.
    One-line :class:`SafeFTError` naming the file (and line/field) for anything else."""
    from safeft.io import read_jsonl

    p = Path(path)
    if not p.is_file():
        raise SafeFTError(f"{p}: file not found; check the path")
    if p.suffix.lower() == ".jsonl":
        rows = read_jsonl(p)
        if not rows:
            raise SafeFTError(f"{p}: no records; each line must be {{\"prompt\": ..., \"answer\": ...}}")
        for i, r in enumerate(rows, start=1):
            for f in ("prompt", "answer"):
                if not isinstance(r.get(f), str):
                    raise SafeFTError(f"{p}:{i}: field {f!r} is missing or not a string")
            if not r["prompt"].strip():
                raise SafeFTError(f"{p}:{i}: field 'prompt' is empty")
        return "jsonl", rows
    try:
        obj = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SafeFTError(f"{p}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise SafeFTError(f"{p}:{e.lineno}: malformed JSON ({e.msg}); pass an eval.json or a .jsonl file") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("harmful"), dict):
        raise SafeFTError(f"{p}: not a safeft eval report (no 'harmful' section); pass an eval.json or a JSONL of "
                          "{prompt, answer} records")
    return "eval", obj


def judge_file(path: str | Path, judge: Judge) -> tuple[str, Any]:
    """Judge a file read by :func:`read_judge_input`: the re-judged report, or the records (in input order) each with
    an ``outcome`` field added."""
    kind, obj = read_judge_input(path)
    if kind == "eval":
        return kind, rejudge_report(obj, judge, str(path))
    prompts = [r["prompt"] for r in obj]
    answers = [r["answer"] for r in obj]
    outcomes = judge.outcomes(prompts, answers)
    return kind, [{**r, "outcome": o} for r, o in zip(obj, outcomes)]
