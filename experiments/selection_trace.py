"""The test AUC of every policy the agents stage validates: what each selection rule would keep.

Issue 22, item 3. Retrains one agent of a finished workdir (its own ``agents`` config, seed
and budget f) with ``val_start`` just below 1, so that the last policy is the one exported,
and scores every validated policy on the *test* split too, at the same moments
(:class:`~sasha_env.agents.callbacks.ValSelection`'s schedule: every ``val_every`` rollouts
and at the end). The torch and NumPy random states are put back around each test pass, so the
training trajectory is the one the agents stage runs with the same config and seed: with
``val_start`` 0 the kept policy is one of the rows. Writes ``OUT/trace-<f>-s<seed>.csv``
(timestep, val auc/f1/ce/score, test auc) and prints which step, val score and test AUC each
rule keeps: ``best`` (the official rule: lowest val score anywhere), ``late`` (lowest from
half-way on: ``agents.val_start: 0.5``) and ``last``.

Nothing is written into the workdir (the agent goes to ``OUT/agent-<f>-s<seed>``)::

    python experiments/selection_trace.py /work/runs/diag/ctl-s1 --frac 0.2 --out DIR
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from stable_baselines3.common.callbacks import BaseCallback

from sasha_env.agents.config import AgentConfig, steps_for
from sasha_env.agents.envs import make_env
from sasha_env.agents.episodes import agent_policy, run_episodes
from sasha_env.agents.selection import selection_score
from sasha_env.workdir import Workdir

sys.path.insert(0, str(Path(__file__).parent))
from diagnose_budgets import agents_config  # noqa: E402  (a sibling script)


class TestTrace(BaseCallback):
    """Score the policy on a split whenever ``ValSelection`` validates it, leaving every random
    state as it found it (so training follows the same trajectory as without this callback)."""

    def __init__(self, wd: Workdir, frac: float, cfg: AgentConfig, every: int) -> None:
        super().__init__()
        self.wd, self.frac, self.cfg, self.every = wd, frac, cfg, every
        self.env: Any = None
        self.rows: list[dict] = []
        self.rollouts = 0
        self._last_updates = -1

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        if self.rollouts % self.every == 0:
            self._score()

    def _on_training_end(self) -> None:
        self._score()

    def _score(self) -> None:
        updates = int(getattr(self.model, "_n_updates", self.num_timesteps))
        if updates == self._last_updates:
            return
        self._last_updates = updates
        torch_state, np_state = torch.get_rng_state(), np.random.get_state()
        try:
            if self.env is None:
                self.env = make_env(self.wd, "test", self.frac, self.cfg)
            eps = run_episodes(self.env, agent_policy(self.model), self.env.slide_ids)
        finally:
            torch.set_rng_state(torch_state)
            np.random.set_state(np_state)
        probs = np.stack([e["probabilities"] for e in eps])
        labels = np.array([e["label"] for e in eps])
        self.rows.append({"timestep": self.num_timesteps, **selection_score(probs, labels)})


def keep(rows: list[dict], start: int) -> dict:
    """The row ``ValSelection`` keeps with ``start`` (the last row always competes)."""
    eligible = [r for r in rows[:-1] if r["timestep"] >= start] + rows[-1:]
    return min(eligible, key=lambda r: r["score"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (python -m pydoc experiments/selection_trace.py).",
    )
    ap.add_argument("workdir", type=Path, help="a finished pipeline workdir (read only)")
    ap.add_argument("--frac", type=float, required=True)
    ap.add_argument("--seed", type=int, help="training seed (default: the workdir's)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from sasha_env.agents.train import train_agent  # lazy: SB3

    wd = Workdir(args.workdir)
    full = yaml.safe_load(wd.config.read_text()) or {}
    seed = int(full.get("seed", 0)) if args.seed is None else args.seed
    cfg = agents_config(wd)
    if not cfg.val_every:
        raise SystemExit("the workdir's agents config has no val_every: nothing is validated")
    trace = TestTrace(wd, args.frac, cfg, cfg.val_every)
    out = args.out / f"agent-{args.frac:g}-s{seed}"
    train_agent(
        wd,
        args.frac,
        replace(cfg, val_start=0.999),
        seed=seed,
        out_dir=out,
        progress=False,
        callbacks=[trace],
    )
    with open(out / "val_curve.csv") as fh:
        val = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]
    if [r["timestep"] for r in val] != [r["timestep"] for r in trace.rows]:
        raise SystemExit("the test passes do not line up with the validations")
    rows = [
        {
            "timestep": int(v["timestep"]),
            **{f"val_{k}": v[k] for k in ("auc", "f1", "ce", "score")},
            "test_auc": t["auc"],
        }
        for v, t in zip(val, trace.rows, strict=True)
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"trace-{args.frac:g}-s{seed}.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    total = rows[-1]["timestep"]
    scored = [{**r, "score": r["val_score"]} for r in rows]
    print(f"{wd.root.name} f={args.frac:g} seed={seed}: {len(rows)} validated policies ({path})")
    print("timestep  val AUC  val CE  val score  test AUC")
    for r in rows:
        print(
            f"{r['timestep']:8d}  {r['val_auc']:.3f}  {r['val_ce']:.3f}  {r['val_score']:.3f}"
            f"  {r['test_auc']:.3f}"
        )
    late = int(0.5 * steps_for(cfg, args.frac))  # as ValSelection's start with val_start 0.5
    for name, start in (("best", 0), ("late", late), ("last", total + 1)):
        k = keep(scored, start)
        print(
            f"rule {name}: keeps step {k['timestep']} (val score {k['val_score']:.3f}), "
            f"test AUC {k['test_auc']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
