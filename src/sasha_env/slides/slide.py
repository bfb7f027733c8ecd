"""Reading whole-slide images through tiffslide, at a resolution chosen by downsample or mpp.

Levels are never addressed by index: a request names the downsample (relative to level 0)
it wants, the reader takes the finest pyramid level that is at least as fine, and resizes
the rest of the way. Single-level TIFFs therefore work (every resolution is made by
downsampling level 0 on read), and so do pyramids written by other tools with other
level spacings.

A slide's resolution (µm per level-0 pixel, "mpp") comes from its metadata when that is
usable (present and within :data:`MPP_RANGE`: a generic TIFF's default 72 dpi reads as
353 µm/px, which no microscope scan is), from an explicit value (a manifest's ``mpp`` column)
which wins over the metadata, or from a fallback (``--mpp``) for slides whose metadata is not
usable. A request by mpp on a slide whose resolution is unknown raises :class:`SlideError`
naming ``--mpp``: it never falls back to a downsample.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["CountingFile", "Slide", "SlideError", "MPP_RANGE", "check_mpp", "metadata_mpp"]

#: Plausible level-0 resolutions of a microscope scan, µm/px (100x oil ≈ 0.1; 5x ≈ 2).
MPP_RANGE = (0.05, 20.0)


class SlideError(RuntimeError):
    """A slide cannot be opened or read; the message names the file and the fix."""


class CountingFile(io.FileIO):
    """A read-only file that counts the bytes read from it (what tiffslide and tifffile fetch:
    the TIFF's structure, and the compressed tiles of every region read)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, "r")
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _count(self, n: int | None) -> None:
        with self._lock:
            self.bytes_read += n or 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(-1 if size is None else size)
        self._count(len(data) if data else 0)
        return data

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer)
        self._count(n)
        return n

    def readall(self) -> bytes:
        data = super().readall()
        self._count(len(data))
        return data


def check_mpp(value: object, what: str) -> float:
    """``value`` as a level-0 resolution in µm/px, or :class:`ValueError` naming ``what``.

    Args:
        value: a number (or its text) within :data:`MPP_RANGE`.
        what: where the value came from, for the message (e.g. ``"--mpp"``).
    """
    try:
        mpp = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {value!r} is not a number of um per pixel") from None
    lo, hi = MPP_RANGE
    if not lo <= mpp <= hi:  # also refuses NaN
        raise ValueError(
            f"{what}: {mpp:.4g} um/px is not a microscope scan's level-0 resolution "
            f"(expected {lo:g} to {hi:g}; 40x is about 0.25, 20x about 0.5)"
        )
    return mpp


def metadata_mpp(properties: Mapping[str, object]) -> tuple[float | None, str]:
    """The level-0 mpp a slide's tiffslide properties declare, if usable.

    Returns:
        ``(mpp, "")`` when ``tiffslide.mpp-x`` (and ``-y``, where given) hold one plausible
        value; ``(None, reason)`` otherwise, ``reason`` saying what is wrong.
    """
    x, y = properties.get("tiffslide.mpp-x"), properties.get("tiffslide.mpp-y")
    if x in (None, ""):
        return None, "the file's metadata declares none"
    try:
        mpp = check_mpp(x, "tiffslide.mpp-x")
    except ValueError as exc:
        return None, str(exc)
    if y not in (None, "") and not math.isclose(float(y), mpp, rel_tol=0.02):  # type: ignore[arg-type]
        return None, f"non-square pixels (mpp-x {mpp:g}, mpp-y {y}) are not supported"
    return mpp, ""


class Slide:
    """A whole-slide image opened with tiffslide.

    Args:
        path: any file tiffslide opens (generic tiled pyramidal TIFF, Aperio SVS, ...).
        mpp: level-0 µm/px to use whatever the metadata says (a manifest's ``mpp`` column).
        fallback_mpp: level-0 µm/px to assume when the metadata has no usable one (``--mpp``).

    Attributes:
        dimensions: level-0 ``(width, height)`` in pixels.
        level_downsamples: downsample factor of each pyramid level relative to level 0.
        mpp: microns per level-0 pixel used for this slide, or ``None`` when unknown.
        mpp_source: where ``mpp`` came from: ``"metadata"``, ``"manifest"``, ``"assumed"``
            (``fallback_mpp``), or ``None`` when unknown.
        metadata_mpp: the file's own usable mpp, or ``None``; ``mpp_problem`` then says why.
        properties: tiffslide's properties (``tiffslide.vendor``, ``tiffslide.objective-power``, ...).
    """

    def __init__(
        self, path: str | Path, mpp: float | None = None, fallback_mpp: float | None = None
    ):
        import tiffslide  # lazy: tifffile, imagecodecs, zarr; only to open a slide

        self.path = Path(path)
        given = None if mpp is None else check_mpp(mpp, f"{self.path}: mpp")
        fallback = None if fallback_mpp is None else check_mpp(fallback_mpp, "--mpp")
        if not self.path.exists():
            raise SlideError(f"{self.path}: file not found")
        self._file: CountingFile | None = None
        try:
            self._file = CountingFile(self.path)
            self._slide = tiffslide.TiffSlide(self._file)
            self.dimensions: tuple[int, int] = tuple(self._slide.dimensions)  # type: ignore[assignment]
            self.level_downsamples: tuple[float, ...] = tuple(
                float(d) for d in self._slide.level_downsamples
            )
            self.level_dimensions = tuple(tuple(d) for d in self._slide.level_dimensions)
        except Exception as exc:  # tiffslide raises many types for broken files
            if self._file is not None:
                self._file.close()
            raise SlideError(
                f"{self.path}: not a readable whole-slide image ({type(exc).__name__}: {exc}). "
                "Check that the file is a complete TIFF/SVS (re-copy it if it was truncated)."
            ) from exc
        self.properties: Mapping[str, object] = dict(self._slide.properties)
        self.metadata_mpp, self.mpp_problem = metadata_mpp(self.properties)
        self.mpp: float | None = self.metadata_mpp
        self.mpp_source: str | None = "metadata" if self.mpp is not None else None
        if given is not None:
            self.mpp, self.mpp_source = given, "manifest"
        elif self.mpp is None and fallback is not None:
            self.mpp, self.mpp_source = fallback, "assumed"
        if self.dimensions[0] <= 0 or self.dimensions[1] <= 0:
            raise SlideError(f"{self.path}: slide has empty dimensions {self.dimensions}")

    @property
    def bytes_read(self) -> int:
        """Bytes fetched from the slide file so far (compressed tiles, strips and the TIFF's
        own structure), counted where the reader reads them."""
        return 0 if self._file is None else self._file.bytes_read

    def close(self) -> None:
        self._slide.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, dimensions={self.dimensions}, mpp={self.mpp})"

    def resolve_downsample(self, downsample: float, mpp: float | None = None) -> float:
        """The level-0 downsample for a target: ``mpp / self.mpp``, or ``downsample`` when no
        ``mpp`` is asked for.

        Raises:
            SlideError: ``mpp`` is asked for and this slide's resolution is unknown (its
                metadata has no usable mpp and none was given); the message names ``--mpp``.
        """
        if mpp is None:
            return float(downsample)
        if self.mpp is None:
            raise SlideError(
                f"{self.path}: no usable mpp metadata ({self.mpp_problem}); the preset reads "
                f"high-res at {mpp:g} um/px, so the slide's resolution must be known: give "
                "--mpp X (level-0 um/px, e.g. 0.25 for 40x, 0.5 for 20x) or an mpp column in "
                "the manifest"
            )
        return mpp / self.mpp

    @property
    def vendor(self) -> str | None:
        """The scanner vendor tiffslide recognised (``aperio``, ``hamamatsu``, ...), if any."""
        value = self.properties.get("tiffslide.vendor")
        return str(value) if value else None

    @property
    def objective_power(self) -> float | None:
        """The scan's objective magnification from the metadata (20, 40, ...), if declared."""
        value = self.properties.get("tiffslide.objective-power")
        try:
            return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None

    def best_level(self, downsample: float) -> int:
        """Index of the coarsest level that is still at least as fine as ``downsample``."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3) and ds >= self.level_downsamples[best]:
                best = i
        return best

    def read(self, x: int, y: int, size_px: int, downsample: float) -> np.ndarray:
        """Read a square region.

        Args:
            x, y: top-left corner in level-0 pixels.
            size_px: side of the returned image in pixels at ``downsample``.
            downsample: resolution relative to level 0 (1 = full resolution).

        Returns:
            ``(size_px, size_px, 3)`` uint8 RGB. Area outside the slide reads as white.
        """
        return self.read_rect(x, y, size_px, size_px, downsample)

    def read_rect(self, x: int, y: int, w_px: int, h_px: int, downsample: float) -> np.ndarray:
        """Read a ``(h_px, w_px, 3)`` uint8 RGB region whose top-left is level-0 ``(x, y)``."""
        level = self.best_level(downsample)
        level_ds = self.level_downsamples[level]
        scale = downsample / level_ds
        lw, lh = max(1, round(w_px * scale)), max(1, round(h_px * scale))
        try:
            region = self._slide.read_region((int(x), int(y)), level, (lw, lh), as_array=True)
        except Exception as exc:
            raise SlideError(
                f"{self.path}: cannot read region at level-0 ({x}, {y}), level {level} "
                f"({type(exc).__name__}: {exc}); the file may be truncated or corrupt."
            ) from exc
        region = _to_rgb(np.asarray(region))
        if (lw, lh) != (w_px, h_px):
            region = np.asarray(
                Image.fromarray(region).resize((w_px, h_px), Image.Resampling.BILINEAR)
            )
        return region

    def thumbnail(self, max_side_px: int, min_downsample: float = 1.0) -> tuple[np.ndarray, float]:
        """Whole-slide thumbnail whose longest side is at most ``max_side_px``.

        ``min_downsample`` makes it coarser still when the caller needs no more detail.

        Returns:
            ``(image (h, w, 3) uint8, downsample)`` where ``downsample`` is the thumbnail's
            resolution relative to level 0 (thumbnail pixel = ``downsample`` level-0 pixels).
        """
        width, height = self.dimensions
        downsample = max(1.0, min_downsample, max(width, height) / max_side_px)
        tw, th = max(1, math.floor(width / downsample)), max(1, math.floor(height / downsample))
        return self.read_rect(0, 0, tw, th, downsample), downsample


def _to_rgb(region: np.ndarray) -> np.ndarray:
    """RGBA/grey/uint16 → uint8 RGB (transparent pixels become white, like glass)."""
    if region.dtype != np.uint8:
        region = np.clip(region / max(1, region.max()) * 255, 0, 255).astype(np.uint8)
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=2)
    if region.shape[2] == 4:
        alpha = region[..., 3:4].astype(np.float32) / 255.0
        rgb = region[..., :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)
        region = rgb.round().astype(np.uint8)
    return np.ascontiguousarray(region[..., :3])
