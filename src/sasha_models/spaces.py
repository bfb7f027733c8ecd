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

Action: ``Discrete(P)``, the patch to zoom; legal = ``valid & ~visited`` (:func:`legal_actions`).

A batch of observations may also come **row-pooled** (from the agents' rollout buffers,
:mod:`sasha_env.agents.buffers`): the per-row keys hold the batch's distinct rows ``(U, ...)``
and :data:`ROW_INDEX` ``(B, P)`` gives each slot's row among them, so observation ``b`` is
``{key: rows[key][row_index[b]]}``.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
from gymnasium import spaces

__all__ = [
    "OBS_KEYS",
    "ROW_INDEX",
    "action_space",
    "legal_actions",
    "observation_space",
    "row_bits",
]

#: Keys of the observation ``Dict`` (a policy reads ``coords`` only when it uses positions).
OBS_KEYS = ("features", "visited", "valid", "coords")

#: Key of a row-pooled batch's ``(B, P)`` slot → distinct-row index (see the module docstring).
ROW_INDEX = "row_index"

A = TypeVar("A")


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


def action_space(max_patches: int) -> spaces.Discrete:
    """One action per patch slot: the patch to zoom."""
    return spaces.Discrete(int(max_patches))


def legal_actions(valid: A, visited: A) -> A:
    """The legal-action rule: a real patch not zoomed yet, ``valid & ~visited``.

    Args:
        valid, visited: ``(..., P)`` numpy arrays or torch tensors holding 0/1 (any dtype).

    Returns:
        bool, the same shape and library as the inputs.
    """
    return (valid > 0.5) & ~(visited > 0.5)  # type: ignore[operator, return-value]


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
