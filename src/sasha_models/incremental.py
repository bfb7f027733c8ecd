"""Slide logits of a state that changes a few rows at a time.

HAFED's level-2 classifier (:class:`~sasha_models.hafed.AttentionMILClassifier`) is
``pool ∘ instance_scores``: the gated-attention logits ``a (N, M)`` and values ``h (N, d)`` of a
row depend on that row alone. Re-running it over all N rows after every zoom costs
``O(N·d·d_hidden)`` (two ``d × 128`` layers per row); SASHA's environment changes one zoomed
row plus the TSU-updated rows per step. :class:`IncrementalClassifier` therefore caches
``a`` and ``h`` and re-scores only the changed rows.

The pooling is kept incremental too. Per branch m the softmax-weighted sum is
``Σ_i e_im h_i / Σ_i e_im`` with ``e_im = exp(a_im − c_m)``; the numerator ``s_m (d,)`` and the
denominator ``Z_m`` are held in float64 and a changed row's old term is subtracted and its new
one added, so a step costs ``O(r·M·d)`` for r changed rows instead of ``O(N·M·d)``. The slide
head then reads ``mean_m s_m / Z_m`` — exactly what ``pool`` computes in eval mode (the
branch-averaged softmax attention applied to ``h``). The shift ``c_m`` is raised (and the sums
rescaled) when a new logit exceeds it by more than 30, and the sums are rebuilt from the
cached rows when a removal cancels most of ``Z_m``, so float64 round-off stays far below
float32's. Classifiers other than ``AttentionMILClassifier`` (anything with
``instance_scores``/``pool``) get the cached scores and a full ``pool`` per update.

With ``incremental=False`` every update re-runs ``classify`` over all rows: the reference the
cached path must equal (tests check 1e-5 relative).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .hafed import AttentionMILClassifier

__all__ = ["IncrementalClassifier"]

_RESCALE_ABOVE = 30.0  # raise the shift when a logit exceeds it by this much
_CANCELLED = 1e-6  # rebuild the sums when a removal leaves less than this share of Z


class IncrementalClassifier:
    """Cache per-row attention logits, values and pooled sums; re-score only changed rows.

    Args:
        classifier: an :class:`~sasha_models.hafed.AttentionMILClassifier`, or a
            :class:`~sasha_models.hafed.HAFED` (its level 2 is used), or any module with
            ``instance_scores(S) -> (a, h)`` and ``pool(a, h, valid) -> (slide_logits, ...)``.
            It must be in eval mode (in train mode ``pool`` drops rows at random).
        incremental: ``False`` re-runs the classifier over all rows at every :meth:`update`.

    Shapes:
        ``reset(S: (N, d)) -> slide logits (C,)``
        ``update(S: (N, d), rows: (r,) int64) -> slide logits (C,)``

    The caller owns ``S`` and changes its rows in place between calls, then names every
    changed row in ``update`` (each row at most once). Call under ``torch.inference_mode()``
    or ``no_grad``.
    """

    def __init__(self, classifier: nn.Module, incremental: bool = True) -> None:
        clf: Any = getattr(classifier, "level2", classifier)  # duck-typed: checked below
        if not (hasattr(clf, "instance_scores") and hasattr(clf, "pool")):
            raise TypeError(
                f"{type(classifier).__name__} has no instance_scores/pool; "
                "expected an AttentionMILClassifier or a HAFED"
            )
        self.classifier: AttentionMILClassifier = clf
        self.incremental = bool(incremental)
        self._running = isinstance(clf, AttentionMILClassifier)
        self._a: Tensor | None = None  # (N, M) attention logits
        self._h: Tensor | None = None  # (N, D) values (own copy)
        self._e: Tensor | None = None  # (N, M) float64 exp(a - c)
        self._c: Tensor | None = None  # (M,) float64 shift
        self._s: Tensor | None = None  # (M, D) float64 Σ e h
        self._z: Tensor | None = None  # (M,) float64 Σ e
        self._logits: Tensor | None = None

    @property
    def logits(self) -> Tensor:
        """Slide logits ``(C,)`` of the state at the last :meth:`reset` / :meth:`update`."""
        if self._logits is None:
            raise RuntimeError("call reset(S) first")
        return self._logits

    def reset(self, S: Tensor) -> Tensor:
        """Score every row of a new state ``S (N, d)``; returns its slide logits ``(C,)``."""
        self._check_eval()
        if not self.incremental:
            self._logits = self.classifier.classify(S)
            return self._logits
        a, h = self.classifier.instance_scores(S)
        self._a, self._h = a.clone(), h.clone()
        if self._running:
            self._rebuild()
            return self._head()
        self._logits = self.classifier.pool(self._a, self._h, None)[0]
        return self._logits

    def update(self, S: Tensor, rows: Tensor) -> Tensor:
        """Slide logits ``(C,)`` after the rows ``rows (r,)`` of ``S`` changed in place."""
        if self._logits is None:
            raise RuntimeError("call reset(S) first")
        if not self.incremental:
            return self.reset(S)
        assert self._a is not None and self._h is not None
        if rows.numel() == 0:
            return self._logits
        a_new, h_new = self.classifier.instance_scores(S[rows])
        if not self._running:
            self._a[rows], self._h[rows] = a_new, h_new
            self._logits = self.classifier.pool(self._a, self._h, None)[0]
            return self._logits
        assert self._e is not None and self._c is not None
        assert self._s is not None and self._z is not None
        e_old, h_old = self._e[rows], self._h[rows].double()
        z_before = self._z.clone()
        self._s -= e_old.T @ h_old
        self._z -= e_old.sum(0)
        self._a[rows], self._h[rows] = a_new, h_new
        a64 = a_new.double()
        if bool((a64 > self._c + _RESCALE_ABOVE).any()) or bool(
            (self._z < _CANCELLED * z_before).any()
        ):
            self._rebuild()  # new shift, or the removal cancelled most of Z: exact sums again
        else:
            e_new = torch.exp(a64 - self._c)
            self._e[rows] = e_new
            self._s += e_new.T @ h_new.double()
            self._z += e_new.sum(0)
        return self._head()

    # ------------------------------------------------------------------ internals
    def _check_eval(self) -> None:
        if self.classifier.training:
            raise RuntimeError("put the classifier in eval mode (.eval()) first")

    def _rebuild(self) -> None:
        """Sums from the cached rows: shift = max logit per branch."""
        assert self._a is not None and self._h is not None
        a64 = self._a.double()
        self._c = a64.max(0).values
        self._e = torch.exp(a64 - self._c)
        self._z = self._e.sum(0)
        self._s = self._e.T @ self._h.double()

    def _head(self) -> Tensor:
        """Slide logits from the sums: the head on the branch-averaged pooled features."""
        assert self._s is not None and self._z is not None and self._h is not None
        pooled = (self._s / self._z.clamp_min(1e-300).unsqueeze(1)).mean(0)  # (D,)
        clf = self.classifier
        self._logits = clf.slide_head(clf.head_dropout(pooled.to(self._h.dtype)))
        return self._logits

    def __repr__(self) -> str:
        return (
            f"IncrementalClassifier({type(self.classifier).__name__}, "
            f"incremental={self.incremental})"
        )
