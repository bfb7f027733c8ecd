"""Adaptive reading in evaluation: the ``sasha_adaptive`` rows, ``adaptive_curve`` and ``referral``.

For each trained agent, evaluation runs one argmax episode per test slide to the agent's cap,
traced zoom by zoom (the ``sasha`` row is its end). The agent's stop rule (fitted on val by
the calibrate stage, ``agents/<algo>-<f>/adaptive.json``) cuts each trace where it fires
(:func:`~sasha_models.stopping.apply_rule`: the same as running the episode under the rule):

- ``sasha_adaptive`` row, ``frac`` = the agent's budget: metrics of the calibrated
  probabilities at each slide's stop, ``mean_frac``, ``frac_p50``, ``frac_p90`` (fraction of
  patches read), ``share_confident``, the rule's ``threshold``, ``refer_below`` and
  ``max_frac`` (its own cap, when ``adaptive.mean_frac`` lowered it below the budget; else
  ``None``: the cap is ``frac``);
- ``adaptive_curve``: at every threshold of :data:`~sasha_models.stopping.THRESHOLDS` (a grid
  fixed beforehand, not chosen on test), the test slides' mean fraction read and AUC with its
  bootstrap interval, for the rule of the fitted one's kind at that threshold
  (:meth:`~sasha_models.stopping.StopRule.at_threshold`: a rule-in rule varies its stop
  classes' threshold only, at the rule's cap);
- ``referral``: :func:`~sasha_models.stopping.referral_metrics` of the rule on test.

Learned stopping (``agents.stop: learned``) is the other way to stop: an agent trained with an
always-legal stop action and a per-zoom cost (``agents/<algo>-<f>-stop/``) decides itself
when to stop. Evaluation runs it on the test slides in its own environment (it changes where
the episode ends, so no trace of the fixed agent can stand in for it) and reports a
``sasha_learned_stop`` row per cap in the same shape (:func:`reading_stats`), paired against
``sasha_adaptive`` at the same cap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sasha_models.stats import percentile_ci, stratified_resamples
from sasha_models.stopping import THRESHOLDS, StopRule, apply_rule, referral_metrics

from ..atomic import write_json
from .calibrate import method_name

__all__ = ["LEARNED_METHOD", "METHOD", "adaptive_results", "nearest", "reading_stats"]

#: The threshold rule's rows (the calibrate stage's stop rule on the fixed agent's traces).
METHOD = "sasha_adaptive"
#: The learned rule's rows (an agent trained with the stop action, ``agents.stop: learned``).
LEARNED_METHOD = "sasha_learned_stop"


def reading_stats(frac_read: np.ndarray) -> dict[str, float]:
    """How much a stopping rule read over the test slides: ``mean_frac``, ``frac_p50`` and
    ``frac_p90``, the mean, median and 90th percentile of ``frac_read`` (``(n,)``, the
    fraction of each slide's patches zoomed)."""
    fr = np.asarray(frac_read, np.float64)
    return {
        "mean_frac": float(fr.mean()),
        "frac_p50": float(np.percentile(fr, 50)),
        "frac_p90": float(np.percentile(fr, 90)),
    }


def adaptive_episodes(episodes: list[dict], rule: StopRule) -> list[dict]:
    """Each traced episode cut where ``rule`` stops it: ``slide_id``, ``label``, ``zoomed``
    (the prefix read), ``frac_read``, ``probabilities`` (calibrated, at the stop),
    ``confidence``, ``stopped``, ``referred``."""
    out = []
    for e in episodes:
        o = apply_rule(e["step_probabilities"], e["step_zoomed"], int(e["n_patches"]), rule)
        out.append(
            {
                "slide_id": e["slide_id"],
                "label": int(e["label"]),
                "zoomed": list(e["zoomed"][: o.n_zoomed]),
                "frac_read": o.frac_read,
                "probabilities": o.probabilities,
                "confidence": o.confidence,
                "stopped": o.stopped,
                "referred": o.referred,
            }
        )
    return out


def adaptive_results(
    agents: dict[float, tuple[StopRule, list[dict]]],
    slide_ids: list[str],
    labels: np.ndarray,
    seed: int,
    n_boot: int,
    level: float,
    episodes_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], list[dict], list[dict], dict[str, tuple[list[str], list[np.ndarray]]]]:
    """``(rows, adaptive_curve, referral, predictions)`` for the agents' traced test episodes.

    Args:
        agents: cap f → (its stop rule, ``run_episodes(..., trace=True)`` on ``slide_ids``).
        slide_ids, labels: the test slides in evaluation order, ``(n,)`` class indices.
        seed, n_boot, level: the bootstrap of the curve's intervals (the same resamples as
            every other interval of ``results.json``).
        episodes_dir: write ``sasha_adaptive-<f>.json`` (per slide: fraction read, stop,
            referral, probabilities) here.

    Returns:
        ``predictions`` maps ``sasha_adaptive@<f>`` to ``(ids, [probs (n, C)])``, for the
        rows' intervals and paired differences.
    """
    from sasha_models.metrics import bootstrap_metrics, classification_metrics  # lazy: torch

    idx = stratified_resamples(labels, n_boot, seed)
    position = {s: i for i, s in enumerate(slide_ids)}
    rows, curve, referral = [], [], []
    predictions: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    for frac, (rule, episodes) in sorted(agents.items()):
        order = [position[e["slide_id"]] for e in episodes]
        y = labels[order]
        eps = adaptive_episodes(episodes, rule)
        probs = np.stack([e["probabilities"] for e in eps])
        fr = np.array([e["frac_read"] for e in eps])
        metrics = {k: _none(v) for k, v in classification_metrics(probs, y).items()}
        rows.append(
            {
                "method": METHOD,
                "frac": float(frac),
                **metrics,
                "n_slides": len(eps),
                **reading_stats(fr),
                "share_confident": float(np.mean([e["stopped"] == "confident" for e in eps])),
                "threshold": rule.threshold,
                "class_thresholds": None
                if rule.class_thresholds is None
                else list(rule.class_thresholds),
                "refer_below": rule.refer_below,
                "max_frac": rule.max_frac,
            }
        )
        predictions[method_name(METHOD, frac)] = ([e["slide_id"] for e in eps], [probs])
        referral.append(
            {
                "method": METHOD,
                "frac": float(frac),
                "refer_below": rule.refer_below,
                **referral_metrics(probs, y, np.array([e["referred"] for e in eps])),
            }
        )
        for t in THRESHOLDS:
            at = adaptive_episodes(episodes, rule.at_threshold(t))
            p = np.empty((len(at), probs.shape[1]), np.float32)
            p[order] = np.stack([e["probabilities"] for e in at])  # slide_ids order
            auc = classification_metrics(p, labels)["auc"]
            boot = bootstrap_metrics([p], labels, idx)["auc"]
            curve.append(
                {
                    "method": METHOD,
                    "frac": float(frac),
                    "threshold": float(t),
                    "mean_frac": float(np.mean([e["frac_read"] for e in at])),
                    "auc": _none(auc),
                    "auc_ci": percentile_ci(boot, level),
                }
            )
        if episodes_dir is not None:
            _save(episodes_dir / f"{METHOD}-{frac:g}.json", eps)
        log(
            f"[evaluate] {METHOD} cap {frac:g}: AUC {_fmt(metrics['auc'])} at mean fraction "
            f"read {fr.mean():.3f} (stop when {rule.describe()}, fixed on val); "
            f"{referral[-1]['share_referred']:.2f} referred"
        )
    return rows, curve, referral, predictions


def nearest(rows: list[dict], method: str, frac: float) -> str | None:
    """``method@<f>`` of the row of ``method`` whose budget is nearest ``frac`` (the smaller
    on a tie), or ``None``."""
    fracs = sorted({float(r["frac"]) for r in rows if r["method"] == method})
    if not fracs:
        return None
    return method_name(method, min(fracs, key=lambda f: (abs(f - frac), f)))


def _save(path: Path, episodes: list[dict]) -> None:
    data: list[dict[str, Any]] = [
        {**e, "probabilities": [float(p) for p in e["probabilities"]]} for e in episodes
    ]
    write_json(path, data, indent=None)


def _none(v: float) -> float | None:
    return None if v is None or np.isnan(v) else float(v)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
