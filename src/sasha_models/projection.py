"""A fixed linear projection of the state's rows, for compact agent observations.

The agent's network applies its first layer to every row of every observation, in every PPO
update: ``O(B·N·d·H)``, which dominates training at real N and d (a 1,280-d row costs 10×
a 128-d one), and the rollout buffer holds ``n_steps · n_envs`` observations of ``N·d``
floats. With a projection ``W (d, k)`` and centre ``μ (d,)`` fitted once on training rows
(PCA), the environment hands the agent ``(S − μ) W`` instead of S: ``k`` columns, updated
only in the rows a zoom changed. The classifier, the TSU and the reward still use the full
state; only what the agent reads is projected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ObsProjection", "fit_obs_projection"]


@dataclass(frozen=True)
class ObsProjection:
    """``x ↦ (x − mean) @ basis``.

    Attributes:
        mean: ``(d,)`` float32, the rows' centre.
        basis: ``(d, k)`` float32, orthonormal columns (the top-k principal directions).
    """

    mean: np.ndarray
    basis: np.ndarray

    def __post_init__(self) -> None:
        if self.basis.ndim != 2 or self.mean.shape != (self.basis.shape[0],):
            raise ValueError(
                f"projection needs mean (d,) and basis (d, k), got {self.mean.shape} and "
                f"{self.basis.shape}"
            )

    @property
    def d_in(self) -> int:
        return int(self.basis.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.basis.shape[1])

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """``(..., d)`` → ``(..., k)`` float32."""
        return ((rows - self.mean) @ self.basis).astype(np.float32, copy=False)


def fit_obs_projection(rows: np.ndarray, k: int) -> ObsProjection:
    """The top-``k`` principal directions of ``rows (n, d)`` (eigenvectors of the covariance).

    Raises:
        ValueError: ``k`` not in ``[1, d]``.
    """
    rows = np.asarray(rows, np.float64)
    d = rows.shape[1]
    if not 1 <= k <= d:
        raise ValueError(f"obs_dim must be between 1 and the feature size {d}, got {k}")
    mean = rows.mean(0)
    x = torch.from_numpy(rows - mean)
    cov = x.T @ x / max(len(rows) - 1, 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    basis = vecs[:, -k:].flip(1).numpy()
    return ObsProjection(mean.astype(np.float32), np.ascontiguousarray(basis, np.float32))
