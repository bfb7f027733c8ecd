"""The similarity test of a zoom: which rows the TSU updates."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Candidates"]


class Candidates:
    """The rows of one slide a zoom may update (neither zoomed nor TSU-updated), and the test
    that picks them: ``|cos(z_j, anchor)| ≥ τ``.

    Such rows still hold their low-res ``z_j``, so the test is one ``(n_cand, d) @ (d,)``
    product over a compacted copy of the candidates' ``z`` rows, with their cached norms. The
    copy is a superset of the free rows (the test masks the others out), rebuilt from the free
    rows when most of it has become stale (:meth:`compact`).

    Args:
        z: the slide's low-res features ``(N, d)``.
        z_norm: their norms ``(N,)``.
    """

    def __init__(self, z: Tensor, z_norm: Tensor) -> None:
        self._z_all, self._norm_all = z, z_norm
        self.idx = torch.arange(len(z), device=z.device)  # (n_cand,) row indices
        self.z, self.norm = z, z_norm  # (n_cand, d), (n_cand,)

    def similar(self, anchor: Tensor, tau: float, free: Tensor) -> Tensor:
        """The free rows ``j`` with ``|cos(z_j, anchor)| ≥ tau``, ascending ``(r,)`` int64.

        Args:
            anchor: ``(d,)``.
            tau: the cosine threshold.
            free: bool ``(N,)``, the rows neither zoomed nor updated.
        """
        dots = self.z @ anchor
        hit = dots.abs_() >= self.norm * (tau * float(anchor.norm()))
        return self.idx[hit & free[self.idx]]

    def compact(self, free: Tensor, n_free: int) -> None:
        """Rebuild the copy from the ``n_free`` free rows when most candidates are stale."""
        if len(self.idx) > 2 * n_free + 256:
            keep = torch.nonzero(free).squeeze(1)
            self.idx, self.z, self.norm = keep, self._z_all[keep], self._norm_all[keep]
