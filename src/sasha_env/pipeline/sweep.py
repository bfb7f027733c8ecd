"""``sasha sweep``: a W&B sweep file run locally, through Optuna.

The sweep file is W&B's format (https://docs.wandb.ai/guides/sweeps/define-sweep-configuration):

- ``method``: ``grid`` (Optuna's ``GridSampler``), ``random`` (``RandomSampler``) or
  ``bayes`` (``TPESampler``);
- ``metric``: ``{name, goal}``, ``name`` one of a trial's ``holdout/*`` keys
  (:mod:`~sasha_env.pipeline.trial`), ``goal`` ``maximize`` or ``minimize``;
- ``parameters``: per name ``value``, ``values``, or ``distribution`` with ``min``/``max``
  (``uniform``, ``int_uniform``, ``log_uniform_values``, ``log_uniform``, ``q_uniform`` with
  ``q``); names are ``agents`` fields (``algo`` included) plus ``frac`` and ``seed``;
- ``early_terminate``: ``{type: hyperband, min_iter, max_iter, eta}``: Optuna's
  ``HyperbandPruner`` over the trial's validations (one iteration = one validation);
- ``name``, ``run_cap`` (the default ``--count``); ``program`` and ``command`` are for
  ``wandb agent`` and not used here.

Each trial is one :func:`~sasha_env.pipeline.trial.run_trial` call, one W&B run (offline
unless asked) and one row of ``DIR/sweeps/NAME/trials.csv``. The Optuna study lives in
``DIR/sweeps/NAME/optuna.journal`` (a journal file): a killed sweep resumes, re-running the
trials that were cut short, until ``count`` trials have finished. When they have, the best
trial's agent, and only it, is evaluated on the test split (``best.json``).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..atomic import replace_atomically, write_json
from ..workdir import Workdir
from .trial import HOLDOUT, agent_config

__all__ = ["SweepSpec", "load_sweep", "run_sweep", "sweep_dir"]

METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "log_uniform_values",
                 "log_uniform", "q_uniform")  # fmt: skip
#: Top-level keys of W&B's format that a local sweep reads or may ignore.
KNOWN_KEYS = {"name", "description", "method", "metric", "parameters", "early_terminate",
              "run_cap", "program", "command", "entity", "project"}  # fmt: skip


@dataclass
class SweepSpec:
    """A parsed sweep file (W&B's format)."""

    name: str
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict]
    """Per name its W&B definition, with ``distribution`` filled in."""
    early_terminate: dict | None = None
    run_cap: int | None = None
    source: Path | None = None
    raw: dict = field(default_factory=dict)

    @property
    def direction(self) -> Any:
        return "maximize" if self.goal == "maximize" else "minimize"

    def grid(self) -> dict[str, list]:
        """The grid of a ``grid`` sweep: every non-constant parameter's values."""
        return {
            k: list(p["values"])
            for k, p in self.parameters.items()
            if p["distribution"] == "categorical"
        }

    def constants(self) -> dict[str, Any]:
        return {
            k: p["value"] for k, p in self.parameters.items() if p["distribution"] == "constant"
        }

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())


def _parameter(where: str, name: str, p: Any) -> dict:
    if not isinstance(p, Mapping):
        raise ValueError(
            f"{where}: parameters.{name} must be a mapping (value, values or distribution)"
        )
    p = dict(p)
    if "value" in p:
        return {"distribution": "constant", "value": p["value"]}
    if "values" in p:
        if not isinstance(p["values"], list) or not p["values"]:
            raise ValueError(f"{where}: parameters.{name}.values must be a non-empty list")
        return {"distribution": "categorical", "values": list(p["values"])}
    dist = p.get("distribution")
    if dist is None and "min" in p and "max" in p:
        both_int = isinstance(p["min"], int) and isinstance(p["max"], int)
        dist = "int_uniform" if both_int else "uniform"
    if dist not in DISTRIBUTIONS:
        raise ValueError(
            f"{where}: parameters.{name}: distribution {dist!r} is not supported locally; use one "
            f"of {', '.join(DISTRIBUTIONS)} (or value/values)"
        )
    if "min" not in p or "max" not in p or not p["min"] < p["max"]:
        raise ValueError(f"{where}: parameters.{name} needs min < max for {dist}")
    if dist == "log_uniform_values" and p["min"] <= 0:
        raise ValueError(f"{where}: parameters.{name}: log_uniform_values needs min > 0")
    if dist == "q_uniform" and not p.get("q"):
        raise ValueError(f"{where}: parameters.{name}: q_uniform needs q")
    return {**p, "distribution": dist}


def load_sweep(path: str | os.PathLike, name: str | None = None) -> SweepSpec:
    """Read and check a sweep file (W&B's format); errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep file is a mapping (method, metric, parameters)")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {unknown}; W&B's sweep keys are {sorted(KNOWN_KEYS)}"
        )
    method = raw.get("method")
    if method not in METHODS:
        raise ValueError(f"{path}: method {method!r}: choose one of {', '.join(METHODS)}")
    metric = raw.get("metric") or {}
    mname, goal = metric.get("name"), metric.get("goal", "minimize")
    if goal not in ("maximize", "minimize"):
        raise ValueError(f"{path}: metric.goal {goal!r}: maximize or minimize")
    keys = ("auc", "f1", "accuracy", "ce", "score")
    if mname not in {f"{HOLDOUT}/{k}" for k in keys}:
        raise ValueError(
            f"{path}: metric.name {mname!r}: trials are scored on the holdout half of val, which "
            f"no checkpoint was selected on; use one of "
            f"{', '.join(f'{HOLDOUT}/{k}' for k in keys)} (val/* is the selection half)"
        )
    params = raw.get("parameters") or {}
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"{path}: parameters must be a non-empty mapping")
    parsed = {str(k): _parameter(str(path), str(k), v) for k, v in params.items()}
    try:
        agent_config({}, {k: _example(p) for k, p in parsed.items()})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if method == "grid":
        ranged = [
            k for k, p in parsed.items() if p["distribution"] not in ("constant", "categorical")
        ]
        if ranged:
            raise ValueError(f"{path}: a grid sweep needs value/values, not ranges, for {ranged}")
    early = raw.get("early_terminate")
    if early is not None:
        if not isinstance(early, Mapping) or early.get("type") != "hyperband":
            raise ValueError(f"{path}: early_terminate: only type hyperband is supported")
        if not (early.get("min_iter") or early.get("max_iter")):
            raise ValueError(f"{path}: early_terminate needs min_iter or max_iter")
    run_cap = raw.get("run_cap")
    return SweepSpec(
        name=str(name or raw.get("name") or path.stem),
        method=method,
        metric=mname,
        goal=goal,
        parameters=parsed,
        early_terminate=dict(early) if early else None,
        run_cap=int(run_cap) if run_cap else None,
        source=path,
        raw=raw,
    )


def _example(p: dict) -> Any:
    """One value of a parameter (for checking names and types before anything runs)."""
    dist = p["distribution"]
    if dist == "constant":
        return p["value"]
    if dist == "categorical":
        return p["values"][0]
    if dist == "int_uniform":
        return int(p["min"])
    if dist == "log_uniform":
        return math.exp(p["min"])
    return float(p["min"])


def suggest(trial: Any, spec: SweepSpec) -> dict[str, Any]:
    """The parameters of an Optuna ``trial`` under ``spec``'s definitions."""
    out: dict[str, Any] = {}
    for name, p in spec.parameters.items():
        dist = p["distribution"]
        if dist == "constant":
            out[name] = p["value"]
        elif dist == "categorical":
            out[name] = trial.suggest_categorical(name, p["values"])
        elif dist == "int_uniform":
            out[name] = trial.suggest_int(name, int(p["min"]), int(p["max"]))
        elif dist == "uniform":
            out[name] = trial.suggest_float(name, float(p["min"]), float(p["max"]))
        elif dist == "q_uniform":
            out[name] = trial.suggest_float(
                name, float(p["min"]), float(p["max"]), step=float(p["q"])
            )
        elif dist == "log_uniform_values":
            out[name] = trial.suggest_float(name, float(p["min"]), float(p["max"]), log=True)
        else:  # log_uniform: min and max are natural-log exponents (W&B's definition)
            out[name] = math.exp(trial.suggest_float(name, float(p["min"]), float(p["max"])))
    return out


def sweep_dir(wd: Workdir, name: str) -> Path:
    """``DIR/sweeps/NAME``: the sweep's study, trials and their agents."""
    return wd.root / "sweeps" / name


def _sampler(spec: SweepSpec, seed: int) -> Any:
    import optuna  # lazy: optuna, only for sweeps

    if spec.method == "grid":
        return optuna.samplers.GridSampler(spec.grid(), seed=seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(spec: SweepSpec) -> Any:
    import optuna  # lazy: as above

    e = spec.early_terminate
    if not e:
        return optuna.pruners.NopPruner()
    eta = int(e.get("eta", 3))
    max_iter = int(e["max_iter"]) if e.get("max_iter") else "auto"
    min_iter = int(e.get("min_iter") or max(1, int(e["max_iter"]) // eta**2))
    return optuna.pruners.HyperbandPruner(
        min_resource=min_iter, max_resource=max_iter, reduction_factor=eta
    )


def _study(spec: SweepSpec, folder: Path, seed: int) -> Any:
    import optuna  # lazy: as above
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))
    return optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=_sampler(spec, seed),
        pruner=_pruner(spec),
        direction=spec.direction,
        load_if_exists=True,
    )


def _recover(study: Any) -> int:
    """Trials left RUNNING by a killed sweep: marked failed, their parameters queued again."""
    from optuna.trial import TrialState  # lazy: as above

    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
    return len(stale)


def _finished(study: Any) -> int:
    from optuna.trial import TrialState  # lazy: as above

    done = (TrialState.COMPLETE, TrialState.PRUNED)
    return sum(t.state in done for t in study.get_trials(deepcopy=False))


def write_trials_csv(study: Any, spec: SweepSpec, path: Path) -> Path:
    """``trials.csv``: one row per trial (number, state, the metric, parameters, seconds,
    W&B run id, agent folder), from the study (the source of truth)."""
    names = list(spec.parameters)
    header = ["trial", "state", spec.metric, *names, "seconds", "wandb_run", "agent_dir", "error"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        params = t.user_attrs.get("params") or {}
        metric = t.user_attrs.get("metrics", {}).get(spec.metric)
        rows.append(
            [t.number, t.state.name.lower(), "" if metric is None else metric]
            + [params.get(n, t.params.get(n, "")) for n in names]
            + [t.user_attrs.get("seconds", ""), t.user_attrs.get("wandb_run", ""),
               t.user_attrs.get("agent_dir", ""), t.user_attrs.get("error", "")]
        )  # fmt: skip

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    replace_atomically(path, write)
    return path


@dataclass
class SweepRun:
    """What one process of a sweep needs to run trials (picklable, for ``--jobs``)."""

    workdir: str
    spec_path: str
    name: str
    base: dict
    count: int
    seed: int
    wandb_mode: str
    project: str


def _objective(run: SweepRun, spec: SweepSpec, study: Any) -> Any:
    import optuna  # lazy: as above

    from .trial import run_trial

    wd = Workdir(run.workdir)
    folder = sweep_dir(wd, spec.name)
    key = spec.metric.split("/", 1)[1]

    def objective(trial: Any) -> float:
        params = suggest(trial, spec)
        trial.set_user_attr("params", params)
        out = folder / "trials" / f"trial-{trial.number:04d}"
        wandb_run = None
        if run.wandb_mode != "disabled":
            import wandb  # lazy: W&B, when trials log to it

            mode: Any = run.wandb_mode  # offline or online

            wandb_run = wandb.init(
                project=run.project, group=spec.name, name=f"{spec.name}-{trial.number}",
                job_type="sweep-trial", dir=str(folder), mode=mode, reinit=True,
                config={"sweep": spec.name, "trial": trial.number, **params},
            )  # fmt: skip
            trial.set_user_attr("wandb_run", wandb_run.id)

        def report(metrics: dict[str, float], step: int) -> bool:
            value = metrics[key]
            if math.isnan(value):
                return False
            trial.report(value, step)
            return trial.should_prune()

        try:
            result = run_trial(wd, run.base, params, out, wandb_run=wandb_run, report=report)
        finally:
            if wandb_run is not None:
                wandb_run.finish()
        trial.set_user_attr("metrics", result["metrics"])
        trial.set_user_attr("seconds", result["seconds"])
        trial.set_user_attr("agent_dir", result["agent_dir"])
        if result["pruned"]:
            raise optuna.TrialPruned()
        return float(result["metrics"][spec.metric])

    return objective


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (``fcntl.flock``)."""
    import fcntl

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _work(run: SweepRun, worker: int = 0) -> int:
    """One worker: take trials until ``count`` are finished or running; returns its failures.

    Taking a trial (counting, then Optuna's ``ask``) holds a lock on the sweep folder, so
    workers never run more than ``count`` trials, and two workers never take the same queued
    grid point. Each worker's sampler has its own seed.
    """
    import optuna  # lazy: as above
    from optuna.trial import TrialState

    spec = load_sweep(run.spec_path, run.name)
    wd = Workdir(run.workdir)
    folder = sweep_dir(wd, spec.name)
    study = _study(spec, folder, run.seed + 7919 * worker + len(study_trials(spec, folder)))
    objective = _objective(run, spec, study)
    taken = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    failures = 0
    while failures < run.count:  # a setting that always fails must not loop for ever
        with _locked(folder / "ask.lock"):
            if sum(t.state in taken for t in study.get_trials(deepcopy=False)) >= run.count:
                return failures
            trial = study.ask()
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except (ValueError, RuntimeError, FloatingPointError) as exc:
            trial.set_user_attr("error", repr(exc)[:500])
            study.tell(trial, state=TrialState.FAIL)
            failures += 1
        else:
            study.tell(trial, value)
        with _locked(folder / "ask.lock"):
            write_trials_csv(study, spec, folder / "trials.csv")
    return failures


def _enqueue_grid(study: Any, spec: SweepSpec, count: int) -> None:
    """Queue the grid's points that no trial holds yet (at most ``count`` points in all), so
    that parallel workers take distinct points (Optuna's ``GridSampler`` alone may repeat one
    across processes)."""
    from optuna.trial import TrialState  # lazy: as above

    grid = spec.grid()
    names = list(grid)
    held = [  # a queued trial has its parameters as Optuna's fixed_params until it runs
        tuple({**t.system_attrs.get("fixed_params", {}), **t.params}.get(n) for n in names)
        for t in study.get_trials(deepcopy=False)
        if t.state != TrialState.FAIL
    ]
    for point in itertools.islice(itertools.product(*grid.values()), count):
        if point not in held:
            study.enqueue_trial(dict(zip(names, point, strict=True)))


def study_trials(spec: SweepSpec, folder: Path) -> list:
    """The trials recorded so far (none before the first run)."""
    if not (folder / "optuna.journal").is_file():
        return []
    return _study(spec, folder, 0).get_trials(deepcopy=False)


def run_sweep(
    wd: Workdir,
    spec: SweepSpec,
    base: dict,
    count: int | None = None,
    jobs: int = 1,
    seed: int = 0,
    wandb_mode: str = "offline",
    project: str = "sasha-sweep",
    log: Any = print,
) -> dict:
    """Run (or resume) a sweep until ``count`` trials have finished; then test the best.

    Args:
        wd: the pipeline workdir (HAFED, TSU, store; its val and test splits).
        spec: the sweep (:func:`load_sweep`).
        base: the ``agents`` section the trials' parameters apply to.
        count: finished trials wanted (default: ``run_cap``, or the grid's size).
        jobs: worker processes running trials side by side (one study, one journal file).
        seed: seed of the sampler (offset by the trials already run, so a resumed random
            sweep draws new points).
        wandb_mode: ``offline``, ``online`` or ``disabled``.
        project: the W&B project of the trials.
        log: where progress messages go.

    Returns:
        ``best.json``'s content: the best trial, its parameters, its holdout metrics and its
        test metrics.
    """
    if count is None:
        count = spec.run_cap or (spec.grid_size() if spec.method == "grid" else None)
        if count is None:
            raise ValueError(f"{spec.source}: a {spec.method} sweep needs --count N (or run_cap)")
    if spec.method == "grid" and count > spec.grid_size():
        count = spec.grid_size()
    if count < 1 or jobs < 1:
        raise ValueError("--count and --jobs must be >= 1")
    folder = sweep_dir(wd, spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    replace_atomically(folder / "sweep.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(spec.raw)))
    study = _study(spec, folder, seed)
    stale = _recover(study)
    if stale:
        log(f"[sweep] {stale} trial(s) cut short earlier: running them again")
    done = _finished(study)
    log(
        f"[sweep] {spec.name}: {done}/{count} trials finished; {spec.method}, {spec.metric} ({spec.goal})"
    )
    run = SweepRun(
        str(wd.root), str(spec.source), spec.name, dict(base), count, seed, wandb_mode, project
    )
    if spec.method == "grid":
        _enqueue_grid(study, spec, count)
    if jobs == 1:
        failed = _work(run)
    else:
        from ..processes import worker_pool  # lazy: --jobs only

        with worker_pool(jobs) as pool:
            failed = sum(f.result() for f in [pool.submit(_work, run, i) for i in range(jobs)])
    if failed:
        log(f"[sweep] {failed} trial(s) failed: their errors are in trials.csv")
    study = _study(spec, folder, seed)
    write_trials_csv(study, spec, folder / "trials.csv")
    return _best(wd, spec, base, study, folder, log)


def _finite(d: dict) -> dict:
    """``d`` with NaN values (an AUC on one class) as ``None``: strict JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


def _best(wd: Workdir, spec: SweepSpec, base: dict, study: Any, folder: Path, log: Any) -> dict:
    from optuna.trial import TrialState  # lazy: as above

    from .trial import evaluate_on_test

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    complete = [t for t in complete if t.value is not None and not math.isnan(t.value)]
    if not complete:
        raise RuntimeError(f"{folder}: no trial finished with a {spec.metric}; see trials.csv")
    sign = 1 if spec.goal == "maximize" else -1
    best = max(complete, key=lambda t: (sign * t.value, -t.number))
    path = folder / "best.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("trial") == best.number and old.get("test"):
            return old  # the chosen configuration was tested already
    params = best.user_attrs["params"]
    test = evaluate_on_test(wd, base, params, Path(best.user_attrs["agent_dir"]))
    out = {
        "sweep": spec.name,
        "trial": best.number,
        "metric": spec.metric,
        "value": best.value,
        "params": params,
        "holdout": _finite(best.user_attrs["metrics"]),
        "agent_dir": best.user_attrs["agent_dir"],
        "test": test,
        "trials_finished": _finished(study),
    }
    write_json(path, out)
    log(
        f"[sweep] best trial {best.number}: {spec.metric} = {best.value:.4f}; test AUC {test.get('auc')}"
    )
    return out
