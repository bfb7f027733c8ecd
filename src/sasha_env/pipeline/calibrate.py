"""The calibrate stage: fit a temperature and class bias per method on the validation split.

For HAFED (its slide probabilities on full high-res bags) and for each trained SASHA agent
(HAFED's probabilities on the final state of the agent's argmax episode at budget f), two
:class:`sasha_models.calibration.Calibration` are fitted on the val slides — a temperature
alone, and a temperature with a class bias — and written to ``WORKDIR/calibration.json``::

    {"split": "val", "n_slides": 15, "kinds": ["temperature", "temperature+bias"],
     "methods": {"hafed@1": {"temperature": {"temperature", "bias", "n_fit", "nll_before",
     "nll_after"}, "temperature+bias": {...}}, "sasha@0.1": {..., "members": 1}, ...}}

(``members``: the agents that acted together in the episodes, ``agents.ensemble``.)

Evaluation reports every calibrated method's accuracy, F1 and ECE before and after each, and
``sasha predict`` returns calibrated probabilities (temperature and bias by default).

Each agent's stop rule (:mod:`~sasha_env.agents.adaptive`: stop when confident, refer when
not) is fitted here too, on the same val episodes traced zoom by zoom, and written beside the
agent (``agents/<algo>-<f>/adaptive.json``). With ``agents.stop: learned`` each learned-stop
agent's final states (where it stopped on val) get their calibration too
(``sasha_learned_stop@<f>``); it has no threshold rule (it stops by itself). The test split is
never looked at here.

:func:`fold_hafed_temperature` is the HAFED stage's own calibration (``hafed.temperature``):
a temperature fitted on the same val slides and folded into HAFED's heads before any later
stage reads it, so the agents' reward is the log-loss of calibrated probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from ..agents.config import AgentConfig
from ..atomic import write_json
from ..config import say
from ..features.bags import StoreBags
from ..features.store import FeatureStore
from ..slides.manifest import read_manifest
from ..workdir import Workdir

if TYPE_CHECKING:
    from sasha_models.data import BagSource
    from sasha_models.hafed import HAFED

__all__ = ["calibrate_workdir", "fold_hafed_temperature", "method_name"]


def method_name(method: str, frac: float) -> str:
    """``sasha@0.1``: a method at a budget (as ``results.json``'s ``paired`` names them)."""
    return f"{method}@{frac:g}"


def fold_hafed_temperature(
    path: Path,
    bags: BagSource,
    setting: float | str,
    split: str = "val",
    log: Callable[[str], None] = say,
) -> float:
    """Fold a temperature into the exported HAFED at ``path`` (rewritten in place, whole or
    not at all), ``hafed.temperature``.

    HAFED's probabilities are the agents' reward (``−CE`` on each state); trained to separate
    full high-res bags, they can sit near 0.5, where a zoom into tumour moves the reward by
    little (docs/budget-f02.md). With ``setting="val"`` a temperature T is fitted on the
    ``split`` slides' full high-res bags (:func:`~sasha_models.calibration.fit_calibration`,
    temperature alone: what the calibrate stage fits as ``hafed@1``) and the heads are divided
    by it (:meth:`~sasha_models.hafed.HAFED.fold_temperature`); a number is used as T as
    given; ``1`` leaves the model as it is. The attention and the distillation are unchanged,
    and so are HAFED's own ranking of slides (its AUC) and every state the TSU produces; what
    changes is the probabilities, hence the agents' reward. The export's
    ``meta["temperature"]`` records T and its fit.

    Args:
        path: HAFED's ``model.pt`` (the stage's fresh export; one already folded is left as
            it is, so a second call never folds twice).
        bags: the workdir's slides.
        setting: ``"val"``, or T > 0.
        split: the split T is fitted on (with no slide there, T = 1).
        log: where the fitted T is reported.

    Returns:
        T (1.0 when nothing was folded).
    """
    from sasha_models.calibration import fit_calibration  # lazy: torch, when the stage runs
    from sasha_models.checkpoint import export_dict, load_export, save_export
    from sasha_models.lit import predict_probs

    if setting == 1:
        return 1.0
    model, meta = load_export(path, ("hafed",))
    if "temperature" in meta:  # folded when this export was written
        return float(meta["temperature"]["value"])
    hafed = cast("HAFED", model)
    if setting == "val":
        _, probs, labels = predict_probs(hafed, bags, split, "highres")
        fitted = fit_calibration(probs, labels, bias=False)
        temperature = fitted.temperature
        record = {
            "value": temperature,
            "fitted_on": split,
            "n_fit": fitted.n_fit,
            "nll_before": fitted.nll_before,
            "nll_after": fitted.nll_after,
        }
        log(
            f"[hafed] temperature T = {temperature:.3f} fitted on {fitted.n_fit} {split} slides "
            f"(NLL {fitted.nll_before:.3f} -> {fitted.nll_after:.3f}), folded into the heads"
        )
    else:
        temperature = float(setting)
        record = {"value": temperature, "fitted_on": None}
        log(f"[hafed] temperature T = {temperature:g} (hafed.temperature), folded into the heads")
    hafed.fold_temperature(temperature)
    meta["temperature"] = record
    save_export(path, export_dict(hafed, "hafed", hafed.cfg.to_dict(), meta))
    return temperature


def calibrate_workdir(
    wd: Workdir, cfg: dict, split: str = "val", log: Callable[[str], None] = say
) -> dict:
    """Fit and write ``calibration.json`` for HAFED and every trained SASHA agent (learned-stop
    agents included), and each fixed-budget agent's stop rule."""
    from sasha_models.calibration import (  # lazy: torch, when the stage runs
        KINDS,
        MEMBERS,
        Calibration,
        fit_calibration,
    )
    from sasha_models.lit import load_model, predict_probs  # lazy: Lightning, as above
    from sasha_models.metrics import classification_metrics  # lazy: torchmetrics, as above

    from ..agents.adaptive import AdaptiveConfig, fit_agent_rule, write_stop_rule  # lazy: as above
    from ..agents.envs import has_agent, load_agent  # lazy: SB3 and torch, as above
    from ..agents.episodes import agent_policy, run_episodes  # lazy: as above

    bags = StoreBags(FeatureStore(wd.store), read_manifest(wd.manifest))
    ids = bags.slide_ids(split)
    if not ids:
        raise RuntimeError(f"no slide of split '{split}' is in the store; cannot calibrate")
    fitted: dict[str, dict] = {}

    def fit(name: str, probs: np.ndarray, labels: np.ndarray) -> None:
        t, tb = fit_calibration(probs, labels, bias=False), fit_calibration(probs, labels)
        fitted[name] = {KINDS[0]: t.to_dict(), KINDS[1]: tb.to_dict()}
        log(
            f"[calibrate] {name}: T = {t.temperature:.3f} (val NLL {t.nll_before:.3f} -> "
            f"{t.nll_after:.3f}); with bias T = {tb.temperature:.3f}, b = {tb.bias[-1]:+.3f} "
            f"(-> {tb.nll_after:.3f})"
        )

    _, probs, labels = predict_probs(
        load_model(wd.require(wd.model("hafed"), "hafed")), bags, split, "highres"
    )
    fit(method_name("hafed", 1.0), np.asarray(probs), np.asarray(labels))
    hafed_auc = classification_metrics(np.asarray(probs), np.asarray(labels))["auc"]
    target = None if np.isnan(hafed_auc) else float(hafed_auc)
    adaptive = AdaptiveConfig.from_dict(cfg.get("adaptive"))
    acfg = AgentConfig.from_dict(cfg.get("agents"))
    for frac in acfg.fracs:
        if not has_agent(wd, frac, acfg.algo):
            continue
        agent = load_agent(wd, frac, acfg.algo, ensemble=acfg.ensemble)
        env = agent.make_env(wd, split, acfg)
        episodes = run_episodes(env, agent_policy(agent.policy), ids, trace=True)
        name = method_name("sasha", frac)
        fit(
            name,
            np.stack([e["probabilities"] for e in episodes]),
            np.array([e["label"] for e in episodes]),
        )
        fitted[name][MEMBERS] = acfg.ensemble  # the agent it was fitted on (agents.ensemble)
        calibration = Calibration.from_dict(fitted[name][adaptive.calibration])
        rule = fit_agent_rule(episodes, adaptive, calibration, target, frac, bags.class_names)
        rule.info["members"] = acfg.ensemble  # the agent it was fitted on (agents.ensemble)
        write_stop_rule(agent.path, rule)
        log(
            f"[calibrate] {name}: stop when {rule.describe()} (val: mean fraction "
            f"read {rule.info['val_mean_frac']:.3f}, AUC {_fmt(rule.info['val_auc'])}, HAFED "
            f"{_fmt(target)}); refer below {rule.refer_below:.3f} at the cap"
        )
        if rule.info.get("budget_met") is False:
            log(
                f"[calibrate] warning: {name}: no cap meets adaptive.mean_frac = "
                f"{adaptive.mean_frac:g} on val; the rule reads at most {rule.max_frac:g} "
                f"({rule.info['val_mean_frac']:.3f} on average on val)"
            )
    for frac in acfg.fracs if acfg.stop == "learned" else ():
        if not has_agent(wd, frac, acfg.algo, learned_stop=True):
            continue
        stopper = load_agent(wd, frac, acfg.algo, learned_stop=True)
        episodes = run_episodes(
            stopper.make_env(wd, split, acfg), agent_policy(stopper.policy), ids
        )
        fit(
            method_name("sasha_learned_stop", frac),
            np.stack([e["probabilities"] for e in episodes]),
            np.array([e["label"] for e in episodes]),
        )
    out = {"split": split, "n_slides": len(ids), "kinds": list(KINDS), "methods": fitted}
    write_json(wd.calibration, out)
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
