"""Import patch features computed elsewhere (TRIDENT, CLAM) into a feature store.

Both tools write one HDF5 file per slide, ``<slide_id>.h5``, holding ``features`` ``(n, d)``
and ``coords`` ``(n, 2)``: the level-0 ``(x, y)`` of each patch's top-left corner.

- **TRIDENT** (``<job>/<mag>x_<px>px_<overlap>px_overlap/features_<encoder>/``): ``coords``
  carries ``patch_size`` (pixels at the target magnification), ``patch_size_level0``,
  ``level0_magnification``, ``target_magnification`` and ``overlap``.
- **CLAM** (``<feat_dir>/h5_files/``): the feature files carry no attributes; the patch size is
  in ``create_patches_fp``'s ``patches/<slide_id>.h5`` (``coords`` attributes ``patch_size``,
  ``patch_level``, ``downsample``). Pass the level-0 sizes (``patch_size × downsample``) with
  ``lowres_px`` / ``highres_px``, or files whose ``coords`` carry those attributes.

One folder holds the low-magnification features (one per low-res patch, SASHA's state) and one
the high-magnification ones. Each high-res patch goes to the low-res cell that contains its
centre, by level-0 coordinates (never by row order), and takes the sub-patch slot
``row · zoom + col`` (row-major) its position in the cell gives. SASHA's hierarchy needs all
``k = zoom²`` sub-patches of a cell: a cell missing any (outside tissue at high magnification,
or not extracted) is left out of the slide and counted, as are high-res patches in no kept
cell; the counts are in the slide's ``import`` attribute and in the report. A slide left with
no complete cell is refused and named.
"""

from __future__ import annotations

import csv
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from ..slides.manifest import SPLITS, ManifestError, file_identity, is_safe_id, resolve_csv_path
from ..slides.slide import Slide
from .records import SlideInfo, StoreInfo
from .store import FeatureStore

__all__ = [
    "FeatureImportError",
    "ImportReport",
    "PatchFile",
    "assemble_slide",
    "import_cohort",
    "read_patch_file",
]


class FeatureImportError(ValueError):
    """A feature file or a slide cannot be imported; the message names the file and the fix."""


@dataclass
class PatchFile:
    """One slide's patch features at one magnification.

    Attributes:
        features: ``(n, d)`` float32.
        coords: ``(n, 2)`` int64 level-0 ``(x, y)`` of each patch's top-left corner.
        size_level0: side of a patch in level-0 pixels (``None``: the file does not say).
        patch_px: side of a patch in pixels at its own magnification (``None``: unknown).
        tool: ``"trident"``, ``"clam"`` or ``"unknown"`` (from the attributes found).
        overlap: overlap between neighbouring patches in pixels, where the file says.
    """

    path: Path
    features: np.ndarray
    coords: np.ndarray
    size_level0: float | None
    patch_px: int | None
    tool: str
    overlap: int = 0


def read_patch_file(path: str | Path, size_level0: float | None = None) -> PatchFile:
    """Read a TRIDENT or CLAM per-slide feature file.

    Args:
        path: ``<slide_id>.h5``.
        size_level0: the patch side in level-0 pixels, overriding what the file says.

    Raises:
        FeatureImportError: not HDF5, no ``features``/``coords``, mismatched rows, or bad shapes.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise FeatureImportError(f"{path}: not a readable HDF5 feature file ({exc})") from exc
    with f:
        missing = [k for k in ("features", "coords") if k not in f]
        if missing:
            raise FeatureImportError(
                f"{path}: no {' or '.join(repr(k) for k in missing)} dataset (found "
                f"{sorted(f.keys())}); expected a TRIDENT or CLAM patch-feature file"
            )
        features = np.asarray(f["features"][...], dtype=np.float32)
        coords = np.asarray(f["coords"][...])
        attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
    if features.ndim == 3 and features.shape[0] == 1:  # some writers keep a batch axis
        features = features[0]
    if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureImportError(
            f"{path}: features {features.shape} and coords {coords.shape}; expected (n, d) "
            "and (n, 2)"
        )
    if len(features) != len(coords):
        raise FeatureImportError(f"{path}: {len(features)} feature rows but {len(coords)} coords")
    if len(features) and not np.isfinite(features).all():
        raise FeatureImportError(f"{path}: features hold NaN or infinite values")
    tool, file_size, patch_px = "unknown", None, None
    if "patch_size_level0" in attrs:
        tool, file_size = "trident", float(attrs["patch_size_level0"])
        patch_px = int(attrs["patch_size"]) if "patch_size" in attrs else None
    elif "patch_level" in attrs and "patch_size" in attrs:
        tool, patch_px = "clam", int(attrs["patch_size"])
        # CLAM steps by patch_size * int(downsample): its downsample is an estimate (4.0003)
        downsample = np.atleast_1d(np.asarray(attrs.get("downsample", 1.0), dtype=float))
        file_size = float(patch_px * int(downsample[0]))
    size = float(size_level0) if size_level0 else file_size
    return PatchFile(
        path,
        features,
        coords.astype(np.int64),
        size,
        patch_px,
        tool,
        int(attrs.get("overlap", 0) or 0),
    )


def _lattice_key(cells: np.ndarray) -> np.ndarray:
    """``(n, 2)`` integer lattice positions (possibly negative) → one int64 key each."""
    c = cells.astype(np.int64) + (1 << 20)
    return c[:, 0] * (1 << 22) + c[:, 1]


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


@dataclass
class Assembly:
    """A slide in the store's layout, and what was left out.

    Attributes:
        lowres: ``(N, d)``; highres: ``(N, k, d)``; coords, cells: ``(N, 2)`` int64.
        zoom: sub-patches per side of a cell; counts: what was dropped and why.
    """

    lowres: np.ndarray
    highres: np.ndarray
    coords: np.ndarray
    cells: np.ndarray
    zoom: int
    counts: dict


def assemble_slide(lo: PatchFile, hi: PatchFile) -> Assembly:
    """Assign high-res patches to the low-res cells that contain them, by level-0 coordinates.

    Args:
        lo: features at the low magnification (one per cell); ``size_level0`` set.
        hi: features at the high magnification; ``size_level0`` set, dividing ``lo``'s.

    Returns:
        The complete cells, in ``lo``'s order, with their ``k`` sub-patches row-major.

    Raises:
        FeatureImportError: unknown or incompatible patch sizes, overlapping patches, different
            feature sizes, or no complete cell.
    """
    for pf, which in ((lo, "low"), (hi, "high")):
        if not pf.size_level0:
            raise FeatureImportError(
                f"{pf.path}: the patch size at level 0 is unknown (CLAM's feature files do not "
                f"record it): pass --{which}res-px, the {which}-res patch side in level-0 "
                "pixels (patch_size × int(downsample) in create_patches_fp's patches/<slide>.h5)"
            )
        if pf.overlap:
            raise FeatureImportError(
                f"{pf.path}: patches overlap by {pf.overlap} px; SASHA's cells tile the slide, "
                "so extract with overlap 0"
            )
    if lo.features.shape[1] != hi.features.shape[1]:
        raise FeatureImportError(
            f"{lo.path} has {lo.features.shape[1]}-d features but {hi.path} has "
            f"{hi.features.shape[1]}-d: both magnifications must come from one encoder"
        )
    s_lo, s_hi = float(lo.size_level0), float(hi.size_level0)  # type: ignore[arg-type]
    ratio = s_lo / s_hi
    zoom = int(round(ratio))
    if zoom < 1 or abs(ratio - zoom) > 1e-6:
        raise FeatureImportError(
            f"{lo.path}: low-res patches of {s_lo:g} level-0 px are not a whole number of "
            f"high-res patches of {s_hi:g} px ({hi.path}); e.g. 256 px at 5x over 256 px at 20x"
        )
    k = zoom * zoom
    n_lo = len(lo.coords)
    centres = hi.coords + s_hi / 2
    owner = np.full(len(centres), -1, np.int64)
    # the low-res cell holding each centre; CLAM starts each tissue contour's grid at its own
    # corner, so the cells may sit on several lattices (one per origin)
    residues = np.mod(lo.coords, s_lo)
    for origin in np.unique(residues, axis=0):
        members = np.flatnonzero((residues == origin).all(1))
        keys = _lattice_key(np.floor((lo.coords[members] - origin) / s_lo + 0.5))
        order = np.argsort(keys)
        sorted_keys = keys[order]
        wanted = _lattice_key(np.floor((centres - origin) / s_lo))
        pos = np.clip(np.searchsorted(sorted_keys, wanted), 0, len(sorted_keys) - 1)
        hit = (sorted_keys[pos] == wanted) & (owner < 0)
        owner[hit] = members[order[pos[hit]]]
    assigned = np.flatnonzero(owner >= 0)
    sub = np.floor((centres[assigned] - lo.coords[owner[assigned]]) / s_hi).astype(np.int64)
    flat = owner[assigned] * k + sub[:, 1] * zoom + sub[:, 0]  # row-major within the cell
    first = np.unique(flat, return_index=True)[1]  # a second patch in one slot is dropped
    slot: np.ndarray = np.full(n_lo * k, -1, np.int64)
    slot[flat[first]] = assigned[first]
    slot = slot.reshape(n_lo, k)
    unassigned = len(centres) - len(assigned)
    duplicates = len(assigned) - len(first)
    complete = (slot >= 0).all(1)
    n_incomplete = int((~complete).sum())
    if not complete.any():
        raise FeatureImportError(
            f"{lo.path}: none of its {n_lo} low-res cells has all {k} high-res sub-patches in "
            f"{hi.path} ({len(hi.coords)} high-res patches, {unassigned} outside every cell): "
            "are both folders from the same slide and level-0 frame?"
        )
    keep = np.flatnonzero(complete)
    coords = lo.coords[keep]
    cells = np.floor(coords / s_lo + 0.5).astype(np.int64)[:, ::-1]  # (row, col) from (x, y)
    counts = {
        "lowres_patches": n_lo,
        "cells_kept": int(len(keep)),
        "cells_incomplete": n_incomplete,
        "highres_patches": int(len(hi.coords)),
        "highres_outside_cells": int(unassigned),
        "highres_duplicate_slot": int(duplicates),
        "highres_in_dropped_cells": int((slot[~complete] >= 0).sum()),
    }
    return Assembly(
        lowres=lo.features[keep],
        highres=hi.features[slot[keep]],
        coords=coords,
        cells=np.ascontiguousarray(cells),
        zoom=zoom,
        counts=counts,
    )


@dataclass
class ImportRow:
    slide_id: str
    label: str
    split: str | None
    path: Path | None


def read_import_csv(path: str | Path) -> list[ImportRow]:
    """The cohort to import: ``slide_id,label`` with optional ``split`` and ``path`` columns
    (``path``: the slide file, used only for pictures; a sasha manifest works as is)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"cohort CSV {path} not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"slide_id", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ManifestError(
                f"{path}: missing column(s) {sorted(missing)}; the header must hold "
                "'slide_id,label' (optional 'split', 'path')"
            )
        rows, seen = [], set()
        for line, row in enumerate(reader, start=2):
            sid, label = (row.get("slide_id") or "").strip(), (row.get("label") or "").strip()
            split = (row.get("split") or "").strip() or None
            where = f"{path}, line {line}"
            if not is_safe_id(sid):
                raise ManifestError(f"{where}: {sid!r} is not a safe slide id")
            if sid in seen:
                raise ManifestError(f"{where}: duplicate slide_id {sid!r}")
            if not label:
                raise ManifestError(f"{where}: empty label for slide {sid!r}")
            if split is not None and split not in SPLITS:
                raise ManifestError(f"{where}: split {split!r} is not one of {SPLITS}")
            seen.add(sid)
            slide = (row.get("path") or "").strip()
            rows.append(
                ImportRow(sid, label, split, resolve_csv_path(path, slide) if slide else None)
            )
    if not rows:
        raise ManifestError(f"{path}: no slides listed")
    return rows


@dataclass
class ImportReport:
    """What an import did. ``failed`` maps slide id → error message."""

    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    counts: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        dropped = sum(c["cells_incomplete"] for c in self.counts.values())
        cells = sum(c["cells_kept"] for c in self.counts.values())
        lines = [
            f"imported {len(self.imported)} slide(s), {cells} cells in {self.seconds:.1f} s; "
            f"{len(self.skipped)} already in the store; {len(self.failed)} failed",
        ]
        if dropped:
            lines.append(
                f"  {dropped} cell(s) left out for missing high-res sub-patches "
                "(per slide: the 'import' attribute)"
            )
        lines += [f"  FAILED {sid}: {msg}" for sid, msg in sorted(self.failed.items())]
        return "\n".join(lines)


def _source(lo: Path, hi: Path) -> dict:
    """The slide's identity in the store: both files' fingerprints (see ``file_identity``)."""
    a, b = file_identity(lo), file_identity(hi)
    digest = hashlib.sha256((a["fingerprint"] + b["fingerprint"]).encode()).hexdigest()[:32]
    return {"fingerprint": digest, "lowres": a, "highres": b}


def _encoder_name(folder: Path) -> str:
    """TRIDENT's ``features_<encoder>`` folder names the encoder; else the folder's name."""
    name = folder.resolve().name
    return name[len("features_") :] if name.startswith("features_") else name


def import_cohort(
    cohort_csv: str | Path,
    lowres_dir: str | Path,
    highres_dir: str | Path,
    out: str | Path,
    lowres_px: float | None = None,
    highres_px: float | None = None,
    encoder: str | None = None,
    progress: bool = True,
) -> ImportReport:
    """Build (or add to) a feature store from per-slide TRIDENT or CLAM h5 files.

    Args:
        cohort_csv: ``slide_id,label[,split][,path]``; each slide needs
            ``lowres_dir/<slide_id>.h5`` and ``highres_dir/<slide_id>.h5``.
        out: the store to create or add to.
        lowres_px, highres_px: patch sides in level-0 pixels, for files that do not say.
        encoder: the encoder's name for the store (default: from the folder's name).

    Returns:
        The report; a slide that cannot be imported is named in ``failed`` and the others are
        imported. A slide already in the store from the same files is skipped.
    """
    t0 = time.perf_counter()
    rows = read_import_csv(cohort_csv)
    lowres_dir, highres_dir = Path(lowres_dir), Path(highres_dir)
    for folder in (lowres_dir, highres_dir):
        if not folder.is_dir():
            raise FeatureImportError(f"{folder}: no such folder of <slide_id>.h5 feature files")
    encoder = encoder or _encoder_name(highres_dir)
    report = ImportReport()
    out = Path(out)
    store = FeatureStore(out, mode="a") if (out / "zarr.json").is_file() else None
    iterator = rows
    if progress:
        iterator = tqdm(rows, desc="import", unit="slide")
    for row in iterator:
        lo_path = lowres_dir / f"{row.slide_id}.h5"
        hi_path = highres_dir / f"{row.slide_id}.h5"
        try:
            for p in (lo_path, hi_path):
                if not p.is_file():
                    raise FeatureImportError(f"{p} not found")
            source = _source(lo_path, hi_path)
            if store is not None and row.slide_id in store:
                old = store.slide_info(row.slide_id)
                same = (
                    old.fingerprint == source["fingerprint"]
                    and old.label == row.label
                    and old.split == row.split
                    and (row.path is None or old.path == str(row.path))
                )
                if same:  # same files, same labels: nothing to do
                    report.skipped.append(row.slide_id)
                    continue
            lo = read_patch_file(lo_path, lowres_px)
            hi = read_patch_file(hi_path, highres_px)
            part = assemble_slide(lo, hi)
            if store is None:
                store = FeatureStore.create(out, _store_info(encoder, lo, hi, part.zoom))
            _check_same_geometry(store, lo, hi)
            store.write_slide(row.slide_id, _arrays(part), _slide_info(row, lo, hi, part, source))
            report.imported.append(row.slide_id)
            report.counts[row.slide_id] = part.counts
        except (FeatureImportError, OSError) as exc:
            report.failed[row.slide_id] = str(exc)
    report.seconds = time.perf_counter() - t0
    return report


def _store_info(encoder: str, lo: PatchFile, hi: PatchFile, zoom: int) -> StoreInfo:
    """The store's attributes: the encoder stands where a backbone name would."""
    patch_px = hi.patch_px or int(round(float(hi.size_level0)))  # type: ignore[arg-type]
    return StoreInfo(
        backbone=f"imported:{encoder}",
        backbone_dim=int(hi.features.shape[1]),
        backbone_weights_sha256=None,
        input_px=None,
        patch_px=patch_px,
        zoom=zoom,
        hi_downsample=float(hi.size_level0) / patch_px,  # type: ignore[arg-type]
        hi_mpp=None,
        lowres_size_level0=float(lo.size_level0),  # type: ignore[arg-type]
        highres_size_level0=float(hi.size_level0),  # type: ignore[arg-type]
        imported={"tool": hi.tool, "encoder": encoder},
    )


def _check_same_geometry(store: FeatureStore, lo: PatchFile, hi: PatchFile) -> None:
    if not store.info.is_imported:
        raise FeatureImportError(
            f"{store.path} holds features extracted by sasha ({store.info.backbone}); "
            "import into a new --out store"
        )
    want = (store.info.lowres_size_level0, store.info.highres_size_level0)
    got = (float(lo.size_level0), float(hi.size_level0))  # type: ignore[arg-type]
    if tuple(want) != got or int(hi.features.shape[1]) != store.feature_dim:
        raise FeatureImportError(
            f"{lo.path}: patches of {got[0]:g}/{got[1]:g} level-0 px and "
            f"{hi.features.shape[1]}-d features, but the store holds {want[0]:g}/{want[1]:g} "
            f"px and {store.feature_dim}-d: one store is one encoder and one geometry"
        )


def _slide_extent(path: Path | None) -> tuple[tuple[int, int] | None, float | None]:
    """Level-0 ``(width, height)`` and mpp of the slide file, when one is given and readable."""
    if path is None or not path.is_file():
        return None, None
    try:
        with Slide(path) as slide:
            return tuple(int(x) for x in slide.dimensions), slide.mpp  # type: ignore[return-value]
    except Exception:  # pictures only: a slide file that cannot be read costs nothing else
        return None, None


def _arrays(part: Assembly) -> dict[str, np.ndarray]:
    return {
        "lowres": part.lowres,
        "highres": part.highres,
        "coords": part.coords,
        "cells": part.cells,
        "tissue": np.ones(len(part.coords), np.float32),  # not known: every kept cell counts
    }


def _slide_info(
    row: ImportRow, lo: PatchFile, hi: PatchFile, part: Assembly, source: dict
) -> SlideInfo:
    s_lo, s_hi = float(lo.size_level0), float(hi.size_level0)  # type: ignore[arg-type]
    patch_px = hi.patch_px or int(round(s_hi))
    dimensions, mpp = _slide_extent(row.path)
    if dimensions is None:  # no slide file: the extent the patches cover
        extent = part.coords.max(0) + s_lo
        dimensions = (int(extent[0]), int(extent[1]))
        shape = [int(x) + 1 for x in part.cells.max(0)]
    else:  # the lattice over the whole slide, as 'sasha extract' lays it
        shape = [int(dimensions[1] // s_lo), int(dimensions[0] // s_lo)]
        shape = [max(a, int(b) + 1) for a, b in zip(shape, part.cells.max(0), strict=True)]
    return SlideInfo(
        label=row.label,
        split=row.split,
        path=str(row.path) if row.path else str(lo.path.resolve()),
        source=source,
        dimensions=(int(dimensions[0]), int(dimensions[1])),
        mpp=mpp,
        n_patches=int(len(part.coords)),
        patch_px=patch_px,
        zoom=part.zoom,
        hi_downsample=s_hi / patch_px,
        lo_downsample=s_lo / patch_px,
        cell_px=s_lo,
        sub_px=s_hi,
        shape=(shape[0], shape[1]),
        import_info={
            "tool": hi.tool,
            "lowres_file": str(lo.path.resolve()),
            "highres_file": str(hi.path.resolve()),
            **part.counts,
        },
    )
