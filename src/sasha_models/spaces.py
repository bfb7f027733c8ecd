"""The observation and action contract of ``Sasha-WSI-v0``, shared by the env and the policies.

One definition, so that the environment, the SASHA policy and toy test environments cannot
drift apart. Gymnasium spaces and array rules only: no environment classes.

Observation (``Dict``), P = ``max_patches``, rows ≥ N are padding (zeros):

=========== ============================== ==================================================
key          space                           meaning
=========== ============================== ==================================================
features     ``Box(-inf, inf, (P, d), f32)``  the state S (low-res z, distilled v, TSU rows)
visited      ``Box(0, 1, (P,), int8)``        1 on zoomed patches
valid        ``Box(0, 1, (P,), int8)``        1 on the slide's N real patches
coords       ``Box(0, 1, (P, 2), f32)``       lattice (row, col) / (shape − 1)
=========== ============================== ==================================================

Episode: ``⌈f·N⌉`` zooms at budget f (:func:`episode_budget`).

Action: ``Discrete(P)``, the patch to zoom; legal = ``valid & ~visited`` (:func:`legal_actions`).
With a stop action (learned stopping, the env's ``stop_action``): ``Discrete(P + 1)``, index
``P`` (:func:`stop_index`) ends the episode and is always legal.

A batch of observations may also come **row-pooled** (from the agents' rollout buffers,
:mod:`sasha_env.agents.buffers`): the per-row keys hold the batch's distinct rows ``(U, ...)``
and :data:`ROW_INDEX` ``(B, P)`` gives each slot's row among them, so observation ``b`` is
``{key: rows[key][row_index[b]]}``.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
from gymnasium import spaces

__all__ = [
    "OBS_KEYS",
    "ROW_INDEX",
    "action_space",
    "episode_budget",
    "legal_actions",
    "observation_space",
    "row_bits",
    "stop_index",
    "with_stop",
]

#: Keys of the observation ``Dict`` (a policy reads ``coords`` only when it uses positions).
OBS_KEYS = ("features", "visited", "valid", "coords")

#: Key of a row-pooled batch's ``(B, P)`` slot → distinct-row index (see the module docstring).
ROW_INDEX = "row_index"

A = TypeVar("A")


def episode_budget(frac: float, n: int) -> int:
    """Zooms per episode, ``⌈frac·N⌉`` (at least 1, at most N).

    ``frac·N`` is rounded to 9 decimals first, so that a product that lands a rounding error
    above an integer is not rounded up a whole zoom (0.07 × 100 is 7.000000000000001 in double
    precision: 7 zooms, not 8). For f = 0.1 and 0.2 this equals the official ``ceil(N·f)``
    (``envs/WSI_cosine_env.py`` at 6385fe6) for every N up to 200,000 (checked).
    """
    return max(1, min(n, math.ceil(round(frac * n, 9))))


def observation_space(max_patches: int, d: int) -> spaces.Dict:
    """The observation space for slides of at most ``max_patches`` patches and d features."""
    P = int(max_patches)
    return spaces.Dict(
        {
            "features": spaces.Box(-np.inf, np.inf, (P, int(d)), np.float32),
            "visited": spaces.Box(0, 1, (P,), np.int8),
            "valid": spaces.Box(0, 1, (P,), np.int8),
            "coords": spaces.Box(0.0, 1.0, (P, 2), np.float32),
        }
    )


def action_space(max_patches: int, stop: bool = False) -> spaces.Discrete:
    """One action per patch slot, the patch to zoom; with ``stop``, one more: index
    ``max_patches`` (:func:`stop_index`) stops reading."""
    return spaces.Discrete(int(max_patches) + int(bool(stop)))


def stop_index(max_patches: int) -> int:
    """The stop action's index in ``action_space(max_patches, stop=True)``: the last one, P."""
    return int(max_patches)


def legal_actions(valid: A, visited: A, stop: bool = False) -> A:
    """The legal-action rule: a real patch not zoomed yet, ``valid & ~visited``; with ``stop``,
    followed by the stop action, always legal (:func:`with_stop`).

    Args:
        valid, visited: ``(..., P)`` numpy arrays or torch tensors holding 0/1 (any dtype).
        stop: the action space has the stop action (``(..., P + 1)`` out).

    Returns:
        bool ``(..., P)`` (``(..., P + 1)`` with ``stop``), the same library as the inputs.
    """
    legal: Any = (valid > 0.5) & ~(visited > 0.5)  # type: ignore[operator]
    return with_stop(legal) if stop else legal


def with_stop(mask: A) -> A:
    """A patch mask ``(..., P)`` with the stop action's column appended, always True:
    bool ``(..., P + 1)``, the same library (numpy or torch) and device as ``mask``."""
    m: Any = mask
    out: Any
    if isinstance(m, np.ndarray):
        out = np.concatenate([m.astype(bool), np.ones(m.shape[:-1] + (1,), bool)], axis=-1)
        return out
    import torch  # lazy: as in row_bits

    t = m.to(torch.bool)
    out = torch.cat([t, torch.ones(t.shape[:-1] + (1,), dtype=torch.bool, device=t.device)], -1)
    return out


def row_bits(x: A) -> A:
    """``x`` with float32 values viewed as their int32 bits (other dtypes as they are).

    How row pooling (the agents' rollout buffers) and the SASHA policy's acting cache tell
    whether a row changed: ``row_bits(new) != row_bits(old)`` is a bitwise comparison, so a row
    counts as unchanged only when it is identical (``-0.0`` against ``0.0`` or a NaN included),
    and it is quicker than comparing floats.

    Args:
        x: a numpy array or a torch tensor.
    """
    if isinstance(x, np.ndarray):
        return x.view(np.int32) if x.dtype == np.float32 else x  # type: ignore[return-value]
    import torch  # lazy: only torch tensors get here; the env's numpy path needs no torch

    return x.view(torch.int32) if x.dtype == torch.float32 else x  # type: ignore[attr-defined]
