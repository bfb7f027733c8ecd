"""Aggregate RL statistics (IQM, stratified bootstrap, probability of improvement)."""

from __future__ import annotations

import numpy as np
import pytest

from sasha_models.stats import (
    iqm,
    mean,
    probability_of_improvement,
    stratified_bootstrap,
)


def test_iqm_by_hand():
    assert iqm(np.arange(1, 9).reshape(4, 2)) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    one_bad_run = np.array([[0.0, 10], [10, 10], [10, 10], [10, 100]])
    assert iqm(one_bad_run) == pytest.approx(10.0) and mean(one_bad_run) == pytest.approx(20.0)


def test_probability_of_improvement_by_hand():
    x = np.array([[1.0, 2], [3, 4]])
    y = np.array([[2.0, 2], [1, 5]])
    # task 0: (1>2) 0, (1=1) ½, (3>2) 1, (3>1) 1 -> 0.625; task 1: ½, 0, 1, 0 -> 0.375
    assert probability_of_improvement(x, y) == pytest.approx(0.5)
    assert probability_of_improvement(x + 10, y) == 1.0
    assert probability_of_improvement(y, y) == 0.5
    with pytest.raises(ValueError, match="share their tasks"):
        probability_of_improvement(x, y[:, :1])


def test_stratified_bootstrap_resamples_runs_within_tasks():
    # every run of task 0 scores 0, of task 1 scores 1: resampling within tasks keeps the
    # mean at exactly 0.5; resampling across tasks would not
    scores = np.array([[0.0, 1.0]] * 5)
    point, lo, hi = stratified_bootstrap(mean, scores, n_boot=200)
    assert point == lo == hi == 0.5
    rng = np.random.default_rng(0)
    noisy = rng.normal(0.8, 0.05, size=(10, 3))
    point, lo, hi = stratified_bootstrap(iqm, noisy, n_boot=500)
    assert lo < point < hi and hi - lo < 0.1
    p, plo, phi = stratified_bootstrap(probability_of_improvement, noisy + 0.03, noisy, n_boot=300)
    assert p > 0.5 and plo <= p <= phi


def test_point_estimates_match_rliable():
    metrics = pytest.importorskip("rliable.metrics")
    rng = np.random.default_rng(1)
    x, y = rng.random((5, 4)), rng.random((3, 4))
    x[0, 0] = y[0, 0]  # a tie
    assert iqm(x) == pytest.approx(metrics.aggregate_iqm(x))
    assert probability_of_improvement(x, y) == pytest.approx(
        metrics.probability_of_improvement(x, y)
    )


def test_median_optimality_gap_and_profiles_by_hand_and_against_rliable():
    from sasha_models.stats import median, optimality_gap, performance_profile

    s = np.array([[0.2, 1.0], [0.6, 0.8], [1.0, 0.4]])
    assert median(s) == pytest.approx((0.6 + 2.2 / 3) / 2)  # median of the task means
    assert optimality_gap(s) == pytest.approx((0.8 + 0.4 + 0.0 + 0.0 + 0.2 + 0.6) / 6)
    # tau 0.5: task 0 has 2/3 runs above, task 1 2/3 -> 2/3; tau 0.9: 1/3 and 1/3
    assert performance_profile(s, np.array([0.5, 0.9])) == pytest.approx([2 / 3, 1 / 3])
    metrics = pytest.importorskip("rliable.metrics")
    rng = np.random.default_rng(2)
    x = rng.random((5, 3))
    assert median(x) == pytest.approx(metrics.aggregate_median(x))
    assert optimality_gap(x) == pytest.approx(metrics.aggregate_optimality_gap(x))
    rly = pytest.importorskip("rliable.library")
    taus = np.linspace(0, 1, 11)
    point, _ = rly.create_performance_profile({"x": x}, taus)
    assert performance_profile(x, taus) == pytest.approx(point["x"])


def test_auc_of_a_perfect_ranking_is_exactly_one() -> None:
    """torchmetrics' float32 AUROC gives 1.0000001 on these 21 slides (11 negative, 10 positive,
    perfectly ranked); results.json and the benchmark's tables must say 1.0."""
    import torch

    from sasha_models.metrics import classification_metrics

    p1 = torch.tensor([
        0.28018438816070557, 0.6327850818634033, 0.3554917871952057, 0.7965039014816284,
        0.04279908537864685, 0.6163788437843323, 0.46240702271461487, 0.5781302452087402,
        0.2289990484714508, 0.5999546051025391, 0.15202972292900085, 0.9087328910827637,
        0.14880484342575073, 0.9583863019943237, 0.39292845129966736, 0.7460613250732422,
        0.22209453582763672, 0.6604255437850952, 0.337130069732666, 0.9604921340942383,
        0.43654707074165344,
    ])  # fmt: skip
    y = torch.arange(21) % 2
    probs = torch.stack([1 - p1, p1], 1)
    assert classification_metrics(probs, y)["auc"] == 1.0
