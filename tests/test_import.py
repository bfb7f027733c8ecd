"""``sasha import``: TRIDENT and CLAM feature files into a store, and ``pipeline --features``.

The files are written the way those tools write them (TRIDENT's ``save_h5``: ``features`` and
``coords`` datasets, the patching attributes on ``coords``; CLAM's ``save_hdf5``: the same
datasets, no attributes), from our own tiny store, so that the import can be checked against
the store it came from.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import tree_digest
from sasha_env.cli import main
from sasha_env.features.importer import (
    FeatureImportError,
    assemble_slide,
    import_cohort,
    read_patch_file,
)
from sasha_env.features.store import FeatureStore
from sasha_env.slides.manifest import read_manifest
from sasha_env.slides.slide import Slide, SlideError


def write_trident_h5(path: Path, features, coords, patch_px: int, size_level0: int) -> None:
    """One slide as TRIDENT's ``extract_patch_features`` writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.asarray(features, np.float32))
        f["features"].attrs.update({"name": path.stem, "savetodir": str(path.parent)})
        f.create_dataset("coords", data=np.asarray(coords, np.int64))
        f["coords"].attrs.update(
            {
                "patch_size": patch_px,
                "patch_size_level0": size_level0,
                "level0_magnification": 40,
                "target_magnification": int(40 * patch_px / size_level0),
                "overlap": 0,
                "name": path.stem,
                "savetodir": str(path.parent),
            }
        )


def write_clam_h5(path: Path, features, coords) -> None:
    """One slide as CLAM's ``extract_features_fp`` writes it (``h5_files/``): no attributes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.asarray(features, np.float32))
        f.create_dataset("coords", data=np.asarray(coords, np.int32))


def sub_patch_coords(coords: np.ndarray, zoom: int, sub_px: float) -> np.ndarray:
    """``(N, 2)`` cell corners → ``(N·k, 2)`` sub-patch corners, row-major within each cell."""
    r, c = np.divmod(np.arange(zoom * zoom), zoom)
    offsets = np.stack([c, r], axis=1) * sub_px
    return (coords[:, None, :] + offsets[None]).reshape(-1, 2).round().astype(np.int64)


def export_store(store_path: Path, out: Path, rng: np.random.Generator, writer="trident"):
    """Write a store's slides as per-slide h5 files at two magnifications (high-res rows
    shuffled: the import must place them by coordinates, not by order)."""
    store = FeatureStore(store_path)
    zoom = int(store.info.zoom)
    for sid in store.slide_ids():
        cell = store.cell_px(sid)
        sub = cell / zoom
        coords = store.read(sid, "coords")
        hi = store.read(sid, "highres").reshape(-1, store.feature_dim)
        hi_xy = sub_patch_coords(coords, zoom, sub)
        order = rng.permutation(len(hi))
        if writer == "trident":
            px = int(store.info.patch_px)
            write_trident_h5(out / "lo" / f"{sid}.h5", store.read(sid, "lowres"), coords, px, cell)
            write_trident_h5(out / "hi" / f"{sid}.h5", hi[order], hi_xy[order], px, sub)
        else:
            write_clam_h5(out / "lo" / f"{sid}.h5", store.read(sid, "lowres"), coords)
            write_clam_h5(out / "hi" / f"{sid}.h5", hi[order], hi_xy[order])
    return store


def cohort_csv(manifest: Path, out: Path, with_path: bool = True) -> Path:
    rows = read_manifest(manifest).records
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "label", "split"] + (["path"] if with_path else []))
        for r in rows:
            w.writerow([r.slide_id, r.label, r.split or ""] + ([str(r.path)] if with_path else []))
    return out


@pytest.fixture(scope="module")
def trident_files(tiny_store, tmp_path_factory) -> tuple[Path, FeatureStore]:
    out = tmp_path_factory.mktemp("trident")
    store = export_store(tiny_store, out, np.random.default_rng(0))
    return out, store


def test_import_places_sub_patches_by_coordinates(trident_files, tiny_cohort, tmp_path):
    files, original = trident_files
    report = import_cohort(
        cohort_csv(tiny_cohort, tmp_path / "cohort.csv"),
        files / "lo",
        files / "hi",
        tmp_path / "imported.zarr",
        progress=False,
    )
    assert report.ok and len(report.imported) == len(original)
    store = FeatureStore(tmp_path / "imported.zarr")
    assert store.info.imported["tool"] == "trident"
    assert store.info.zoom == original.info.zoom
    for sid in original.slide_ids():
        for name in ("lowres", "highres", "coords", "cells"):
            np.testing.assert_array_equal(store.read(sid, name), original.read(sid, name), name)
        a, b = store.slide_info(sid), original.slide_info(sid)
        assert store.cell_px(sid) == original.cell_px(sid)
        assert a.shape == b.shape and a.dimensions == b.dimensions
        assert a.import_info["cells_incomplete"] == 0
    # the same files again: nothing to do
    again = import_cohort(
        tmp_path / "cohort.csv", files / "lo", files / "hi", tmp_path / "imported.zarr",
        progress=False,
    )  # fmt: skip
    assert again.imported == [] and len(again.skipped) == len(original)
    # a corrected label is taken up, though the files are the same
    rows = list(csv.reader((tmp_path / "cohort.csv").open()))
    sid, old_label = rows[1][0], rows[1][1]
    new_label = next(r[1] for r in rows[1:] if r[1] != old_label)
    rows[1][1] = new_label
    with (tmp_path / "cohort.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    fixed = import_cohort(
        tmp_path / "cohort.csv", files / "lo", files / "hi", tmp_path / "imported.zarr",
        progress=False,
    )  # fmt: skip
    assert fixed.imported == [sid] and store.slide_info(sid).label == new_label


def test_features_from_another_store_rekey_the_workdir(tiny_store, tmp_path):
    """Giving a workdir another --features store re-links it, forgets the extract stage
    (every later stage re-keys on the new store) and rebuilds the cohort from the store."""
    from sasha_env.pipeline.runner import Pipeline

    smaller = tmp_path / "smaller.zarr"
    shutil.copytree(tiny_store, smaller)
    dropped = FeatureStore(smaller).slide_ids()[0]
    shutil.rmtree(smaller / "slides" / dropped)
    wd = tmp_path / "wd"

    def prepare(store: Path) -> list[str]:
        pipe = Pipeline(wd, features=store, preset="tiny", progress=False, log=lambda m: None)
        pipe._prepare()
        return [r.slide_id for r in read_manifest(wd / "manifest.csv").records]

    assert dropped in prepare(tiny_store)
    (wd / "stages").mkdir()
    (wd / "stages" / "extract.json").write_text("{}")
    assert dropped not in prepare(smaller)
    assert not (wd / "stages" / "extract.json").exists()
    assert dropped not in FeatureStore(wd / "features.zarr").slide_ids()
    (wd / "stages" / "extract.json").write_text("{}")
    prepare(smaller)  # the same store again: nothing to redo
    assert (wd / "stages" / "extract.json").exists()


def test_features_onto_an_extracted_store_refuse_without_force(tiny_store, tmp_path):
    """A workdir whose store was extracted from its slides keeps it: --features would throw
    the extraction away and retrain every stage, so it needs --force extract."""
    from sasha_env.cli import main

    wd = tmp_path / "wd"
    shutil.copytree(tiny_store, wd / "features.zarr")  # as `sasha extract` left it
    other = tmp_path / "other.zarr"
    shutil.copytree(tiny_store, other)
    shutil.rmtree(other / "slides" / FeatureStore(other).slide_ids()[0])
    before = tree_digest(wd)
    args = ["pipeline", "--features", str(other), "--workdir", str(wd), "--preset", "tiny",
            "--stages", "extract", "--quiet"]  # fmt: skip
    assert main(args) == 2
    assert tree_digest(wd) == before  # nothing written, the extraction kept
    assert main([*args, "--force", "extract"]) in (0, 1)
    assert FeatureStore(wd / "features.zarr").slide_ids() == FeatureStore(other).slide_ids()


def test_incomplete_cells_are_left_out_and_counted(tmp_path):
    rng = np.random.default_rng(1)
    lo_xy = np.array([[0, 0], [512, 0], [0, 512], [1024, 1024]])
    hi_xy = sub_patch_coords(lo_xy, 2, 256)
    hi_feat = rng.normal(size=(len(hi_xy), 8))
    keep = np.ones(len(hi_xy), bool)
    keep[5] = False  # cell 1 loses its second sub-patch
    stray = np.array([[4096, 4096]])  # in no cell
    write_trident_h5(tmp_path / "lo.h5", rng.normal(size=(4, 8)), lo_xy, 256, 512)
    write_trident_h5(
        tmp_path / "hi.h5",
        np.concatenate([hi_feat[keep], rng.normal(size=(1, 8))]),
        np.concatenate([hi_xy[keep], stray]),
        256,
        256,
    )
    part = assemble_slide(read_patch_file(tmp_path / "lo.h5"), read_patch_file(tmp_path / "hi.h5"))
    assert part.zoom == 2
    np.testing.assert_array_equal(part.coords, lo_xy[[0, 2, 3]])
    np.testing.assert_allclose(part.highres[1], hi_feat[8:12].astype(np.float32))
    assert part.counts["cells_incomplete"] == 1
    assert part.counts["highres_outside_cells"] == 1
    assert part.counts["highres_in_dropped_cells"] == 3
    np.testing.assert_array_equal(part.cells, [[0, 0], [1, 0], [2, 2]])


def test_clam_files_need_the_patch_size_and_bad_slides_are_named(tiny_store, tiny_cohort, tmp_path):
    export_store(tiny_store, tmp_path, np.random.default_rng(2), writer="clam")
    ids = FeatureStore(tiny_store).slide_ids()
    (tmp_path / "hi" / f"{ids[0]}.h5").write_bytes(b"not hdf5")  # one broken file
    (tmp_path / "lo" / f"{ids[1]}.h5").unlink()  # one missing
    csv_path = cohort_csv(tiny_cohort, tmp_path / "cohort.csv", with_path=False)
    out = tmp_path / "clam.zarr"

    rc = main(["import", str(csv_path), "--lowres", str(tmp_path / "lo"), "--highres",
               str(tmp_path / "hi"), "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 1
    assert not (out / "zarr.json").exists()  # every slide refused: no store

    with pytest.raises(FeatureImportError, match="--lowres-px"):
        assemble_slide(
            read_patch_file(tmp_path / "lo" / f"{ids[2]}.h5"),
            read_patch_file(tmp_path / "hi" / f"{ids[2]}.h5"),
        )
    original = FeatureStore(tiny_store)
    cell = original.cell_px(ids[2])
    report = import_cohort(csv_path, tmp_path / "lo", tmp_path / "hi", out,
                           lowres_px=cell, highres_px=cell / original.info.zoom,
                           progress=False)  # fmt: skip
    assert set(report.failed) == {ids[0], ids[1]}
    assert "not a readable HDF5" in report.failed[ids[0]] and "not found" in report.failed[ids[1]]
    store = FeatureStore(out)
    assert store.info.imported["tool"] == "unknown" and len(store) == len(ids) - 2
    np.testing.assert_array_equal(store.read(ids[2], "highres"), original.read(ids[2], "highres"))
    assert store.slide_info(ids[2]).path.endswith(f"{ids[2]}.h5")  # no slide file given


def test_a_mismatched_pair_is_refused_with_the_reason(tmp_path):
    rng = np.random.default_rng(3)
    write_trident_h5(tmp_path / "lo.h5", rng.normal(size=(2, 8)), [[0, 0], [512, 0]], 256, 512)
    write_trident_h5(tmp_path / "hi.h5", rng.normal(size=(8, 8)), np.zeros((8, 2)), 256, 200)
    with pytest.raises(FeatureImportError, match="whole number"):
        assemble_slide(read_patch_file(tmp_path / "lo.h5"), read_patch_file(tmp_path / "hi.h5"))
    write_trident_h5(tmp_path / "hi.h5", rng.normal(size=(8, 4)), np.zeros((8, 2)), 256, 256)
    with pytest.raises(FeatureImportError, match="one encoder"):
        assemble_slide(read_patch_file(tmp_path / "lo.h5"), read_patch_file(tmp_path / "hi.h5"))


@pytest.mark.slow
def test_pipeline_on_imported_features_reproduces_the_original(
    trident_files, tiny_cohort, tiny_workdir, tmp_path, monkeypatch
):
    """Our tiny store, written out as TRIDENT files and imported, gives the same results."""
    files, _ = trident_files
    built = tree_digest(tiny_cohort.parent)
    csv_path = cohort_csv(tiny_workdir / "manifest.csv", tmp_path / "cohort.csv", with_path=False)
    assert main(["import", str(csv_path), "--lowres", str(files / "lo"), "--highres",
                 str(files / "hi"), "--out", str(tmp_path / "imported.zarr"), "--quiet"]) == 0  # fmt: skip
    opened: list[str] = []

    def no_pixels(self, path):  # every slide read goes through Slide: none may happen here
        opened.append(str(path))
        raise SlideError(f"{path}: no pixels in this test")

    monkeypatch.setattr(Slide, "__init__", no_pixels)
    wd = tmp_path / "wd"
    assert main(["pipeline", "--features", str(tmp_path / "imported.zarr"), "--workdir",
                 str(wd), "--preset", "tiny", "--quiet"]) == 0  # fmt: skip
    monkeypatch.undo()
    assert opened == []
    assert tree_digest(tiny_cohort.parent) == built
    ours = json.loads((tiny_workdir / "results.json").read_text())["methods"]
    theirs = json.loads((wd / "results.json").read_text())["methods"]
    assert [(m["method"], m["frac"]) for m in theirs] == [(m["method"], m["frac"]) for m in ours]
    for a, b in zip(ours, theirs, strict=True):
        for metric in ("auc", "accuracy", "f1"):
            assert a[metric] == pytest.approx(b[metric], abs=1e-6), (a["method"], metric)
    # the user's store is untouched: distillation wrote into the workdir's copy
    assert not FeatureStore(tmp_path / "imported.zarr").has_array(
        read_manifest(wd / "manifest.csv").records[0].slide_id, "distilled"
    )
    assert not list((wd / "figures").glob("paths/*.png"))  # no pixels: no zoom-path pictures
    assert list((wd / "figures" / "geojson").rglob("*.geojson"))
