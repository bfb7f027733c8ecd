"""Slide-level classification metrics (torchmetrics), shared by training and evaluation, and
the same metrics over many bootstrap resamples of the slides at once (for intervals and paired
differences between methods on the same resamples; the resampling and the intervals are in
:mod:`sasha_models.stats`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_f1_score,
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_f1_score,
)

__all__ = [
    "ECE_BINS",
    "bootstrap_metrics",
    "classification_metrics",
]

#: Number of equal-width confidence bins of the expected calibration error.
ECE_BINS = 15


def classification_metrics(
    probs: Tensor | np.ndarray, labels: Tensor | np.ndarray
) -> dict[str, float]:
    """Accuracy, AUC, F1 and ECE of slide predictions.

    Binary problems (C = 2): AUROC of the positive-class probability and F1 of the positive
    class. C > 2: macro one-vs-rest AUROC (over the classes present in ``labels``) and macro
    F1. Predictions are the argmax class. ECE is the top-label calibration error with
    :data:`ECE_BINS` bins for every C. AUC is NaN when ``labels`` holds a single class; all
    metrics are NaN for an empty input.

    Args:
        probs: ``(n, C)`` class probabilities.
        labels: ``(n,)`` integer class indices.

    Returns:
        ``{'accuracy', 'auc', 'f1', 'ece'}`` as Python floats.
    """
    p = torch.as_tensor(np.ascontiguousarray(probs) if not isinstance(probs, Tensor) else probs)
    p = p.detach().float().cpu()
    y = torch.as_tensor(np.ascontiguousarray(labels) if not isinstance(labels, Tensor) else labels)
    y = y.detach().long().cpu().reshape(-1)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(
            f"probs must be (n, C) and labels (n,); got {tuple(p.shape)}, {tuple(y.shape)}"
        )
    nan = float("nan")
    if y.numel() == 0:
        return {"accuracy": nan, "auc": nan, "f1": nan, "ece": nan}
    n_classes = p.shape[1]
    pred = p.argmax(1)
    present = torch.unique(y)
    if n_classes == 2:
        auc = binary_auroc(p[:, 1], y).item() if present.numel() == 2 else nan
        f1 = binary_f1_score(pred, y).item()
    else:
        if present.numel() >= 2:
            per_class = multiclass_auroc(p, y, num_classes=n_classes, average=None)
            auc = per_class[present].mean().item()
        else:
            auc = nan
        f1 = multiclass_f1_score(pred, y, num_classes=n_classes, average="macro").item()
    # torchmetrics' AUROC sums float32 trapezoids: a perfect ranking can come out 1.0000001
    auc = min(max(auc, 0.0), 1.0) if auc == auc else auc  # (NaN stays NaN)
    ece = multiclass_calibration_error(p, y, num_classes=n_classes, n_bins=ECE_BINS).item()
    accuracy = (pred == y).float().mean().item()
    return {"accuracy": accuracy, "auc": auc, "f1": f1, "ece": ece}


# ----------------------------------------------------------------------------- over resamples


def _auc_batch(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of each row: ``scores (B, n)``, ``positive (B, n)`` bool; NaN without both classes.

    The Mann–Whitney statistic with average ranks for ties (what ROC integration gives).
    """
    from scipy.stats import rankdata  # lazy: scipy only for bootstrap resamples

    ranks = rankdata(scores, axis=1)
    n_pos = positive.sum(1)
    n_neg = positive.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * positive).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _metrics_batch(probs: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, AUC and F1 (as :func:`classification_metrics` defines them) of each resample.

    Args:
        probs: ``(n, C)``; labels: ``(n,)``; idx: ``(B, n)`` slide indices of B resamples.

    Returns:
        ``{'accuracy', 'auc', 'f1'}``, each ``(B,)``.
    """
    p, y = probs[idx], labels[idx]  # (B, n, C), (B, n)
    pred = p.argmax(-1)
    n_classes = probs.shape[1]
    accuracy = (pred == y).mean(1)
    if n_classes == 2:
        auc = _auc_batch(p[..., 1], y == 1)
        tp = ((pred == 1) & (y == 1)).sum(1)
        fp = ((pred == 1) & (y != 1)).sum(1)
        fn = ((pred != 1) & (y == 1)).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.nan_to_num(2 * tp / (2 * tp + fp + fn))
    else:
        aucs, f1s = [], []
        for c in range(n_classes):
            aucs.append(_auc_batch(p[..., c], y == c))
            tp = ((pred == c) & (y == c)).sum(1)
            fp = ((pred == c) & (y != c)).sum(1)
            fn = ((pred != c) & (y == c)).sum(1)
            with np.errstate(invalid="ignore", divide="ignore"):
                f1s.append(np.nan_to_num(2 * tp / (2 * tp + fp + fn)))
        with np.errstate(invalid="ignore"):
            auc = np.nanmean(np.stack(aucs, 1), axis=1)  # macro over the classes present
        f1 = np.mean(np.stack(f1s, 1), axis=1)
    return {"accuracy": accuracy, "auc": auc, "f1": f1}


def bootstrap_metrics(
    runs: list[np.ndarray], labels: np.ndarray, idx: np.ndarray
) -> dict[str, np.ndarray]:
    """Each resample's accuracy, AUC and F1, averaged over ``runs`` (e.g. random seeds).

    Args:
        runs: one ``(n, C)`` probability array per run, slides in the same order as ``labels``.
        labels: ``(n,)`` class indices.
        idx: ``(B, n)`` resamples (:func:`~sasha_models.stats.stratified_resamples`); use
            the same ``idx`` for two methods to get paired differences.

    Returns:
        ``{'accuracy', 'auc', 'f1'}``, each ``(B,)``.
    """
    per_run = [_metrics_batch(np.asarray(r, np.float64), np.asarray(labels), idx) for r in runs]
    return {k: np.mean([m[k] for m in per_run], axis=0) for k in per_run[0]}
