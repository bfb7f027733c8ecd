"""Tumour annotations for analysis: which patches overlap tumour, tumour-hit and found rates.

Masks are images (any downsample of level 0; nonzero = tumour) named in the manifest's
optional ``mask`` column. They are used to *measure* where an agent looks — never to train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .grid import box_fraction

__all__ = ["patch_tumour_fraction", "hit_rate", "found_rate"]


def patch_tumour_fraction(
    mask_path: str | Path, slide_dimensions: tuple[int, int], coords: np.ndarray, cell_px: float
) -> np.ndarray:
    """Fraction of each low-res patch's area that the mask marks as tumour.

    Args:
        mask_path: mask image; its scale is inferred from ``slide_dimensions``.
        slide_dimensions: level-0 ``(width, height)`` of the slide.
        coords: ``(N, 2)`` level-0 ``(x, y)`` of the patches' top-left corners.
        cell_px: side of a low-res patch in level-0 pixels.

    Returns:
        ``(N,)`` float32 in [0, 1].
    """
    mask = np.asarray(Image.open(mask_path).convert("L")) > 0
    downsample = slide_dimensions[0] / mask.shape[1]
    x, y = coords[:, 0], coords[:, 1]
    return box_fraction(mask, x, y, x + cell_px, y + cell_px, downsample).astype(np.float32)


def hit_rate(zoomed: list[np.ndarray], tumour: list[np.ndarray]) -> tuple[float, float]:
    """Share of zooms that landed on tumour, and the share uniform random zooms would get.

    Args:
        zoomed: per slide, the indices of the zoomed patches.
        tumour: per slide, ``(N,)`` bool — the patch overlaps tumour.

    Returns:
        ``(hit_rate, chance)`` over all zooms of the given slides (use positive slides).
    """
    n_zooms = sum(len(z) for z in zoomed)
    if n_zooms == 0:
        return float("nan"), float("nan")
    hits = sum(int(t[np.asarray(z, dtype=int)].sum()) for z, t in zip(zoomed, tumour, strict=True))
    chance = sum(len(z) * float(t.mean()) for z, t in zip(zoomed, tumour, strict=True))
    return hits / n_zooms, chance / n_zooms


def found_rate(zoomed: list[np.ndarray], tumour: list[np.ndarray]) -> tuple[float, float]:
    """Share of slides on which at least one zoom landed on tumour, and the share that
    uniform random zooms (as many, without replacement) would reach.

    A sharp classifier scores a tumour slide by whether any zoom read its tumour, so a slide
    none of whose zooms did is a detection the policy missed whatever the rest of the episode.
    Chance per slide is ``1 − C(N − T, k) / C(N, k)`` for ``T`` tumour patches of ``N`` and
    ``k`` zooms.

    Args:
        zoomed: per slide, the indices of the zoomed patches.
        tumour: per slide, ``(N,)`` bool — the patch overlaps tumour (use tumour slides).

    Returns:
        ``(found, chance)``, both ``nan`` without slides.
    """
    if not zoomed:
        return float("nan"), float("nan")
    found = chance = 0.0
    for z, t in zip(zoomed, tumour, strict=True):
        idx = np.asarray(z, dtype=int)
        found += float(bool(t[idx].any()))
        n, n_tumour, k = len(t), int(t.sum()), len(idx)
        # P(no tumour in k draws without replacement) = prod_{i<k} (n - T - i) / (n - i)
        i = np.arange(k)
        miss = float(np.prod((n - n_tumour - i) / (n - i))) if k <= n - n_tumour else 0.0
        chance += 1.0 - miss
    return found / len(zoomed), chance / len(zoomed)
