"""Slide-level classification metrics (torchmetrics), shared by training and evaluation."""

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

__all__ = ["ECE_BINS", "classification_metrics"]

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
    p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, Tensor) else probs)
    p = p.detach().float().cpu()
    y = torch.as_tensor(labels).detach().long().cpu().reshape(-1)
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
    ece = multiclass_calibration_error(p, y, num_classes=n_classes, n_bins=ECE_BINS).item()
    accuracy = (pred == y).float().mean().item()
    return {"accuracy": accuracy, "auc": auc, "f1": f1, "ece": ece}
