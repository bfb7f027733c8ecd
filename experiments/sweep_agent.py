"""One W&B sweep trial: train an agent with the given hyper-parameters, score it on ``val``.

    python experiments/sweep_agent.py --workdir demo-run [--learning_rate 3e-4 ...]

Called by ``wandb agent`` with ``--name=value`` arguments from ``experiments/sweep.yaml``.
W&B runs offline unless ``WANDB_MODE`` says otherwise. Logs ``val/auc``, ``val/accuracy``,
``val/f1``, ``val/ece`` and the training curve; the agent lands in
``WORKDIR/agents/sweep-<run id>/``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

import numpy as np
import wandb

from sasha_env.agents.config import AgentConfig
from sasha_env.agents.envs import make_env
from sasha_env.agents.episodes import agent_policy, run_episodes
from sasha_env.agents.export import load_policy
from sasha_env.agents.train import train_agent
from sasha_env.config import load_config
from sasha_env.workdir import Workdir
from sasha_models.metrics import classification_metrics

TUNABLE = {
    f.name: f.type
    for f in fields(AgentConfig)
    if f.name
    in {
        "learning_rate",
        "ent_coef",
        "n_epochs",
        "reward",
        "total_timesteps",
        "n_steps",
        "batch_size",
        "gamma",
        "gae_lambda",
        "clip_range",
        "d_hidden",
        "correct_bonus",
    }
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--preset", default="demo", help="preset whose 'agents' section is the base (default: demo)"
    )
    p.add_argument("--frac", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    for name in TUNABLE:
        kind = (
            str
            if name == "reward"
            else int
            if name in {"n_epochs", "total_timesteps", "n_steps", "batch_size", "d_hidden"}
            else float
        )
        p.add_argument(f"--{name}", type=kind, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    wd = Workdir(args.workdir)
    base = load_config(args.preset).get("agents", {})
    overrides = {k: getattr(args, k) for k in TUNABLE if getattr(args, k) is not None}
    cfg = AgentConfig.from_dict({**base, **overrides, "fracs": [args.frac]})
    run = wandb.init(
        project="sasha-sweep",
        dir=str(wd.root),
        config={**overrides, "frac": args.frac, "seed": args.seed},
    )
    out = wd.agent_dir(f"sweep-{run.id}")
    train_agent(wd, args.frac, cfg, seed=args.seed, out_dir=out, progress=False)
    env = make_env(wd, "val", args.frac, cfg)
    episodes = run_episodes(env, agent_policy(load_policy(out)), env.slide_ids)
    probs = np.stack([e["probabilities"] for e in episodes])
    labels = np.array([e["label"] for e in episodes])
    metrics = {f"val/{k}": v for k, v in classification_metrics(probs, labels).items()}
    run.log(metrics)
    run.summary.update(metrics)
    run.finish()
    print(metrics)
    return metrics


if __name__ == "__main__":
    main()
