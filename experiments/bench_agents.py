"""RL algorithm benchmark on Sasha-WSI-v0: MaskablePPO (SASHA policy), PPO, A2C and DQN.

    python experiments/bench_agents.py --workdir demo-run [--frac 0.1] [--seeds 0 1 2]
        [--timesteps 10000] [--algos maskable_ppo ppo a2c dqn]

Needs a finished pipeline workdir (``make demo``). Runs that finished earlier (same number of
steps) are kept, so a killed benchmark resumes. For every algorithm and seed it trains an
agent on the train split (same environment, same budget), evaluates the argmax policy on the
test split, and writes into ``WORKDIR/bench_agents/``:

- ``table.md`` — test AUC / accuracy (mean ± sd over seeds) and training wall time;
- ``learning_curves.png`` — training episode return against environment steps, mean over seeds.

PPO and A2C use the SASHA network with the legal-action mask derived from the observation;
DQN uses SB3's ``MultiInputPolicy`` and learns the mask only through the environment's
illegal-action penalty.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sasha_env.agents.export import load_policy  # noqa: E402
from sasha_env.agents.policies import agent_policy, run_episodes  # noqa: E402
from sasha_env.agents.train import (  # noqa: E402
    ALGORITHMS,
    AgentConfig,
    make_env,
    train_agent,
)
from sasha_env.config import load_config  # noqa: E402
from sasha_env.workdir import Workdir  # noqa: E402
from sasha_models.metrics import classification_metrics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", type=Path, default=Path("demo-run"))
    p.add_argument("--preset", default="demo")
    p.add_argument("--frac", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--timesteps", type=int, default=10_000)
    p.add_argument("--algos", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    args = p.parse_args()

    wd = Workdir(args.workdir)
    out = wd.root / "bench_agents"
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(args.preset).get("agents", {})
    results: dict[str, list[dict]] = {}
    for algo in args.algos:
        cfg = AgentConfig.from_dict(
            {**base, "algo": algo, "fracs": [args.frac], "total_timesteps": args.timesteps}
        )
        for seed in args.seeds:
            run_dir = out / f"{algo}-seed{seed}"
            meta = run_dir / "agent.json"
            if (
                meta.is_file()
                and json.loads(meta.read_text())["config"]["total_timesteps"] == args.timesteps
            ):
                seconds = json.loads(meta.read_text())["train_seconds"]  # finished earlier: resume
            else:
                t0 = time.perf_counter()
                train_agent(wd, args.frac, cfg, seed=seed, out_dir=run_dir, progress=False)
                seconds = time.perf_counter() - t0
            env = make_env(wd, "test", args.frac, cfg)
            episodes = run_episodes(env, agent_policy(load_policy(run_dir)), env.slide_ids)
            probs = np.stack([e["probabilities"] for e in episodes])
            labels = np.array([e["label"] for e in episodes])
            metrics = classification_metrics(probs, labels)
            # an episode with fewer zooms than its budget spent steps on illegal actions (DQN)
            illegal = sum(
                len(e["zoomed"]) < math.ceil(args.frac * e["n_patches"]) for e in episodes
            )
            row = {"seed": seed, "seconds": seconds, **{k: float(v) for k, v in metrics.items()}}
            row["episodes_with_illegal_actions"] = illegal
            results.setdefault(algo, []).append(row)
            print(f"{algo} seed {seed}: test AUC {metrics['auc']:.3f}, {seconds:.0f} s", flush=True)
            gc.collect()  # DQN's replay buffer (two observations per step) must go before the next run
    (out / "results.json").write_text(json.dumps(results, indent=2))

    lines = [
        f"f = {args.frac}, {args.timesteps} steps, seeds {args.seeds}, test split of {wd.root}",
        "",
        "| algorithm | test AUC | test accuracy | train wall time (s) | test episodes with illegal actions |",
        "|---|---|---|---|---|",
    ]
    for algo, rows in results.items():
        auc = np.array([r["auc"] for r in rows])
        acc = np.array([r["accuracy"] for r in rows])
        sec = np.array([r["seconds"] for r in rows])
        bad = sum(r["episodes_with_illegal_actions"] for r in rows)
        lines.append(
            f"| {algo} | {auc.mean():.3f} ± {auc.std():.3f} | {acc.mean():.3f} ± {acc.std():.3f} | {sec.mean():.0f} | {bad} |"
        )
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    grid = np.linspace(0, args.timesteps, 60)
    for algo in results:
        curves = []
        for seed in args.seeds:
            rows = list(csv.DictReader((out / f"{algo}-seed{seed}" / "episodes.csv").open()))
            t = np.array([int(r["timestep"]) for r in rows])
            ret = np.array([float(r["episode_return"]) for r in rows])
            w = max(1, len(ret) // 20)
            smooth = np.convolve(ret, np.ones(w) / w, mode="valid")  # no edge artefacts
            curves.append(np.interp(grid, t[w - 1 :], smooth, left=np.nan, right=np.nan))
        curves = np.array(curves)
        ax.plot(grid, np.nanmean(curves, 0), label=algo)
        ax.fill_between(grid, np.nanmin(curves, 0), np.nanmax(curves, 0), alpha=0.2)
    ax.set(
        xlabel="environment steps",
        ylabel="training episode return",
        title=f"Sasha-WSI-v0, f = {args.frac}",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    print(f"wrote {out / 'table.md'} and {out / 'learning_curves.png'}")


if __name__ == "__main__":
    main()
