"""One hyper-parameter trial: train an agent, pick its checkpoint on half of val, score it on
the other half.

A sweep compares trials by a number; if that number came from the slides the trial's own
checkpoint was chosen on, the best trial's score would be biased upwards (it won twice on the
same slides). So the validation split is cut in two stratified halves, the same for every
trial of a sweep (:func:`split_val`):

- **select** — :class:`~sasha_env.agents.callbacks.ValSelection` validates on it every
  ``agents.val_every`` rollouts (every rollout when the config says 0) and keeps the best
  checkpoint by the official criterion (``val/*`` keys);
- **holdout** — :class:`HoldoutScore` scores the current policy on it at the same points
  (``holdout/*`` keys: the intermediate values that pruning and W&B's early termination read),
  and the kept checkpoint is scored on it once more at the end: the trial's metric.

The test split is never read here; a sweep evaluates only its chosen configuration on it
(:func:`evaluate_on_test`). :func:`run_trial` is the one trial function: ``sasha sweep`` calls
it for each Optuna trial, ``sasha trial`` (what ``wandb agent`` runs) calls it once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from ..agents.config import AgentConfig
from ..workdir import Workdir

__all__ = [
    "HOLDOUT",
    "SWEEP_KEYS",
    "agent_config",
    "evaluate_on_test",
    "run_trial",
    "split_val",
    "trial_wandb_mode",
]

#: The prefix of a trial's score keys (``holdout/auc``, ``holdout/f1``, ``holdout/accuracy``,
#: ``holdout/ce``, ``holdout/score``); a sweep's metric must be one of them.
HOLDOUT = "holdout"
#: Sweep parameters that are not ``agents`` fields: the zoom budget and the training seed.
SWEEP_KEYS = ("frac", "seed")


def agent_config(
    base: Mapping[str, Any], params: Mapping[str, Any]
) -> tuple[AgentConfig, float, int]:
    """``(AgentConfig, frac, seed)`` of a trial: the ``agents`` section ``base`` with the
    trial's ``params`` applied (``frac`` default: ``base``'s first f; ``seed`` default 0).

    A trial trains and scores one agent: ``base``'s ``agents.ensemble`` is set to 1 (a
    workdir that trains ensembles sweeps the settings of their members).

    Raises:
        ValueError: a parameter that is neither an ``agents`` field nor ``frac``/``seed``,
            or ``ensemble`` (not a setting one trial can score).
    """
    names = {f.name for f in fields(AgentConfig)}
    unknown = sorted(set(params) - names - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(
            f"sweep parameter(s) {unknown} are not agents settings: use fields of the agents "
            f"section ({', '.join(sorted(names))}) or {', '.join(SWEEP_KEYS)}"
        )
    if "ensemble" in params:
        raise ValueError(
            "sweep parameter 'ensemble': a trial trains and scores one agent; compare ensemble "
            "sizes with 'sasha study --config' (experiments/ablations/ensemble-3.yaml)"
        )
    fracs = list(base.get("fracs") or AgentConfig().fracs)
    frac = float(params.get("frac", fracs[0]))
    seed = int(params.get("seed", 0))
    own = {k: v for k, v in params.items() if k not in SWEEP_KEYS}
    cfg = AgentConfig.from_dict({**dict(base), **own, "fracs": [frac], "ensemble": 1})
    if cfg.val_every == 0:
        cfg.val_every = 1  # a trial selects a checkpoint, so it validates
    return cfg, frac, seed


def split_val(
    slide_ids: list[str], labels: list[str], seed: int = 0
) -> tuple[list[str], list[str]]:
    """Cut validation slides in two stratified halves ``(select, holdout)``.

    Within each class the slides are shuffled by ``seed`` and dealt alternately, the first to
    ``select``; so each half has about half of every class, and the same inputs give the same
    halves in every trial.

    Raises:
        ValueError: fewer than two slides.
    """
    if len(slide_ids) < 2:
        raise ValueError(
            f"a sweep needs at least 2 validation slides (one to select checkpoints on, one to "
            f"score trials on), got {len(slide_ids)}"
        )
    rng = np.random.default_rng(seed)
    select: list[str] = []
    holdout: list[str] = []
    turn = 0
    for label in sorted(set(labels)):
        members = sorted(s for s, lab in zip(slide_ids, labels, strict=False) if lab == label)
        for i in rng.permutation(len(members)):
            (select if turn % 2 == 0 else holdout).append(members[i])
            turn += 1
    return select, holdout


def _score(env: Any, policy: Any, slide_ids: list[str]) -> dict[str, float]:
    from ..agents.episodes import agent_policy, run_episodes  # lazy: SB3
    from ..agents.selection import selection_score  # lazy: torchmetrics

    episodes = run_episodes(env, agent_policy(policy), slide_ids)
    probs = np.stack([e["probabilities"] for e in episodes])
    labels = np.array([e["label"] for e in episodes])
    return {k: float(v) for k, v in selection_score(probs, labels).items()}


def _holdout_callback(env: Any, slide_ids: list[str], every: int, report: Callable | None) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback  # lazy: SB3

    class HoldoutScore(BaseCallback):
        """Every ``every`` rollouts: the current policy's ``holdout/*`` on the holdout half,
        recorded in SB3's logger and passed to ``report(metrics, index) -> stop?``."""

        def __init__(self) -> None:
            super().__init__()
            self.rollouts = self.reports = 0
            self.stop = False

        def _on_step(self) -> bool:
            return not self.stop

        def _on_rollout_end(self) -> None:
            self.rollouts += 1
            if self.rollouts % every:
                return
            metrics = _score(env, self.model, slide_ids)
            for key, value in metrics.items():
                self.logger.record(f"{HOLDOUT}/{key}", value)
            self.reports += 1
            if report is not None and report(metrics, self.reports):
                self.stop = True

    return HoldoutScore()


def trial_wandb_mode(mode: str | None = None) -> str | None:
    """The W&B mode of a trial: ``mode`` when given; none (W&B's own choice) under
    ``wandb agent`` (``WANDB_SWEEP_ID`` set) or when ``WANDB_MODE`` is set; else ``offline``.

    The environment is read, never written: a trial started by ``wandb agent`` runs in the
    agent's mode, so its metric reaches the sweep controller.
    """
    import os

    if mode is not None:
        return mode
    if os.environ.get("WANDB_SWEEP_ID") or os.environ.get("WANDB_MODE"):
        return None
    return "offline"


def run_trial(
    wd: Workdir,
    base: Mapping[str, Any],
    params: Mapping[str, Any],
    out_dir: Path,
    *,
    wandb_run: Any = None,
    report: Callable[[dict[str, float], int], bool] | None = None,
    split_seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one trial's agent into ``out_dir`` and score it.

    Args:
        wd: the pipeline workdir (HAFED, TSU and the store are its).
        base: the ``agents`` section the parameters apply to.
        params: the trial's parameters (``agents`` fields, ``frac``, ``seed``).
        out_dir: the agent's folder (``progress.csv``, ``val_curve.csv``, the export).
        wandb_run: an open W&B run to log to (training curves, ``val/*``, ``holdout/*``);
            left open.
        report: called at each validation with the current ``holdout/*`` values (without the
            prefix) and the validation's index from 1; returning True stops training early
            (pruning). The trial is then reported as pruned.
        split_seed: the seed of the val halves (:func:`split_val`).
        progress: show a progress bar.

    Returns:
        ``{"metrics": {"holdout/auc": ..., ...}, "pruned": bool, "seconds": float,
        "agent_dir": str, "config": {...}}``: the metrics are the selected checkpoint's on the
        holdout half.
    """
    from ..agents.envs import make_env  # lazy: SB3, gymnasium
    from ..agents.export import load_policy  # lazy: torch
    from ..agents.train import train_agent  # lazy: SB3

    cfg, frac, seed = agent_config(base, params)
    t0 = time.perf_counter()
    val = make_env(wd, "val", frac, cfg)
    labels = {sid: val.manifest.by_id()[sid].label for sid in val.slide_ids}
    select, holdout = split_val(list(val.slide_ids), [labels[s] for s in val.slide_ids], split_seed)
    every = cfg.val_every
    if cfg.protocol == "paper":
        raise ValueError("sweeps train with protocol 'sb3' (set agents.protocol: sb3 or sweep it)")
    callback = _holdout_callback(val, holdout, every, report)
    out_dir = Path(out_dir)
    train_agent(
        wd, frac, cfg, seed=seed, out_dir=out_dir, progress=progress, eval_env=val,
        callbacks=[callback], wandb_run=wandb_run, val_slides=select,
        run_config={"params": dict(params), "val_select": select, "val_holdout": holdout},
    )  # fmt: skip
    final = _score(val, load_policy(out_dir), holdout)
    metrics = {f"{HOLDOUT}/{k}": v for k, v in final.items()}
    if wandb_run is not None:
        wandb_run.log({**metrics, "global_step": int(cfg.total_timesteps)})
        wandb_run.summary.update(metrics)
    val.close()
    return {
        "metrics": metrics,
        "pruned": bool(callback.stop),
        "seconds": round(time.perf_counter() - t0, 2),
        "agent_dir": str(out_dir),
        "config": {"frac": frac, "seed": seed, "algo": cfg.algo},
    }


def evaluate_on_test(
    wd: Workdir, base: Mapping[str, Any], params: Mapping[str, Any], agent_dir: Path
) -> dict[str, float]:
    """Test metrics (``auc``, ``accuracy``, ``f1``, ``ece``) of a trained trial's agent: what a
    sweep runs once, for its chosen configuration only."""
    from sasha_models.metrics import classification_metrics  # lazy: torchmetrics

    from ..agents.envs import make_env  # lazy: SB3
    from ..agents.episodes import agent_policy, run_episodes  # lazy: SB3
    from ..agents.export import load_policy  # lazy: torch

    cfg, frac, _ = agent_config(base, params)
    env = make_env(wd, "test", frac, cfg)
    episodes = run_episodes(env, agent_policy(load_policy(agent_dir)), env.slide_ids)
    env.close()
    probs = np.stack([e["probabilities"] for e in episodes])
    labels = np.array([e["label"] for e in episodes])
    out = {k: float(v) for k, v in classification_metrics(probs, labels).items()}
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}  # type: ignore[misc]
