"""Adaptive reading for trained agents: the stop rule stored beside each agent.

The calibrate stage fits a :class:`~sasha_models.stopping.StopRule` per agent on the val
split (:func:`fit_agent_rule`) and writes it to ``agents/<algo>-<f>/adaptive.json``
(:func:`write_stop_rule`); evaluation, ``sasha predict --adaptive`` and
``SashaWSIEnv(stop_rule=...)`` read it back with :func:`read_stop_rule`. The agent's budget f
is the rule's cap, unless ``adaptive.mean_frac`` lowered it (the rule's ``max_frac``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sasha_models.calibration import KINDS, Calibration
from sasha_models.stopping import StopRule, fit_capped_rule, fit_stop_rule

from ..atomic import write_json
from ..config import dataclass_from_dict

__all__ = [
    "ADAPTIVE_FILE",
    "AdaptiveConfig",
    "fit_agent_rule",
    "read_stop_rule",
    "stop_class_indices",
    "traces",
    "write_stop_rule",
]

#: The stop rule's file in an agent's folder.
ADAPTIVE_FILE = "adaptive.json"


@dataclass(frozen=True)
class AdaptiveConfig:
    """How the stop rule is fitted on val (config section ``adaptive``)."""

    margin: float = 0.01
    """The stop threshold reads least among those whose val AUC is at least HAFED's val AUC
    minus this."""
    max_auto_error: float = 0.05
    """The referral threshold is the lowest at which the val slides decided automatically err
    on at most this share of them."""
    calibration: str = "temperature+bias"
    """Which of the calibrate stage's calibrations gives the confidence (``temperature`` or
    ``temperature+bias``)."""
    per_class: bool = False
    """One stop threshold per class, fitted on val the same way (a slide can be ruled in by
    the first zoom on tumour and ruled out only later), instead of one for every class."""
    stop_classes: list[str] | None = None
    """Class names (the manifest's labels) that may stop a slide early, each with its own
    threshold fitted on val; the other classes never stop it (e.g. ``[tumor]``: rule a slide in
    as soon as the classifier is sure of tumour, never rule it out before the cap). ``None``:
    every class (with ``per_class``, each its own threshold; without, one for all)."""
    nll_margin: float | None = None
    """``None``: the stop threshold is held to val AUC only. A number: also to the val slides'
    mean negative log-likelihood at the stop, at most this much above reading every slide to
    the cap (AUC on 15 slides cannot see a slide ruled out with a confident wrong answer that
    still ranks right)."""
    mean_frac: float | None = None
    """``None``: each agent's rule reads at most to the agent's budget f. A fraction of the
    patches: the most a rule may read on average over the val slides; each agent's cap is
    lowered from f in steps of 0.01, the thresholds refitted at each, until its rule meets it
    on val (:func:`~sasha_models.stopping.fit_capped_rule`; e.g. 0.1 with ``stop_classes:
    [tumor]`` reads tumour slides until ruled in and normal-looking ones to the lowered cap)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AdaptiveConfig:
        cfg = dataclass_from_dict(cls, d, "adaptive")
        if cfg.stop_classes is not None and not cfg.stop_classes:
            raise ValueError("adaptive.stop_classes must name at least one class, or be null")
        if cfg.nll_margin is not None and cfg.nll_margin < 0:
            raise ValueError(f"adaptive.nll_margin must be >= 0 or null; got {cfg.nll_margin}")
        if cfg.mean_frac is not None and not 0 < cfg.mean_frac <= 1:
            raise ValueError(f"adaptive.mean_frac must be in (0, 1] or null; got {cfg.mean_frac}")
        if not 0 <= cfg.margin <= 1 or not 0 <= cfg.max_auto_error <= 1:
            raise ValueError(
                f"adaptive.margin and adaptive.max_auto_error must be in [0, 1]; got {cfg}"
            )
        if cfg.calibration not in KINDS:
            raise ValueError(
                f"adaptive.calibration = {cfg.calibration!r}: choose one of {', '.join(KINDS)}"
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def traces(episodes: list[dict]) -> list[tuple[np.ndarray, list[int], int]]:
    """``(step_probabilities, step_zoomed, n_patches)`` of each episode of
    ``run_episodes(..., trace=True)``, as :func:`~sasha_models.stopping.apply_rule` takes them."""
    return [(e["step_probabilities"], e["step_zoomed"], int(e["n_patches"])) for e in episodes]


def fit_agent_rule(
    episodes: list[dict],
    acfg: AdaptiveConfig,
    calibration: Calibration | None,
    target_auc: float | None,
    cap: float,
    class_names: list[str] | None = None,
) -> StopRule:
    """Fit an agent's stop rule on its val episodes (:func:`~sasha_models.stopping.fit_stop_rule`).

    Args:
        episodes: ``run_episodes(..., trace=True)`` of the agent (argmax) on the val slides,
            each to its cap.
        calibration: the agent's final-state calibration (kind ``acfg.calibration``).
        target_auc: HAFED's AUC on the same val slides.
        cap: the agent's budget f, recorded with the rule (with ``acfg.mean_frac``, the rule's
            own cap may be lower: its ``max_frac``).
        class_names: the classes in index order (needed with ``acfg.stop_classes``).
    """
    labels = np.array([e["label"] for e in episodes])
    fit: dict[str, Any] = {
        "margin": acfg.margin,
        "max_auto_error": acfg.max_auto_error,
        "per_class": acfg.per_class,
        "nll_margin": acfg.nll_margin,
        "stop_classes": stop_class_indices(acfg, class_names),
    }
    if acfg.mean_frac is None:
        rule = fit_stop_rule(traces(episodes), labels, calibration, target_auc, **fit)
    else:
        rule = fit_capped_rule(
            traces(episodes), labels, calibration, target_auc, acfg.mean_frac, cap, **fit
        )
    info = {**rule.info, "cap": float(cap), "calibration_kind": acfg.calibration}
    return dataclasses.replace(rule, info=info)


def stop_class_indices(acfg: AdaptiveConfig, class_names: list[str] | None) -> list[int] | None:
    """The indices of ``acfg.stop_classes`` among ``class_names``; a name that is not a class
    is a ``ValueError`` naming the classes there are."""
    if acfg.stop_classes is None:
        return None
    names = [str(c) for c in class_names or []]
    missing = [c for c in acfg.stop_classes if str(c) not in names]
    if missing:
        raise ValueError(
            f"adaptive.stop_classes {missing} are not classes of this cohort; its classes are "
            f"{names}"
        )
    return [names.index(str(c)) for c in acfg.stop_classes]


def write_stop_rule(agent_dir: str | Path, rule: StopRule) -> Path:
    """Write ``rule`` to ``agent_dir/adaptive.json`` (atomically); returns the path."""
    path = Path(agent_dir) / ADAPTIVE_FILE
    write_json(path, rule.to_dict())
    return path


def read_stop_rule(agent_dir: str | Path) -> StopRule | None:
    """The stop rule stored beside an agent, or ``None`` when it has none (fitted by the
    calibrate stage); a malformed file is a ``ValueError`` naming it."""
    path = Path(agent_dir) / ADAPTIVE_FILE
    if not path.is_file():
        return None
    try:
        return StopRule.from_dict(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{path}: not a valid stop rule ({exc!r}); re-run the calibrate stage "
            "(sasha pipeline --workdir DIR --force calibrate)"
        ) from exc
