"""The verbs that compare agents: ``sweep`` (a W&B sweep file run locally), ``trial`` (one
trial, what ``wandb agent`` runs) and ``benchmark`` (RL algorithms side by side)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from ..config import PRESETS, load_config
from ..workdir import Workdir
from .common import EXIT_OK, SubParsers, add_quiet


def _add_base(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, required=True, metavar="DIR", help="a pipeline workdir")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="take the agents settings from this preset (default: the workdir's config.yaml)",
    )
    p.add_argument(
        "--config", type=Path, default=None, metavar="YAML", help="YAML whose sections override it"
    )


def base_agents(args: argparse.Namespace) -> tuple[dict, str]:
    """``(agents section, where it came from)``: ``--preset``/``--config``, else the workdir's
    resolved ``config.yaml``, else the demo preset."""
    wd = Workdir(args.workdir)
    if not wd.root.is_dir():
        raise FileNotFoundError(f"{wd.root} does not exist: run 'sasha pipeline' first")
    if args.preset is None and args.config is None and wd.config.is_file():
        cfg = yaml.safe_load(wd.config.read_text()) or {}
        return dict(cfg.get("agents") or {}), str(wd.config)
    preset = args.preset or "demo"
    return dict(load_config(preset, args.config).get("agents") or {}), f"preset {preset}"


def add_sweep(sub: SubParsers) -> None:
    """Register ``sasha sweep SWEEP.yaml --workdir DIR``."""
    p = sub.add_parser(
        "sweep",
        help="run a W&B sweep file's trials locally (grid, random, bayes; pruning), resumable",
        description="Run the trials of a W&B sweep file (method grid/random/bayes, metric, "
        "parameters, early_terminate) on this machine through Optuna. Each trial trains an "
        "agent on the train split, keeps the checkpoint that scores best on one half of val and "
        "is scored on the other half (holdout/* keys); the best trial's agent alone is then "
        "evaluated on test. Writes DIR/sweeps/NAME/ (trials.csv, best.json, the study, each "
        "trial's agent and W&B run). Re-running resumes.",
    )
    p.add_argument("sweep", type=Path, metavar="SWEEP.yaml", help="the sweep file (W&B's format)")
    _add_base(p)
    p.add_argument("--count", type=int, default=None, help="finished trials wanted (default: run_cap, or the grid's size)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, help="trials run side by side (processes)")
    p.add_argument("--name", default=None, help="the sweep's name (default: its file's name key or stem)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument(
        "--wandb",
        choices=("offline", "online", "disabled"),
        default="offline",
        help="each trial's W&B run (default: offline; online needs `wandb login`)",
    )
    p.add_argument("--project", default="sasha-sweep", help="W&B project (default: sasha-sweep)")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ..pipeline.sweep import load_sweep, run_sweep  # lazy: optuna, SB3

    spec = load_sweep(args.sweep, args.name)
    base, source = base_agents(args)
    print(f"[sweep] agents settings from {source}")
    best = run_sweep(
        Workdir(args.workdir), spec, base, count=args.count, jobs=args.jobs, seed=args.seed,
        wandb_mode=args.wandb, project=args.project,
    )  # fmt: skip
    print(json.dumps(best, indent=2))
    return EXIT_OK


def _value(text: str) -> Any:
    """A ``--name=value`` argument of ``wandb agent`` as YAML reads it (numbers, bools, lists)."""
    value = yaml.safe_load(text)
    return text if value is None else value


def add_trial(sub: SubParsers) -> None:
    """Register ``sasha trial --workdir DIR [--NAME=VALUE ...]``."""
    p = sub.add_parser(
        "trial",
        allow_abbrev=False,  # --NAME=VALUE parameters must not match an option's prefix
        help="one sweep trial (what `wandb agent` runs): train, select on half of val, score on the other",
        description="One trial of a sweep: parameters as --NAME=VALUE (agents fields, frac, "
        "seed), as `wandb agent` passes them (command: [sasha, trial, --workdir, DIR, "
        "${args}]). Logs the training curves, val/* and holdout/* to a W&B run: under `wandb "
        "agent` in the agent's mode, else offline unless WANDB_MODE says otherwise.",
    )
    _add_base(p)
    p.add_argument("--out", type=Path, default=None, help="the agent's folder (default: DIR/sweeps/trials/<run id>)")  # fmt: skip
    p.add_argument("--project", default="sasha-sweep", help="W&B project when not under an agent")
    add_quiet(p)
    p.set_defaults(func=_cmd_trial, _accepts_extra=True)


def parse_params(extra: list[str]) -> dict[str, Any]:
    """``["--lr=3e-4", "--algo", "a2c"]`` -> ``{"lr": 0.0003, "algo": "a2c"}``."""
    params: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: give parameters as --NAME=VALUE")
        name, eq, text = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra):
                raise ValueError(f"--{name} needs a value")
            i += 1
            text = extra[i]
        params[name.replace("-", "_")] = _value(text)
        i += 1
    return params


def _cmd_trial(args: argparse.Namespace) -> int:
    import wandb  # lazy: W&B, only for this verb

    from ..pipeline.trial import agent_config, run_trial, trial_wandb_mode

    params = parse_params(args._extra)
    base, _ = base_agents(args)
    agent_config(base, params)  # bad names stop here, before a run is created
    mode: Any = trial_wandb_mode()
    run = wandb.init(
        project=args.project, mode=mode, dir=str(args.workdir), config=params,
        job_type="sweep-trial",
    )  # fmt: skip
    params = {**params, **{k: v for k, v in dict(run.config).items() if k in params}}
    wd = Workdir(args.workdir)
    out = args.out or wd.root / "sweeps" / "trials" / run.id
    try:
        result = run_trial(wd, base, params, out, wandb_run=run, progress=not args.quiet)
    finally:
        run.finish()
    print(json.dumps(result["metrics"]))
    return EXIT_OK


def add_benchmark(sub: SubParsers) -> None:
    """Register ``sasha benchmark --workdir DIR --algos ... --seeds ... --frac F --out OUT``."""
    p = sub.add_parser(
        "benchmark",
        help="RL algorithms side by side: rliable aggregates with stratified-bootstrap CIs",
        description="Train every algorithm x seed on each workdir's train split (a task per "
        "workdir), score the argmax policy on its test split, and write OUT/results.json, "
        "OUT/table.md and figures with rliable's aggregates (IQM, median, mean, optimality gap; "
        "95 % stratified-bootstrap intervals), performance profiles and probabilities of "
        "improvement. Runs are keyed on everything that defines them (algorithm, "
        "hyper-parameters, frac, preset, timesteps, seed, the workdir's models): a finished "
        "run is reused only when all of it matches.",
    )
    p.add_argument("--workdir", type=Path, nargs="+", required=True, metavar="DIR", help="pipeline workdir(s): one task each")  # fmt: skip
    p.add_argument("--algos", nargs="+", required=True, metavar="ALGO", help="maskable_ppo, ppo, ppo_unmasked, a2c, dqn")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", required=True, metavar="S", help="training seeds (runs)")  # fmt: skip
    p.add_argument("--frac", type=float, required=True, help="zoom budget f")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--preset", choices=PRESETS, default="demo", help="agents settings bundle (default: demo)")  # fmt: skip
    p.add_argument("--timesteps", type=int, default=None, help="steps per run (default: the hyper-parameter file's n_timesteps, else the preset's)")  # fmt: skip
    p.add_argument("--hyperparams", type=Path, default=None, metavar="DIR", help="RL-Zoo-format files <algo>.yml (default: the package's)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, help="runs trained side by side (processes)")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--wandb", choices=("offline", "online", "disabled"), default="disabled", help="log each run to W&B (default: disabled)")  # fmt: skip
    p.set_defaults(func=_cmd_benchmark)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from ..pipeline.benchmark import BenchmarkSpec, run_benchmark  # lazy: SB3, matplotlib

    spec = BenchmarkSpec(
        workdirs=[Path(w) for w in args.workdir], algos=list(args.algos), seeds=list(args.seeds),
        frac=args.frac, preset=args.preset, timesteps=args.timesteps,
        hyperparams=args.hyperparams, boot=args.boot, wandb=args.wandb,
    )  # fmt: skip
    out = run_benchmark(spec, args.out, jobs=args.jobs)
    print(out["table"])
    return EXIT_OK
