"""Tumour annotations for analysis: which patches overlap tumour; tumour-hit, found and
area-read rates.

Masks are images (any downsample of level 0; nonzero = tumour) named in the manifest's
optional ``mask`` column. They are used to *measure* where an agent looks — never to train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .grid import box_fraction

__all__ = ["area_read", "found_rate", "hit_rate", "patch_tumour_fraction"]


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


def area_read(zoomed: list[np.ndarray], fraction: list[np.ndarray]) -> tuple[float, float]:
    """Mean share of each slide's tumour area that lies in its zoomed patches, and that share
    for uniform random zooms (as many, without replacement).

    Unlike :func:`found_rate`, which counts a slide as found when any zoom overlaps its
    tumour at all, this weighs each zoom by how much tumour it read: a zoom on the rim of a
    focus (a patch 5 % tumour) adds 5 % of a patch, one on its core a whole patch. For
    uniform random zooms the expected share is ``k / N`` on every slide, whatever the
    tumour's shape.

    Args:
        zoomed: per slide, the indices of the zoomed patches.
        fraction: per slide, ``(N,)`` float in [0, 1] — the share of each patch's area that is
            tumour (:func:`patch_tumour_fraction`); slides without tumour area are skipped.

    Returns:
        ``(read, chance)``: means over the slides with tumour, both ``nan`` without any.
    """
    read: list[float] = []
    chance: list[float] = []
    for z, f in zip(zoomed, fraction, strict=True):
        f = np.asarray(f, dtype=np.float64)
        total = float(f.sum())
        if total <= 0.0:
            continue
        idx = np.unique(np.asarray(z, dtype=int))
        read.append(float(f[idx].sum()) / total)
        chance.append(len(idx) / len(f))
    if not read:
        return float("nan"), float("nan")
    return float(np.mean(read)), float(np.mean(chance))
