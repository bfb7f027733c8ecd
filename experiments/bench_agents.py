"""RL algorithm benchmark on Sasha-WSI-v0 with aggregate statistics over tasks and runs.

    python experiments/bench_agents.py --workdir demo-run            # one split (one task)
    python experiments/bench_agents.py --study study --tasks 3       # study seeds as tasks
        [--frac 0.1] [--seeds 0 1 2] [--timesteps 10000] [--algos maskable_ppo ppo a2c dqn]

A *task* is one cohort split with its models: a pipeline workdir (``--workdir``), or the first
``--tasks`` seed workdirs of a ``sasha study`` (each its own stratified split and models). A
*run* is one agent-training seed (``--seeds``). For every algorithm, task and run it trains an
agent on the task's train split (same environment, same step budget, ``protocol: sb3``),
evaluates the argmax policy on the task's test split, and writes into ``OUT/`` (default
``WORKDIR/bench_agents`` or ``STUDY/bench_agents``):

- ``table.md`` — per algorithm the interquartile mean (IQM) of test AUC over all runs × tasks
  with a 95 % stratified-bootstrap interval (runs resampled within tasks), the mean, and the
  probability that MaskablePPO with the SASHA policy beats it (P(X > Y), with its interval);
  statistics from :mod:`sasha_models.stats` (rliable's, checked against rliable);
- ``results.json`` — every run's metrics and training time;
- ``learning_curves.png`` — training episode return against environment steps: the mean over
  runs × tasks with the interquartile band.

Finished runs (same step budget) are kept, so a killed benchmark resumes. PPO and A2C use the
SASHA network with the legal-action mask derived from the observation; DQN uses SB3's
``MultiInputPolicy`` and learns the mask only through the environment's illegal-action penalty.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sasha_env.agents.config import ALGORITHMS, AgentConfig  # noqa: E402
from sasha_env.agents.envs import make_env  # noqa: E402
from sasha_env.agents.episodes import agent_policy, run_episodes  # noqa: E402
from sasha_env.agents.export import load_policy  # noqa: E402
from sasha_env.agents.train import train_agent  # noqa: E402
from sasha_env.config import load_config  # noqa: E402
from sasha_env.pipeline.report import markdown_table  # noqa: E402
from sasha_env.workdir import Workdir  # noqa: E402
from sasha_models.metrics import classification_metrics  # noqa: E402
from sasha_models.stats import (  # noqa: E402
    iqm,
    probability_of_improvement,
    stratified_bootstrap,
)

REFERENCE = "maskable_ppo"


def tasks_of(args: argparse.Namespace) -> dict[str, Workdir]:
    """Task name -> pipeline workdir."""
    if args.study is None:
        return {"split": Workdir(args.workdir)}
    seeds = sorted(
        (d for d in args.study.glob("seed-*") if (d / "stages" / "agents.json").is_file()),
        key=lambda d: int(d.name.split("-")[1]),
    )
    if not seeds:
        raise SystemExit(f"{args.study}: no finished seed-<s>/ workdir (run sasha study first)")
    return {d.name: Workdir(d) for d in seeds[: args.tasks]}


def run_one(wd: Workdir, cfg: AgentConfig, frac: float, seed: int, run_dir: Path) -> dict:
    """Train (or keep a finished run) and score the argmax policy on the test split."""
    meta = run_dir / "agent.json"
    if (
        meta.is_file()
        and json.loads(meta.read_text())["config"]["total_timesteps"] == cfg.total_timesteps
    ):
        seconds = json.loads(meta.read_text())["train_seconds"]  # finished earlier: resume
    else:
        t0 = time.perf_counter()
        train_agent(wd, frac, cfg, seed=seed, out_dir=run_dir, progress=False)
        seconds = time.perf_counter() - t0
    env = make_env(wd, "test", frac, cfg)
    episodes = run_episodes(env, agent_policy(load_policy(run_dir)), env.slide_ids)
    probs = np.stack([e["probabilities"] for e in episodes])
    labels = np.array([e["label"] for e in episodes])
    metrics = classification_metrics(probs, labels)
    # an episode with fewer zooms than its budget spent steps on illegal actions (DQN)
    illegal = sum(len(e["zoomed"]) < math.ceil(frac * e["n_patches"]) for e in episodes)
    row = {"seed": seed, "seconds": seconds, **{k: float(v) for k, v in metrics.items()}}
    row["n_test_slides"] = len(episodes)
    row["episodes_with_illegal_actions"] = illegal
    return row


def table(results: dict, args: argparse.Namespace, tasks: list[str], n_test: list[int]) -> str:
    """Markdown table of aggregate statistics (IQM, mean, P(reference > algo))."""
    auc = {a: np.array([[r["auc"] for r in rows] for rows in per_task.values()]).T
           for a, per_task in results.items()}  # fmt: skip  # (runs, tasks)
    caption = (
        f"f = {args.frac:g}, {args.timesteps} steps, {len(args.seeds)} training seeds × "
        f"{len(tasks)} task(s) ({', '.join(tasks)}; {', '.join(map(str, n_test))} test slides); "
        f"95% stratified-bootstrap intervals ({args.boot} resamples, runs within tasks)"
    )
    columns = [
        "algorithm",
        "IQM test AUC [95% CI]",
        "mean test AUC",
        f"P({REFERENCE} > algorithm) [95% CI]",
        "train wall time (s)",
        "test episodes with illegal actions",
    ]
    body = []
    for algo, scores in auc.items():
        point, lo, hi = stratified_bootstrap(iqm, scores, n_boot=args.boot)
        if algo != REFERENCE and REFERENCE in auc:
            p, plo, phi = stratified_bootstrap(
                probability_of_improvement, auc[REFERENCE], scores, n_boot=args.boot
            )
            poi = f"{p:.2f} [{plo:.2f}, {phi:.2f}]"
        else:
            poi = "—"
        rows = [r for per_task in results[algo].values() for r in per_task]
        sec = np.mean([r["seconds"] for r in rows])
        bad = sum(r["episodes_with_illegal_actions"] for r in rows)
        body.append(
            [algo, f"{point:.3f} [{lo:.3f}, {hi:.3f}]", f"{scores.mean():.3f}", poi]
            + [f"{sec:.0f}", str(bad)]
        )
    return markdown_table(columns, body, caption)


def learning_curves(out: Path, runs: dict[str, list[Path]], timesteps: int, frac: float) -> Path:
    """Training return against steps: mean over runs × tasks, interquartile band."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    grid = np.linspace(0, timesteps, 60)
    for algo, dirs in runs.items():
        curves = []
        for run_dir in dirs:
            rows = list(csv.DictReader((run_dir / "episodes.csv").open()))
            t = np.array([int(r["timestep"]) for r in rows])
            ret = np.array([float(r["episode_return"]) for r in rows])
            w = max(1, len(ret) // 20)
            smooth = np.convolve(ret, np.ones(w) / w, mode="valid")  # no edge artefacts
            curves.append(np.interp(grid, t[w - 1 :], smooth, left=np.nan, right=np.nan))
        curves = np.array(curves)
        with warnings.catch_warnings():  # steps before the first smoothed point are all NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(curves, 0)
            q1, q3 = np.nanpercentile(curves, [25, 75], axis=0)
        ax.plot(grid, mean, label=f"{algo} ({len(dirs)} runs)")
        ax.fill_between(grid, q1, q3, alpha=0.2)
    ax.set(
        xlabel="environment steps",
        ylabel="training episode return",
        title=f"Sasha-WSI-v0, f = {frac:g} (band: interquartile range over runs)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workdir", type=Path, default=Path("demo-run"), help="one task")
    where.add_argument("--study", type=Path, default=None, help="a sasha study: seeds as tasks")
    p.add_argument("--tasks", type=int, default=3, help="study seeds used as tasks (default 3)")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--preset", default="demo")
    p.add_argument("--frac", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (runs)")
    p.add_argument("--timesteps", type=int, default=10_000)
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--algos", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    args = p.parse_args()

    tasks = tasks_of(args)
    out = args.out or ((args.study or args.workdir) / "bench_agents")
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(args.preset).get("agents", {})
    results: dict[str, dict[str, list[dict]]] = {}
    run_dirs: dict[str, list[Path]] = {}
    for algo in args.algos:
        cfg = AgentConfig.from_dict(
            {**base, "algo": algo, "protocol": "sb3", "fracs": [args.frac],
             "total_timesteps": args.timesteps, "val_every": 0}
        )  # fmt: skip
        for task, wd in tasks.items():
            for seed in args.seeds:
                run_dir = out / task / f"{algo}-seed{seed}"
                row = run_one(wd, cfg, args.frac, seed, run_dir)
                results.setdefault(algo, {}).setdefault(task, []).append(row)
                run_dirs.setdefault(algo, []).append(run_dir)
                print(
                    f"{algo} {task} seed {seed}: test AUC {row['auc']:.3f}, {row['seconds']:.0f} s",
                    flush=True,
                )
                gc.collect()  # DQN's replay buffer must go before the next run
    (out / "results.json").write_text(json.dumps(results, indent=2))
    n_test = [results[args.algos[0]][t][0]["n_test_slides"] for t in tasks]
    text = table(results, args, list(tasks), n_test)
    (out / "table.md").write_text(text + "\n")
    print(text)
    figure = learning_curves(out, run_dirs, args.timesteps, args.frac)
    print(f"wrote {out / 'table.md'} and {figure}")


if __name__ == "__main__":
    main()
