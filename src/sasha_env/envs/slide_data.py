"""One slide's arrays as the environment uses them, read from the store once and cached."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..features.store import FeatureStore, StoreError
from ..lru import ByteLRU
from ..slides.grid import grid_positions

__all__ = ["SlideData", "SlideCache"]


@dataclass
class SlideData:
    """One slide's arrays, as the environment uses them.

    Attributes:
        slide_id: the id.
        label: class index (into the manifest's ``class_names``).
        z: low-resolution features ``(N, d)`` float32.
        v: distilled high-resolution features ``(N, d)`` float32 (HAFED level 1).
        z_norm: ``‖z_j‖`` ``(N,)``, for cosine similarities in O(N·d).
        coords: level-0 ``(x, y)`` top-left of each patch ``(N, 2)`` int64.
        grid: lattice ``(row, col)`` scaled to [0, 1] ``(N, 2)`` float32.
        path: the slide file (from the store's slide attributes).
        dimensions: level-0 ``(width, height)`` in pixels.
        cell_px: side of a patch in level-0 pixels (``patch_px * lo_downsample``).
    """

    slide_id: str
    label: int
    z: Tensor
    v: Tensor
    z_norm: Tensor
    coords: np.ndarray
    grid: np.ndarray
    path: str
    dimensions: tuple[int, int]
    cell_px: float

    @property
    def n(self) -> int:
        return int(self.z.shape[0])

    @property
    def nbytes(self) -> int:
        return int(
            (self.z.numel() + self.v.numel() + self.z_norm.numel()) * 4
            + self.coords.nbytes
            + self.grid.nbytes
        )


class SlideCache:
    """Per-slide arrays read from the store on first use and kept in a bytes-bounded LRU.

    Args:
        store: the feature store.
        labels: class index of every slide the cache may serve.
        cache_mb: keep at most this many MiB of slides (the current one is always kept).
    """

    def __init__(self, store: FeatureStore, labels: dict[str, int], cache_mb: float = 1024) -> None:
        self.store, self.labels = store, labels
        self._cache: ByteLRU[SlideData] = ByteLRU(cache_mb, lambda s: s.nbytes, keep_last=True)

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self.labels

    def get(self, slide_id: str) -> SlideData:
        """The slide's arrays (read from the store on first use)."""
        if slide_id not in self.labels:
            raise KeyError(
                f"slide {slide_id!r} is not one this environment can load "
                "(it must be in both the manifest and the feature store)"
            )
        return self._cache.get(slide_id, lambda: self._load(slide_id))

    def _load(self, sid: str) -> SlideData:
        store = self.store
        info = store.slide_info(sid)
        if not store.has_array(sid, "distilled"):
            raise StoreError(_no_distilled(store, [sid]))
        z = np.ascontiguousarray(store.read(sid, "lowres"), dtype=np.float32)
        v = np.ascontiguousarray(store.read(sid, "distilled"), dtype=np.float32)
        if z.ndim != 2 or v.shape != z.shape:
            raise StoreError(
                f"{store.path}: slide {sid!r} has lowres {z.shape} but distilled {v.shape}; "
                "re-run the 'distill' stage"
            )
        coords = np.asarray(store.read(sid, "coords"), dtype=np.int64).reshape(-1, 2)
        cells = store.read(sid, "cells")
        zt = torch.from_numpy(z)
        return SlideData(
            slide_id=sid,
            label=self.labels[sid],
            z=zt,
            v=torch.from_numpy(v),
            z_norm=zt.norm(dim=1),
            coords=coords,
            grid=grid_positions(cells, info.shape or None),
            path=str(info.path or ""),
            dimensions=tuple(int(x) for x in info.dimensions or (1, 1)),  # type: ignore[arg-type]
            cell_px=store.cell_px(sid),
        )


def _no_distilled(store: FeatureStore, missing: list[str]) -> str:
    shown = ", ".join(repr(s) for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
    return (
        f"{store.path}: {len(missing)} slide(s) ({shown}) have no 'distilled' array: "
        "run the 'distill' stage first (sasha pipeline --workdir DIR), which writes HAFED's "
        "level-1 vectors v into the store"
    )
