"""Fresh observations without copying the whole state every step.

An environment that returns a new copy of its ``(P, d)`` state every step copies 12.6 MB per
step at N = 8,192 and d = 384, about as long as the rest of the step; yet a zoom changes a few
rows. :class:`ObservationPool` hands out read-only snapshots and keeps a few sets of them: once
nothing outside the pool refers to any array of a set — not the caller, not a view of it (a
numpy view holds a reference to its base), not a tensor made by ``torch.from_numpy`` — the set
is brought up to date by copying only the rows changed since it was filled, and handed out
again. So an observation the caller can still read never changes, as with a new copy, and a
step costs a few rows instead of the whole state.

The snapshots are read-only (``flags.writeable`` is ``False``), which is what lets the pool
trust that a returned set still holds what it was filled with; write into a copy
(``np.array(obs["features"])``). A set whose arrays were made writeable again is refilled in
full. Writes that go around the flag are not seen: a tensor made by ``torch.from_numpy`` shares
the memory (torch warns that it must not be written), and an array made writeable, written and
made read-only again looks untouched; such writes would reach later observations.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Mapping

import numpy as np

__all__ = ["ObservationPool"]


def _refs(arrays: dict[str, np.ndarray], key: str) -> int:
    """``sys.getrefcount`` of one array of a set, always taken through this one expression, so
    that the count of an array nobody else holds is the same on every interpreter."""
    return sys.getrefcount(arrays[key])


class ObservationPool:
    """Read-only copies of an environment's observation buffers, refreshed row by row.

    The environment calls :meth:`changed` whenever it writes into its buffers (``None``: any
    row may have changed, e.g. a reset) and :meth:`copy` to get an observation. The buffers'
    first axis is the row axis (the patches).

    Args:
        keep: sets of arrays kept for reuse (each one observation's worth of memory; two suffice
            for a caller that holds the last observation while stepping). When all are held,
            :meth:`copy` returns a new read-only copy that is not kept.
        history: changes remembered; a set older than that is refilled in full.

    Attributes:
        reused: observations served by refreshing a dropped snapshot (the rest were copied
            whole).
    """

    def __init__(self, keep: int = 2, history: int = 16) -> None:
        if keep < 0 or history < 1:
            raise ValueError(f"keep must be >= 0 and history >= 1, got {keep}, {history}")
        self.keep = int(keep)
        self._sets: list[tuple[dict[str, np.ndarray], list[int]]] = []  # arrays, [version]
        self._version = 0
        self.reused = 0
        self._log: deque[tuple[int, np.ndarray | None]] = deque(maxlen=history)
        probe = {"probe": np.empty(0)}
        self._unheld = _refs(probe, "probe")  # the count of an array only its set refers to

    def changed(self, rows: np.ndarray | None) -> None:
        """Record that the buffers' ``rows`` (int indices; ``None``: all) have changed."""
        self._version += 1
        self._log.append((self._version, None if rows is None else np.asarray(rows)))

    def copy(self, buffers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A new ``dict`` of read-only arrays equal to ``buffers``, none of which the caller
        holds.

        Args:
            buffers: the environment's arrays, by observation key.

        Returns:
            ``{key: array}``, each array equal to its buffer (same shape and dtype), read-only.
        """
        for arrays, filled in self._sets:
            if self._reusable(arrays, buffers):
                self._refresh(arrays, buffers, self._rows_since(filled[0]))
                filled[0] = self._version
                self.reused += 1
                return dict(arrays)
        fresh = {key: buffer.copy() for key, buffer in buffers.items()}
        for array in fresh.values():
            array.flags.writeable = False
        if len(self._sets) < self.keep:
            self._sets.append((fresh, [self._version]))
        return dict(fresh)

    def _rows_since(self, version: int) -> np.ndarray | None:
        """The rows changed after ``version`` (``None``: every row, or not known)."""
        if version == self._version:
            return np.zeros(0, np.int64)
        if not self._log or self._log[0][0] > version + 1:
            return None  # older than the history
        parts = []
        for v, rows in self._log:
            if v > version:
                if rows is None:
                    return None
                parts.append(rows)
        return np.unique(np.concatenate(parts))

    @staticmethod
    def _refresh(
        arrays: dict[str, np.ndarray], buffers: Mapping[str, np.ndarray], rows: np.ndarray | None
    ) -> None:
        """Bring ``arrays`` up to date: ``rows`` of each, or all of them when ``None`` or when
        an array was made writeable while it was handed out."""
        for key, buffer in buffers.items():
            array = arrays[key]
            whole = rows is None or array.flags.writeable
            array.flags.writeable = True
            if whole:
                np.copyto(array, buffer)
            elif rows is not None and len(rows):
                array[rows] = buffer[rows]
            array.flags.writeable = False

    def _reusable(self, arrays: dict[str, np.ndarray], buffers: Mapping[str, np.ndarray]) -> bool:
        """Whether nobody outside the pool holds any array of ``arrays`` and they fit
        ``buffers``."""
        if arrays.keys() != buffers.keys():
            return False
        for key, buffer in buffers.items():
            array = arrays[key]
            if array.shape != buffer.shape or array.dtype != buffer.dtype:
                return False
            del array  # not a reference of ours while counting
            if _refs(arrays, key) > self._unheld:
                return False
        return True
