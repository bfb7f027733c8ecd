"""Reading a patch's pixels: its low-res view and its k high-res sub-patches."""

from __future__ import annotations

import numpy as np

from .grid import PatchGrid
from .slide import Slide

__all__ = ["LowResRows", "read_patch"]


def read_patch(
    slide: Slide, grid: PatchGrid, i: int, low: bool = True
) -> tuple[np.ndarray | None, np.ndarray]:
    """Pixels of patch ``i``: its low-res view and its k high-res sub-patches.

    Returns:
        ``lo (P, P, 3)`` uint8 at the low-res downsample and ``hi (k, P, P, 3)`` uint8 at the
        high-res downsample, sub-patches in row-major order (see ``PatchGrid.sub_coords``).
        ``lo`` is ``None`` with ``low=False`` (only the high-res region is read).
    """
    p, z = grid.patch_px, grid.zoom
    x, y = (int(v) for v in grid.coords[i])
    lo = slide.read(x, y, p, grid.lo_downsample) if low else None
    region = slide.read(x, y, p * z, grid.hi_downsample)
    hi = region.reshape(z, p, z, p, 3).transpose(0, 2, 1, 3, 4).reshape(z * z, p, p, 3)
    return lo, np.ascontiguousarray(hi)


class LowResRows:
    """Low-res patches cut from one read per lattice row, instead of one read per patch.

    A region read costs ~1 ms of fixed overhead in tiffslide, and a row of patches is one
    region. Pixel-identical to :func:`read_patch`'s low-res view when the low-res downsample
    is a pyramid level (as in the presets); otherwise equal up to resampling at patch borders.
    Index in row-major patch order (as :class:`~sasha_env.slides.grid.PatchGrid` stores them).
    """

    def __init__(self, slide: Slide, grid: PatchGrid):
        self.slide, self.grid = slide, grid
        self._row: int | None = None
        self._c0 = 0
        self._strip = np.zeros((0, 0, 3), np.uint8)

    def __getitem__(self, i: int) -> np.ndarray:
        """``(P, P, 3)`` uint8: patch ``i`` at the low-res downsample."""
        g = self.grid
        row, col = (int(v) for v in g.cells[i])
        if row != self._row:
            cols = g.cells[g.cells[:, 0] == row, 1]
            self._c0, n = int(cols.min()), int(cols.max() - cols.min()) + 1
            x0, y0 = round(self._c0 * g.cell_px), int(g.coords[i][1])
            self._strip = self.slide.read_rect(x0, y0, n * g.patch_px, g.patch_px, g.lo_downsample)
            self._row = row
        j = (col - self._c0) * g.patch_px
        return np.ascontiguousarray(self._strip[:, j : j + g.patch_px])
