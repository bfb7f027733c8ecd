"""Slide logits of E states at once, each changing a few rows at a time.

:class:`BatchedIncrementalClassifier` is :class:`~sasha_models.incremental.IncrementalClassifier`
for a batch of E states padded to P rows (the states of a vector environment's E slides): the
changed rows of every state are re-scored in **one** ``instance_scores`` call, and the pooled
sums of every state are updated by batched segment sums, so a step of E environments costs a
few tensor operations whatever E is (on a GPU, the difference between E small kernels and one).

The arithmetic is the single classifier's: per state and branch m, float64 sums
``s_m = Σ_i e_im h_i`` and ``Z_m = Σ_i e_im`` with ``e_im = exp(a_im − c_m)``; a changed row's
old term is subtracted and its new one added; a state whose new logit exceeds its shift by more
than 30, or whose removal cancels most of ``Z_m``, is rebuilt from its cached rows. The slide
logits are the head on ``mean_m s_m / Z_m``. The sums are added in another order than the
single classifier's (batched products), so the logits equal E single classifiers' to float
rounding (tests: 1e-5 relative), not bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .hafed import AttentionMILClassifier
from .incremental import _CANCELLED, _RESCALE_ABOVE

__all__ = ["BatchedIncrementalClassifier", "segment_outer"]


def segment_outer(segment: Tensor, w: Tensor, h: Tensor, n_segments: int) -> Tensor:
    """Per segment, the sum of the outer products of its rows: ``out[e] = Σ_{r: segment[r]=e}
    w[r] ⊗ h[r]``.

    Computed as one batched product over rows padded per segment (``(E, R_max, ·)``), not as
    ``(R, M, D)`` outer products.

    Args:
        segment: ``(R,)`` int64 in ``[0, n_segments)``.
        w: ``(R, M)``.
        h: ``(R, D)``, the dtype of ``w``.
        n_segments: E.

    Returns:
        ``(E, M, D)``; zeros for segments without rows.
    """
    out_shape = (n_segments, w.shape[1], h.shape[1])
    if segment.numel() == 0:
        return w.new_zeros(out_shape)
    order = torch.argsort(segment, stable=True)
    segment, w, h = segment[order], w[order], h[order]
    counts = torch.bincount(segment, minlength=n_segments)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(len(segment), device=segment.device) - start[segment]
    width = int(counts.max())
    w_pad = w.new_zeros(n_segments, width, w.shape[1])
    h_pad = h.new_zeros(n_segments, width, h.shape[1])
    w_pad[segment, pos] = w
    h_pad[segment, pos] = h
    return w_pad.transpose(1, 2) @ h_pad


class BatchedIncrementalClassifier:
    """Cache per-row attention logits, values and pooled sums of E states; re-score only
    changed rows, all states in one call.

    Args:
        classifier: an :class:`~sasha_models.hafed.AttentionMILClassifier`, or a
            :class:`~sasha_models.hafed.HAFED` (its level 2 is used), or any module with
            ``instance_scores(S) -> (a, h)`` and a batched, masked ``pool(a, h, valid)``
            (which then runs over the changed states at every update). In eval mode, on the
            device of the states.
        n_states: E.
        max_rows: P, the padded number of rows of every state.
        incremental: ``False`` re-runs the classifier over the changed states' rows at every
            :meth:`update` (the reference).

    Shapes:
        ``reset(e: int, S_e: (n, d)) -> slide logits (C,)`` — state e starts (n ≤ P rows);
        ``update(S: (E, P, d), env: (R,), row: (R,)) -> slide logits (E, C)`` — the rows
        ``S[env[i], row[i]]`` changed in place (each pair at most once);
        ``logits``: ``(E, C)``, every state's slide logits.

    Call under ``torch.inference_mode()`` or ``no_grad``.
    """

    def __init__(
        self, classifier: nn.Module, n_states: int, max_rows: int, incremental: bool = True
    ) -> None:
        clf: Any = getattr(classifier, "level2", classifier)  # duck-typed: checked below
        if not (hasattr(clf, "instance_scores") and hasattr(clf, "pool")):
            raise TypeError(
                f"{type(classifier).__name__} has no instance_scores/pool; "
                "expected an AttentionMILClassifier or a HAFED"
            )
        self.classifier: AttentionMILClassifier = clf
        self.n_states, self.max_rows = int(n_states), int(max_rows)
        self.incremental = bool(incremental)
        self._running = isinstance(clf, AttentionMILClassifier)
        self._n = torch.zeros(self.n_states, dtype=torch.long)  # rows of each state (CPU)
        self._logits: Tensor | None = None  # (E, C)
        self._a: Tensor | None = None  # (E, P, M) attention logits (padding: 0)
        self._h: Tensor | None = None  # (E, P, D) values (own copy; padding: 0)
        self._e: Tensor | None = None  # (E, P, M) float64 exp(a - c) (padding: 0)
        self._c: Tensor | None = None  # (E, M) float64 shift
        self._s: Tensor | None = None  # (E, M, D) float64 Σ e h
        self._z: Tensor | None = None  # (E, M) float64 Σ e

    @property
    def logits(self) -> Tensor:
        """Slide logits ``(E, C)`` of every state at its last :meth:`reset` / :meth:`update`."""
        if self._logits is None:
            raise RuntimeError("call reset(e, S_e) first")
        return self._logits

    def reset(self, e: int, S_e: Tensor) -> Tensor:
        """Score every row of state ``e``'s new rows ``S_e (n, d)``; returns its logits ``(C,)``."""
        if self.classifier.training:
            raise RuntimeError("put the classifier in eval mode (.eval()) first")
        n = int(S_e.shape[0])
        if n > self.max_rows:
            raise ValueError(f"a state of {n} rows does not fit max_rows={self.max_rows}")
        self._n[e] = n
        if not self.incremental:
            self._set_logits(torch.tensor([e]), self.classifier.classify(S_e).unsqueeze(0))
            return self.logits[e]
        a, h = self.classifier.instance_scores(S_e)
        if self._a is None or self._a.device != a.device:
            self._allocate(a, h)
        assert self._a is not None and self._h is not None
        self._a[e, :n], self._a[e, n:] = a, 0.0
        self._h[e, :n], self._h[e, n:] = h, 0.0
        if self._running:
            self._rebuild(e)
            self._set_logits(torch.tensor([e], device=a.device), self._head([e]))
        else:
            self._set_logits(torch.tensor([e]), self.classifier.pool(a, h, None)[0].unsqueeze(0))
        return self.logits[e]

    def update(self, S: Tensor, env: Tensor, row: Tensor) -> Tensor:
        """Slide logits ``(E, C)`` after the rows ``S[env[i], row[i]]`` changed in place."""
        if self._logits is None:
            raise RuntimeError("call reset(e, S_e) first")
        if env.numel() == 0:
            return self._logits
        touched = torch.unique(env)
        if not self.incremental:
            logits = self.classifier.classify(S[touched], self._valid(touched))
            self._set_logits(touched, logits)
            return self._logits
        assert self._a is not None and self._h is not None
        a_new, h_new = self.classifier.instance_scores(S[env, row])
        if not self._running:
            self._a[env, row], self._h[env, row] = a_new, h_new
            pooled = self.classifier.pool(self._a[touched], self._h[touched], self._valid(touched))
            self._set_logits(touched, pooled[0])
            return self._logits
        assert self._e is not None and self._c is not None
        assert self._s is not None and self._z is not None
        E = self.n_states
        e_old, h_old = self._e[env, row], self._h[env, row].double()
        z_before = self._z.clone()
        self._s -= segment_outer(env, e_old, h_old, E)
        self._z.index_add_(0, env, -e_old)
        self._a[env, row], self._h[env, row] = a_new, h_new
        a64 = a_new.double()
        rises = (a64 > self._c[env] + _RESCALE_ABOVE).any(1).long()
        risen = torch.zeros(E, dtype=torch.long, device=env.device).index_add_(0, env, rises) > 0
        rebuild = risen | (self._z < _CANCELLED * z_before).any(1)
        keep = ~rebuild[env]  # rows of states updated in place; the others are rebuilt
        env_k, row_k = env[keep], row[keep]
        e_new = torch.exp(a64[keep] - self._c[env_k])
        self._e[env_k, row_k] = e_new
        self._s += segment_outer(env_k, e_new, h_new[keep].double(), E)
        self._z.index_add_(0, env_k, e_new)
        for e in torch.nonzero(rebuild).flatten().tolist():  # rare: exact sums again
            self._rebuild(e)
        self._set_logits(touched, self._head(touched))
        return self._logits

    # ------------------------------------------------------------------ internals
    def _allocate(self, a: Tensor, h: Tensor) -> None:
        E, P, M, D = self.n_states, self.max_rows, a.shape[-1], h.shape[-1]
        self._a = a.new_zeros(E, P, M)
        self._h = h.new_zeros(E, P, D)
        f64, dev = torch.float64, a.device
        self._e = torch.zeros(E, P, M, dtype=f64, device=dev)
        self._c = torch.zeros(E, M, dtype=f64, device=dev)
        self._s = torch.zeros(E, M, D, dtype=f64, device=dev)
        self._z = torch.ones(E, M, dtype=f64, device=dev)

    def _rebuild(self, e: int) -> None:
        """State ``e``'s sums from its cached rows: shift = max logit per branch."""
        assert self._a is not None and self._h is not None and self._e is not None
        assert self._c is not None and self._s is not None and self._z is not None
        n = int(self._n[e])
        a64 = self._a[e, :n].double()
        self._c[e] = a64.max(0).values
        rows = torch.exp(a64 - self._c[e])
        self._e[e, :n], self._e[e, n:] = rows, 0.0
        self._z[e] = rows.sum(0)
        self._s[e] = rows.T @ self._h[e, :n].double()

    def _head(self, states: Tensor | list[int]) -> Tensor:
        """Slide logits ``(len(states), C)`` from the sums of ``states``."""
        assert self._s is not None and self._z is not None and self._h is not None
        s, z = self._s[states], self._z[states]
        pooled = (s / z.clamp_min(1e-300).unsqueeze(-1)).mean(1)  # (k, D)
        clf = self.classifier
        return clf.slide_head(clf.head_dropout(pooled.to(self._h.dtype)))

    def _valid(self, states: Tensor) -> Tensor:
        """bool ``(k, P)``: the real rows of ``states``."""
        n = self._n.to(states.device)[states]
        return torch.arange(self.max_rows, device=states.device) < n.unsqueeze(1)

    def _set_logits(self, states: Tensor, logits: Tensor) -> None:
        if self._logits is None or self._logits.device != logits.device:
            self._logits = logits.new_zeros(self.n_states, logits.shape[-1])
        self._logits[states.to(logits.device)] = logits

    def __repr__(self) -> str:
        return (
            f"BatchedIncrementalClassifier({type(self.classifier).__name__}, "
            f"n_states={self.n_states}, max_rows={self.max_rows}, "
            f"incremental={self.incremental})"
        )
