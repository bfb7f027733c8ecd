"""The official criterion that picks a validation-selected agent: ``(2 − AUC − F1) + CE``.

SASHA's official training keeps the epoch with the lowest criterion on the validation slides;
:class:`~sasha_env.agents.callbacks.ValSelection` applies it while an agent trains. Pure
scoring: no SB3 here.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["selection_score"]


def selection_score(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The official selection criterion on validation slides, lower is better.

    Args:
        probs: ``(n, C)`` final-state class probabilities; labels: ``(n,)`` class indices.

    Returns:
        ``{'auc', 'f1', 'accuracy', 'ce', 'score'}`` with ``score = (2 − AUC − F1) + CE``
        (an undefined AUC, one class only, counts as 0.5).
    """
    from sasha_models.metrics import classification_metrics  # lazy: torchmetrics, on use

    m = classification_metrics(probs, labels)
    p = np.clip(np.asarray(probs, np.float64)[np.arange(len(labels)), labels], 1e-12, 1.0)
    ce = float(-np.log(p).mean())
    auc = 0.5 if math.isnan(m["auc"]) else m["auc"]
    return {
        "auc": m["auc"],
        "f1": m["f1"],
        "accuracy": m["accuracy"],
        "ce": ce,
        "score": (2 - auc - m["f1"]) + ce,
    }
