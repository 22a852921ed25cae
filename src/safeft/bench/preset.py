"""Benchmark presets: a YAML file naming shared settings, a grid (p × defenses × seeds) and per-defense options,
expanded into cells — one fine-tuning run (or the un-fine-tuned θ₀, ``aligned``) each.

Preset keys::

    name: tiny                      # defaults to the file name
    description: one line
    base: {dotted.key: value}       # config overrides applied to every cell (nested mappings are flattened)
    grid: {p: [0.1], defenses: [sft, cwac, cwac@lam5], seeds: [0]}   # seeds set training.seed
                                    # or a list of such blocks; the cells are their union, e.g.
                                    # [{p: [0.1], defenses: [sft, cwac, lisa]}, {p: [0, 0.2], defenses: [sft, cwac]},
                                    #  {defenses: [sft, cwac], seeds: [1, 2]}]
    defense_options: {cwac: {n_anchor: 60}, cwac@lam5: {lam: 5.0}}
                                    # cwac-weight / cwac-activation fall back to cwac's options
    overrides: {pact@authors: {training.lr: 3.0e-5, training.lora_targets: [q_proj, v_proj]}}
                                    # config keys of one grid entry's cells (after base); p, seed and the
                                    # defense name stay the grid's

A grid entry ``NAME@LABEL`` is a *variant*: defense ``NAME`` run with ``defense_options[NAME]`` updated by
``defense_options[NAME@LABEL]``, reported as its own row (``cwac@lam5``). Use variants to compare settings of one
defense side by side, e.g. in a tuning preset on a validation split.
    include_aligned: true           # add the θ₀ row (evaluated, not trained)
    cell_timeout_minutes: 30        # a cell running longer is stopped and recorded as failed (null = no limit)

String values may use ``${VAR}`` / ``${VAR:-default}`` (environment variables) and ``${BENCH_OUT}`` (the results
folder), e.g. ``model.aligned: ${SAFEFT_SMOKE_MODEL}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeft.config import without_idle_monitor
from safeft.errors import SafeFTError

PRESET_KEYS = {
    "name",
    "description",
    "base",
    "grid",
    "defense_options",
    "overrides",
    "include_aligned",
    "cell_timeout_minutes",
}
GRID_KEYS = {"p", "defenses", "seeds"}
ALIGNED = "aligned"
_GRID_OWNED = {"data.p", "training.seed"}  # a grid axis sets these in every cell
# config keys that do not change a cell's result (left out of its cache hash)
# (the judge too: it never changes the answers, and a cell judged by another judge is re-judged from its eval.json)
_UNHASHED = {("training", "output_dir"), ("training", "progress"), ("training", "resume"), ("eval", "judge")}
# config keys added after cells were committed, with the value that leaves a cell's result as it was
_ADDED_OFF = {("eval", "n_copyright"): 0, ("data", "poison_share"): 1.0}
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


@dataclass
class Preset:
    """A parsed preset. ``base``: flat dotted overrides; ``path``: the YAML file it came from."""

    name: str
    description: str
    base: dict[str, Any]
    p: list[float]
    defenses: list[str]
    seeds: list[int]
    defense_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    include_aligned: bool = True
    # the grid's blocks (p, defenses, seeds): one for a grid mapping, several for a list of them (cells = union)
    blocks: list[tuple[list[float], list[str], list[int]]] = field(default_factory=list)
    cell_timeout_minutes: float | None = None
    path: Path | None = None


@dataclass
class Cell:
    """One benchmark cell. ``kind``: "eval" (θ₀ untouched) or "train" (fine-tune + eval); ``overrides``: the full
    dotted config of the cell except its output dir; ``skip``: why it is not run (None = it runs)."""

    id: str
    defense: str
    p: float | None
    seed: int
    kind: str
    overrides: dict[str, Any]
    skip: str | None = None


def presets_dir() -> Path:
    """``benchmarks/presets`` of this checkout (next to ``src/``), else of the current folder."""
    repo = Path(__file__).resolve().parents[3] / "benchmarks" / "presets"
    return repo if repo.is_dir() else Path.cwd() / "benchmarks" / "presets"


def find_preset(name_or_path: str) -> Path:
    """A preset name (``tiny`` → ``benchmarks/presets/tiny.yaml``, looked up in the cwd first) or a YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise SafeFTError(f"--preset {name_or_path}: file not found")
        return p
    for d in (Path.cwd() / "benchmarks" / "presets", presets_dir()):
        f = d / f"{name_or_path}.yaml"
        if f.is_file():
            return f
    avail = sorted(f.stem for f in presets_dir().glob("*.yaml"))
    raise SafeFTError(
        f"--preset {name_or_path}: no such preset; choose from {', '.join(avail) or '(none found)'} or pass a YAML path"
    )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        # defense.options.<name> stays a mapping: it is one value
        if isinstance(v, dict) and not key.startswith("defense.options"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def expand_vars(value: Any, where: str, out_dir: Path | None) -> Any:
    """Replace ``${VAR}``, ``${VAR:-default}`` and ``${BENCH_OUT}`` in strings (recursively in lists/dicts)."""
    if isinstance(value, dict):
        return {k: expand_vars(v, f"{where}.{k}", out_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_vars(v, where, out_dir) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if var == "BENCH_OUT":
            if out_dir is None:
                raise SafeFTError(f"{where}: ${{BENCH_OUT}} is only known once the results folder is set")
            return str(out_dir.resolve())
        if var in os.environ and os.environ[var] != "":
            return os.environ[var]
        if default is not None:
            return default
        raise SafeFTError(
            f"{where} uses ${{{var}}}, which is not set: export {var}=... (see benchmarks/RUNNING.md)"
        )

    return _VAR.sub(sub, value)


def load_preset(name_or_path: str) -> Preset:
    """Read and validate a preset (unknown keys, empty grids, unknown defenses and bad config values are refused
    with a message naming the file and key). ``${...}`` variables are expanded later, by :func:`plan_cells`."""
    import yaml

    from safeft.defenses import defense_names
    from safeft.defenses.base import parse_defense_spec

    path = find_preset(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SafeFTError(
            f"{path}{f':{mark.line + 1}' if mark else ''}: malformed YAML ({getattr(e, 'problem', e)})"
        ) from None
    if not isinstance(data, dict):
        raise SafeFTError(f"{path}: a preset is a mapping with keys {', '.join(sorted(PRESET_KEYS))}")
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:
        raise SafeFTError(
            f"{path}: unknown preset key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(PRESET_KEYS))}"
        )
    base = data.get("base") or {}
    grid = {} if data.get("grid") is None else data["grid"]
    opts = data.get("defense_options") or {}
    overrides = data.get("overrides") or {}
    for key, val in (("base", base), ("defense_options", opts), ("overrides", overrides)):
        if not isinstance(val, dict):
            raise SafeFTError(f"{path}: {key} must be a mapping")
    if not isinstance(grid, (dict, list)) or (isinstance(grid, list) and not grid):
        raise SafeFTError(f"{path}: grid must be a mapping (p, defenses, seeds) or a non-empty list of them")
    blocks = [_grid_block(path, g, f"grid[{i}]" if isinstance(grid, list) else "grid")
              for i, g in enumerate(grid if isinstance(grid, list) else [grid])]
    defenses = list(dict.fromkeys(d for b in blocks for d in b[1]))
    known = set(defense_names())
    for d in defenses:
        if d == ALIGNED:
            raise SafeFTError(
                f"{path}: grid.defenses: 'aligned' is added by include_aligned: true, not listed"
            )
        spec, label = split_variant(str(d))
        if label is not None and (not re.fullmatch(r"[A-Za-z0-9_.=-]+", label) or "+" in spec):
            raise SafeFTError(
                f"{path}: grid.defenses: {d!r}: a variant is one defense name, '@' and a label of letters, "
                "digits, '_', '-', '.' or '=' (e.g. cwac@lam5)"
            )
        try:
            parse_defense_spec(spec)
        except SafeFTError as e:
            raise SafeFTError(f"{path}: grid.defenses: {e}") from None
    for d, o in opts.items():
        spec, label = split_variant(str(d))
        if label is not None:
            if d not in map(str, defenses):
                raise SafeFTError(
                    f"{path}: defense_options.{d}: variant not listed in grid.defenses; add it there or remove it"
                )
            d = spec
        if d not in known:
            raise SafeFTError(
                f"{path}: defense_options.{d}: unknown defense; choose from {', '.join(sorted(known))}"
            )
        if not isinstance(o, dict):
            raise SafeFTError(f"{path}: defense_options.{d} must be a mapping of that defense's settings")
    flat_overrides = {}
    for d, o in overrides.items():
        if str(d) not in map(str, defenses):
            raise SafeFTError(f"{path}: overrides.{d}: not an entry of grid.defenses; add it there or remove it")
        if not isinstance(o, dict):
            raise SafeFTError(f"{path}: overrides.{d} must be a mapping of config keys (e.g. training.lr: 3.0e-5)")
        flat = _flatten(o)
        fixed = sorted(k for k in flat if k in _GRID_OWNED or k.startswith("defense."))
        if fixed:
            raise SafeFTError(f"{path}: overrides.{d}.{fixed[0]}: set by the grid (p, seeds, defenses) or "
                              "defense_options, not here")
        flat_overrides[str(d)] = flat
    timeout = data.get("cell_timeout_minutes")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise SafeFTError(f"{path}: cell_timeout_minutes must be a positive number or null, got {timeout!r}")
    return Preset(
        name=str(data.get("name") or path.stem),
        description=str(data.get("description") or ""),
        base=_flatten(base),
        p=sorted({x for b in blocks for x in b[0]}) if len(blocks) > 1 else blocks[0][0],
        defenses=defenses,
        seeds=sorted({s for b in blocks for s in b[2]}) if len(blocks) > 1 else blocks[0][2],
        blocks=blocks,
        defense_options={str(k): dict(v) for k, v in opts.items()},
        overrides=flat_overrides,
        include_aligned=bool(data.get("include_aligned", True)),
        cell_timeout_minutes=float(timeout) if timeout is not None else None,
        path=path,
    )


def _grid_block(path: Path, grid: Any, where: str) -> tuple[list[float], list[str], list[int]]:
    """(p, defenses, seeds) of one grid mapping, checked."""
    if not isinstance(grid, dict):
        raise SafeFTError(f"{path}: {where} must be a mapping with keys p, defenses, seeds")
    bad = sorted(set(grid) - GRID_KEYS)
    if bad:
        raise SafeFTError(f"{path}: unknown {where} key(s) {', '.join(bad)}; allowed: p, defenses, seeds")
    p = grid.get("p", [0.1])
    defenses = grid.get("defenses", ["sft"])
    seeds = grid.get("seeds", [0])
    p = p if isinstance(p, list) else [p]
    seeds = seeds if isinstance(seeds, list) else [seeds]
    defenses = defenses if isinstance(defenses, list) else [defenses]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in p) or not p:
        raise SafeFTError(f"{path}: {where}.p must be a non-empty list of fractions in [0, 1], got {p!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or not seeds:
        raise SafeFTError(f"{path}: {where}.seeds must be a non-empty list of integers, got {seeds!r}")
    if not defenses:
        raise SafeFTError(f"{path}: {where}.defenses is empty; name at least one defense (see `safeft list`)")
    if len(set(map(str, defenses))) != len(defenses):
        raise SafeFTError(f"{path}: {where}.defenses lists an entry twice: {defenses!r}")
    return [float(x) for x in p], [str(d) for d in defenses], list(seeds)


def split_variant(entry: str) -> tuple[str, str | None]:
    """``"cwac@lam5"`` → ``("cwac", "lam5")``; ``"cwac"`` → ``("cwac", None)``."""
    spec, sep, label = str(entry).partition("@")
    return spec, (label if sep else None)


def options_for(preset: Preset, entry: str) -> dict[str, dict[str, Any]]:
    """``defense.options`` of a cell: the options of each defense in ``entry`` (``a+b``); an ablation variant
    ``cwac-weight`` without its own entry uses the options of ``cwac``; a labelled variant ``a@x`` (single defense)
    updates them with ``defense_options["a@x"]``."""
    from safeft.defenses.base import parse_defense_spec

    spec, label = split_variant(entry)
    out = {}
    for name in parse_defense_spec(spec):
        if name in preset.defense_options:
            out[name] = dict(preset.defense_options[name])
        elif "-" in name and name.split("-", 1)[0] in preset.defense_options:
            out[name] = dict(preset.defense_options[name.split("-", 1)[0]])
    if label is not None:
        out[spec] = {**out.get(spec, {}), **preset.defense_options.get(entry, {})}
    return out


def _skip_reason(preset: Preset, spec: str, base: dict[str, Any]) -> str | None:
    from safeft.defenses import get_defense_class
    from safeft.defenses.base import parse_defense_spec

    names = parse_defense_spec(spec)
    need_b = [n for n in names if get_defense_class(n).needs_base_model]
    if need_b and not base.get("model.base"):
        return f"needs the unaligned base model θ_b, which preset {preset.name} does not set (model.base)"
    lora = [n for n in names if get_defense_class(n).requires_lora]
    if lora and base.get("training.method", "lora") == "full":
        return "works on LoRA adapters only; this preset fine-tunes all weights (training.method: full)"
    return None


def plan_cells(preset: Preset, out_dir: Path | None = None, only: list[str] | None = None) -> list[Cell]:
    """Expand the preset into cells, in run order: ``aligned`` first, then block by block (a grid list's first
    block runs first, so put the headline table there), per p and seed ``sft`` first (the reference of the cost
    ratios) and the other defenses in grid order; a cell two blocks share runs once, with the first. ``only``
    keeps the named defenses ("aligned" included)."""
    base = expand_vars(preset.base, f"{preset.path or preset.name}: base", out_dir)
    order = (
        ["sft"] + [d for d in preset.defenses if d != "sft"]
        if "sft" in preset.defenses
        else list(preset.defenses)
    )
    cells: list[Cell] = []
    if preset.include_aligned:
        ov = dict(base)
        ov["defense.name"] = "sft"
        cells.append(Cell(ALIGNED, ALIGNED, None, preset.seeds[0], "eval", ov))
    blocks = preset.blocks or [(preset.p, preset.defenses, preset.seeds)]
    seen: set[tuple[float, int, str]] = set()
    for p, seed, d in ((p, s, d) for b in blocks for p in b[0] for s in b[2] for d in order if d in b[1]):
        if (p, seed, d) in seen:
            continue
        seen.add((p, seed, d))
        ov = dict(base)
        spec = split_variant(d)[0]
        ov.update(expand_vars(preset.overrides.get(d, {}), f"{preset.path}: overrides.{d}", out_dir))
        ov.update({"data.p": p, "training.seed": seed, "defense.name": spec})
        opts = options_for(preset, d)
        if opts:
            ov["defense.options"] = expand_vars(opts, f"{preset.path}: defense_options", out_dir)
        cells.append(Cell(f"p{p:g}-{d}-s{seed}", d, p, seed, "train", ov, _skip_reason(preset, spec, base)))
    if only:
        unknown = sorted(set(only) - {c.defense for c in cells})
        if unknown:
            raise SafeFTError(
                f"--only {','.join(only)}: {', '.join(unknown)} not in preset {preset.name} "
                f"(has: {', '.join(dict.fromkeys(c.defense for c in cells))})"
            )
        cells = [c for c in cells if c.defense in only]
    return cells


def cell_config(cell: Cell, cell_dir: Path) -> dict[str, Any]:
    """The validated, complete config dict of a cell (what its ``config.yaml`` holds)."""
    from safeft.config import build_config

    ov = dict(cell.overrides)
    ov["training.output_dir"] = str(cell_dir.resolve())
    try:
        return build_config(None, ov).to_dict()
    except SafeFTError as e:
        raise SafeFTError(f"cell {cell.id}: {e}") from None


def config_hash(cell: Cell, cfg: dict[str, Any]) -> str:
    """sha256 (16 hex) of what determines a cell's result: its config minus output dir / progress / resume; for
    the ``aligned`` cell (no training) only model, eval, alignment stage and data sources."""
    cfg = json.loads(json.dumps(cfg))
    for sec, key in _UNHASHED:
        cfg.get(sec, {}).pop(key, None)
    cfg = without_idle_monitor(cfg)
    for (sec, key), off in _ADDED_OFF.items():  # keys added later, at their "off" value: same hash as before them
        if cfg.get(sec, {}).get(key, off) == off:
            cfg.get(sec, {}).pop(key, None)
    if cell.kind == "eval":
        data = {k: v for k, v in cfg["data"].items() if k not in ("n", "p", "seed", "poison_share")}
        cfg = {"model": cfg["model"], "eval": cfg["eval"], "align": cfg["align"], "data": data}
    payload = json.dumps({"kind": cell.kind, "config": cfg}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
