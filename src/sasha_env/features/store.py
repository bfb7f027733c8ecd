"""The feature store: one zarr (v3) directory store per (cohort, backbone, grid).

Layout::

    STORE/
      zarr.json                 root attributes (StoreInfo): backbone name, dim and weights
                                hash, grid settings (patch_px, zoom, hi_downsample/hi_mpp),
                                input_px, format
      slides/<slide_id>/        one group per slide; attributes (SlideInfo): label, path,
                                n_patches, level-0 dimensions, mpp, hi/lo downsample, lattice
                                shape, source fingerprint
        lowres     (N, d)    float32  low-res patch features z
        highres    (N, k, d) float32  high-res sub-patch features, row-major within a patch
        coords     (N, 2)    int64    level-0 (x, y) of each low-res patch's top-left
        cells      (N, 2)    int64    (row, col) in the patch lattice
        tissue     (N,)      float32  tissue fraction of each patch
        distilled  (N, d)    float32  HAFED's level-1 vectors v (written by the distillation stage)
      qc/<slide_id>.png         tissue mask and grid over the thumbnail
      _staging/                 work in progress and set-aside entries (never read)

A slide group is either complete or absent to readers: it is written under ``_staging`` and
moved into ``slides/`` with one atomic rename. Arrays added later (``distilled``) are written
the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import zarr

from ..slides.manifest import is_safe_id
from .records import FORMAT_VERSION, SlideInfo, StoreInfo

__all__ = ["FeatureStore", "StoreError", "link_store", "store_identity"]

_HOST = socket.gethostname().replace("~", "-")
_rename = os.replace  # the store's renames (one name, so tests can interrupt them)
_KEYS_THAT_MUST_MATCH = (
    "backbone",
    "backbone_weights_sha256",
    "backbone_dim",
    "input_px",
    "patch_px",
    "zoom",
    "hi_downsample",
    "hi_mpp",
)


class StoreError(RuntimeError):
    """A store is missing, incompatible, or lacks a stage's output."""


class FeatureStore:
    """Read and write a feature store.

    Args:
        path: the store directory (``*.zarr``).
        mode: ``"r"`` to read an existing store, ``"a"`` to write slides into it.

    Attributes:
        info: the store's root attributes.
    """

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise StoreError(
                f"{self.path}: not a sasha feature store (no zarr.json); create it with 'sasha extract'"
            )
        self.mode = mode
        self._root = zarr.open_group(str(self.path), mode="r" if mode == "r" else "a")
        self.info = StoreInfo.from_attrs(self._root.attrs)

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str | Path, info: StoreInfo) -> FeatureStore:
        """Open ``path`` for writing, creating it with ``info`` if new.

        Raises:
            StoreError: the existing store was made with another backbone or grid.
        """
        path = Path(path)
        attrs = replace(info, format_version=FORMAT_VERSION).to_attrs()
        if (path / "zarr.json").is_file():
            store = cls(path, mode="a")
            old = store.info.to_attrs()
            diffs = {
                k: (old.get(k), attrs.get(k))
                for k in _KEYS_THAT_MUST_MATCH
                if _jsonable(old.get(k)) != _jsonable(attrs.get(k))
            }
            if set(diffs) == {"hi_mpp"} and store._read_at(attrs.get("hi_mpp")):
                store._adopt_root(attrs)  # the same grid, now named by mpp
                return store
            if diffs:
                detail = "; ".join(
                    f"{k}: store has {a!r}, run asks {b!r}" for k, (a, b) in diffs.items()
                )
                raise StoreError(
                    f"{path}: existing store was made with other settings ({detail}). "
                    "Use a new --out path, or delete the store to rebuild it."
                )
            return store
        path.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(path), mode="w")
        root.attrs.update(_jsonable(attrs))
        zarr.open_group(str(path / "slides"), mode="w")
        return cls(path, mode="a")

    def _read_at(self, hi_mpp: float | None) -> bool:
        """Whether this store fixed its high-res level by downsample (``hi_mpp`` null, as
        ``tiny`` and ``demo`` did before they fixed it in µm/px) and every slide in it was
        nonetheless read at ``hi_mpp`` µm/px: a run asking for ``hi_mpp`` would make the same
        store."""
        if self.info.hi_mpp is not None or hi_mpp is None:
            return False
        for sid in self.slide_ids():
            info = self.slide_info(sid)
            if info.mpp is None or info.hi_downsample is None:
                return False
            if abs(info.mpp * info.hi_downsample / hi_mpp - 1) > 1e-6:
                return False
        return True

    def _adopt_root(self, attrs: dict) -> None:
        """Rewrite the root attributes with ``attrs``' grid (:meth:`_read_at` holds)."""
        root = zarr.open_group(str(self.path), mode="a")
        root.attrs.update(_jsonable({k: attrs[k] for k in ("hi_mpp", "grid") if k in attrs}))
        self.info = StoreInfo.from_attrs(root.attrs)

    # ------------------------------------------------------------------ reading
    def slide_ids(self) -> list[str]:
        """Ids of the complete slides, sorted."""
        slides = self.path / "slides"
        if not slides.is_dir():
            return []
        return sorted(p.name for p in slides.iterdir() if (p / "zarr.json").is_file())

    def __contains__(self, slide_id: str) -> bool:
        return is_safe_id(slide_id) and (self.path / "slides" / slide_id / "zarr.json").is_file()

    def __len__(self) -> int:
        return len(self.slide_ids())

    def _group(self, slide_id: str) -> zarr.Group:
        _check_id(slide_id)
        if slide_id not in self:
            raise StoreError(f"{self.path}: slide {slide_id!r} is not in the store")
        return zarr.open_group(str(self.path / "slides" / slide_id), mode="r")

    def slide_info(self, slide_id: str) -> SlideInfo:
        """The slide group's attributes."""
        return SlideInfo.from_attrs(self._group(slide_id).attrs)

    def n_patches(self, slide_id: str) -> int:
        """N, the slide's number of low-res patches (from its attributes or ``coords``)."""
        n = self.slide_info(slide_id).n_patches
        return int(n if n is not None else self.read(slide_id, "coords").shape[0])

    def cell_px(self, slide_id: str) -> float:
        """Side of the slide's low-res patch in level-0 pixels (``patch_px · lo_downsample``).

        Falls back on the store's grid settings for slides written without them.
        """
        slide, root = self.slide_info(slide_id), self.info
        patch_px = slide.patch_px if slide.patch_px is not None else root.patch_px
        lo_ds = slide.lo_downsample
        if lo_ds is None:
            zoom = root.zoom if root.zoom is not None else 1
            lo_ds = float(root.hi_downsample or 1.0) * int(zoom)
        return float(patch_px if patch_px is not None else 1) * float(lo_ds)

    def read(self, slide_id: str, name: str) -> np.ndarray:
        """One array of a slide (``lowres``, ``highres``, ``coords``, ``cells``, ``tissue``, ``distilled``)."""
        group = self._group(slide_id)
        if name not in group:
            hint = (
                " — distilled features are written by the HAFED stage ('sasha pipeline' or 'sasha train-hafed')"
                if name == "distilled"
                else ""
            )
            raise StoreError(f"{self.path}: slide {slide_id!r} has no {name!r} array{hint}")
        return np.asarray(cast(zarr.Array, group[name])[...])  # the slide's members are arrays

    def has_array(self, slide_id: str, name: str) -> bool:
        return (self.path / "slides" / slide_id / name / "zarr.json").is_file()

    def array_attrs(self, slide_id: str, name: str) -> dict:
        return dict(self._group(slide_id)[name].attrs)

    @property
    def feature_dim(self) -> int:
        return int(self.info.backbone_dim)

    # ------------------------------------------------------------------ writing
    def _staging(self, target: str, kind: str) -> Path:
        """A fresh staging path: ``<target>~<kind>~<host>~<pid>~<random>``.

        ``target`` is ``<slide_id>`` or ``<slide_id>@<array>``; ``kind`` is ``new`` (being
        written) or ``old`` (the group or array it replaces, kept until the new one is in
        place). The host name keeps nodes sharing a store from touching each other's entries.
        """
        staging = self.path / "_staging"
        staging.mkdir(exist_ok=True)
        return staging / f"{target}~{kind}~{_HOST}~{os.getpid()}~{uuid.uuid4().hex[:8]}"

    def _swap_in(self, tmp: Path, final: Path, target: str) -> None:
        """Move ``tmp`` to ``final``; an existing ``final`` is set aside first and dropped after.

        A directory cannot replace a non-empty one in one rename, so there are two. If the
        process dies between them, the old entry waits in staging under ``old`` and
        :meth:`clean_staging` moves it back: a reader sees the old or the new, and a kill never
        loses what was there.
        """
        if final.exists():
            old = self._staging(target, "old")
            _rename(final, old)
            _rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _rename(tmp, final)

    def write_slide(self, slide_id: str, arrays: dict[str, np.ndarray], info: SlideInfo) -> None:
        """Write a whole slide group, its ``arrays`` and ``info``, atomically (replacing an
        existing one)."""
        self._check_writable()
        _check_id(slide_id)
        tmp = self._staging(slide_id, "new")
        group = zarr.open_group(str(tmp), mode="w")
        group.attrs.update(_jsonable(info.to_attrs()))
        for name, arr in arrays.items():
            _write_array(group, name, arr)
        self._swap_in(tmp, self.path / "slides" / slide_id, slide_id)

    def write_array(
        self, slide_id: str, name: str, arr: np.ndarray, attrs: dict | None = None
    ) -> None:
        """Add (or atomically replace) one array of an existing slide."""
        self._check_writable()
        _check_id(slide_id)
        _check_id(name)
        if slide_id not in self:
            raise StoreError(f"{self.path}: slide {slide_id!r} is not in the store")
        tmp = self._staging(f"{slide_id}@{name}", "new")
        z = zarr.create_array(str(tmp), data=np.ascontiguousarray(arr), chunks=_chunks(arr))
        if attrs:
            z.attrs.update(_jsonable(attrs))
        self._swap_in(tmp, self.path / "slides" / slide_id / name, f"{slide_id}@{name}")

    def clean_staging(self) -> None:
        """Finish what killed writers of this host left: restore set-aside entries whose
        replacement never arrived, remove the rest. Entries of live writers, and of other
        hosts (whose processes cannot be seen from here), are left alone."""
        staging = self.path / "_staging"
        if not staging.is_dir():
            return
        for entry in staging.iterdir():
            parts = entry.name.split("~")
            if len(parts) != 5:  # an older layout: <name>.<pid>.<random>
                old = entry.name.rsplit(".", 2)
                old_pid = int(old[1]) if len(old) == 3 and old[1].isdigit() else None
                if old_pid is None or not _pid_alive(old_pid):
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            target, kind, host, pid = parts[0], parts[1], parts[2], parts[3]
            if host != _HOST or (pid.isdigit() and _pid_alive(int(pid))):
                continue
            slide_id, _, array = target.partition("@")
            final = (
                self.path / "slides" / slide_id / array
                if array
                else self.path / "slides" / slide_id
            )
            if kind == "old" and not final.exists() and final.parent.is_dir():
                os.replace(entry, final)  # killed between the two renames: put it back
            else:
                shutil.rmtree(entry, ignore_errors=True)

    def qc_path(self, slide_id: str) -> Path:
        qc = self.path / "qc"
        qc.mkdir(exist_ok=True)
        return qc / f"{slide_id}.png"

    def _check_writable(self) -> None:
        if self.mode == "r":
            raise StoreError(f"{self.path}: store opened read-only")


def store_identity(store: FeatureStore) -> str:
    """What the store holds: its root attributes as written and each slide's id and source
    fingerprint."""
    slides = [(sid, store.slide_info(sid).fingerprint) for sid in store.slide_ids()]
    text = json.dumps([_jsonable(dict(store._root.attrs)), slides], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def link_store(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` a copy of the store ``src`` whose files are hard links to ``src``'s.

    Free in time and space, and safe: zarr chunks are never rewritten in place, and arrays
    added later (``distilled``) are new files, so writing into ``dst`` never changes ``src``.
    Copies instead where links cannot be made (another file system). ``dst`` is replaced
    atomically: a reader sees the old copy or the new one.
    """
    src, dst = Path(src), Path(dst)
    FeatureStore(src)  # a clear error when it is not a store
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.linking~{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    def work_in_progress(folder: str, names: list[str]) -> list[str]:
        return ["_staging"] if Path(folder) == src and "_staging" in names else []

    try:
        shutil.copytree(src, tmp, copy_function=os.link, ignore=work_in_progress)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=work_in_progress)
    if dst.exists():
        old = dst.parent / f".{dst.name}.old~{os.getpid()}"
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def _check_id(name: str) -> None:
    """Refuse a slide id or array name that is not a safe file name (it becomes a folder)."""
    if not is_safe_id(name):
        raise StoreError(
            f"{name!r} is not a safe slide id or array name for the store (letters, digits, "
            "'.', '_', '-'; no slashes; at most 128 characters)"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _chunks(arr: np.ndarray) -> tuple[int, ...]:
    """About 32 MiB per chunk along the patch axis."""
    row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    rows = max(1, min(arr.shape[0], (32 << 20) // row_bytes))
    return (rows, *arr.shape[1:]) if arr.ndim else ()


def _write_array(group: zarr.Group, name: str, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    group.create_array(name, data=arr, chunks=_chunks(arr))


def _jsonable(value):
    """Plain JSON types (tuples → lists, numpy scalars → Python) for zarr attributes."""
    return json.loads(
        json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    )
