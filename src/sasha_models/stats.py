"""Statistics of evaluation numbers: how much a number would move, and how to sum up many.

Pure numpy (scipy for the t distribution); the metrics themselves are in
:mod:`sasha_models.metrics`.

Over the slides of one test split (``results.json``):

- :func:`stratified_resamples` — bootstrap resamples of the slides, drawn within each class;
- :func:`percentile_ci` — the percentile interval of bootstrap values.

Over seeds (``study.json``): :func:`mean_sd` and :func:`t_interval`, the Student-t interval
of the mean.

Over runs and tasks, for comparing RL algorithms over few runs (Agarwal et al., 2021): the
statistics of the ``rliable`` library, written out here so the benchmark needs neither it
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
  the runs of X and Y, ties counted half), averaged over tasks;
- :func:`median` and :func:`optimality_gap` (how far scores fall short of a target γ, on
  average) — rliable's other aggregates;
- :func:`performance_profile` — the fraction of runs scoring above each threshold τ (per task,
  then averaged over tasks), rliable's score distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "iqm",
    "mean",
    "mean_sd",
    "median",
    "optimality_gap",
    "performance_profile",
    "percentile_ci",
    "probability_of_improvement",
    "stratified_bootstrap",
    "stratified_resamples",
    "t_interval",
]


# ----------------------------------------------------------------------------- over slides


def stratified_resamples(labels: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n)`` bootstrap resamples of slide indices, drawn with replacement within
    each class, so that every resample keeps the class counts (and AUC stays defined)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    idx = np.empty((n_boot, len(labels)), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        idx[:, members] = members[rng.integers(0, len(members), (n_boot, len(members)))]
    return idx


def percentile_ci(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """The ``level`` percentile interval of bootstrap values (NaNs dropped), or None."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


# ----------------------------------------------------------------------------- over seeds


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd (``ddof=1``; 0 for one value) of the values that are neither None
    nor NaN; ``(None, None)`` when none is."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return float(np.mean(vals)), sd


def t_interval(
    values: Sequence[float | None], level: float = 0.95, bounds: tuple[float, float] = (0.0, 1.0)
) -> list[float] | None:
    """Student-t interval of the mean over seeds, clipped to the metric's ``bounds`` (None for
    fewer than two values; None and NaN values are left out). With few seeds the t interval of
    a metric near 1 reaches past 1; the clip keeps it a statement about possible values."""
    from scipy.stats import t as student_t  # lazy: scipy only when an interval is asked for

    vals = [v for v in values if v is not None and not math.isnan(v)]
    if len(vals) < 2:
        return None
    mean, sd = float(np.mean(vals)), float(np.std(vals, ddof=1))
    half = float(student_t.ppf(0.5 + level / 2, len(vals) - 1)) * sd / math.sqrt(len(vals))
    return [max(bounds[0], mean - half), min(bounds[1], mean + half)]


# ---------------------------------------------------------------------- over runs and tasks


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


def median(scores: np.ndarray) -> float:
    """rliable's median: the median over tasks of each task's mean score ``(runs, tasks)``."""
    return float(np.median(_matrix(scores).mean(axis=0)))


def optimality_gap(scores: np.ndarray, gamma: float = 1.0) -> float:
    """rliable's optimality gap: the mean of ``max(γ − score, 0)`` over all scores
    ``(runs, tasks)``; lower is better (0: every run reaches γ). For AUC, γ = 1."""
    return float(np.maximum(gamma - _matrix(scores), 0.0).mean())


def performance_profile(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """The fraction of runs scoring above each threshold: ``(len(taus),)``, per task then
    averaged over tasks (rliable's ``run_score_distributions``).

    Args:
        scores: ``(runs, tasks)``.
        taus: thresholds ``(T,)``.
    """
    s = _matrix(scores)
    t = np.asarray(taus, np.float64)
    return (s[None, :, :] > t[:, None, None]).mean(axis=1).mean(axis=1)


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
