"""Tissue segmentation on a thumbnail and the two-level patch grid.

A low-resolution patch is ``patch_px`` pixels at downsample ``lo_ds = hi_ds * zoom``; it
covers ``zoom x zoom = k`` high-resolution sub-patches of ``patch_px`` pixels at ``hi_ds``.
In level-0 pixels a low-res cell is ``cell = patch_px * lo_ds`` wide and a sub-patch
``patch_px * hi_ds``. Coordinates are always level-0 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from ..config import dataclass_from_dict
from .slide import Slide, SlideError

__all__ = ["GridConfig", "PatchGrid", "segment_tissue", "box_fraction", "build_grid", "GridError"]


class GridError(SlideError):
    """The slide has no usable patch grid (no tissue, too small, ...)."""


@dataclass
class GridConfig:
    """Where and how a slide is cut into patches (see the presets for values)."""

    hi_downsample: float = 1.0
    """Resolution of high-res sub-patches relative to level 0; used only when ``hi_mpp`` is null."""
    hi_mpp: float | None = 0.5
    """Resolution of high-res sub-patches in µm/px (every preset sets it: the same tissue on
    every scanner). A slide whose mpp is unknown then stops with an error naming ``--mpp``;
    null reads at ``hi_downsample`` of level 0 instead, whatever the scanner."""
    patch_px: int = 32
    """Side, in pixels at their own resolution, of a low-res patch and of a high-res sub-patch."""
    zoom: int = 4
    """Low-res downsample = zoom x high-res downsample; k = zoom**2 sub-patches per patch."""
    min_tissue: float = 0.25
    """Minimum tissue fraction of a low-res patch's area for it to enter the grid."""
    thumbnail_px: int = 1024
    """Longest side of the segmentation thumbnail (at most; coarser when 16 px per cell allow)."""

    @classmethod
    def from_dict(cls, d: dict | None) -> GridConfig:
        return dataclass_from_dict(cls, d, "grid")

    @property
    def k(self) -> int:
        return self.zoom * self.zoom


@dataclass
class PatchGrid:
    """The patch grid of one slide.

    Attributes:
        coords: ``(N, 2)`` int64 level-0 ``(x, y)`` of each low-res patch's top-left corner.
        cells: ``(N, 2)`` int64 ``(row, col)`` of each patch in the cell lattice.
        tissue: ``(N,)`` float32 tissue fraction of each patch.
        shape: ``(rows, cols)`` of the full lattice over the slide.
        hi_downsample, lo_downsample: resolutions actually used for this slide.
        cell_px: side of a low-res cell in level-0 pixels.
        sub_px: side of a high-res sub-patch in level-0 pixels.
    """

    coords: np.ndarray
    cells: np.ndarray
    tissue: np.ndarray
    shape: tuple[int, int]
    hi_downsample: float
    lo_downsample: float
    patch_px: int
    zoom: int

    @property
    def n(self) -> int:
        return len(self.coords)

    @property
    def cell_px(self) -> float:
        return self.patch_px * self.lo_downsample

    @property
    def sub_px(self) -> float:
        return self.patch_px * self.hi_downsample

    def sub_coords(self, i: int) -> np.ndarray:
        """``(k, 2)`` level-0 ``(x, y)`` of patch i's high-res sub-patches, row-major."""
        x0, y0 = self.coords[i]
        r, c = np.divmod(np.arange(self.zoom * self.zoom), self.zoom)
        return (
            np.stack([x0 + c * self.sub_px, y0 + r * self.sub_px], axis=1).round().astype(np.int64)
        )

    def grid_positions(self) -> np.ndarray:
        """``(N, 2)`` float32 ``(row, col)`` scaled to [0, 1] by the lattice shape."""
        return grid_positions(self.cells, self.shape)


def grid_positions(cells: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Lattice positions scaled to [0, 1]: ``(row, col) / (shape - 1)``.

    Args:
        cells: ``(N, 2)`` int ``(row, col)`` of each patch in the lattice.
        shape: ``(rows, cols)`` of the lattice; ``None``: the smallest that holds ``cells``.

    Returns:
        ``(N, 2)`` float32 in [0, 1] (the observation's ``coords``).
    """
    cells = np.asarray(cells, np.int64).reshape(-1, 2)
    if shape is None:
        shape = tuple(cells.max(0) + 1) if len(cells) else (1, 1)
    denom = np.maximum(np.asarray(shape, np.float32) - 1, 1)
    return np.clip(cells / denom, 0.0, 1.0).astype(np.float32)


def segment_tissue(thumb: np.ndarray) -> np.ndarray:
    """Tissue mask of an RGB thumbnail: Otsu on HSV saturation, then morphology.

    Args:
        thumb: ``(h, w, 3)`` uint8 RGB.

    Returns:
        ``(h, w)`` bool, True on tissue.
    """
    sat = rgb2hsv(thumb)[..., 1]
    sat = ndimage.median_filter(sat, size=3)
    if float(sat.max() - sat.min()) < 0.02:
        return np.zeros(sat.shape, dtype=bool)
    thr = max(threshold_otsu(sat), 0.05)  # glass is grey: never call low saturation tissue
    mask = sat > thr
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2)
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3)), iterations=1)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = sizes >= max(16, 0.001 * mask.size)
        mask = keep[labels]
    return mask


def box_fraction(
    mask: np.ndarray,
    x0: np.ndarray,
    y0: np.ndarray,
    x1: np.ndarray,
    y1: np.ndarray,
    downsample: float,
) -> np.ndarray:
    """Share of each box that ``mask`` covers, by an integral image (O(1) per box).

    Args:
        mask: ``(h, w)`` bool at ``downsample`` (one mask pixel = ``downsample`` level-0 px).
        x0, y0, x1, y1: box corners in level-0 pixels (any matching shapes).

    Returns:
        float64 fractions in [0, 1], shaped like ``x0``; boxes are widened to whole mask pixels.
    """
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    bx0 = np.clip(np.floor(x0 / downsample).astype(int), 0, w)
    by0 = np.clip(np.floor(y0 / downsample).astype(int), 0, h)
    bx1 = np.clip(np.ceil(x1 / downsample).astype(int), 0, w)
    by1 = np.clip(np.ceil(y1 / downsample).astype(int), 0, h)
    area = np.maximum((by1 - by0) * (bx1 - bx0), 1)
    inside = integral[by1, bx1] - integral[by0, bx1] - integral[by1, bx0] + integral[by0, bx0]
    return inside / area


def build_grid(slide: Slide, cfg: GridConfig) -> tuple[PatchGrid, np.ndarray, np.ndarray, float]:
    """Segment tissue and lay the low-res patch grid over it.

    Returns:
        ``(grid, thumbnail (h, w, 3) uint8, tissue mask (h, w) bool, thumbnail downsample)``.

    Raises:
        GridError: the slide is smaller than one low-res patch, or no patch has enough tissue.
    """
    hi_ds = slide.resolve_downsample(cfg.hi_downsample, cfg.hi_mpp)
    lo_ds = hi_ds * cfg.zoom
    cell = cfg.patch_px * lo_ds
    width, height = slide.dimensions
    cols, rows = int(width // cell), int(height // cell)
    if rows < 1 or cols < 1:
        raise GridError(
            f"{slide.path}: slide is {width}x{height} px at level 0, smaller than one low-res patch "
            f"({cell:g} px = {cfg.patch_px} px at downsample {lo_ds:g}); use a smaller patch_px or zoom"
        )
    # The mask needs ~16 thumbnail pixels across a cell, not more: read as coarse as that allows.
    thumb, thumb_ds = slide.thumbnail(cfg.thumbnail_px, min_downsample=cell / 16)
    mask = segment_tissue(thumb)
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    tissue = box_fraction(mask, cc * cell, rr * cell, (cc + 1) * cell, (rr + 1) * cell, thumb_ds)
    keep = tissue >= cfg.min_tissue
    if not keep.any():
        raise GridError(
            f"{slide.path}: no tissue found (no low-res patch has >= {cfg.min_tissue:.0%} tissue); "
            "check the slide, or lower grid.min_tissue"
        )
    cells = np.stack([rr[keep], cc[keep]], axis=1).astype(np.int64)
    coords = np.stack([cells[:, 1] * cell, cells[:, 0] * cell], axis=1).round().astype(np.int64)
    grid = PatchGrid(
        coords=coords,
        cells=cells,
        tissue=tissue[keep].astype(np.float32),
        shape=(rows, cols),
        hi_downsample=hi_ds,
        lo_downsample=lo_ds,
        patch_px=cfg.patch_px,
        zoom=cfg.zoom,
    )
    return grid, thumb, mask, thumb_ds
