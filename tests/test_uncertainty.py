"""Intervals on every number: bootstrap over test slides, and paired differences between methods."""

from __future__ import annotations

import numpy as np
import pytest

from sasha_env.pipeline.evaluate import add_uncertainty, format_table
from sasha_models.metrics import _metrics_batch, bootstrap_metrics, classification_metrics
from sasha_models.stats import stratified_resamples


def _probs(labels: np.ndarray, skill: float, rng: np.random.Generator) -> np.ndarray:
    """Two-class probabilities whose positive score separates the classes by ``skill``."""
    score = 1 / (1 + np.exp(-(skill * (2 * labels - 1) + rng.normal(size=len(labels)))))
    return np.stack([1 - score, score], 1)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_resampled_metrics_match_classification_metrics(n_classes):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, n_classes, 30)
    probs = np.round(rng.dirichlet(np.ones(n_classes), 30), 1)  # ties included
    ref = classification_metrics(probs, labels)
    got = _metrics_batch(probs, labels, np.arange(30)[None])
    for k in ("accuracy", "auc", "f1"):
        assert got[k][0] == pytest.approx(ref[k], abs=1e-6)


def test_resamples_keep_class_counts():
    labels = np.array([0] * 7 + [1] * 4)
    idx = stratified_resamples(labels, 500, seed=1)
    assert idx.shape == (500, 11)
    assert (labels[idx].sum(1) == 4).all()


def _rows_and_predictions(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * (n // 2))
    ids = [f"s{i}" for i in range(n)]
    good, weak = _probs(labels, 3.0, rng), _probs(labels, 0.2, rng)
    randoms = [_probs(labels, 0.0, rng) for _ in range(3)]  # chance
    predictions = {
        "hafed@1": (ids, [good]),
        "sasha@0.1": (ids[::-1], [good[::-1]]),  # another slide order: aligned by id
        "random@0.1": (ids, randoms),
        "attention_topk@0.1": (ids, [weak]),
    }
    rows = []
    for name, (_, runs) in predictions.items():
        method, frac = name.split("@")
        per_run = [classification_metrics(r, labels) for r in runs]
        rows.append({"method": method, "frac": float(frac)} | {
            k: float(np.mean([m[k] for m in per_run])) for k in ("auc", "accuracy", "f1")
        })  # fmt: skip
    rows[1] = rows[1] | classification_metrics(good, labels)
    return rows, predictions, ids, labels


def test_intervals_and_paired_differences():
    rows, predictions, ids, labels = _rows_and_predictions(40)
    paired = add_uncertainty(rows, predictions, ids, labels, seed=0, n_boot=1000)
    by = {(r["method"]): r for r in rows}
    for r in rows:
        lo, hi = r["auc_ci"]
        assert lo <= r["auc"] <= hi and lo >= 0 and hi <= 1
        assert r["accuracy_ci"] is not None and r["f1_ci"] is not None
    assert by["random"]["auc_ci"][0] < 0.5 < by["sasha"]["auc_ci"][0]
    pairs = {(p["a"], p["b"], p["metric"]): p for p in paired}
    better = pairs["sasha@0.1", "random@0.1", "auc"]
    assert better["diff"] == pytest.approx(by["sasha"]["auc"] - by["random"]["auc"])
    assert better["ci"][0] > 0  # clearly better: the interval excludes 0
    same = pairs["sasha@0.1", "hafed@1", "auc"]  # identical predictions
    assert same["diff"] == pytest.approx(0) and same["ci"] == [0.0, 0.0]
    assert {p["metric"] for p in paired} == {"auc", "accuracy"}
    table = format_table({"methods": rows, "paired": paired, "n_slides": 40})
    assert "| sasha@0.1 − random@0.1 | auc | +" in table and "40 test slides" in table


def test_intervals_narrow_with_more_slides():
    widths = []
    for n in (20, 200):
        rows, predictions, ids, labels = _rows_and_predictions(n, seed=3)
        add_uncertainty(rows, predictions, ids, labels, n_boot=1000)
        lo, hi = next(r for r in rows if r["method"] == "attention_topk")["auc_ci"]
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_bootstrap_averages_runs_inside_each_resample():
    labels = np.array([0, 1] * 10)
    a = np.stack([1 - labels, labels], 1).astype(float)  # perfect
    b = a[:, ::-1].copy()  # perfectly wrong
    idx = stratified_resamples(labels, 50, seed=0)
    mixed = bootstrap_metrics([a, b], labels, idx)
    assert np.allclose(mixed["auc"], 0.5) and np.allclose(mixed["accuracy"], 0.5)


def test_bootstrap_auc_against_a_hand_computed_case():
    """One negative (score 0.5) and two positives (0.9 and 0.1). Resampling within classes
    draws the positives as aa, ab, ba or bb, each with probability 1/4, whose AUCs are 1, 1/2,
    1/2 and 0: the resampled AUC is 1, 0.5, 0 with probabilities 1/4, 1/2, 1/4, so its 95 %
    interval is [0, 1] and its mean 0.5."""
    labels = np.array([0, 1, 1])
    probs = np.array([[0.5, 0.5], [0.1, 0.9], [0.9, 0.1]])
    idx = stratified_resamples(labels, 20_000, seed=0)
    auc = bootstrap_metrics([probs], labels, idx)["auc"]
    values, counts = np.unique(auc, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(counts / counts.sum(), [0.25, 0.5, 0.25], atol=0.01)
    from sasha_models.stats import percentile_ci

    assert percentile_ci(auc) == [0.0, 1.0]
