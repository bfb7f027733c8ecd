"""``sasha benchmark``: RL algorithms on ``Sasha-WSI-v0`` side by side, with rliable's statistics.

A *task* is one pipeline workdir (one cohort split with its HAFED and TSU); a *run* is one
agent-training seed on it. For every algorithm, task and seed the benchmark trains an agent on
the task's train split (``protocol: sb3``, the last policy kept: no validation selection, so
the algorithms are compared as they learn), scores the argmax policy on the test split, and
aggregates test AUC over runs × tasks as rliable does (Agarwal et al., 2021), with the
statistics of :mod:`sasha_models.stats`: IQM, median, mean and optimality gap (γ = 1) with 95 %
stratified-bootstrap intervals, performance profiles, and the probability of improvement of
each algorithm over the others.

Runs are keyed on everything that defines them: the algorithm, its full resolved settings
(preset, hyper-parameter file, budget), f, the seed, the task's models (hashes of HAFED,
TSU and the manifest) and the version of the agents stage's code (the pipeline's own cache
marker, raised when training changes what it produces). A run's folder is
``OUT/runs/<task>/<algo>-s<seed>-<key>/`` and it is reused only when its ``result.json``
holds the same key: nothing stale is ever reported.

Hyper-parameters come from RL-Zoo-format files ``<algo>.yml`` (``Sasha-WSI-v0: {...}``), by
default the package's (:data:`HYPERPARAMS`).
"""

from __future__ import annotations

import ast
import csv
import gc
import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..agents.config import ALGORITHMS, AgentConfig
from ..atomic import replace_atomically, write_json
from ..config import load_config
from ..workdir import Workdir

__all__ = ["ENV_ID", "HYPERPARAMS", "BenchmarkSpec", "load_hyperparams", "run_benchmark"]

ENV_ID = "Sasha-WSI-v0"
#: The package's RL-Zoo-format hyper-parameter files, one per algorithm.
HYPERPARAMS = Path(__file__).parent / "hyperparams"
#: The algorithm the others are compared with in ``table.md``.
REFERENCE = "maskable_ppo"
#: Zoo keys that describe the run, not an SB3 argument.
_ZOO_ONLY = {"policy", "n_timesteps"}
#: Zoo keys the benchmark cannot honour (env wrappers and normalisation change the task).
_REFUSED = {"normalize", "env_wrapper", "frame_stack", "callback", "vec_env_wrapper"}


@dataclass
class BenchmarkSpec:
    """What a benchmark compares (``sasha benchmark``'s options)."""

    workdirs: list[Path]
    algos: list[str]
    seeds: list[int]
    frac: float
    preset: str = "demo"
    timesteps: int | None = None
    hyperparams: Path | None = None
    boot: int = 2000
    wandb: str = "disabled"


def _safe_literal(text: str, where: str) -> Any:
    """A Zoo ``policy_kwargs`` string such as ``"dict(net_arch=[128])"``, read without eval."""

    def value(node: ast.AST) -> Any:
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "dict"
        ):
            if node.args:
                raise ValueError
            return {k.arg: value(k.value) for k in node.keywords}
        if isinstance(node, (ast.List, ast.Tuple)):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            return {value(k): value(v) for k, v in zip(node.keys, node.values, strict=False)}  # type: ignore[arg-type]
        if isinstance(node, ast.Constant):
            return node.value
        raise ValueError

    try:
        return value(ast.parse(text, mode="eval").body)
    except (ValueError, SyntaxError):
        raise ValueError(
            f"{where}: policy_kwargs {text!r}: only dict(...), lists, numbers and strings are "
            "read (nothing is evaluated)"
        ) from None


def load_hyperparams(algo: str, folder: Path | None = None) -> tuple[dict, int | None, Path]:
    """``(agents settings, n_timesteps or None, file)`` of ``algo`` from ``folder/<algo>.yml``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no ``Sasha-WSI-v0`` entry, or a key the benchmark cannot honour.
    """
    path = Path(folder or HYPERPARAMS) / f"{algo}.yml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no hyper-parameters for {algo} (RL Zoo format: {ENV_ID}: ...)")  # fmt: skip
    raw = yaml.safe_load(path.read_text()) or {}
    entry = raw.get(ENV_ID)
    if not isinstance(entry, dict):
        raise ValueError(
            f"{path}: no {ENV_ID} entry (RL Zoo format: the env id, then its settings)"
        )
    agent_fields = {f.name for f in fields(AgentConfig)}
    settings: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, val in entry.items():
        if key in _REFUSED:
            raise ValueError(
                f"{path}: {key} is not supported by the benchmark (it changes the task)"
            )
        if key in _ZOO_ONLY:
            continue
        if key == "policy_kwargs":
            if algo != "dqn":
                raise ValueError(
                    f"{path}: policy_kwargs: the SASHA policy takes d_hidden, use that key"
                )
            extra[key] = _safe_literal(val, str(path)) if isinstance(val, str) else val
        elif key in agent_fields:
            settings[key] = val
        else:
            extra[key] = val
    steps = entry.get("n_timesteps")
    if extra:
        settings["extra"] = extra
    return settings, None if steps is None else int(steps), path


def agent_settings(spec: BenchmarkSpec, algo: str) -> tuple[AgentConfig, int]:
    """The resolved :class:`AgentConfig` of ``algo`` and its budget: the preset's ``agents``,
    then the hyper-parameter file, then the benchmark's own settings (f, budget, sb3 protocol,
    no validation selection)."""
    if algo not in ALGORITHMS:
        raise ValueError(f"--algos {algo!r}: choose from {', '.join(ALGORITHMS)}")
    base = dict(load_config(spec.preset).get("agents") or {})
    settings, zoo_steps, path = load_hyperparams(algo, spec.hyperparams)
    steps = int(spec.timesteps or zoo_steps or base.get("total_timesteps") or AgentConfig().total_timesteps)  # fmt: skip
    extra = dict(settings.pop("extra", {}))
    share = extra.pop("learning_starts_fraction", None)
    if share is not None:
        extra["learning_starts"] = max(1, int(float(share) * steps))
    if algo == "dqn" and extra.get("learning_starts", 0) >= steps:
        raise ValueError(
            f"{path}: learning_starts {extra['learning_starts']} is not below the budget of "
            f"{steps} steps: DQN would never update"
        )
    merged = {**base, **settings, "algo": algo, "protocol": "sb3", "fracs": [spec.frac],
              "total_timesteps": steps, "equal_episodes": False, "val_every": 0,
              "extra": {**dict(base.get("extra") or {}), **extra}}  # fmt: skip
    return AgentConfig.from_dict(merged), steps


def task_identity(wd: Workdir) -> str:
    """Hash of what a task is: its HAFED, TSU and manifest (splits and labels)."""
    from .stages import file_sha256  # lazy: stage helpers

    parts = [file_sha256(wd.require(p, stage)) for p, stage in
             ((wd.model("hafed"), "hafed"), (wd.model("tsu"), "tsu"), (wd.manifest, "extract"))]  # fmt: skip
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def run_key(task: str, cfg: AgentConfig, frac: float, preset: str, seed: int) -> str:
    """The key of a run: every setting that defines it (``cfg`` holds the algorithm, its
    hyper-parameters and the budget), and the agents stage's code version, so runs trained
    by older training code are retrained rather than reported."""
    from .stages import REGISTRY

    desc = {
        "task": task,
        "agents": asdict(cfg),
        "frac": frac,
        "preset": preset,
        "seed": seed,
        "code": REGISTRY["agents"].version,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def _run(job: dict) -> dict:
    """Train (or reuse) one run and score it on test; a picklable job for the process pool."""
    from sasha_models.metrics import classification_metrics  # lazy: torchmetrics

    from ..agents.envs import make_env  # lazy: SB3
    from ..agents.episodes import agent_policy, run_episodes
    from ..agents.export import load_policy
    from ..agents.train import train_agent
    from ..envs.wsi import episode_budget

    run_dir = Path(job["run_dir"])
    done = run_dir / "result.json"
    if done.is_file():
        old = json.loads(done.read_text())
        if old.get("key") == job["key"] and (run_dir / "policy.pt").is_file():
            return {**old, "reused": True}
    wd = Workdir(job["workdir"])
    cfg = AgentConfig.from_dict(job["agents"])
    wandb = None
    if job["wandb"] != "disabled":
        wandb = {"mode": job["wandb"], "project": "sasha-benchmark", "group": job["out_name"],
                 "name": f"{job['task']}-{cfg.algo}-s{job['seed']}"}  # fmt: skip
    t0 = time.perf_counter()
    model = train_agent(
        wd, job["frac"], cfg, seed=job["seed"], out_dir=run_dir, progress=False, wandb=wandb,
        run_config={"benchmark": {k: job[k] for k in ("task", "key", "preset", "frac", "seed")}},
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    row = {"algo": cfg.algo, "class": type(model).__name__, "updates": int(getattr(model, "_n_updates", 0))}  # fmt: skip
    del model
    gc.collect()  # DQN's replay buffer goes before the next run
    env = make_env(wd, "test", job["frac"], cfg)
    episodes = run_episodes(env, agent_policy(load_policy(run_dir)), env.slide_ids)
    env.close()
    probs = np.stack([e["probabilities"] for e in episodes])
    labels = np.array([e["label"] for e in episodes])
    metrics = {k: float(v) for k, v in classification_metrics(probs, labels).items()}
    # an episode with fewer zooms than its budget spent steps on illegal actions
    illegal = sum(len(e["zoomed"]) < episode_budget(job["frac"], e["n_patches"]) for e in episodes)
    result = {
        **row, "task": job["task"], "seed": job["seed"], "key": job["key"],
        "timesteps": cfg.total_timesteps, "seconds": round(seconds, 2), **metrics,
        "n_test_slides": len(episodes), "episodes_with_illegal_actions": int(illegal),
        "run_dir": str(run_dir),
    }  # fmt: skip
    write_json(done, {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()})  # fmt: skip
    return {**result, "reused": False}


def _task_names(workdirs: list[Path]) -> list[str]:
    names: list[str] = []
    for i, w in enumerate(workdirs):
        name = Path(w).resolve().name or f"task{i}"
        names.append(name if name not in names else f"{name}-{i}")
    return names


def run_benchmark(spec: BenchmarkSpec, out: Path, jobs: int = 1, log: Any = print) -> dict:
    """Run (or reuse) every run, then aggregate; writes ``out/results.json``, ``out/table.md``
    and the figures. Returns ``results.json``'s content plus ``table`` (the Markdown)."""
    if not spec.algos or not spec.seeds or not spec.workdirs:
        raise ValueError("--algos, --seeds and --workdir need at least one value each")
    if not 0 < spec.frac <= 1:
        raise ValueError(f"--frac {spec.frac}: a fraction of the patches in (0, 1]")
    out = Path(out)
    configs = {a: agent_settings(spec, a) for a in spec.algos}  # bad settings stop here
    tasks = dict(zip(_task_names(spec.workdirs), [Workdir(w) for w in spec.workdirs], strict=False))
    identity = {t: task_identity(wd) for t, wd in tasks.items()}
    out.mkdir(parents=True, exist_ok=True)
    jobs_list = []
    for algo, (cfg, _) in configs.items():
        for task, wd in tasks.items():
            for seed in spec.seeds:
                key = run_key(identity[task], cfg, spec.frac, spec.preset, seed)
                run_dir = out / "runs" / task / f"{algo}-s{seed}-{key[:12]}"
                jobs_list.append({
                    "workdir": str(wd.root), "agents": asdict(cfg), "frac": spec.frac,
                    "seed": seed, "key": key, "task": task, "preset": spec.preset,
                    "run_dir": str(run_dir), "wandb": spec.wandb, "out_name": out.name,
                })  # fmt: skip
    rows: list[dict] = []

    def record(job: dict, result: dict) -> None:
        rows.append(result)
        how = "reused" if result.get("reused") else f"{result['seconds']:.0f} s"
        log(f"[benchmark] {job['task']} {result['algo']} seed {job['seed']}: test AUC {result['auc']}, {how}")  # fmt: skip

    if jobs <= 1:
        for job in jobs_list:
            record(job, _run(job))
    else:
        from ..processes import worker_pool  # lazy: --jobs only

        with worker_pool(jobs) as pool:
            futures = [(job, pool.submit(_run, job)) for job in jobs_list]
            for job, fut in futures:
                record(job, fut.result())
    results = aggregate(rows, spec, list(tasks), {a: s for a, (_, s) in configs.items()})
    table = markdown(results)
    write_json(out / "results.json", results)
    replace_atomically(out / "table.md", lambda tmp: tmp.write_text(table + "\n"))
    for path in figures(results, out):
        log(f"[benchmark] figure {path}")
    return {**results, "table": table}


def _matrix(
    rows: list[dict], algo: str, tasks: list[str], seeds: list[int], metric: str
) -> np.ndarray:
    by = {(r["task"], r["seed"]): r[metric] for r in rows if r["algo"] == algo}
    m = np.array([[by[(t, s)] for t in tasks] for s in seeds], np.float64)  # (runs, tasks)
    if np.isnan(m).any():
        raise ValueError(
            f"{algo}: test {metric} is undefined on some task (a test split with one class); "
            "benchmark on workdirs whose test split has both classes"
        )
    return m


def aggregate(
    rows: list[dict], spec: BenchmarkSpec, tasks: list[str], steps: dict[str, int]
) -> dict:
    """rliable's aggregates of test AUC over runs × tasks (see the module docstring)."""
    from sasha_models.stats import (
        iqm,
        mean,
        median,
        optimality_gap,
        performance_profile,
        probability_of_improvement,
        stratified_bootstrap,
    )

    auc = {a: _matrix(rows, a, tasks, spec.seeds, "auc") for a in spec.algos}
    stats = {"iqm": iqm, "median": median, "mean": mean, "optimality_gap": optimality_gap}
    aggregates: dict[str, dict] = {}
    for algo, scores in auc.items():
        aggregates[algo] = {}
        for name, fn in stats.items():
            point, lo, hi = stratified_bootstrap(fn, scores, n_boot=spec.boot)
            aggregates[algo][name] = {"point": point, "ci": [lo, hi]}
    taus = np.linspace(0.0, 1.0, 21)
    profiles: dict[str, Any] = {"taus": taus.tolist()}
    rng = np.random.default_rng(0)
    for algo, scores in auc.items():
        boots = np.empty((spec.boot, len(taus)))
        runs, n_tasks = scores.shape
        for b in range(spec.boot):
            idx = rng.integers(0, runs, size=(runs, n_tasks))
            boots[b] = performance_profile(np.take_along_axis(scores, idx, axis=0), taus)
        lo, hi = np.quantile(boots, [0.025, 0.975], axis=0)
        profiles[algo] = {"fraction": performance_profile(scores, taus).tolist(),
                          "ci_lo": lo.tolist(), "ci_hi": hi.tolist()}  # fmt: skip
    poi = []
    for x in spec.algos:
        for y in spec.algos:
            if x != y:
                p, lo, hi = stratified_bootstrap(probability_of_improvement, auc[x], auc[y], n_boot=spec.boot)  # fmt: skip
                poi.append({"x": x, "y": y, "p": p, "ci": [lo, hi]})
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items() if k != "reused"} for r in rows]  # fmt: skip
    return {
        "env": ENV_ID, "metric": "auc", "split": "test", "frac": spec.frac, "preset": spec.preset,
        "algos": spec.algos, "seeds": spec.seeds, "tasks": tasks, "timesteps": steps,
        "n_boot": spec.boot, "aggregates": aggregates, "performance_profiles": profiles,
        "probability_of_improvement": poi, "runs": clean,
    }  # fmt: skip


def markdown(results: dict) -> str:
    """``table.md``: per algorithm the four aggregates with their intervals, P(reference >
    algorithm), the training time and the test episodes with illegal actions."""
    from .report import markdown_table

    def cell(a: dict) -> str:
        return f"{a['point']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]"

    poi = {(p["x"], p["y"]): p for p in results["probability_of_improvement"]}
    ref = REFERENCE if REFERENCE in results["algos"] else results["algos"][0]
    columns = ["algorithm", "IQM", "median", "mean", "optimality gap", f"P({ref} > algo)",
               "steps", "train s (mean)", "illegal test episodes"]  # fmt: skip
    body = []
    for algo in results["algos"]:
        agg = results["aggregates"][algo]
        p = poi.get((ref, algo))
        runs = [r for r in results["runs"] if r["algo"] == algo]
        body.append([
            algo, cell(agg["iqm"]), cell(agg["median"]), cell(agg["mean"]),
            cell(agg["optimality_gap"]),
            "—" if p is None else f"{p['p']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]",
            str(results["timesteps"][algo]), f"{np.mean([r['seconds'] for r in runs]):.0f}",
            str(sum(r["episodes_with_illegal_actions"] for r in runs)),
        ])  # fmt: skip
    caption = (
        f"Test AUC on {ENV_ID}, f = {results['frac']:g}, preset {results['preset']}: "
        f"{len(results['seeds'])} seed(s) × {len(results['tasks'])} task(s) "
        f"({', '.join(results['tasks'])}); 95% stratified-bootstrap intervals "
        f"({results['n_boot']} resamples, runs within tasks); optimality gap to AUC 1"
    )
    return markdown_table(columns, body, caption)


def figures(results: dict, out: Path) -> list[Path]:
    """``aggregates.png``, ``performance_profile.png``, ``probability_of_improvement.png`` and
    ``learning_curves.png`` (training ``rollout/ep_rew_mean`` from each run's progress.csv)."""
    import matplotlib  # lazy: matplotlib, for the figures only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = results["algos"]
    paths = []
    fig, axes = plt.subplots(1, 4, figsize=(12, max(2.5, 0.8 + 0.45 * len(algos))), sharey=True)
    for ax, name in zip(axes, ("iqm", "median", "mean", "optimality_gap"), strict=False):
        for i, algo in enumerate(algos):
            a = results["aggregates"][algo][name]
            ax.plot(a["ci"], [i, i], lw=6, alpha=0.5)
            ax.plot([a["point"]], [i], "k|", ms=14)
        ax.set_title(name.replace("_", " "))
        ax.set_yticks(range(len(algos)), algos)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("test AUC, 95% stratified-bootstrap intervals")
    fig.tight_layout()
    paths.append(_save(fig, out / "aggregates.png", plt))

    fig, ax = plt.subplots(figsize=(6, 4))
    prof = results["performance_profiles"]
    for algo in algos:
        ax.plot(prof["taus"], prof[algo]["fraction"], label=algo)
        ax.fill_between(prof["taus"], prof[algo]["ci_lo"], prof[algo]["ci_hi"], alpha=0.2)
    ax.set(xlabel="test AUC τ", ylabel="fraction of runs with AUC > τ", title="performance profile")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out / "performance_profile.png", plt))

    pairs = results["probability_of_improvement"]
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.8 + 0.35 * len(pairs))))
    for i, p in enumerate(pairs):
        ax.plot(p["ci"], [i, i], lw=6, alpha=0.5)
        ax.plot([p["p"]], [i], "k|", ms=12)
    ax.set_yticks(range(len(pairs)), [f"P({p['x']} > {p['y']})" for p in pairs])
    ax.axvline(0.5, color="grey", ls="--")
    ax.set(xlim=(0, 1), title="probability of improvement (test AUC)")
    fig.tight_layout()
    paths.append(_save(fig, out / "probability_of_improvement.png", plt))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for algo in algos:
        curves = []
        grid = np.linspace(0, results["timesteps"][algo], 40)
        for r in results["runs"]:
            if r["algo"] != algo:
                continue
            rows = [x for x in csv.DictReader((Path(r["run_dir"]) / "progress.csv").open())
                    if x.get("rollout/ep_rew_mean")]  # fmt: skip
            if rows:
                t = np.array([float(x["time/total_timesteps"]) for x in rows])
                y = np.array([float(x["rollout/ep_rew_mean"]) for x in rows])
                curves.append(np.interp(grid, t, y, left=np.nan))
        if curves:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ax.plot(grid, np.nanmean(curves, axis=0), label=f"{algo} ({len(curves)} runs)")
    ax.set(xlabel="environment steps", ylabel="rollout/ep_rew_mean", title=f"{ENV_ID}, f = {results['frac']:g}")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out / "learning_curves.png", plt))
    return paths


def _save(fig: Any, path: Path, plt: Any) -> Path:
    replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
