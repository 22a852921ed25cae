"""``safeft bench``: every defense on the same work — harmful score, fine-tune accuracy, cost — from a preset
(``benchmarks/presets/*.yaml``), one cached subprocess per cell, with summary.json, results.md and pareto.png."""

from safeft.bench.preset import Cell, Preset, config_hash, load_preset, plan_cells
from safeft.bench.report import build_rows, write_reports
from safeft.bench.runner import run_bench

__all__ = [
    "Cell",
    "Preset",
    "build_rows",
    "config_hash",
    "load_preset",
    "plan_cells",
    "run_bench",
    "write_reports",
]
