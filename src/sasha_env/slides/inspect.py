"""``sasha inspect``: what a slide file says about itself, and how a preset would read it.

The report users ask for when a slide's mpp is wrong or missing: the scanner vendor, every
pyramid level with its downsample and µm/px, the objective power, the size, and the share of
the slide that is tissue (the same segmentation the grid uses). With a grid, also which
levels the high- and low-res patches would be read from and how many patches there would be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .grid import GridConfig, build_grid, segment_tissue
from .slide import Slide

__all__ = ["inspect_slide", "format_inspection"]


def inspect_slide(
    path: str | Path,
    grid: GridConfig | None = None,
    mpp: float | None = None,
    fallback_mpp: float | None = None,
    thumbnail_px: int = 1024,
) -> dict[str, Any]:
    """A JSON-ready description of one slide.

    Args:
        path: the slide file.
        grid: also lay this grid (a preset's) and say how the slide would be read; a grid
            that cannot be laid (unknown mpp, no tissue, too small) is reported under
            ``grid.error``.
        mpp, fallback_mpp: as :class:`~sasha_env.slides.slide.Slide` takes them (a manifest's
            ``mpp``; ``--mpp``).
        thumbnail_px: longest side of the thumbnail the tissue is segmented on.

    Returns:
        ``slide``, ``vendor``, ``objective_power``, ``dimensions`` (level-0 ``[w, h]`` px),
        ``mpp`` (µm/px used, or ``None``), ``mpp_source``, ``metadata_mpp``, ``mpp_problem``
        (why the metadata is not usable, or ``None``), ``size_mm`` (``[w, h]`` or ``None``),
        ``file_bytes``, ``levels`` (``[{level, downsample, width, height, mpp}]``),
        ``tissue_fraction`` (share of the slide's area) and ``tissue_mm2``; with ``grid``,
        ``grid`` (``hi_mpp``, ``hi_downsample``, ``hi_level``, ``lo_downsample``,
        ``lo_level``, ``patch_px``, ``zoom``, ``n_patches``; or ``error``).

    Raises:
        SlideError: the file is missing or not a readable slide.
    """
    with Slide(path, mpp=mpp, fallback_mpp=fallback_mpp) as slide:
        width, height = slide.dimensions
        levels = [
            {
                "level": i,
                "downsample": round(ds, 4),
                "width": int(dims[0]),
                "height": int(dims[1]),
                "mpp": None if slide.mpp is None else round(slide.mpp * ds, 4),
            }
            for i, (ds, dims) in enumerate(
                zip(slide.level_downsamples, slide.level_dimensions, strict=True)
            )
        ]
        thumb, _ = slide.thumbnail(thumbnail_px)
        tissue = float(np.mean(segment_tissue(thumb)))
        out: dict[str, Any] = {
            "slide": str(path),
            "vendor": slide.vendor,
            "objective_power": slide.objective_power,
            "dimensions": [int(width), int(height)],
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "metadata_mpp": slide.metadata_mpp,
            "mpp_problem": slide.mpp_problem or None,
            "size_mm": None
            if slide.mpp is None
            else [round(width * slide.mpp / 1000, 3), round(height * slide.mpp / 1000, 3)],
            "file_bytes": Path(path).stat().st_size,
            "levels": levels,
            "tissue_fraction": round(tissue, 4),
            "tissue_mm2": None
            if slide.mpp is None
            else round(tissue * width * height * slide.mpp**2 / 1e6, 3),
        }
        if grid is not None:
            out["grid"] = _grid_report(slide, grid)
    return out


def _grid_report(slide: Slide, cfg: GridConfig) -> dict[str, Any]:
    """How ``cfg`` reads ``slide``: levels and downsamples of both resolutions, patch count."""
    try:
        grid, *_ = build_grid(slide, cfg)
    except Exception as exc:  # unknown mpp, no tissue, too small: all SlideErrors, named
        return {"error": str(exc)}
    return {
        "hi_mpp": cfg.hi_mpp,
        "hi_downsample": round(grid.hi_downsample, 4),
        "hi_level": slide.best_level(grid.hi_downsample),
        "lo_downsample": round(grid.lo_downsample, 4),
        "lo_level": slide.best_level(grid.lo_downsample),
        "patch_px": grid.patch_px,
        "zoom": grid.zoom,
        "n_patches": grid.n,
    }


def format_inspection(r: dict[str, Any], preset: str | None = None) -> str:
    """``r`` (from :func:`inspect_slide`) as a few lines of text for a terminal."""
    w, h = r["dimensions"]
    head = [f"{r['vendor'] or 'generic TIFF'}"]
    if r["objective_power"]:
        head.append(f"{r['objective_power']:g}x objective")
    size = f"{w} x {h} px"
    if r["size_mm"]:
        size += f" = {r['size_mm'][0]:g} x {r['size_mm'][1]:g} mm"
    head += [size, f"{r['file_bytes'] / 1e6:.1f} MB"]
    if r["mpp"] is None:
        mpp = f"mpp: unknown ({r['mpp_problem']}); give --mpp X or an mpp column in the manifest"
    elif r["mpp_source"] == "metadata":
        mpp = f"mpp: {r['mpp']:g} um/px at level 0 (metadata)"
    else:
        mpp = f"mpp: {r['mpp']:g} um/px at level 0 ({r['mpp_source']}; metadata: "
        mpp += f"{r['metadata_mpp']:g})" if r["metadata_mpp"] else f"{r['mpp_problem']})"
    lines = [r["slide"], "  " + ", ".join(head), "  " + mpp]
    lines.append(f"  {'level':>5}  {'downsample':>10}  {'width x height':>17}  {'um/px':>7}")
    for lv in r["levels"]:
        dims = f"{lv['width']} x {lv['height']}"
        lv_mpp = f"{lv['mpp']:g}" if lv["mpp"] is not None else "?"
        lines.append(f"  {lv['level']:>5}  {lv['downsample']:>10g}  {dims:>17}  {lv_mpp:>7}")
    tissue = f"  tissue: {r['tissue_fraction']:.0%} of the slide"
    if r["tissue_mm2"] is not None:
        tissue += f" ({r['tissue_mm2']:g} mm2)"
    lines.append(tissue)
    g = r.get("grid")
    if g is not None:
        name = f"preset {preset}" if preset else "grid"
        if "error" in g:
            lines.append(f"  {name}: cannot read this slide: {g['error']}")
        else:
            hi = f"{g['hi_mpp']:g} um/px" if g["hi_mpp"] else f"downsample {g['hi_downsample']:g}"
            lines.append(
                f"  {name}: high-res {hi} from level {g['hi_level']} (downsample "
                f"{g['hi_downsample']:g}), low-res from level {g['lo_level']} (downsample "
                f"{g['lo_downsample']:g}); {g['n_patches']} patches of {g['patch_px']} px, "
                f"k = {g['zoom'] ** 2}"
            )
    return "\n".join(lines)
