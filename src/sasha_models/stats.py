"""Aggregate statistics for comparing RL algorithms over few runs (Agarwal et al., 2021).

The statistics of the ``rliable`` library, written out here so the benchmark needs neither it
nor its pinned dependencies (``tests/test_aggregate.py`` checks the point estimates against
``rliable`` where it is installed, and every statistic against hand-computed values).

Scores are matrices ``(runs, tasks)``: on ``Sasha-WSI-v0`` a *task* is one cohort split (a
study seed: its own train/val/test slides and models) and a *run* is one agent-training
seed on it; the score is a test metric such as AUC.

- :func:`iqm` — interquartile mean over every run × task score: the mean of the middle 50 %,
  robust to one bad run yet using more of the data than the median;
- :func:`stratified_bootstrap` — resample runs with replacement *within each task* (tasks
  are fixed), the interval rliable recommends for few runs;
- :func:`probability_of_improvement` — P(X > Y) per task (the Mann-Whitney U statistic over
  the runs of X and Y, ties counted half), averaged over tasks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["iqm", "mean", "probability_of_improvement", "stratified_bootstrap"]


def _matrix(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"scores must be a non-empty (runs, tasks) matrix, got shape {s.shape}")
    return s


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of all scores ``(runs, tasks)``: the 25 %-trimmed mean.

    As ``scipy.stats.trim_mean(x, 0.25)``: ``⌊0.25·n⌋`` scores are cut from each end of the
    sorted ``n`` scores and the rest averaged.
    """
    flat = np.sort(_matrix(scores).ravel())
    cut = int(0.25 * flat.size)
    return float(flat[cut : flat.size - cut].mean())


def mean(scores: np.ndarray) -> float:
    """Mean of all scores ``(runs, tasks)``."""
    return float(_matrix(scores).mean())


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y): per task, the share of run pairs where X scores higher (ties count ½),
    averaged over tasks.

    Args:
        x: ``(runs_x, tasks)`` scores of algorithm X; y: ``(runs_y, tasks)`` of Y, same tasks.
    """
    x, y = _matrix(x), _matrix(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must share their tasks: {x.shape[1]} != {y.shape[1]}")
    diff = x[:, None, :] - y[None, :, :]  # (runs_x, runs_y, tasks)
    per_task = ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(0, 1))
    return float(per_task.mean())


def stratified_bootstrap(
    statistic: Callable[..., float],
    *scores: np.ndarray,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``statistic(*scores)`` and its percentile interval under a stratified bootstrap.

    Each resample draws, for every matrix and every task independently, as many runs as it
    has with replacement (the tasks themselves are not resampled).

    Returns:
        ``(point, lo, hi)``.
    """
    mats = [_matrix(s) for s in scores]
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        resampled = []
        for m in mats:
            runs, tasks = m.shape
            idx = rng.integers(0, runs, size=(runs, tasks))
            resampled.append(np.take_along_axis(m, idx, axis=0))
        values[b] = statistic(*resampled)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(statistic(*mats)), float(lo), float(hi)
