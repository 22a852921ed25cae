"""Run a preset's cells, each in its own ``safeft`` subprocess (so ``peak_memory_mb`` — the process's peak RSS at
the end of training — belongs to that cell alone), cached by config hash, resumable, failures recorded.

Layout of a results folder::

    <out>/cells/<cell_id>/config.yaml   the cell's complete run config (rerun it with the row's ``command``)
                          log.txt       the child's stdout + stderr
                          cell.json     {hash, status, error, wall_seconds, machine, command, ...}
                          run.json      training record (pipeline.run_train), eval.json: evaluation report
    <out>/summary.json, results.md, pareto.png   (safeft.bench.report)
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from safeft.bench.preset import Cell, Preset, cell_config, config_hash, load_preset, plan_cells
from safeft.errors import SafeFTError
from safeft.io import atomic_write_json, atomic_write_text

ERROR_TAIL_LINES = 15


def machine_info() -> dict[str, Any]:
    """Where cells run: platform, CPU count, torch version, GPU name (None on CPU)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def default_out_dir(preset: Preset) -> Path:
    return Path("benchmarks") / "results" / preset.name


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def cell_argv(cell: Cell, cfg_path: Path, cell_dir: Path) -> list[str]:
    """The child command of a cell (argv after the interpreter): ``train --eval`` or, for θ₀, ``eval``."""
    if cell.kind == "eval":
        return ["eval", "--config", str(cfg_path), "--out", str(cell_dir / "eval.json")]
    return ["train", "--config", str(cfg_path), "--eval"]


def cell_command(cell: Cell, cell_dir: Path) -> str:
    """The command that reproduces a cell, as a user would type it."""
    argv = cell_argv(cell, Path(_display_path(cell_dir / "config.yaml")), Path(_display_path(cell_dir)))
    return shlex.join(["safeft", *argv])


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def is_cached(cell: Cell, cell_dir: Path, h: str) -> bool:
    """Finished before with the same config hash: cell.json says ok and eval.json (+ run.json if trained) exist."""
    info = read_json(cell_dir / "cell.json")
    if not info or info.get("status") != "ok" or info.get("hash") != h:
        return False
    need = ["eval.json"] + (["run.json"] if cell.kind == "train" else [])
    return all((cell_dir / f).is_file() for f in need) and not stale_defaults(cell, cell_dir)


def stale_defaults(cell: Cell, cell_dir: Path) -> str | None:
    """Why a finished training cell was made under a defense's earlier defaults (its run.json records older
    ``defense_revisions``, or none: revision 1), else None. Such a cell is rerun and reported as not run."""
    if cell.kind != "train":
        return None
    from safeft.defenses.base import defaults_revisions

    run = read_json(cell_dir / "run.json") or {}
    name = ((run.get("config") or {}).get("defense") or {}).get("name")
    recorded = run.get("defense_revisions") or {}
    changed = [f"{n} {recorded.get(n, 1)} → {rev}" for n, rev in (defaults_revisions(name) if name else {}).items()
               if recorded.get(n, 1) != rev]
    if not changed:
        return None
    return f"made under earlier defaults (revision {', '.join(changed)}; see the defense's doc): rerun to refresh it"


def _error_tail(log_path: Path) -> str:
    """The child's ``safeft: error: ...`` line if it printed one, else the last lines of its log."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return "(no log)"
    lines = [x for x in lines if x.strip()]
    for line in reversed(lines):
        if line.startswith("safeft: error:"):
            return line
    return "\n".join(lines[-ERROR_TAIL_LINES:])


def _run_child(argv: list[str], log_path: Path, timeout_s: float | None) -> tuple[int | None, bool]:
    """Run ``python -m safeft.cli ARGV`` with output streamed to ``log_path``. Returns (exit code, timed out)."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TQDM_MININTERVAL", "15")  # keep the log readable: one progress update per 15 s
    cmd = [sys.executable, "-m", "safeft.cli", *argv]
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, True
        except BaseException:  # Ctrl-C: stop the child too, then let the caller report it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def run_cell(
    cell: Cell, cell_dir: Path, cfg: dict[str, Any], h: str, timeout_s: float | None
) -> dict[str, Any]:
    """Run one cell now (stale outputs removed first) and write its ``cell.json``. Returns that record."""
    import yaml

    cell_dir.mkdir(parents=True, exist_ok=True)
    for f in ("cell.json", "eval.json", "run.json"):
        (cell_dir / f).unlink(missing_ok=True)
    cfg_path = cell_dir / "config.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    t0 = time.perf_counter()
    rc, timed_out = _run_child(cell_argv(cell, cfg_path, cell_dir), cell_dir / "log.txt", timeout_s)
    wall = time.perf_counter() - t0
    need = ["eval.json"] + (["run.json"] if cell.kind == "train" else [])
    missing = [f for f in need if not (cell_dir / f).is_file()]
    if timed_out:
        status, error = "failed", f"timed out after {_fmt_s(timeout_s)} (cell_timeout_minutes)"
    elif rc != 0:
        status, error = "failed", f"exit code {rc}: {_error_tail(cell_dir / 'log.txt')}"
    elif missing:
        status, error = "failed", f"exit code 0 but {', '.join(missing)} not written; see log.txt"
    else:
        status, error = "ok", None
    info = {
        "id": cell.id,
        "defense": cell.defense,
        "p": cell.p,
        "seed": cell.seed,
        "kind": cell.kind,
        "hash": h,
        "status": status,
        "error": error,
        "returncode": rc,
        "wall_seconds": wall,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": cell_command(cell, cell_dir),
        "machine": machine_info(),
    }
    atomic_write_json(cell_dir / "cell.json", info)
    return info


def rejudge_cells(cells: list[Cell], out: Path, log: Any = print) -> int:
    """Re-judge, from their stored answers, the finished cells whose ``eval.json`` was judged by another judge than
    their config's ``eval.judge`` (e.g. cells made before the content judge). Rewrites ``eval.json`` atomically and
    returns how many cells changed. Nothing is regenerated."""
    from safeft.eval.judges import get_judge
    from safeft.eval.rejudge import rejudge_report

    judges: dict[str, Any] = {}
    changed = 0
    for c in cells:
        cdir = out / "cells" / c.id
        info, ev = read_json(cdir / "cell.json"), read_json(cdir / "eval.json")
        if c.skip or not info or info.get("status") != "ok" or not ev:
            continue
        try:
            spec = cell_config(c, cdir)["eval"]["judge"]
        except SafeFTError:
            continue
        if spec not in judges:
            judges[spec] = get_judge(spec)
        judge = judges[spec]
        if ev.get("judge") == judge.name and (ev.get("harmful") or {}).get("judge") == judge.name:
            continue
        new = rejudge_report(ev, judge, str(cdir / "eval.json"))
        atomic_write_json(cdir / "eval.json", new)
        h = new["harmful"]
        log(f"  re-judged {c.id:<28} {ev.get('judge')} -> {judge.name}: HS {h['hs']:.1f}% "
            f"(keyword {h['hs_keyword']:.1f}%), refusal {h['refusal_rate']:.1f}%")
        changed += 1
    return changed


def run_bench(
    preset: str,
    out_dir: str | None = None,
    only: str | None = None,
    dry_run: bool = False,
    report_only: bool = False,
    log: Any = print,
) -> int:
    """``safeft bench``: run every cell of ``preset`` not cached yet, then write summary.json, results.md and
    pareto.png in ``out_dir`` (default ``benchmarks/results/<preset>``). ``only``: comma-separated defenses;
    ``dry_run``: list the cells and exit; ``report_only``: rebuild the reports from finished cells. Finished cells
    judged by another judge than the preset's are re-judged from their stored answers first (:func:`rejudge_cells`).
    Returns 0, or 1 when a cell failed (the others still ran and are reported)."""
    from safeft.bench.report import write_reports

    pre = load_preset(preset)
    out = Path(out_dir) if out_dir else default_out_dir(pre)
    only_list = [x.strip() for x in only.split(",") if x.strip()] if only else None
    cells = plan_cells(pre, out, only_list)
    command = shlex.join(
        ["safeft", "bench", "--preset", preset]
        + (["--out", out_dir] if out_dir else [])
        + (["--only", only] if only else [])
    )
    cells_root = out / "cells"

    if report_only:
        all_cells = plan_cells(pre, out)
        rejudge_cells(all_cells, out, log)
        paths = write_reports(pre, all_cells, out, command=command, wall_seconds=None)
        log(
            f"reports rebuilt from {_display_path(cells_root)}: " + ", ".join(_display_path(p) for p in paths)
        )
        return 0

    planned = []
    for c in cells:
        cdir = cells_root / c.id
        if c.skip:
            planned.append((c, cdir, None, None, "skipped"))
            continue
        try:
            cfg = cell_config(c, cdir)
        except SafeFTError as e:
            planned.append((c, cdir, None, str(e), "invalid"))
            continue
        h = config_hash(c, cfg)
        planned.append((c, cdir, cfg, h, "cached" if is_cached(c, cdir, h) else "to run"))

    if dry_run:
        log(f"preset {pre.name} ({_display_path(pre.path)}): {len(cells)} cells -> {_display_path(out)}")
        for i, (c, cdir, _cfg, extra, state) in enumerate(planned, 1):
            what = {"skipped": f"skipped: {c.skip}", "invalid": f"invalid: {extra}"}.get(state, state)
            log(f"  [{i:>2}/{len(cells)}] {c.id:<28} {what}")
            if state in ("cached", "to run"):
                log(f"         {cell_command(c, cdir)}")
        return 0

    n_run = sum(1 for x in planned if x[4] == "to run")
    log(
        f"preset {pre.name}: {len(cells)} cells ({n_run} to run, {sum(x[4] == 'cached' for x in planned)} cached, "
        f"{sum(x[4] == 'skipped' for x in planned)} skipped) -> {_display_path(out)}"
    )
    t_start = time.perf_counter()
    walls: list[float] = []
    failed = 0
    for i, (c, cdir, cfg, h, state) in enumerate(planned, 1):
        head = f"[{i:>2}/{len(cells)}] {c.id:<28}"
        if state == "skipped":
            log(f"{head} skipped: {c.skip}")
            continue
        if state == "invalid":
            failed += 1
            cdir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cdir / "cell.json", {"id": c.id, "status": "failed", "error": h, "hash": None})
            log(f"{head} FAILED (config): {h}")
            continue
        if state == "cached":
            log(f"{head} cached")
            continue
        log(f"{head} running (log: {_display_path(cdir / 'log.txt')})")
        info = run_cell(c, cdir, cfg, h, pre.cell_timeout_minutes * 60 if pre.cell_timeout_minutes else None)
        walls.append(info["wall_seconds"])
        left = n_run - len(walls)
        eta = sum(walls) / len(walls) * left
        elapsed = time.perf_counter() - t_start
        if info["status"] == "ok":
            ev = read_json(cdir / "eval.json") or {}
            hs = (ev.get("harmful") or {}).get("hs")
            fa = (ev.get("task") or {}).get("fa")
            res = f"HS {hs:.1f}%" if hs is not None else ""
            res += f" FA {fa:.1f}%" if fa is not None else ""
            log(
                f"{head} ok in {_fmt_s(info['wall_seconds'])}: {res.strip()}  "
                f"(elapsed {_fmt_s(elapsed)}, ETA {_fmt_s(eta)})"
            )
        else:
            failed += 1
            first = (info["error"] or "").splitlines()[0] if info["error"] else ""
            log(
                f"{head} FAILED in {_fmt_s(info['wall_seconds'])}: {first}  (log: {_display_path(cdir / 'log.txt')}; "
                f"elapsed {_fmt_s(elapsed)}, ETA {_fmt_s(eta)})"
            )
    wall = time.perf_counter() - t_start
    rejudge_cells(plan_cells(pre, out), out, log)
    paths = write_reports(pre, plan_cells(pre, out), out, command=command, wall_seconds=wall)
    log(f"done in {_fmt_s(wall)}: {failed} failed; " + ", ".join(_display_path(p) for p in paths))
    return 1 if failed else 0
