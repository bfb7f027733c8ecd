"""Workdirs built from synthetic features, for the project's tests and tests of your own code.

:func:`write_workdir` writes a pipeline workdir — feature store, manifest, HAFED and TSU
exports, distilled features, slide files — holding exactly the slides and models you give:
random ones from :func:`random_slides` and :func:`random_models`, or hand-set values for exact
checks. Every file is written by the package's own code (the store by
:class:`~sasha_env.features.store.FeatureStore`, the manifest by
:class:`~sasha_env.slides.manifest.Manifest`, the models by
:func:`sasha_models.checkpoint.save_export`); the features are synthetic and no backbone runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from sasha_models.checkpoint import export_dict, save_export
from sasha_models.hafed import HAFED, HAFEDConfig
from sasha_models.tsu import TSU, TSUConfig

from .features.store import FeatureStore
from .slides.manifest import Manifest, SlideRecord
from .workdir import Workdir

__all__ = [
    "CELL_PX",
    "CLASS_NAMES",
    "K",
    "LO_DOWNSAMPLE",
    "PATCH_PX",
    "SLIDE_RGB",
    "SlideSpec",
    "export_model",
    "lattice_cells",
    "random_models",
    "random_slides",
    "write_workdir",
]

#: Side of a low-res patch and of a high-res sub-patch, in pixels at their level.
PATCH_PX = 16
#: Low-res downsample of level 0 (zoom 2 over high-res sub-patches read at level 0).
LO_DOWNSAMPLE = 2.0
#: Side of a lattice cell (one low-res patch) in level-0 pixels.
CELL_PX = int(PATCH_PX * LO_DOWNSAMPLE)
#: High-res sub-patches per low-res patch (zoom²).
K = 4
#: The uniform colour (RGB) of every slide file.
SLIDE_RGB = (236, 200, 222)
#: The two classes; class index = position.
CLASS_NAMES = ["normal", "tumor"]


@dataclass
class SlideSpec:
    """One synthetic slide.

    Attributes:
        slide_id: a safe file name.
        label: one of :data:`CLASS_NAMES`.
        split: ``train``, ``val`` or ``test``.
        z: low-res features ``(N, d)`` float32.
        v: high-res features per patch ``(N, d)`` float32: :func:`write_workdir` stores them as
            the distilled features, and repeats them ``K`` times as the high-res sub-patches
            unless ``highres`` is given.
        cells: lattice ``(row, col)`` of each patch ``(N, 2)`` int64.
        highres: high-res sub-patch features ``(N, K, d)`` float32, or ``None``.
    """

    slide_id: str
    label: str
    split: str
    z: np.ndarray
    v: np.ndarray
    cells: np.ndarray
    highres: np.ndarray | None = field(default=None, repr=False)

    @property
    def coords(self) -> np.ndarray:
        """Level-0 ``(x, y)`` of each cell's top-left corner, ``(N, 2)`` int64."""
        return np.stack([self.cells[:, 1], self.cells[:, 0]], 1).astype(np.int64) * CELL_PX

    @property
    def shape(self) -> tuple[int, int]:
        """Lattice ``(rows, cols)``."""
        return int(self.cells[:, 0].max()) + 1, int(self.cells[:, 1].max()) + 1


def lattice_cells(n: int, cols: int = 4) -> np.ndarray:
    """``(n, 2)`` int64 ``(row, col)`` filling a lattice ``cols`` wide, row by row."""
    i = np.arange(n)
    return np.stack([i // cols, i % cols], 1).astype(np.int64)


def random_slides(
    n_slides: int = 6,
    d: int = 8,
    n_range: tuple[int, int] = (5, 12),
    seed: int = 0,
    splits: Sequence[str] = ("train", "train", "train", "train", "val", "test"),
) -> list[SlideSpec]:
    """Slides with clustered features, so that the TSU has similar patches to update.

    Slide ``s`` is ``slide{s:02d}``, labelled ``CLASS_NAMES[s % 2]``, in ``splits[s %
    len(splits)]``, with N drawn from ``n_range`` (inclusive). ``z`` rows are three cluster
    centres plus noise (sd 0.15), ``v = z + noise`` (sd 0.5).
    """
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_slides):
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        centres = rng.normal(size=(3, d))
        z = centres[rng.integers(0, 3, n)] + 0.15 * rng.normal(size=(n, d))
        v = z + 0.5 * rng.normal(size=(n, d))
        out.append(
            SlideSpec(
                slide_id=f"slide{s:02d}",
                label=CLASS_NAMES[s % 2],
                split=splits[s % len(splits)],
                z=z.astype(np.float32),
                v=v.astype(np.float32),
                cells=lattice_cells(n),
            )
        )
    return out


def random_models(
    d: int, tau: float = 0.9, seed: int = 0, n_branches: int = 2
) -> tuple[HAFED, TSU]:
    """Random-init HAFED (2 classes, hidden size 8) and TSU (threshold ``tau``), in eval mode.

    The weights depend on ``seed`` alone; torch's global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hafed = HAFED(HAFEDConfig(d_in=d, n_classes=2, d_hidden=8, n_branches=n_branches))
        tsu = TSU(TSUConfig(d=d, tau=tau))
    return hafed.eval(), tsu.eval()


def export_model(
    model: HAFED | TSU, kind: str, path: Path, class_names: Sequence[str] = CLASS_NAMES
) -> Path:
    """Write ``model.pt`` as the pipeline exports it (read by ``sasha_models.checkpoint``).

    Args:
        model: a HAFED or TSU.
        kind: ``"hafed"`` or ``"tsu"``.
        path: the file.
        class_names: recorded in the export's ``meta`` (the env checks them on HAFED).
    """
    meta = {"class_names": list(class_names), "feature_dim": int(model.d_in)}
    return save_export(path, export_dict(model, kind, model.cfg.to_dict(), meta))


def _store_attrs(d: int) -> dict[str, Any]:
    """Root attributes of the store: the geometry above, a backbone named ``synthetic``."""
    return {
        "backbone": "synthetic",
        "backbone_dim": d,
        "backbone_weights_sha256": "none",
        "input_px": PATCH_PX,
        "patch_px": PATCH_PX,
        "zoom": int(math.isqrt(K)),
        "k": K,
        "hi_downsample": 1.0,
        "hi_mpp": None,
    }


def write_workdir(
    root: str | os.PathLike,
    slides: Sequence[SlideSpec],
    hafed: HAFED,
    tsu: TSU,
    *,
    distilled: bool = True,
    models: tuple[str, ...] = ("hafed", "tsu"),
    tiffs: bool = True,
) -> Path:
    """Write a workdir holding exactly ``slides``, ``hafed`` and ``tsu``.

    ::

        ROOT/features.zarr          lowres, highres, coords, cells, tissue (1.0), distilled = v
        ROOT/manifest.csv           slide_id,path,label,split,mask
        ROOT/models/hafed/model.pt  the pipeline's export format
        ROOT/models/tsu/model.pt
        ROOT/slides/<id>.tiff       a uniform-colour single-level TIFF per slide (for render)

    Args:
        root: the workdir (created).
        slides: what the store holds, in manifest order; all with the same ``d``.
        hafed, tsu: the models to export.
        distilled: store each slide's ``v`` as its distilled features; ``False`` leaves the
            distill stage undone.
        models: which of ``hafed`` and ``tsu`` to export (fewer leave stages undone).
        tiffs: write the slide files (``False``: the manifest names files that do not exist).

    Returns:
        ``root`` as a ``Path``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    d = slides[0].z.shape[1]
    store = FeatureStore.create(root / "features.zarr", _store_attrs(d))
    records = []
    for s in slides:
        rows_n, cols_n = s.shape
        path = root / "slides" / f"{s.slide_id}.tiff"
        width, height = cols_n * CELL_PX, rows_n * CELL_PX
        if tiffs:
            path.parent.mkdir(parents=True, exist_ok=True)
            image = np.empty((height, width, 3), np.uint8)
            image[:] = SLIDE_RGB
            tifffile.imwrite(path, image, photometric="rgb")
        n = len(s.z)
        highres = np.repeat(s.v[:, None, :], K, axis=1) if s.highres is None else s.highres
        store.write_slide(
            s.slide_id,
            {
                "lowres": s.z,
                "highres": highres,
                "coords": s.coords,
                "cells": s.cells,
                "tissue": np.ones(n, np.float32),
            },
            {
                "label": s.label,
                "path": str(path),
                "dimensions": [width, height],
                "mpp": 0.5,
                "level_downsamples": [1.0],
                "n_patches": n,
                "shape": [rows_n, cols_n],
                "patch_px": PATCH_PX,
                "zoom": int(math.isqrt(K)),
                "hi_downsample": 1.0,
                "lo_downsample": LO_DOWNSAMPLE,
            },
        )
        if distilled:
            store.write_array(s.slide_id, "distilled", s.v)
        records.append(SlideRecord(s.slide_id, path, s.label, s.split))
    manifest = root / "manifest.csv"
    Manifest(manifest, records, sorted({s.label for s in slides})).write(manifest)
    wd = Workdir(root)
    exports: tuple[tuple[str, HAFED | TSU], ...] = (("hafed", hafed), ("tsu", tsu))
    for name, model in exports:
        if name in models:
            export_model(model, name, wd.model(name))
    return root
