"""Rollout buffers that store each distinct patch row once (row pooling).

Between two steps of a ``Sasha-WSI-v0`` episode only a few rows of the observation change: the
zoomed patch's and the ones the TSU updated (``env.changed_rows``). SB3's dict rollout buffer
nevertheless stores every observation in full, ``n_steps × n_envs × P × (4d + 10)`` bytes, and
PPO's update runs the policy's per-row layers over ``batch_size × P`` rows although most of them
are copies of one another.

The buffers here keep a **pool of distinct rows** and, per step and env, the ``(P,)`` indices
of its rows in the pool. :meth:`RowPoolMixin.add` compares each env's observation with its
previous one and appends only the rows that differ (every key of a row is compared bitwise
with the env's last rows, which the buffer keeps its own copy of, so nothing depends on the env
telling what changed or on its arrays staying unchanged). A mini-batch is handed to the policy
**row-pooled** (:data:`sasha_models.spaces.ROW_INDEX`): each per-row key holds the batch's
distinct rows ``(U, ...)`` and ``row_index`` ``(B, P)`` says which of them every slot is. The
SASHA policies then run their per-row layers on ``U`` rows instead of ``B·P``
(:meth:`sasha_models.actor_critic.SashaActorCritic.forward_pooled`); every output is the same up to
float rounding (the gradient of a shared row is summed in another order).

- :class:`RowPoolMaskableRolloutBuffer` for ``sb3_contrib.MaskablePPO``;
- :class:`RowPoolRolloutBuffer` for SB3's ``PPO`` and ``A2C``.

Both need a policy that reads row-pooled observations (the SASHA policies do).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer
from stable_baselines3.common.buffers import DictRolloutBuffer

from sasha_models.spaces import ROW_INDEX, row_bits

__all__ = ["RowPoolMaskableRolloutBuffer", "RowPoolMixin", "RowPoolRolloutBuffer"]


class RowPoolMixin:
    """Row pooling for SB3 dict rollout buffers; must come before the buffer class in the bases.

    Row keys are the observation keys whose first axis is the patch axis (that of
    ``features``); other keys are stored by the base buffer as usual.

    Attributes:
        row_index: ``(buffer_size, n_envs, P)`` int64, each slot's row in the pool (after the
            rollout: ``(buffer_size · n_envs, P)``, SB3's flattened order).
        pool_rows: rows in the pool (all envs, this rollout).
    """

    observation_space: spaces.Dict
    obs_shape: dict[str, tuple[int, ...]]
    buffer_size: int
    n_envs: int
    pos: int
    generator_ready: bool
    device: torch.device

    def reset(self) -> None:
        if not hasattr(self, "row_shapes"):
            if not isinstance(self.observation_space, spaces.Dict) or (
                "features" not in self.observation_space.spaces
            ):
                raise ValueError(
                    "row pooling needs Dict observations with a per-patch 'features' key "
                    f"(Sasha-WSI-v0's), got {self.observation_space}; use SB3's own buffer "
                    "(agents.row_pool: false)"
                )
            p = self.observation_space["features"].shape[0]
            self.row_shapes = {
                k: shape for k, shape in self.obs_shape.items() if len(shape) and shape[0] == p
            }
            # the base buffer stores (and allocates) only the other keys
            self.obs_shape = {k: s for k, s in self.obs_shape.items() if k not in self.row_shapes}
            self.n_rows = p
        super().reset()  # type: ignore[misc]
        self.row_index = np.zeros((self.buffer_size, self.n_envs, self.n_rows), dtype=np.int64)
        self._chunks: dict[str, list[np.ndarray]] = {k: [] for k in self.row_shapes}
        self._pool: dict[str, torch.Tensor] = {}
        self.pool_rows = 0
        self._last: list[tuple[dict[str, np.ndarray], np.ndarray] | None] = [None] * self.n_envs

    def add(self, obs: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> None:
        for e in range(self.n_envs):
            rows = {
                k: np.asarray(obs[k][e], self.observation_space[k].dtype) for k in self.row_shapes
            }
            last = self._last[e]
            if last is None:  # the env's first step in this rollout: every row is new
                last = ({k: r.copy() for k, r in rows.items()}, np.empty(self.n_rows, np.int64))
                new = np.arange(self.n_rows)
            else:
                changed = np.zeros(self.n_rows, dtype=bool)
                for k, r in rows.items():
                    diff = row_bits(r) != row_bits(last[0][k])
                    changed |= diff.reshape(self.n_rows, -1).any(1)
                new = np.flatnonzero(changed)
            kept, index = last  # owned copies: updated in place, row by row
            index[new] = self.pool_rows + np.arange(new.size)
            for k, r in rows.items():
                self._chunks[k].append(r[new])
                kept[k][new] = r[new]
            self.pool_rows += int(new.size)
            self.row_index[self.pos, e] = index
            self._last[e] = last
        super().add(obs, *args, **kwargs)  # type: ignore[misc]

    def get(self, batch_size: int | None = None) -> Any:
        if not self.generator_ready:
            self._pool = {
                k: torch.from_numpy(np.concatenate(chunks)) for k, chunks in self._chunks.items()
            }
            self._chunks = {k: [] for k in self.row_shapes}
            self.row_index = self.swap_and_flatten(self.row_index)  # type: ignore[attr-defined]
        yield from super().get(batch_size)  # type: ignore[misc]

    def _get_samples(self, batch_inds: np.ndarray, env: Any = None) -> Any:
        samples = super()._get_samples(batch_inds, env)  # type: ignore[misc]
        distinct, index = torch.unique(
            torch.from_numpy(self.row_index[batch_inds]), return_inverse=True
        )
        observations = dict(samples.observations)
        for k, pool in self._pool.items():
            observations[k] = pool[distinct].to(self.device)
        observations[ROW_INDEX] = index.to(self.device)
        return samples._replace(observations=observations)


class RowPoolMaskableRolloutBuffer(RowPoolMixin, MaskableDictRolloutBuffer):
    """``MaskableDictRolloutBuffer`` with row pooling (``MaskablePPO(..., rollout_buffer_class=...)``)."""


class RowPoolRolloutBuffer(RowPoolMixin, DictRolloutBuffer):
    """``DictRolloutBuffer`` with row pooling (SB3's ``PPO`` and ``A2C``)."""
