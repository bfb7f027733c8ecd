"""Drawing an episode over a slide thumbnail: the patch grid, zoomed and TSU-updated patches."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..slides.slide import Slide

__all__ = ["GRID_RGB", "UPDATED_RGB", "ZOOMED_RGB", "ThumbnailCache", "draw_patches"]

#: Outline of every patch of the grid.
GRID_RGB = (150, 150, 150)
#: Outline and tint of patches whose state the TSU updated (and that were not zoomed).
UPDATED_RGB = (0, 114, 178)
#: Outline and tint of zoomed patches (read at high resolution).
ZOOMED_RGB = (213, 0, 50)


class ThumbnailCache:
    """Slide thumbnails, read once per slide and kept for the last ``size`` slides.

    Args:
        max_side_px: longest side of a thumbnail in pixels.
        size: how many slides' thumbnails to keep.

    A slide file that cannot be read (moved, deleted) gives a white canvas of the slide's
    size, with a warning, so that rendering never stops an evaluation.
    """

    def __init__(self, max_side_px: int = 512, size: int = 8) -> None:
        self.max_side_px, self.size = int(max_side_px), int(size)
        self._cache: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()

    def get(self, path: str | Path, dimensions: tuple[int, int]) -> tuple[np.ndarray, float]:
        """``(thumbnail (h, w, 3) uint8, downsample)``; thumbnail pixel = ``downsample`` level-0 px.

        Args:
            path: the slide file.
            dimensions: level-0 ``(width, height)``, used for the blank canvas fallback.
        """
        key = str(path)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            with Slide(path) as slide:
                thumb = slide.thumbnail(self.max_side_px)
        except Exception as exc:  # any unreadable slide falls back to a canvas
            warnings.warn(
                f"cannot read slide {path} for rendering ({exc}); drawing on a blank canvas",
                stacklevel=3,
            )
            w, h = (max(1, int(x)) for x in dimensions)
            ds = max(1.0, max(w, h) / self.max_side_px)
            canvas = np.full((max(1, int(h / ds)), max(1, int(w / ds)), 3), 255, np.uint8)
            thumb = (canvas, ds)
        self._cache[key] = thumb
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return thumb


def draw_patches(
    thumb: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    cell_px: float,
    zoomed: np.ndarray,
    updated: np.ndarray,
    alpha: float = 0.5,
    grid: bool = True,
) -> np.ndarray:
    """Draw the patch grid and an episode's patches on a thumbnail.

    Args:
        thumb: ``(h, w, 3)`` uint8 slide thumbnail (not modified).
        downsample: level-0 pixels per thumbnail pixel.
        coords: ``(N, 2)`` level-0 ``(x, y)`` top-left corners of the patches.
        cell_px: side of a patch in level-0 pixels (``patch_px * lo_downsample``).
        zoomed: indices of zoomed patches — tinted and outlined in :data:`ZOOMED_RGB`.
        updated: indices of TSU-updated patches — :data:`UPDATED_RGB` (zoomed wins).
        alpha: opacity of the tint inside a patch (its 1-px outline is opaque).
        grid: outline every patch in :data:`GRID_RGB`.

    Returns:
        ``(h, w, 3)`` uint8 image.
    """
    img = thumb.astype(np.float32, copy=True)
    h, w = img.shape[:2]
    boxes = np.empty((len(coords), 4), np.int64)  # x0, y0, x1, y1 (exclusive), thumbnail px
    if len(coords):
        lo = np.floor(np.asarray(coords, np.float64) / downsample).astype(np.int64)
        hi = np.floor((np.asarray(coords, np.float64) + cell_px) / downsample).astype(np.int64)
        hi = np.maximum(hi, lo + 1)
        boxes[:, 0], boxes[:, 1] = np.clip(lo[:, 0], 0, w - 1), np.clip(lo[:, 1], 0, h - 1)
        boxes[:, 2], boxes[:, 3] = np.clip(hi[:, 0], 1, w), np.clip(hi[:, 1], 1, h)

    def outline(i: int, rgb: tuple[int, int, int]) -> None:
        x0, y0, x1, y1 = boxes[i]
        img[y0:y1, [x0, x1 - 1]] = rgb
        img[[y0, y1 - 1], x0:x1] = rgb

    def tint(i: int, rgb: tuple[int, int, int]) -> None:
        x0, y0, x1, y1 = boxes[i]
        img[y0:y1, x0:x1] = (1 - alpha) * img[y0:y1, x0:x1] + alpha * np.asarray(rgb, np.float32)
        outline(i, rgb)

    if grid:
        for i in range(len(coords)):
            outline(i, GRID_RGB)
    zoomed_set = {int(i) for i in zoomed}
    for i in updated:
        if int(i) not in zoomed_set:
            tint(int(i), UPDATED_RGB)
    for i in zoomed:
        tint(int(i), ZOOMED_RGB)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
