"""A synthetic cohort of H&E-like whole-slide images on which zooming in matters.

Every slide shows 1-3 tissue islands on glass: pink fibrous stroma with scattered small
nuclei, and a few lymphoid aggregates ("mimics") of densely packed, small, very dark
nuclei. Tumour-positive slides also hold a few tumour foci of crowded, large, pleomorphic,
vesicular nuclei with dark rims and nucleoli. The nuclear sizes and colours are tuned so that,
at downsample 4, a tumour focus has about the mean colour of a mimic: a low-resolution view
shows two kinds of dark purple patches that look alike, and only the full-resolution view tells
which is tumour. Per-slide stain jitter keeps absolute colour from being a label cue.

Colours follow Beer-Lambert: each pixel has a haematoxylin and an eosin concentration, and
``RGB = glass * exp(-(c_H * od_H + c_E * od_E))``. Nuclei are stamped from small banks of
pre-rendered sprites, so a 1792 x 1792 slide renders in well under a second.

Level-0 sizes are drawn in ``size_px`` and rounded to a multiple of the coarsest downsample,
so the written pyramid levels have exactly the configured downsamples.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from ..atomic import replace_atomically, write_json
from ..memory import keep_freed_memory
from ..processes import worker_pool
from .manifest import stratified_split

__all__ = [
    "MASK_DOWNSAMPLE",
    "SynthConfig",
    "SlideLayers",
    "PlannedSlide",
    "plan_cohort",
    "block_mean",
    "render_layers",
    "render_mosaic",
    "render_slide",
    "write_pyramid_tiff",
    "synthesize_cohort",
]

MASK_DOWNSAMPLE = 4
"""Downsample (relative to level 0) of the tumour masks written next to the slides."""

_COARSE = 8  # level-0 pixels per cell of the coarse grid used for tissue layout
_ISLAND_CUT = 0.4  # level at which the tissue-island bumps are cut
_BLOB_EXTENT = 1.4  # largest outline radius of a focus or aggregate, in units of its radius
_REGION_GAP_PX = 16  # least clearance between the outlines of two foci or aggregates
_SPRITES_PER_KIND = 32
_SUPERSAMPLE = 4  # sprite anti-aliasing: sub-pixels per pixel side
_JPEG_QUALITY = 90
_COHORT_STREAM = 1  # spawn key of the cohort-level random stream (slides use none)
_LABEL_NAMES = ("normal", "tumor")

# Reference stain colours at unit concentration on white (R, G, B).
_H_RGB = (80.0, 55.0, 150.0)
_E_RGB = (235.0, 150.0, 190.0)


@dataclass
class SynthConfig:
    """How the synthetic cohort is drawn. Pixel sizes are at level 0; ranges are inclusive.

    Attributes:
        n_slides: number of slides.
        positive_fraction: share of tumour-positive slides (``round(n_slides * share)``).
        size_px: range of the level-0 width and of the height (drawn independently).
        mpp: microns per level-0 pixel, written into the TIFF resolution tags.
        downsamples: pyramid levels to write: 1, r, r^2, ... with r = 2 or 4.
        tile_px: TIFF tile side (a multiple of 16).
        n_foci: range of tumour foci per positive slide.
        focus_radius_px: range of a focus radius.
        n_mimics: range of lymphoid aggregates per slide, in both classes.
        mimic_radius_px: range of an aggregate radius.
        split: train/val/test shares, stratified by label.
        mosaic: ``(rows, cols)`` tissue sections per slide. ``(1, 1)``: one section of
            ``size_px``. More: a square section side is drawn once from ``size_px`` and the
            slide is a grid of such sections (same tissue model, same resolution), which is how
            slides as large as CAMELYON16's are made in minutes (``--preset large``).
        distinct_sections: with a mosaic, how many sections are rendered; the mosaic reuses
            them, each placement flipped or rotated (one of 8 symmetries). ``0``: every section
            is rendered. On a positive slide only the first section carries tumour, and it is
            placed once, so the tumour stays a small share of the tissue.
    """

    n_slides: int = 12
    positive_fraction: float = 0.5
    size_px: tuple[int, int] = (640, 768)
    mpp: float = 0.5
    downsamples: tuple[int, ...] = (1, 2, 4, 8)
    tile_px: int = 128
    n_foci: tuple[int, int] = (1, 2)
    focus_radius_px: tuple[int, int] = (40, 60)
    n_mimics: tuple[int, int] = (1, 2)
    mimic_radius_px: tuple[int, int] = (30, 50)
    split: tuple[float, float, float] = (0.5, 0.25, 0.25)
    mosaic: tuple[int, int] = (1, 1)
    distinct_sections: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        self._validate()
        self.downsamples = tuple(int(d) for d in self.downsamples)

    def _validate(self) -> None:
        if self.n_slides < 1:
            raise ValueError(f"n_slides must be >= 1, got {self.n_slides}")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {self.positive_fraction}")
        for name in ("size_px", "n_foci", "focus_radius_px", "n_mimics", "mimic_radius_px"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(
                    f"{name} must be a range (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}"
                )
        if self.size_px[0] < 128:
            raise ValueError(f"size_px must be at least 128 pixels, got {self.size_px}")
        if self.n_foci[0] < 1:
            raise ValueError(
                f"n_foci must start at 1 or more (a positive slide has a focus), got {self.n_foci}"
            )
        ds = self.downsamples
        if not _readable_pyramid(ds) or (len(ds) > 1 and ds[1] not in (2, 4)):
            raise ValueError(
                f"downsamples must be 1, r, r^2, ... with a level ratio r of 2 or 4 (the pyramids "
                f"tifffile and tiffslide recognise), got {ds}"
            )
        if self.tile_px < 16 or self.tile_px % 16:
            raise ValueError(f"tile_px must be a positive multiple of 16, got {self.tile_px}")
        if len(self.mosaic) != 2 or min(self.mosaic) < 1:
            raise ValueError(f"mosaic must be (rows, cols) of at least 1, got {self.mosaic}")
        if self.distinct_sections < 0:
            raise ValueError(f"distinct_sections must be >= 0, got {self.distinct_sections}")
        if self.mpp <= 0:
            raise ValueError(f"mpp must be positive, got {self.mpp}")
        if len(self.split) != 3 or min(self.split) < 0 or not math.isclose(sum(self.split), 1.0):
            raise ValueError(
                f"split must be three non-negative shares summing to 1, got {self.split}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthConfig:
        """Build from a config section; unknown keys raise ``ValueError`` naming them."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(
                f"unknown synth config key(s) {unknown}; valid keys: {', '.join(names)}"
            )
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)


@dataclass
class SlideLayers:
    """A rendered slide and its ground truth, all at level 0.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        tumour: ``(H, W)`` bool, the tumour foci.
        mimic: ``(H, W)`` bool, the lymphoid aggregates.
        tissue: ``(H, W)`` bool, tissue (foci and aggregates included).
        n_foci: number of tumour foci.
        n_mimics: number of lymphoid aggregates.
    """

    image: np.ndarray
    tumour: np.ndarray
    mimic: np.ndarray
    tissue: np.ndarray
    n_foci: int
    n_mimics: int


# --- nuclei -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NucleusStyle:
    """Shape and haematoxylin concentration of one kind of nucleus (sizes in level-0 pixels)."""

    radius: tuple[float, float]  # mean radius range
    axis_ratio: tuple[float, float]  # minor / major axis range
    wobble: float  # relative amplitude of outline irregularity
    core: tuple[float, float]  # concentration range of the interior
    rim: float = 0.0  # extra concentration on the nuclear membrane
    rim_px: float = 0.0  # membrane thickness
    nucleolus_p: float = 0.0  # probability of a nucleolus
    nucleolus: float = 0.0  # its concentration
    speckle: float = 0.0  # relative amplitude of chromatin texture


_NORMAL = _NucleusStyle(
    radius=(2.5, 3.5), axis_ratio=(0.45, 1.0), wobble=0.04, core=(0.85, 1.05), speckle=0.06
)
_LYMPHOCYTE = _NucleusStyle(
    radius=(2.0, 2.5), axis_ratio=(0.85, 1.0), wobble=0.03, core=(1.3, 1.5), speckle=0.04
)
_TUMOUR = _NucleusStyle(
    radius=(4.5, 7.0),
    axis_ratio=(0.55, 0.95),
    wobble=0.12,
    core=(0.42, 0.58),
    rim=0.85,
    rim_px=1.3,
    nucleolus_p=0.8,
    nucleolus=1.5,
    speckle=0.25,
)


@dataclass(frozen=True)
class _Texture:
    """Nuclear packing and the stain between nuclei inside one kind of region."""

    style: _NucleusStyle
    spacing: float  # hexagonal grid pitch of nucleus centres, level-0 pixels
    keep: float  # share of grid sites holding a nucleus
    jitter: float  # centre jitter, as a share of the pitch
    background_h: float  # haematoxylin between nuclei
    background_e: float  # eosin between nuclei


_STROMA = _Texture(_NORMAL, spacing=15.0, keep=0.5, jitter=0.5, background_h=0.06, background_e=0.8)
_AGGREGATE = _Texture(
    _LYMPHOCYTE, spacing=5.4, keep=0.96, jitter=0.22, background_h=0.12, background_e=0.75
)
_CARCINOMA = _Texture(
    _TUMOUR, spacing=11.5, keep=0.95, jitter=0.2, background_h=0.6, background_e=1.32
)


def _sprite_bank(
    style: _NucleusStyle, rng: np.random.Generator, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-render ``n`` nuclei of one style, anti-aliased by supersampling.

    Returns:
        ``(conc, alpha)``, each ``(n, S, S)`` float32 with odd ``S``: the premultiplied
        haematoxylin concentration and the nuclear coverage (0..1) of each pixel.
    """
    half = math.ceil(style.radius[1] * (1 + 3 * style.wobble) / style.axis_ratio[0] ** 0.5) + 1
    size, ss = 2 * half + 1, _SUPERSAMPLE
    coords = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss - size / 2
    y, x = coords[:, None], coords[None, :]
    k = np.arange(2, 6)[:, None, None]
    theta = np.arctan2(y, x)
    cos_k, sin_k = np.cos(k * theta), np.sin(k * theta)  # (4, P, P)

    def per_sprite(values: np.ndarray) -> np.ndarray:
        return values.astype(np.float32)[:, None, None]

    radius = rng.uniform(*style.radius, n)
    ratio = rng.uniform(*style.axis_ratio, n)
    phi = rng.uniform(0, np.pi, n)
    # Outline wobble: sum_k amp_k cos(k (theta - phi) + psi_k), expanded in cos/sin(k theta).
    amp = style.wobble * rng.normal(size=(n, 4)) / np.sqrt(k[:, 0, 0])
    shift = rng.uniform(0, 2 * np.pi, (n, 4)) - k[:, 0, 0] * phi[:, None]
    outline = (
        1
        + np.tensordot(amp * np.cos(shift), cos_k, 1)
        - np.tensordot(amp * np.sin(shift), sin_k, 1)
    )
    u = x * per_sprite(np.cos(phi)) + y * per_sprite(np.sin(phi))
    v = y * per_sprite(np.cos(phi)) - x * per_sprite(np.sin(phi))
    a, b = per_sprite(radius / ratio**0.5), per_sprite(radius * ratio**0.5)  # area of the mean disc
    rho = np.hypot(u / a, v / b) / np.maximum(outline, 0.5)
    conc = np.broadcast_to(per_sprite(rng.uniform(*style.core, n)), rho.shape)
    if style.rim:
        conc = conc + style.rim * (rho > 1 - style.rim_px / per_sprite(radius))
    if style.nucleolus_p:
        has = per_sprite(rng.random(n) < style.nucleolus_p) > 0
        off = rng.uniform(-0.3, 0.3, (n, 2)) * radius[:, None]
        dot = np.hypot(u - per_sprite(off[:, 0]), v - per_sprite(off[:, 1])) < per_sprite(
            rng.uniform(0.8, 1.2, n)
        )
        conc = np.where(has & dot, style.nucleolus, conc)
    inside = (rho < 1).astype(np.float32)
    conc_px = (conc * inside).reshape(n, size, ss, size, ss).mean(axis=(2, 4))
    alpha_px = inside.reshape(n, size, ss, size, ss).mean(axis=(2, 4))
    if style.speckle:  # chromatin grain at pixel scale
        grain = ndi.gaussian_filter(
            rng.standard_normal((n, size, size)).astype(np.float32), (0, 0.7, 0.7)
        )
        conc_px *= np.clip(1 + style.speckle * grain / grain.std(), 0, None)
    return conc_px.astype(np.float32), alpha_px


def _hex_points(
    rng: np.random.Generator, region: np.ndarray, box: tuple[slice, slice], texture: _Texture
) -> np.ndarray:
    """Nucleus centres on a randomly rotated, jittered, thinned hexagonal lattice.

    Args:
        region: ``(H, W)`` bool, where nuclei may sit.
        box: level-0 bounding box of the part of ``region`` to fill.

    Returns:
        ``(N, 2)`` int64 level-0 ``(y, x)`` centres inside ``region[box]``.
    """
    ys, xs = box
    pitch = texture.spacing
    half = math.hypot(ys.stop - ys.start, xs.stop - xs.start) / 2 + pitch
    rows = np.arange(-half, half, pitch * math.sqrt(3) / 2)
    cols = np.arange(-half, half, pitch)
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    xx = xx + (np.arange(len(rows))[:, None] % 2) * pitch / 2
    angle = rng.uniform(0, np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = np.stack([yy.ravel(), xx.ravel()], axis=1) @ rot.T
    pts += ((ys.start + ys.stop) / 2, (xs.start + xs.stop) / 2)
    pts += rng.uniform(-1, 1, pts.shape) * texture.jitter * pitch
    pts = np.rint(pts[rng.random(len(pts)) < texture.keep]).astype(np.int64)
    inside = (
        (pts[:, 0] >= ys.start)
        & (pts[:, 0] < ys.stop)
        & (pts[:, 1] >= xs.start)
        & (pts[:, 1] < xs.stop)
    )
    pts = pts[inside]
    return pts[region[pts[:, 0], pts[:, 1]]]


def _stamp(
    conc: np.ndarray,
    alpha: np.ndarray,
    pad: int,
    bank: tuple[np.ndarray, np.ndarray],
    centres: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Max-composite random sprites of ``bank`` at ``centres`` into padded canvases, in place.

    Args:
        conc, alpha: ``(H + 2 pad, W + 2 pad)`` float32 canvases.
        pad: canvas margin, at least half a sprite.
        bank: ``(conc, alpha)`` sprites from :func:`_sprite_bank`.
        centres: ``(N, 2)`` level-0 ``(y, x)``.
    """
    bank_c, bank_a = bank
    n, size, _ = bank_c.shape
    width = conc.shape[1]
    ids = rng.integers(n, size=len(centres))
    gain = rng.uniform(0.9, 1.1, len(centres)).astype(np.float32)
    dy, dx = np.mgrid[0:size, 0:size] - size // 2
    offsets = (dy * width + dx).ravel()
    base = (centres[:, 0] + pad) * width + centres[:, 1] + pad
    index = base[:, None] + offsets[None, :]
    a = bank_a.reshape(n, -1)[ids]
    c = bank_c.reshape(n, -1)[ids] * gain[:, None]
    nz = a > 0
    np.maximum.at(conc.reshape(-1), index[nz], c[nz])
    np.maximum.at(alpha.reshape(-1), index[nz], a[nz])


# --- layout ---------------------------------------------------------------------------------


def _upsample(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a ``(h, w)`` coarse-grid field to ``shape`` (cell centres aligned)."""

    def taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.intp)
        return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)

    coarse = coarse.astype(np.float32)
    lo, hi, t = taps(shape[0], coarse.shape[0])
    rows = coarse[lo] * (1 - t)[:, None] + coarse[hi] * t[:, None]
    lo, hi, t = taps(shape[1], coarse.shape[1])
    return rows[:, lo] * (1 - t) + rows[:, hi] * t


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, rescaled to zero mean and unit std."""
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-6)


def _tissue_layout(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """1-3 irregular tissue islands on the coarse grid: ``(ceil(H/8), ceil(W/8))`` bool."""
    h, w = -(-shape[0] // _COARSE), -(-shape[1] // _COARSE)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    n_islands = int(rng.integers(1, 4))
    coverage = rng.uniform(0.55, 0.75)  # before trimming at the border; ~0.4-0.55 remains
    # Islands are Gaussian bumps cut at _ISLAND_CUT, side by side and elongated along a
    # common direction; a bump of sigmas (su, sv) covers 2 pi ln(1 / cut) su sv cells.
    cut_area = 2 * np.pi * math.log(1 / _ISLAND_CUT)
    phi = rng.uniform(0, np.pi)
    bumps = np.zeros((h, w), np.float32)
    for k in range(n_islands):
        aspect = rng.uniform(1.0, 1.4) if n_islands == 1 else rng.uniform(1.6, 2.4)
        sigma_v = math.sqrt(coverage * h * w / n_islands / (cut_area * aspect))
        sigma_u = aspect * sigma_v
        along = rng.uniform(-0.3, 0.3) * sigma_v
        across = (k - (n_islands - 1) / 2) * 2.9 * sigma_v
        cy = h / 2 + along * np.sin(phi) + across * np.cos(phi)
        cx = w / 2 + along * np.cos(phi) - across * np.sin(phi)
        turn = phi + rng.uniform(-0.15, 0.15)
        u = (yy - cy) * np.sin(turn) + (xx - cx) * np.cos(turn)
        v = (yy - cy) * np.cos(turn) - (xx - cx) * np.sin(turn)
        bumps = np.maximum(bumps, np.exp(-0.5 * ((u / sigma_u) ** 2 + (v / sigma_v) ** 2)))
    side = min(h, w)
    bumps += 0.12 * _smooth_noise(rng, (h, w), side / 12)
    bumps += 0.04 * _smooth_noise(rng, (h, w), side / 40)
    ellipse = np.hypot((yy + 0.5) / h * 2 - 1, (xx + 0.5) / w * 2 - 1)
    bumps -= 10 * np.clip(ellipse - 0.7, 0, None) ** 2  # islands round off towards the border
    margin = max(2, round(0.05 * side))
    inner = np.zeros((h, w), bool)
    inner[margin:-margin, margin:-margin] = True
    tissue = ndi.binary_opening(bumps > _ISLAND_CUT, iterations=2) & inner
    tissue = ndi.binary_fill_holes(tissue)
    labels, n = ndi.label(tissue)
    if n > 1:  # keep at most 3 islands, dropping specks
        sizes = ndi.sum_labels(tissue, labels, index=np.arange(1, n + 1))
        order = np.argsort(sizes)[::-1][:3]
        keep = [i + 1 for i in order if sizes[i] >= 0.03 * sizes.sum()]
        tissue = np.isin(labels, keep)
    return tissue


def _blob(
    rng: np.random.Generator, centre: tuple[float, float], radius: float, shape: tuple[int, int]
) -> tuple[tuple[slice, slice], np.ndarray]:
    """A roundish region with an irregular outline, anti-aliased over ~2 pixels.

    Returns:
        ``(box, soft)``: the level-0 bounding box (clipped to ``shape``) and the region's
        coverage (0..1, float32) inside it.
    """
    cy, cx = centre
    ext = math.ceil(radius * _BLOB_EXTENT) + 2
    y0, y1 = max(0, int(cy) - ext), min(shape[0], int(cy) + ext + 1)
    x0, x1 = max(0, int(cx) - ext), min(shape[1], int(cx) + ext + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    outline = 1 + sum(
        rng.normal(0, 0.16) / k**0.8 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        for k in range(2, 9)
    )
    bound = radius * np.clip(outline, 0.6, _BLOB_EXTENT)
    soft = np.clip((bound - np.hypot(yy - cy, xx - cx)) / 2 + 0.5, 0, 1).astype(np.float32)
    return (slice(y0, y1), slice(x0, x1)), soft


def _place_regions(
    rng: np.random.Generator,
    tissue: np.ndarray,
    radii: Sequence[float] | np.ndarray,
    placed: list[tuple[float, float, float]],
) -> list[tuple[float, float, float]]:
    """Centres for regions of ``radii`` inside coarse-grid ``tissue``, apart from ``placed``.

    A centre is drawn among the coarse cells where the region fits inside tissue and clears
    every placed region by a gap; where none exists, the best cell is taken.

    Returns:
        ``placed`` extended by one ``(y, x, radius)`` per radius, level-0 pixels.
    """
    inside = ndi.distance_transform_edt(np.pad(tissue, 1))[1:-1, 1:-1] * _COARSE
    cells = np.argwhere(tissue)
    room = inside[cells[:, 0], cells[:, 1]]
    pos = (cells + 0.5) * _COARSE
    placed = list(placed)
    for r in radii:
        reach = _BLOB_EXTENT * r
        score = room - reach
        for py, px, pr in placed:
            gap = (
                np.hypot(pos[:, 0] - py, pos[:, 1] - px) - _BLOB_EXTENT * (pr + r) - _REGION_GAP_PX
            )
            score = np.minimum(score, gap)
        ok = np.flatnonzero(score >= 0)
        i = int(rng.choice(ok)) if len(ok) else int(np.argmax(score))
        placed.append((float(pos[i, 0]), float(pos[i, 1]), float(r)))
    return placed


# --- rendering ------------------------------------------------------------------------------


def _stain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slide stain: optical densities of H and E at unit concentration, and glass RGB."""
    od_h = -np.log(np.clip(np.array(_H_RGB) * np.exp(rng.normal(0, 0.05, 3)), 1, 254) / 255)
    od_e = -np.log(np.clip(np.array(_E_RGB) * np.exp(rng.normal(0, 0.04, 3)), 1, 254) / 255)
    od_h *= rng.uniform(0.9, 1.1)
    od_e *= rng.uniform(0.85, 1.15)
    glass = rng.uniform(236, 244) + rng.uniform(-2, 2, 3)
    return od_h.astype(np.float32), od_e.astype(np.float32), glass.astype(np.float32)


def _fibres(
    rng: np.random.Generator, shape: tuple[int, int], drift: np.ndarray, coarse: tuple[int, int]
) -> np.ndarray:
    """Zero-mean, unit-std stroma texture: wavy collagen streaks.

    Horizontal and vertical streaks (noise box-smoothed along one axis) are bent by a smooth
    displacement field and blended by ``drift``, so their direction wanders across the slide.

    Args:
        shape: level-0 ``(H, W)``.
        drift: ``(H, W)`` smooth zero-mean field that picks the streak direction.
        coarse: shape of the coarse grid the displacement field is drawn on.
    """
    h, w = shape
    noise = rng.random(shape, dtype=np.float32)
    along_x = ndi.uniform_filter1d(noise, 13, axis=1)
    along_y = ndi.uniform_filter1d(noise, 13, axis=0)
    bend = _upsample(_smooth_noise(rng, coarse, 2.0), shape) * 4
    rows = np.clip(np.arange(h)[:, None] + bend, 0, h - 1).astype(np.intp)
    cols = np.clip(np.arange(w)[None, :] + bend, 0, w - 1).astype(np.intp)
    mix = np.clip(drift * 0.6 + 0.5, 0, 1)
    f = mix * np.take_along_axis(along_x, rows, axis=0)
    f += (1 - mix) * np.take_along_axis(along_y, cols, axis=1)
    f -= f.mean()
    return f / (f.std() + 1e-6)


def _binomial_blur(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur of a 2-D array (a Gaussian of sigma ~0.7 px): scanner optics."""
    k = np.array([0.25, 0.5, 0.25], np.float32)
    return ndi.correlate1d(ndi.correlate1d(a, k, axis=0, mode="nearest"), k, axis=1, mode="nearest")


def _draw_size(rng: np.random.Generator, lo: int, hi: int, multiple: int) -> int:
    """A side length uniform over the multiples of ``multiple`` in ``[lo, hi]`` (else in ``[lo, hi]``)."""
    first, last = -(-lo // multiple), hi // multiple
    if first <= last:
        return int(rng.integers(first, last + 1)) * multiple
    return int(rng.integers(lo, hi + 1))


def _draw_regions(
    cfg: SynthConfig, label: int, rng: np.random.Generator, coarse: np.ndarray
) -> tuple[list[tuple[float, float, float]], int]:
    """Aggregates (both classes), then foci (positives): ``([(y, x, radius), ...], n_mimics)``."""
    n_mimics = int(rng.integers(cfg.n_mimics[0], cfg.n_mimics[1] + 1))
    regions = _place_regions(rng, coarse, rng.uniform(*cfg.mimic_radius_px, n_mimics), [])
    n_foci = int(rng.integers(cfg.n_foci[0], cfg.n_foci[1] + 1)) if label else 0
    regions = _place_regions(rng, coarse, rng.uniform(*cfg.focus_radius_px, n_foci), regions)
    return regions, n_mimics


def _paint_regions(
    rng: np.random.Generator,
    regions: list[tuple[float, float, float]],
    n_mimics: int,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, list[tuple[slice, slice]]]:
    """Coverage maps of the aggregates and of the foci (``(H, W)`` float32) and region boxes."""
    soft_m = np.zeros(shape, np.float32)
    soft_t = np.zeros(shape, np.float32)
    boxes = []
    for k, (cy, cx, r) in enumerate(regions):
        box, soft = _blob(rng, (cy, cx), r, shape)
        target = soft_m if k < n_mimics else soft_t
        target[box] = np.maximum(target[box], soft)
        boxes.append(box)
    return np.minimum(soft_m, 1 - soft_t), soft_t, boxes  # tumour wins where crowded


def _nuclei(
    rng: np.random.Generator,
    shape: tuple[int, int],
    stroma: np.ndarray,
    regions: list[tuple[np.ndarray, tuple[slice, slice], _Texture]],
) -> tuple[np.ndarray, np.ndarray]:
    """Stamp stromal nuclei over ``stroma`` and each region's nuclei inside its mask and box.

    Returns:
        ``(conc, alpha)``: ``(H, W)`` float32 nuclear haematoxylin and nuclear coverage.
    """
    banks = {
        t: _sprite_bank(t.style, rng, _SPRITES_PER_KIND) for t in (_STROMA, _AGGREGATE, _CARCINOMA)
    }
    pad = max(bank[0].shape[1] for bank in banks.values())
    conc = np.zeros((shape[0] + 2 * pad, shape[1] + 2 * pad), np.float32)
    alpha = np.zeros_like(conc)
    everywhere = (slice(0, shape[0]), slice(0, shape[1]))
    for mask, box, texture in [(stroma, everywhere, _STROMA), *regions]:
        _stamp(conc, alpha, pad, banks[texture], _hex_points(rng, mask, box, texture), rng)
    return conc[pad:-pad, pad:-pad], alpha[pad:-pad, pad:-pad]


def _to_rgb(
    c_h: np.ndarray,
    c_e: np.ndarray,
    stain: tuple[np.ndarray, np.ndarray, np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """Beer-Lambert colour of H and E concentration maps, blurred and noisy: ``(H, W, 3)`` uint8."""
    od_h, od_e, glass = stain
    od = _binomial_blur(c_h)[..., None] * od_h
    od += _binomial_blur(c_e)[..., None] * od_e
    od -= np.log(glass)
    image = np.exp(-od, out=od)
    image += 5 * (rng.random(image.shape, dtype=np.float32) - 0.5)  # sensor noise, std ~1.4
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def render_layers(cfg: SynthConfig, label: int, rng: np.random.Generator) -> SlideLayers:
    """Render one slide with its tumour, aggregate and tissue masks.

    Args:
        cfg: the cohort configuration (sizes, foci and aggregate counts and radii).
        label: 1 for a tumour-positive slide (draws ``cfg.n_foci`` foci), 0 for a negative.
        rng: the slide's random stream; the same stream gives the same slide.

    Returns:
        The level-0 layers; see :class:`SlideLayers`.
    """
    step = cfg.downsamples[-1]
    shape = (_draw_size(rng, *cfg.size_px, step), _draw_size(rng, *cfg.size_px, step))
    stain = _stain(rng)
    coarse = _tissue_layout(rng, shape)
    regions, n_mimics = _draw_regions(cfg, label, rng, coarse)
    soft_m, soft_t, boxes = _paint_regions(rng, regions, n_mimics, shape)
    mimic, tumour = soft_m > 0.5, soft_t > 0.5

    # Tissue: the upsampled coarse layout with fibre-ragged edges, always under the regions.
    drift = _upsample(_smooth_noise(rng, coarse.shape, 5.0), shape)
    fib = _fibres(rng, shape, drift, coarse.shape)
    level = _upsample(ndi.gaussian_filter(coarse.astype(np.float32), 1.0), shape) + 0.03 * fib
    tissue_a = np.maximum(np.clip((level - 0.5) * _COARSE + 0.5, 0, 1), soft_m + soft_t)
    tissue = tissue_a > 0.5

    # Stain between nuclei: fibrous stroma, blended into the region backgrounds.
    shade = 1 + 0.12 * drift
    rest = 1 - soft_m - soft_t
    bg_h = _STROMA.background_h * shade * rest
    bg_h += _AGGREGATE.background_h * soft_m + _CARCINOMA.background_h * soft_t
    bg_e = _STROMA.background_e * shade * np.clip(1 + 0.35 * fib, 0.2, None) * rest
    bg_e += _AGGREGATE.background_e * soft_m + _CARCINOMA.background_e * soft_t

    region_nuclei = [
        (mimic, box, _AGGREGATE) if k < n_mimics else (tumour, box, _CARCINOMA)
        for k, box in enumerate(boxes)
    ]
    conc, alpha = _nuclei(rng, shape, tissue & (rest > 0.5), region_nuclei)
    c_h = tissue_a * (bg_h * (1 - alpha) + conc)
    c_e = tissue_a * bg_e * (1 - 0.85 * alpha)  # nuclei hold little eosin
    image = _to_rgb(c_h, c_e, stain, rng)
    return SlideLayers(
        image, tumour & tissue, mimic & tissue, tissue, len(regions) - n_mimics, n_mimics
    )


def render_mosaic(cfg: SynthConfig, label: int, rng: np.random.Generator) -> SlideLayers:
    """Render a slide as a ``cfg.mosaic`` grid of square tissue sections.

    ``cfg.distinct_sections`` sections (all of them when 0) are rendered with
    :func:`render_layers`; the others reuse them under one of the 8 symmetries of the square.
    On a positive slide section 0 alone carries tumour and is placed once, at a random place.

    Returns:
        The level-0 layers of the whole slide; ``n_foci`` and ``n_mimics`` count what was
        placed.
    """
    rows, cols = cfg.mosaic
    n_places = rows * cols
    side = _draw_size(rng, *cfg.size_px, cfg.downsamples[-1])
    section_cfg = dataclasses.replace(cfg, size_px=(side, side), mosaic=(1, 1))
    n_distinct = min(cfg.distinct_sections or n_places, n_places)
    if label and n_places > 1:
        n_distinct = max(n_distinct, 2)  # a negative section to fill around the tumour
    sections = [render_layers(section_cfg, label if i == 0 else 0, rng) for i in range(n_distinct)]
    choice = rng.integers(0, n_distinct, n_places)
    if label and n_distinct > 1:  # the tumour section once, the others negative
        choice = rng.integers(1, n_distinct, n_places)
        choice[rng.integers(n_places)] = 0
    symmetry = rng.integers(0, 8, n_places)
    image = np.empty((rows * side, cols * side, 3), np.uint8)
    masks = {
        name: np.empty((rows * side, cols * side), bool) for name in ("tumour", "mimic", "tissue")
    }
    n_foci = n_mimics = 0
    for place, (k, sym) in enumerate(zip(choice, symmetry, strict=True)):
        r, c = divmod(place, cols)
        window = (slice(r * side, (r + 1) * side), slice(c * side, (c + 1) * side))
        layers = sections[k]
        image[window] = _symmetry(layers.image, sym)
        for name, mask in masks.items():
            mask[window] = _symmetry(getattr(layers, name), sym)
        n_foci += layers.n_foci
        n_mimics += layers.n_mimics
    return SlideLayers(image, masks["tumour"], masks["mimic"], masks["tissue"], n_foci, n_mimics)


def _symmetry(a: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square: ``k % 4`` quarter turns, mirrored when ``k >= 4``."""
    a = np.rot90(a, int(k) % 4, axes=(0, 1))
    return a[:, ::-1] if k >= 4 else a


def render_slide(
    cfg: SynthConfig, label: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Render one slide.

    Returns:
        ``(image, mask)``: level-0 ``(H, W, 3)`` uint8 RGB and ``(H, W)`` bool tumour mask.
    """
    layers = render_layers(cfg, label, rng)
    return layers.image, layers.tumour


# --- writing --------------------------------------------------------------------------------


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Area-average downsampling by an integer factor.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array (bool, integer or float).
        factor: block side in pixels.

    Returns:
        float32 ``(ceil(H/f), ceil(W/f)[, C])``; edge blocks average only the pixels they hold.
    """
    h, w = image.shape[:2]
    hh, ww = -(-h // factor), -(-w // factor)
    rest = image.shape[2:]
    if (hh * factor, ww * factor) != (h, w):
        image = np.pad(image, [(0, hh * factor - h), (0, ww * factor - w)] + [(0, 0)] * len(rest))
    sums = image.reshape(hh, factor, ww * factor, *rest).sum(axis=1, dtype=np.float32)
    sums = sums.reshape(hh, ww, factor, *rest).sum(axis=2, dtype=np.float32)
    rows = np.minimum(factor, h - np.arange(hh) * factor)
    cols = np.minimum(factor, w - np.arange(ww) * factor)
    counts = np.outer(rows, cols).astype(np.float32)
    return sums / counts.reshape(hh, ww, *([1] * len(rest)))


def _readable_pyramid(downsamples: Sequence[float]) -> bool:
    """Whether levels ``1, r, r^2, ...`` with ``r`` in 2, 3, 4: what tifffile groups into a pyramid."""
    ds = [float(d) for d in downsamples]
    if not ds or ds[0] != 1 or any(not d.is_integer() for d in ds):
        return False
    return len(ds) == 1 or (ds[1] in (2, 3, 4) and ds == [ds[1] ** k for k in range(len(ds))])


def write_pyramid_tiff(
    path: Path, image: np.ndarray, downsamples: Sequence[int], mpp: float, tile_px: int
) -> None:
    """Write a tiled, JPEG-compressed pyramidal TIFF that tiffslide reads as one multi-level slide.

    Level 0 is the main image; each reduced level (area-averaged from level 0, sides
    ceil-divided) is a SubIFD with ``subfiletype=1``. The file appears atomically.

    Args:
        path: destination ``.tiff``.
        image: level-0 ``(H, W, 3)`` uint8 RGB.
        downsamples: level downsamples relative to level 0: ``1, r, r^2, ...`` with ``r`` in
            2, 3, 4 (tifffile, and so tiffslide, drops levels of any other spacing).
        mpp: microns per level-0 pixel (resolution tags; tiffslide's ``tiffslide.mpp-x/y``).
        tile_px: tile side, a multiple of 16.

    Raises:
        ValueError: downsamples that would not read back as a pyramid.
    """
    if not _readable_pyramid(downsamples):
        raise ValueError(
            f"downsamples {tuple(downsamples)} would not read back as a pyramid; "
            "use 1, r, r^2, ... with r = 2, 3 or 4"
        )
    path = Path(path)
    res = 1e4 / mpp  # pixels per centimetre
    options: dict[str, Any] = dict(
        tile=(tile_px, tile_px),
        compression="jpeg",
        compressionargs={"level": _JPEG_QUALITY},
        photometric="rgb",
        resolution=(res, res),
        resolutionunit="CENTIMETER",
    )

    def write(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tw:
            tw.write(image, subifds=len(downsamples) - 1, **options)
            for ds in downsamples[1:]:
                level = (block_mean(image, int(ds)) + 0.5).astype(np.uint8)
                tw.write(level, subfiletype=1, **options)

    replace_atomically(path, write)


def _write_mask_png(path: Path, tumour: np.ndarray) -> None:
    """Tumour mask at ``MASK_DOWNSAMPLE``: a block is tumour (255) when at least half of it is."""
    small = block_mean(tumour, MASK_DOWNSAMPLE) >= 0.5
    png = Image.fromarray(np.where(small, 255, 0).astype(np.uint8))
    replace_atomically(path, lambda tmp: png.save(tmp, format="PNG"))


# --- cohort ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedSlide:
    """One slide of a synthetic cohort, before rendering.

    Attributes:
        index: position in the cohort; the slide draws from ``SeedSequence([seed, index])``.
        slide_id: ``syn_000``, ``syn_001``, ...
        label: ``"normal"`` or ``"tumor"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
    """

    index: int
    slide_id: str
    label: str
    split: str


def plan_cohort(cfg: SynthConfig, seed: int = 0) -> list[PlannedSlide]:
    """Ids, labels and stratified splits of the cohort that ``synthesize_cohort`` writes.

    Exactly ``round(n_slides * positive_fraction)`` slides are positive, in an order shuffled
    by the seed; the split is :func:`~sasha_env.slides.manifest.stratified_split`'s, drawn
    from the same random stream.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_COHORT_STREAM,)))
    n = cfg.n_slides
    n_pos = round(n * cfg.positive_fraction)
    labels = rng.permutation(np.r_[np.ones(n_pos, int), np.zeros(n - n_pos, int)])
    splits = stratified_split(labels.tolist(), cfg.split, rng)
    digits = max(3, len(str(n - 1)))
    return [
        PlannedSlide(i, f"syn_{i:0{digits}d}", _LABEL_NAMES[labels[i]], splits[i]) for i in range(n)
    ]


def _field_defaults() -> dict[str, Any]:
    """Every :class:`SynthConfig` field's default, as ``cohort.json`` records config values."""
    return json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(SynthConfig)}))


def _slide_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of slide ``index`` of the cohort drawn from ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _write_slide(out: Path, cfg: SynthConfig, seed: int, slide: PlannedSlide) -> dict[str, Any]:
    """Render one planned slide, write its TIFF and mask under ``out``; its ``cohort.json``
    statistics."""
    label = _LABEL_NAMES.index(slide.label)
    render = render_layers if tuple(cfg.mosaic) == (1, 1) else render_mosaic
    layers = render(cfg, label, _slide_rng(seed, slide.index))
    write_pyramid_tiff(
        out / "slides" / f"{slide.slide_id}.tiff",
        layers.image,
        cfg.downsamples,
        cfg.mpp,
        cfg.tile_px,
    )
    _write_mask_png(out / "masks" / f"{slide.slide_id}.png", layers.tumour)
    tissue_px = int(layers.tissue.sum())
    return {
        "label": slide.label,
        "width": int(layers.image.shape[1]),
        "height": int(layers.image.shape[0]),
        "tissue_fraction": round(tissue_px / layers.tissue.size, 4),
        "tumour_share": round(int(layers.tumour.sum()) / max(tissue_px, 1), 5),
        "n_foci": layers.n_foci,
        "n_mimics": layers.n_mimics,
    }


def synthesize_cohort(
    out_dir: str | Path,
    cfg: SynthConfig,
    seed: int = 0,
    progress: bool = True,
    jobs: int = 1,
) -> Path:
    """Write a synthetic cohort, resuming where an earlier run of the same seed and config stopped.

    Writes ``slides/<id>.tiff`` (pyramidal TIFF), ``masks/<id>.png`` (tumour mask at
    ``MASK_DOWNSAMPLE``, 255 = tumour), ``manifest.csv`` (``slide_id,path,label,split,mask`` with
    paths relative to ``out_dir``) and ``cohort.json`` (seed, config, per-slide statistics;
    updated after every slide). A slide counts as done when its TIFF and mask exist and
    ``cohort.json`` lists it; done slides are not rewritten.

    Args:
        out_dir: cohort folder (created).
        cfg: the cohort configuration.
        seed: cohort seed; slide ``i`` draws from ``SeedSequence([seed, i])``.
        progress: show a tqdm progress bar.
        jobs: render this many slides at once, one process each (each slide draws from its
            own stream, so the cohort is the same with any number).

    Returns:
        Path of ``manifest.csv``.

    Raises:
        ValueError: ``out_dir`` holds a cohort made with another seed or config.
    """
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("slides/.*.tmp"), *out.glob("masks/.*.tmp"), *out.glob(".*.tmp")]:
        stale.unlink(missing_ok=True)

    config = dataclasses.asdict(cfg)
    config = json.loads(json.dumps(config))  # tuples -> lists, as read back
    record_path = out / "cohort.json"
    record: dict[str, Any] = {
        "seed": seed,
        "config": config,
        "mask_downsample": MASK_DOWNSAMPLE,
        "slides": {},
    }
    if record_path.exists():
        old = json.loads(record_path.read_text())
        # a cohort written before a config field existed was made with its default
        defaults = _field_defaults()
        old_config = {**defaults, **(old.get("config") or {})}
        if old.get("seed") != seed or old_config != config:
            raise ValueError(
                f"{out} holds a cohort made with seed {old.get('seed')} and config {old.get('config')}; "
                f"use another folder for seed {seed} and config {config}"
            )
        record["slides"] = old.get("slides", {})

    plan = plan_cohort(cfg, seed)
    todo = [
        slide
        for slide in plan
        if not (
            slide.slide_id in record["slides"]
            and (out / "slides" / f"{slide.slide_id}.tiff").is_file()
            and (out / "masks" / f"{slide.slide_id}.png").is_file()
        )
    ]
    bar = tqdm(
        total=len(plan),
        initial=len(plan) - len(todo),
        desc="synthesizing slides",
        disable=not progress,
    )
    with ExitStack() as stack:
        if jobs > 1 and len(todo) > 1:
            pool = stack.enter_context(worker_pool(min(jobs, len(todo)), keep_freed_memory))
            done = pool.map(_write_slide, repeat(out), repeat(cfg), repeat(seed), todo)
        else:
            done = map(_write_slide, repeat(out), repeat(cfg), repeat(seed), todo)
        for slide, stats in zip(todo, done, strict=True):  # in plan order, as with one job
            record["slides"][slide.slide_id] = stats
            write_json(record_path, record, indent=1)
            bar.update()
    bar.close()

    manifest = out / "manifest.csv"

    def write_manifest(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["slide_id", "path", "label", "split", "mask"])
            for slide in plan:
                sid = slide.slide_id
                w.writerow(
                    [sid, f"slides/{sid}.tiff", slide.label, slide.split, f"masks/{sid}.png"]
                )

    replace_atomically(manifest, write_manifest)
    return manifest
