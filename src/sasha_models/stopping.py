"""Stop when confident, refer when not: a per-slide reading rule and what it is measured by.

An agent zooms patch after patch; after each zoom the state is classified, and the calibrated
probabilities ``p`` (:class:`~sasha_models.calibration.Calibration` of the agent's final
states) give a confidence ``max_c p_c``. :class:`StopRule` stops the episode at the first zoom
whose confidence *exceeds* ``threshold``, or at the cap (the agent's budget ⌈f·N⌉ zooms, or
the rule's own lower cap ⌈max_frac·N⌉, :func:`fit_capped_rule`); a
slide that reaches the cap with confidence below ``refer_below`` is *referred* (a pathologist
reads it in full). A threshold of 1 never fires: the rule then reads every slide to the cap.
With ``class_thresholds`` each class has its own: stop when ``p_c`` exceeds class c's. A
tumour search wants that asymmetry — a slide can be ruled in by the first zoom on tumour, but
ruling it out early risks stopping before the tumour was reached.

The rule's two thresholds are fitted on validation slides only (:func:`fit_stop_rule`), from
each slide's *trace* — the raw class probabilities after every zoom of one argmax episode to
the cap. Since stopping only truncates that episode (the agent's choices do not depend on
when it will stop), :func:`apply_rule` on a trace gives exactly what an episode run under the
rule gives, for any threshold, from one episode per slide.

What the test split is measured by (:func:`referral_metrics`): the share referred, sensitivity
and specificity of the decisions taken automatically, the share of slides cleared
automatically at 100 % sensitivity, and the risk–coverage curve with its area (AURC; Geifman
& El-Yaniv, 2017). Pure numpy, plus :func:`~sasha_models.metrics.classification_metrics`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .calibration import Calibration
from .spaces import episode_budget

__all__ = [
    "MAX_PER_CLASS",
    "THRESHOLDS",
    "Outcome",
    "StopRule",
    "apply_rule",
    "fit_capped_rule",
    "fit_stop_rule",
    "referral_metrics",
    "risk_coverage",
    "threshold_curve",
]

#: Confidence thresholds the rule is fitted over (and the adaptive curve is drawn at); 1 never
#: fires (every slide read to the cap).
THRESHOLDS: tuple[float, ...] = (
    *(round(0.5 + 0.05 * i, 2) for i in range(10)),
    0.97,
    0.98,
    0.99,
    0.995,
    0.999,
    1.0,
)


@dataclass(frozen=True)
class StopRule:
    """Stop after the first zoom whose calibrated confidence exceeds ``threshold`` (or, with
    ``class_thresholds``, whose probability of some class c exceeds class c's threshold);
    refer a slide that reaches the cap with confidence below ``refer_below``.

    Attributes:
        threshold: in (0, 1]; the episode stops when ``max(calibration.apply(p)) > threshold``
            (1: never, read to the cap). With ``class_thresholds``, their largest (the
            strictest; what logs and result rows show as the rule's threshold).
        refer_below: in [0, 1]; at the cap, ``confidence < refer_below`` → referred (0: never).
        calibration: applied to the classifier's probabilities before the confidence is taken
            (identity when ``None``).
        info: how the thresholds were fitted (split, slides, margin, the val curve...), kept
            with the rule in its JSON.
        class_thresholds: ``None`` (every class stops at ``threshold``), or one threshold in
            (0, 1] per class: stop when ``calibration.apply(p)[c] > class_thresholds[c]`` for
            some c. ``(t, …, t)`` is the rule with ``threshold = t``.
        max_frac: ``None`` (read to the episode's cap, the agent's budget f), or the rule's own
            cap below it, a fraction of the slide's patches: at most
            :func:`~sasha_models.spaces.episode_budget` ``(max_frac, N)`` zooms
            (:func:`fit_capped_rule` lowers it to meet a mean reading budget).
    """

    threshold: float = 1.0
    refer_below: float = 0.0
    calibration: Calibration | None = None
    info: dict[str, Any] = field(default_factory=dict, compare=False)
    class_thresholds: tuple[float, ...] | None = None
    max_frac: float | None = None

    def __post_init__(self) -> None:
        if self.max_frac is not None and not 0.0 < self.max_frac <= 1.0:
            raise ValueError(f"a stop rule's max_frac must be in (0, 1], got {self.max_frac}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"stop threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.refer_below <= 1.0:
            raise ValueError(f"referral threshold must be in [0, 1], got {self.refer_below}")
        if self.class_thresholds is not None:
            ct = tuple(float(t) for t in self.class_thresholds)
            if len(ct) < 2 or not all(0.0 < t <= 1.0 for t in ct):
                raise ValueError(
                    f"class_thresholds must be one threshold in (0, 1] per class (at least 2), "
                    f"got {self.class_thresholds}"
                )
            if self.threshold != max(ct):
                raise ValueError(
                    f"with class_thresholds {ct} the rule's threshold is their largest, "
                    f"{max(ct)}; got {self.threshold}"
                )
            object.__setattr__(self, "class_thresholds", ct)

    @classmethod
    def per_class(
        cls,
        class_thresholds: Sequence[float],
        refer_below: float = 0.0,
        calibration: Calibration | None = None,
        info: dict[str, Any] | None = None,
        max_frac: float | None = None,
    ) -> StopRule:
        """A rule with one stop threshold per class (``threshold`` set to their largest)."""
        ct = tuple(float(t) for t in class_thresholds)
        return cls(max(ct), refer_below, calibration, dict(info or {}), ct, max_frac)

    def cap_steps(self, n_patches: int, steps: int) -> int:
        """Zooms the rule reads at most of an episode of ``steps`` on a slide of ``n_patches``:
        ``steps``, or fewer when the rule's own ``max_frac`` caps it lower."""
        if self.max_frac is None:
            return int(steps)
        return min(int(steps), episode_budget(self.max_frac, int(n_patches)))

    def fires(self, probs: np.ndarray) -> np.ndarray:
        """``(T,)`` bool: whether the rule stops on each row of ``(T, C)`` raw probabilities."""
        p = self.calibrated(np.atleast_2d(probs))
        if self.class_thresholds is None:
            return np.asarray(p.max(axis=-1) > self.threshold)
        if len(self.class_thresholds) != p.shape[-1]:
            raise ValueError(
                f"the stop rule has {len(self.class_thresholds)} class thresholds, "
                f"the classifier {p.shape[-1]} classes"
            )
        return np.asarray((p > np.asarray(self.class_thresholds, np.float32)).any(axis=-1))

    def at_threshold(self, threshold: float) -> StopRule:
        """The rule of the same kind at another confidence threshold, for curves over
        :data:`THRESHOLDS`: a shared rule at ``threshold``; a per-class one with every class
        that may stop a slide at ``threshold`` (``info["stop_classes"]`` when it was fitted
        with them, else every class) and the others still never stopping it. Calibration and
        ``max_frac`` are kept; nothing is referred."""
        if self.class_thresholds is None:
            return StopRule(threshold, 0.0, self.calibration, max_frac=self.max_frac)
        n = len(self.class_thresholds)
        stop = self.info.get("stop_classes")
        free = set(range(n)) if stop is None else {int(c) for c in stop}
        return StopRule.per_class(
            [threshold if c in free else 1.0 for c in range(n)],
            0.0,
            self.calibration,
            max_frac=self.max_frac,
        )

    def describe(self) -> str:
        """The rule in words, for logs: ``confidence > 0.9``, or per class
        ``p[0] > 0.99 or p[1] > 0.7``."""
        if self.class_thresholds is None:
            text = f"confidence > {self.threshold:g}"
        else:
            text = " or ".join(f"p[{c}] > {t:g}" for c, t in enumerate(self.class_thresholds))
        return text if self.max_frac is None else f"{text}, reading at most {self.max_frac:g}"

    def calibrated(self, probs: np.ndarray) -> np.ndarray:
        """``(…, C)`` probabilities after the rule's calibration."""
        p = np.asarray(probs, np.float32)
        return p if self.calibration is None else self.calibration.apply(p)

    def confidence(self, probs: np.ndarray) -> np.ndarray | float:
        """Calibrated confidence ``max_c p_c`` of ``(C,)`` (a float) or ``(T, C)`` probabilities."""
        c = self.calibrated(probs).max(axis=-1)
        return float(c) if np.ndim(c) == 0 else c

    def confident(self, probs: np.ndarray) -> bool:
        """Whether the rule stops on these ``(C,)`` raw probabilities."""
        return bool(self.fires(np.asarray(probs).reshape(1, -1))[0])

    def referred(self, probs: np.ndarray) -> bool:
        """Whether a slide that reached the cap with these ``(C,)`` raw probabilities is referred."""
        return bool(self.confidence(probs) < self.refer_below)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "class_thresholds": None
            if self.class_thresholds is None
            else list(self.class_thresholds),
            "refer_below": self.refer_below,
            "max_frac": self.max_frac,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            **self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StopRule:
        """Inverse of :meth:`to_dict`; bad values are a ``ValueError``. Files written before
        per-class thresholds existed (no ``class_thresholds`` key) read as shared ones, and
        those before ``max_frac`` as reading to the episode's cap."""
        known = ("threshold", "refer_below", "calibration", "class_thresholds", "max_frac")
        cal = d.get("calibration")
        ct = d.get("class_thresholds")
        mf = d.get("max_frac")
        return cls(
            float(d["threshold"]),
            float(d["refer_below"]),
            None if cal is None else Calibration.from_dict(cal),
            {k: v for k, v in d.items() if k not in known},
            None if ct is None else tuple(float(t) for t in ct),
            None if mf is None else float(mf),
        )


@dataclass(frozen=True)
class Outcome:
    """One slide read under a :class:`StopRule` (:func:`apply_rule`).

    Attributes:
        steps: zooms taken (1 ≤ steps ≤ the trace's length).
        n_zoomed: patches read at high resolution by then.
        frac_read: ``n_zoomed / n_patches``.
        probabilities: ``(C,)`` calibrated probabilities at the stop.
        confidence: their maximum.
        stopped: ``"confident"`` or ``"cap"``.
        referred: reached the cap below ``refer_below``.
    """

    steps: int
    n_zoomed: int
    frac_read: float
    probabilities: np.ndarray
    confidence: float
    stopped: str
    referred: bool


def apply_rule(
    step_probs: np.ndarray, n_zoomed: Sequence[int], n_patches: int, rule: StopRule
) -> Outcome:
    """Where ``rule`` stops an episode whose trace is given.

    Args:
        step_probs: ``(T, C)`` raw class probabilities after each of the episode's T steps
            (T = its cap).
        n_zoomed: ``(T,)`` patches zoomed after each step (the step count unless the agent
            took illegal actions).
        n_patches: N, the slide's patches.
        rule: the stop rule (with ``max_frac``, the trace is read to that cap at most).
    """
    probs = np.asarray(step_probs, np.float32)
    if probs.ndim != 2 or len(probs) == 0 or len(n_zoomed) != len(probs):
        raise ValueError(f"a trace is (T, C) probabilities and T counts; got {probs.shape}")
    probs = probs[: rule.cap_steps(n_patches, len(probs))]
    conf = np.asarray(rule.confidence(probs)).reshape(-1)
    hits = np.flatnonzero(rule.fires(probs))
    t = int(hits[0]) if hits.size else len(probs) - 1
    stopped = "confident" if hits.size else "cap"
    p = rule.calibrated(probs[t])
    return Outcome(
        steps=t + 1,
        n_zoomed=int(n_zoomed[t]),
        frac_read=int(n_zoomed[t]) / n_patches,
        probabilities=p,
        confidence=float(conf[t]),
        stopped=stopped,
        referred=stopped == "cap" and float(conf[t]) < rule.refer_below,
    )


def _auc(probs: np.ndarray, labels: np.ndarray) -> float | None:
    from .metrics import classification_metrics  # lazy: torchmetrics

    auc = classification_metrics(probs, labels)["auc"]
    return None if math.isnan(auc) else float(auc)


def threshold_curve(
    traces: Sequence[tuple[np.ndarray, Sequence[int], int]],
    labels: np.ndarray,
    calibration: Calibration | None,
    thresholds: Sequence[float] = THRESHOLDS,
    stop_classes: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """``[{"threshold", "mean_frac", "auc", "accuracy", "nll"}]``: the rule at each threshold on
    the slides of ``traces`` (``(step_probs, n_zoomed, n_patches)`` per slide, as
    :func:`apply_rule` takes them): AUC, accuracy and mean negative log-likelihood of the
    calibrated probabilities at the stop. With ``stop_classes`` only those classes stop at
    the threshold (the others never do), as :meth:`StopRule.at_threshold`."""
    y = np.asarray(labels)
    kind = StopRule(1.0, 0.0, calibration)
    if stop_classes is not None:
        n = np.asarray(traces[0][0]).shape[1]
        info = {"stop_classes": [int(c) for c in stop_classes]}
        kind = StopRule.per_class([1.0] * n, 0.0, calibration, info)
    out = []
    for t in thresholds:
        rule = kind.at_threshold(float(t))
        outs = [apply_rule(p, z, n, rule) for p, z, n in traces]
        probs = np.stack([o.probabilities for o in outs])
        out.append(
            {
                "threshold": float(t),
                "mean_frac": float(np.mean([o.frac_read for o in outs])),
                "auc": _auc(probs, y),
                "accuracy": float(np.mean(probs.argmax(1) == y)),
                "nll": _nll(probs, y),
            }
        )
    return out


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean ``−log p[label]`` of ``(n, C)`` probabilities (clipped at 1e-7)."""
    p = np.asarray(probs, np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.clip(p, 1e-7, 1.0)).mean())


def _stable_within(
    curve: list[dict[str, Any]], target: float | None, nll_max: float | None = None
) -> list[dict[str, Any]]:
    """The points of ``curve`` whose val AUC and every stricter threshold's reach ``target``
    (and whose val NLL stays at most ``nll_max``, when given)."""
    if target is None:
        return []
    ok: list[dict[str, Any]] = []
    for c in sorted(curve, key=lambda c: -c["threshold"]):  # strictest first
        if c["auc"] is None or c["auc"] < target:
            break
        if nll_max is not None and c["nll"] > nll_max:
            break
        ok.append(c)
    return ok


#: Most classes :func:`fit_stop_rule` searches per-class thresholds for (the grid has
#: ``len(THRESHOLDS) ** C`` points).
MAX_PER_CLASS = 3


def _per_class_grid(
    traces: Sequence[tuple[np.ndarray, Sequence[int], int]],
    labels: np.ndarray,
    calibration: Calibration | None,
    thresholds: Sequence[float],
    free: Sequence[bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every per-class rule of the grid ``thresholds ** C`` on the traces, vectorised.

    ``free[c]`` False fixes class c's threshold at 1 (it never stops a slide): the grid then
    spans the free classes only.

    Returns:
        ``(index (G**C, C), mean_frac (G**C,), auc (G**C,), nll (G**C,))``: each rule's
        threshold indices, mean fraction read, AUC (NaN where undefined) and mean negative
        log-likelihood, rules in C-order of the grid.
    """
    cal = StopRule(1.0, 0.0, calibration)
    thr = np.asarray(thresholds, np.float64)
    steps = [cal.calibrated(np.asarray(p, np.float32)) for p, _, _ in traces]
    n_classes = steps[0].shape[1]
    never = int(np.flatnonzero(thr == 1.0)[0])
    axes = [
        np.arange(len(thr)) if free is None or free[c] else np.array([never])
        for c in range(n_classes)
    ]
    index = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, n_classes)
    stop = np.empty((len(traces), len(index)), np.int64)
    for s, p in enumerate(steps):
        above = p[:, :, None] > thr.astype(np.float32)[None, None, :]  # (T, C, G), as fires()
        first = np.where(above.any(0), above.argmax(0), len(p) - 1)  # (C, G): cap if never
        stop[s] = first[np.arange(n_classes)[None, :], index].min(axis=1)
    frac = np.stack([np.asarray(z)[stop[s]] / n for s, (_, z, n) in enumerate(traces)])  # (S, G**C)
    y = np.asarray(labels)
    at_stop = [
        np.stack([steps[s][stop[s, g]] for s in range(len(steps))]) for g in range(len(index))
    ]
    aucs = [_auc(p, y) for p in at_stop]
    auc = np.array([np.nan if a is None else a for a in aucs], np.float64)
    nll = np.array([_nll(p, y) for p in at_stop])
    return index, frac.mean(axis=0), auc, nll


def _stable_grid(ok: np.ndarray) -> np.ndarray:
    """``ok`` on a C-dimensional grid of thresholds (axis values increasing) → True where
    ``ok`` holds at that point and at every stricter one (no threshold lower, componentwise)."""
    for axis in range(ok.ndim):
        ok = np.flip(np.logical_and.accumulate(np.flip(ok, axis), axis=axis), axis)
    return ok


def fit_stop_rule(
    traces: Sequence[tuple[np.ndarray, Sequence[int], int]],
    labels: np.ndarray,
    calibration: Calibration | None,
    target_auc: float | None,
    margin: float = 0.01,
    max_auto_error: float = 0.05,
    thresholds: Sequence[float] = THRESHOLDS,
    per_class: bool = False,
    nll_margin: float | None = None,
    stop_classes: Sequence[int] | None = None,
) -> StopRule:
    """Fit both thresholds on validation traces (never on test slides).

    Stop threshold: of :data:`THRESHOLDS`, the one with the smallest mean fraction read from
    which on the val AUC stays at least ``target_auc − margin`` (``target_auc``: HAFED's val
    AUC on every patch) at this threshold *and every stricter one*. On a val split of 15 slides
    an early stop can rank them right by luck and a stricter threshold then ranks them wrong
    (the val curve dips); a threshold inside such a dip is a fluke, not a level of confidence
    at which reading more stops mattering, and is not chosen. When no threshold qualifies (or
    AUC is undefined), the one of highest val AUC, and of those the least reading.

    With ``per_class`` every class gets its own stop threshold, chosen the same way over the
    grid ``THRESHOLDS ** C`` ("every stricter one": every rule whose thresholds are each at
    least as high), so a tumour slide can stop at the first zoom that rules it in while a
    slide that looks normal reads on. The shared thresholds are the grid's diagonal; stability
    is asked of more rules here (every componentwise stricter one, not only the diagonal's), so
    the per-class rule may read more on val than the shared one. At most
    :data:`MAX_PER_CLASS` classes.

    With ``nll_margin`` a rule must also keep the val slides' mean negative log-likelihood at
    the stop within ``nll_margin`` of reading every slide to the cap (at it, and at every
    stricter rule). AUC on 15 slides cannot tell a tumour slide ruled out at p = 0.05 (still
    ranked above normal slides at 0.04) from one ruled in at 0.95; its likelihood can.

    With ``stop_classes`` (per class only) only those classes may stop a slide early; the
    others' thresholds are 1 (e.g. ``[tumour]``: a slide is ruled in as soon as the classifier
    is sure of tumour, and never ruled out before the cap, as a negative is signed out only
    after a full search).

    Referral threshold: the smallest confidence in ``[0, threshold]`` (0 and the cap
    confidences of the val slides) at which the automatic decisions on val (slides not
    referred) err on at most ``max_auto_error`` of them.

    Args:
        traces: per val slide ``(step_probs (T, C), n_zoomed (T,), n_patches)``.
        labels: ``(n,)`` their class indices.
        calibration: of the agent's final states (``calibration.json``'s ``sasha@<f>``).
        target_auc: HAFED's val AUC, or ``None``.
        margin: how far below ``target_auc`` the val AUC may be.
        max_auto_error: error rate allowed on val among the slides not referred.
        per_class: one stop threshold per class instead of one for all.
        nll_margin: ``None`` (off), or how far above the read-to-the-cap val NLL a rule's
            val NLL may be.
        stop_classes: the class indices that may stop a slide early (``None``: every class);
            implies ``per_class``.

    Returns:
        The :class:`StopRule`, its ``info`` holding the val curve (:func:`threshold_curve`:
        shared thresholds, or with ``stop_classes`` theirs) and the fit's inputs.
    """
    if not traces:
        raise ValueError("fit_stop_rule needs at least one validation slide")
    y = np.asarray(labels)
    curve = threshold_curve(traces, y, calibration, thresholds, stop_classes)
    target = None if target_auc is None else float(target_auc) - margin
    nll_max = None
    if nll_margin is not None:
        to_cap = [apply_rule(p, z, n, StopRule(1.0, 0.0, calibration)) for p, z, n in traces]
        nll_max = _nll(np.stack([o.probabilities for o in to_cap]), y) + float(nll_margin)
    if per_class or stop_classes is not None:
        rule, val_frac, val_auc = _fit_per_class(
            traces, y, calibration, thresholds, target, nll_max, stop_classes
        )
    else:
        ok = _stable_within(curve, target, nll_max)
        if ok:
            best = min(ok, key=lambda c: (c["mean_frac"], -c["threshold"]))
        else:
            best = min(curve, key=lambda c: (-(c["auc"] or 0.0), c["mean_frac"], -c["threshold"]))
        rule = StopRule(best["threshold"], 0.0, calibration)
        val_frac, val_auc = best["mean_frac"], best["auc"]
    threshold = rule.threshold
    outs = [apply_rule(p, z, n, rule) for p, z, n in traces]
    conf = np.array([o.confidence for o in outs])
    at_cap = np.array([o.stopped == "cap" for o in outs])
    wrong = np.array([int(np.argmax(o.probabilities)) != yi for o, yi in zip(outs, y, strict=True)])
    refer = threshold
    # candidates: refer nothing, or every cap slide up to one more (just above its confidence)
    for r in [0.0, *sorted(min(c + 1e-7, threshold) for c in conf[at_cap])]:
        auto = ~(at_cap & (conf < r))
        if not auto.any() or wrong[auto].sum() <= max_auto_error * auto.sum():
            refer = r
            break
    info = {
        "fitted_on": "val",
        "n_slides": len(traces),
        "target_auc": target_auc,
        "margin": margin,
        "max_auto_error": max_auto_error,
        "per_class": per_class or stop_classes is not None,
        "stop_classes": None if stop_classes is None else [int(c) for c in stop_classes],
        "nll_margin": nll_margin,
        "val_nll_max": nll_max,
        "val_mean_frac": val_frac,
        "val_auc": val_auc,
        "val_curve": curve,
    }
    return StopRule(threshold, float(refer), calibration, info, rule.class_thresholds)


def fit_capped_rule(
    traces: Sequence[tuple[np.ndarray, Sequence[int], int]],
    labels: np.ndarray,
    calibration: Calibration | None,
    target_auc: float | None,
    mean_frac: float,
    cap: float,
    step: float = 0.01,
    **fit: Any,
) -> StopRule:
    """:func:`fit_stop_rule` under a mean reading budget, on validation traces only.

    The rule's own cap (``max_frac``) is the largest of ``cap`` and the multiples of ``step``
    below it (down to ``step``) at which the rule fitted on the traces cut to that cap reads at
    most ``mean_frac`` of the val slides' patches on average; the thresholds are refitted at
    each cap (a cap that cuts no slide shorter than the last one tried is skipped: its rule is
    the same). A rule within the budget at ``cap`` keeps ``max_frac = None``; when no cap is,
    the smallest is taken. ``info["budget_met"]`` says which, ``info["val_mean_frac"]`` what it
    read. With ``nll_margin`` the likelihood guard is relative to reading to the cap being
    tried, not to ``cap``.

    A tumour search that rules slides in early (``stop_classes``) reads every normal-looking
    slide to the cap. Lowering the cap is how such a rule meets a mean budget: lowering the
    thresholds instead would rule tumour slides out before their tumour is reached.

    Args:
        traces, labels, calibration, target_auc: as :func:`fit_stop_rule`.
        mean_frac: in (0, 1], the most the rule may read on average over the val slides.
        cap: the traces' own cap, the agent's budget f.
        step: the spacing of the caps tried.
        **fit: the other arguments of :func:`fit_stop_rule` (``margin``, ``stop_classes``...).
    """
    if not 0.0 < mean_frac <= 1.0:
        raise ValueError(f"a mean reading budget must be in (0, 1], got {mean_frac}")
    if not 0.0 < step <= cap:
        raise ValueError(
            f"a mean reading budget lowers the cap in steps of {step}: the agent's budget "
            f"{cap} is below one step"
        )
    lower = [round(k * step, 9) for k in range(math.ceil(round(cap / step, 9)) - 1, 0, -1)]
    last: list[int] | None = None
    for c in [cap, *lower]:
        lengths = [StopRule(max_frac=c).cap_steps(n, len(p)) for p, _, n in traces]
        if lengths == last:
            continue  # cuts no slide shorter than the cap before: the same rule
        last = lengths
        cut = [(p[:k], z[:k], n) for (p, z, n), k in zip(traces, lengths, strict=True)]
        rule, at = fit_stop_rule(cut, labels, calibration, target_auc, **fit), c
        if rule.info["val_mean_frac"] <= mean_frac:
            break
    met = rule.info["val_mean_frac"] <= mean_frac
    info = {**rule.info, "mean_frac_budget": mean_frac, "cap_step": step, "budget_met": met}
    return dataclasses.replace(rule, max_frac=None if at == cap else at, info=info)


def _fit_per_class(
    traces: Sequence[tuple[np.ndarray, Sequence[int], int]],
    labels: np.ndarray,
    calibration: Calibration | None,
    thresholds: Sequence[float],
    target: float | None,
    nll_max: float | None = None,
    stop_classes: Sequence[int] | None = None,
) -> tuple[StopRule, float, float | None]:
    """The per-class rule of :func:`fit_stop_rule`: ``(rule, val mean fraction, val AUC)``."""
    n_classes = np.asarray(traces[0][0]).shape[1]
    free = [True] * n_classes
    if stop_classes is not None:
        bad = [c for c in stop_classes if not 0 <= int(c) < n_classes]
        if bad or not stop_classes:
            raise ValueError(
                f"stop classes {list(stop_classes)}: give class indices in [0, {n_classes})"
            )
        free = [c in {int(k) for k in stop_classes} for c in range(n_classes)]
    if 1.0 not in [float(t) for t in thresholds]:
        raise ValueError("per-class thresholds need 1 (never stop) in the threshold grid")
    if sum(free) > MAX_PER_CLASS:
        raise ValueError(
            f"per-class stop thresholds are searched for at most {MAX_PER_CLASS} classes "
            f"(a grid of {len(thresholds)}**C rules); this classifier has {n_classes}: "
            "set adaptive.per_class: false"
        )
    thr = np.asarray(thresholds, np.float64)
    index, frac, auc, nll = _per_class_grid(traces, labels, calibration, thresholds, free)
    strictness = thr[index].sum(axis=1)
    ok = np.zeros(len(index), bool)
    if target is not None:
        good = ~np.isnan(auc) & (auc >= target)
        if nll_max is not None:
            good &= nll <= nll_max
        grid = good.reshape(tuple(len(thr) if f else 1 for f in free))
        ok = _stable_grid(grid).reshape(-1)
    if ok.any():
        cand = np.flatnonzero(ok)
        g = cand[np.lexsort((-strictness[cand], frac[cand]))[0]]
    else:
        a = np.nan_to_num(auc, nan=0.0)
        g = np.lexsort((-strictness, frac, -a))[0]
    rule = StopRule.per_class(thr[index[g]].tolist(), 0.0, calibration)
    return rule, float(frac[g]), None if np.isnan(auc[g]) else float(auc[g])


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage (n,), risk (n,))``: keep the k most confident slides (k = 1..n); risk is the
    error rate among them. Ties in confidence are broken by slide order."""
    c = np.asarray(confidence, np.float64)
    ok = np.asarray(correct, bool)
    order = np.argsort(-c, kind="stable")
    errors = np.cumsum(~ok[order])
    k = np.arange(1, len(c) + 1)
    return k / len(c), errors / k


def referral_metrics(
    probs: np.ndarray, labels: np.ndarray, referred: np.ndarray, positive: int = -1
) -> dict[str, Any]:
    """What referral achieves on a split.

    Args:
        probs: ``(n, C)`` calibrated probabilities at each slide's stop.
        labels: ``(n,)`` class indices.
        referred: ``(n,)`` bool.
        positive: the positive class (default: the last, e.g. ``tumor``).

    Returns:
        ``share_referred``; ``n_auto``; ``sensitivity`` and ``specificity`` of the argmax
        decisions on the slides not referred (``None`` without positives / negatives among
        them); ``cleared_at_full_sensitivity``: the largest share of all slides that a
        threshold on the positive-class probability could call negative automatically (not
        referred) without clearing a single positive (an oracle threshold, as specificity at
        100 % sensitivity is); ``aurc`` and ``risk_coverage`` (``[{"coverage", "risk"}]``)
        over every slide, ranked by confidence.
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels)
    ref = np.asarray(referred, bool)
    n = len(y)
    pos = positive % p.shape[1]
    auto = ~ref
    pred = p.argmax(1)
    is_pos = y == pos
    tp = int(np.sum(auto & is_pos & (pred == pos)))
    tn = int(np.sum(auto & ~is_pos & (pred != pos)))
    n_pos, n_neg = int(np.sum(auto & is_pos)), int(np.sum(auto & ~is_pos))
    score = p[:, pos]
    auto_pos = score[auto & is_pos]
    cut = auto_pos.min() if auto_pos.size else np.inf  # clear below the least positive
    cleared = int(np.sum(auto & (score < cut)))
    coverage, risk = risk_coverage(p.max(1), pred == y)
    return {
        "n_slides": n,
        "n_auto": int(auto.sum()),
        "share_referred": float(ref.mean()) if n else None,
        "sensitivity": tp / n_pos if n_pos else None,
        "specificity": tn / n_neg if n_neg else None,
        "cleared_at_full_sensitivity": cleared / n if n else None,
        "aurc": float(risk.mean()) if n else None,
        "risk_coverage": [
            {"coverage": float(c), "risk": float(r)} for c, r in zip(coverage, risk, strict=True)
        ],
    }
