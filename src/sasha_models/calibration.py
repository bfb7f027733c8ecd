"""Post-hoc calibration of slide probabilities: a temperature and a class bias fitted on val.

HAFED's and SASHA's slide probabilities are bunched: on the demo cohort HAFED reaches 95 %
accuracy with an ECE of 0.30, and SASHA's final states rank the test slides perfectly (AUC 1)
while the 0.5 threshold gets 82 % right. Temperature scaling (Guo et al., 2017) divides the
logits by one scalar T, which fixes over- or under-confidence but, being monotone and
centred, can never move a binary decision; a per-class bias b shifts the threshold as well
(Platt scaling on the logit difference when C = 2). Both are fitted on the validation split
and then applied, unchanged, to test slides and to ``sasha predict``.

``calibrated logits = log p / T + b``, ``b[0] = 0``. Validation splits are small (15 slides
on the demo) and often perfectly separated, where the maximum-likelihood T goes to 0; the fit
is therefore a MAP estimate under a weak Gaussian prior — ``log T ~ N(0, 1)``, ``b ~ N(0, 2²)``
— which leaves a well-populated fit where the data put it and keeps a separable one finite.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "KINDS",
    "MEMBERS",
    "Calibration",
    "fit_calibration",
    "fitted_members",
    "read_calibrations",
]

#: The two calibrations fitted per method: a temperature alone (keeps every argmax decision),
#: and a temperature with a class bias (moves the decision threshold too).
KINDS = ("temperature", "temperature+bias")

#: The key of a method's entry in ``calibration.json`` that records how many agents acted
#: together (``agents.ensemble``) in the episodes its calibration was fitted on.
MEMBERS = "members"

#: Prior standard deviations of log T and of each bias entry (see the module docstring).
PRIOR_SD_LOG_T = 1.0
PRIOR_SD_BIAS = 2.0


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and class bias; :meth:`apply` maps probabilities to calibrated ones.

    Attributes:
        temperature: T > 0 (T > 1 softens, T < 1 sharpens).
        bias: ``(C,)`` added to the tempered log-probabilities, ``bias[0] == 0``.
        n_fit: slides the fit saw.
        nll_before, nll_after: mean negative log-likelihood on those slides.
    """

    temperature: float = 1.0
    bias: tuple[float, ...] = field(default_factory=tuple)
    n_fit: int = 0
    nll_before: float | None = None
    nll_after: float | None = None

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrate ``(n, C)`` (or ``(C,)``) class probabilities; rows still sum to 1."""
        p = np.asarray(probs, np.float64)
        logits = np.log(np.clip(p, 1e-12, 1.0)) / self.temperature
        if self.bias:
            logits = logits + np.asarray(self.bias, np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)

    def to_dict(self) -> dict:
        return {**asdict(self), "bias": list(self.bias)}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """Inverse of :meth:`to_dict`; a bad temperature or bias is a ``ValueError``."""
        t = float(d["temperature"])
        if not np.isfinite(t) or t <= 0:
            raise ValueError(f"calibration temperature must be > 0, got {d['temperature']!r}")
        bias = tuple(float(b) for b in d.get("bias") or ())
        return cls(t, bias, int(d.get("n_fit", 0)), d.get("nll_before"), d.get("nll_after"))


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, labels)


def fit_calibration(probs: np.ndarray, labels: np.ndarray, bias: bool = True) -> Calibration:
    """Fit T (and the class bias) on validation probabilities by penalised maximum likelihood.

    Args:
        probs: ``(n, C)`` class probabilities of the validation slides.
        labels: ``(n,)`` their class indices.
        bias: fit the class bias too (``False``: temperature scaling alone).

    Returns:
        The fitted :class:`Calibration` (identity when ``n == 0``).
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.int64).reshape(-1)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (n, C) and labels (n,); got {p.shape}, {y.shape}")
    n, n_classes = p.shape
    if n == 0:
        return Calibration(bias=(0.0,) * n_classes)
    z = torch.as_tensor(np.log(np.clip(p, 1e-12, 1.0)))
    target = torch.as_tensor(y)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes - 1, dtype=torch.float64, requires_grad=bias)
    params = [log_t, b] if bias else [log_t]
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def logits() -> torch.Tensor:
        return z / log_t.exp() + torch.cat([torch.zeros(1, dtype=z.dtype), b])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        prior = (log_t / PRIOR_SD_LOG_T) ** 2 + ((b / PRIOR_SD_BIAS) ** 2).sum()
        loss = _nll(logits(), target) + 0.5 * prior / n
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        after = float(_nll(logits(), target))
        before = float(_nll(z, target))
    return Calibration(
        temperature=float(log_t.detach().exp()),
        bias=(0.0, *(float(v) for v in b.detach())),
        n_fit=n,
        nll_before=before,
        nll_after=after,
    )


def _methods(path: Path) -> dict[str, dict]:
    """``calibration.json``'s per-method entries; ``{}`` for a missing file, a ``ValueError``
    naming a malformed one."""
    if not path.is_file():
        return {}
    try:
        methods = json.loads(path.read_text())["methods"]
        if not isinstance(methods, dict):
            raise TypeError(f"'methods' is a {type(methods).__name__}, not a mapping")
        return methods
    except (KeyError, TypeError, ValueError) as exc:
        raise _invalid(path, exc) from exc


def _invalid(path: Path, exc: Exception) -> ValueError:
    return ValueError(
        f"{path}: not a valid calibration file ({exc!r}); re-run the calibrate stage "
        "(sasha pipeline --workdir DIR --force calibrate)"
    )


def read_calibrations(path: str | os.PathLike, kind: str = "temperature") -> dict[str, Calibration]:
    """``{"hafed@1": Calibration, "sasha@0.1": ...}`` of one of :data:`KINDS` from a workdir's
    ``calibration.json``.

    A missing file is ``{}`` (nothing calibrated); a malformed one is a ``ValueError`` naming it.
    """
    if kind not in KINDS:
        raise ValueError(f"calibration kind {kind!r}: choose one of {', '.join(KINDS)}")
    path = Path(path)
    methods = _methods(path)
    try:
        return {name: Calibration.from_dict(d[kind]) for name, d in methods.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise _invalid(path, exc) from exc


def fitted_members(path: str | os.PathLike, name: str) -> int | None:
    """How many agents acted together (an ensemble's size) in the episodes method ``name``'s
    calibration in ``calibration.json`` was fitted on; ``None`` when the file, the method or
    the record is missing (a file written before calibrations recorded it).

    A probability calibrated with another ensemble's temperature and bias is miscalibrated, so
    :class:`~sasha_env.predict.Predictor` refuses the pair. A malformed file is a
    ``ValueError`` naming it.
    """
    path = Path(path)
    entry = _methods(path).get(name) or {}
    try:
        members = entry.get(MEMBERS)
        return None if members is None else int(members)
    except (AttributeError, TypeError, ValueError) as exc:
        raise _invalid(path, exc) from exc
