"""Extraction into the feature store: geometry, round trip, resume, bad input, DDP."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CMU_SVS, kill_when, tissue_image, tree_digest, write_single_level_tiff
from sasha_env.config import load_config
from sasha_env.features.backbones import build_backbone
from sasha_env.features.embed import embed_patches
from sasha_env.features.extract import ExtractConfig, extract_cohort
from sasha_env.features.store import FeatureStore, StoreError
from sasha_env.slides.grid import GridConfig
from sasha_env.slides.manifest import read_manifest
from sasha_env.slides.slide import Slide

TINY = load_config("tiny")
GRID = GridConfig.from_dict(TINY["grid"])
EXTRACT = ExtractConfig.from_dict(TINY["extract"])
SASHA = [sys.executable, "-m", "sasha_env.cli"]


def _subset_manifest(manifest: Path, out: Path, n: int) -> Path:
    rows = list(csv.DictReader(manifest.open()))[:n]
    for r in rows:
        r["path"] = str((manifest.parent / r["path"]).resolve())
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def test_store_is_self_describing_and_round_trips(tiny_store, tiny_cohort):
    store = FeatureStore(tiny_store)
    manifest = read_manifest(tiny_cohort)
    assert store.slide_ids() == sorted(r.slide_id for r in manifest.records)
    assert store.info.backbone == "efficientnet-lite0"
    assert len(store.info.backbone_weights_sha256 or "") == 64
    assert store.info.zoom == GRID.zoom and store.info.patch_px == GRID.patch_px
    sid = store.slide_ids()[0]
    info = store.slide_info(sid)
    lo, hi = store.read(sid, "lowres"), store.read(sid, "highres")
    n, d = lo.shape
    assert d == store.feature_dim == 1280 and lo.dtype == np.float32
    assert hi.shape == (n, GRID.k, d) and info.n_patches == n
    assert store.read(sid, "coords").shape == (n, 2)
    assert info.label in ("normal", "tumor") and info.mpp == pytest.approx(0.5)
    with pytest.raises(StoreError, match="distilled"):
        store.read(sid, "distilled")


def test_an_array_added_later_is_readable(tiny_store, tmp_path):
    built = tree_digest(tiny_store)
    copy = tmp_path / "features.zarr"  # a copy: the session's store stays as extracted
    shutil.copytree(tiny_store, copy)
    sid = FeatureStore(copy).slide_ids()[0]
    lo = FeatureStore(copy).read(sid, "lowres")
    FeatureStore(copy, mode="a").write_array(sid, "extra_test", lo[:, :4], {"by": "test"})
    assert np.array_equal(FeatureStore(copy).read(sid, "extra_test"), lo[:, :4])
    assert not FeatureStore(tiny_store).has_array(sid, "extra_test")
    assert tree_digest(tiny_store) == built


def test_stored_features_equal_backbone_on_patches_read_directly(tiny_store):
    store = FeatureStore(tiny_store)
    backbone = build_backbone(store.info.backbone)
    sid = store.slide_ids()[1]
    info = store.slide_info(sid)
    coords = store.read(sid, "coords")
    lo, hi = store.read(sid, "lowres"), store.read(sid, "highres")
    p, zoom = info.patch_px, info.zoom
    with Slide(info.path) as slide:
        for i in (0, len(coords) // 2, len(coords) - 1):
            x, y = (int(v) for v in coords[i])
            direct_lo = slide.read(x, y, p, info.lo_downsample)
            # sub-patch (row 1, col 0) of patch i, read on its own
            sub_x, sub_y = x, y + p * info.hi_downsample
            direct_hi = slide.read(int(sub_x), int(sub_y), p, info.hi_downsample)
            feats = embed_patches(
                backbone,
                torch.from_numpy(np.stack([direct_lo, direct_hi])),
                store.info.input_px,
            ).numpy()
            np.testing.assert_allclose(feats[0], lo[i], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(feats[1], hi[i, zoom], rtol=1e-4, atol=1e-4)


def test_real_svs_and_other_writers_extract(tmp_path):
    write_single_level_tiff(tmp_path / "single.tif", tissue_image(384, 384))
    from conftest import write_ome_pyramid

    write_ome_pyramid(tmp_path / "pyr.ome.tif", tissue_image(384, 512, seed=2))
    (tmp_path / "m.csv").write_text(
        f"slide_id,path,label\ncmu,{CMU_SVS},tumor\nsingle,single.tif,normal\npyr,pyr.ome.tif,normal\n"
    )
    cfg = GridConfig(patch_px=32, zoom=2, hi_downsample=2.0, hi_mpp=None)
    report = extract_cohort(tmp_path / "m.csv", tmp_path / "f.zarr", cfg, EXTRACT, progress=False)
    assert report.ok, report.summary()
    store = FeatureStore(tmp_path / "f.zarr")
    assert store.slide_ids() == ["cmu", "pyr", "single"]
    assert store.slide_info("cmu").n_patches > 50
    assert (tmp_path / "f.zarr" / "qc" / "cmu.png").is_file()


def test_bad_slides_are_named_and_the_rest_extracted(tmp_path, tiny_cohort):
    good = [r for r in read_manifest(tiny_cohort).records[:2]]
    truncated = tmp_path / "truncated.tiff"
    data = good[0].path.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    (tmp_path / "text.svs").write_text("not a slide at all")
    write_single_level_tiff(tmp_path / "blank.tif", np.full((256, 256, 3), 241, np.uint8))
    write_single_level_tiff(tmp_path / "small.tif", tissue_image(40, 40))
    rows = [
        ("good0", good[0].path, "tumor"),
        ("good1", good[1].path, "normal"),
        ("truncated", truncated, "tumor"),
        ("textfile", tmp_path / "text.svs", "normal"),
        ("blank", tmp_path / "blank.tif", "normal"),
        ("small", tmp_path / "small.tif", "normal"),
        ("dup", good[0].path, "tumor"),
        ("dup", good[1].path, "normal"),
        ("../escape", good[0].path, "tumor"),
        ("missing", tmp_path / "nope.tiff", "normal"),
    ]
    (tmp_path / "m.csv").write_text(
        "slide_id,path,label\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)
    )
    out = tmp_path / "f.zarr"
    proc = subprocess.run(
        [
            *SASHA,
            "extract",
            str(tmp_path / "m.csv"),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert FeatureStore(out).slide_ids() == ["good0", "good1"]
    failed = json.loads((out / "extract_report.json").read_text())["failed"]
    assert set(failed) == {"truncated", "textfile", "blank", "small", "dup", "../escape", "missing"}
    assert (
        "not a readable whole-slide image" in failed["textfile"]
        and "text.svs" in failed["textfile"]
    )
    assert "no tissue" in failed["blank"] and "smaller than one low-res patch" in failed["small"]
    assert (
        "duplicate slide_id 'dup'" in failed["dup"]
        and "not a safe file name" in failed["../escape"]
    )
    assert "not found" in failed["missing"] and "truncated.tiff" in failed["truncated"]
    for sid in failed:
        assert f"FAILED {sid}:" in proc.stdout
    assert not (tmp_path / "escape").exists()


def test_resume_after_killed_run(tmp_path, tiny_cohort):
    manifest = _subset_manifest(tiny_cohort, tmp_path / "m.csv", 6)
    out = tmp_path / "f.zarr"
    cmd = [
        *SASHA,
        "extract",
        str(manifest),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--quiet",
        "--batch-size",
        "20",
    ]
    kill_when(cmd, lambda: (out / "zarr.json").is_file() and bool(FeatureStore(out).slide_ids()))
    done_before = FeatureStore(out).slide_ids()
    assert 0 < len(done_before) < 6  # killed part-way
    for sid in done_before:  # whatever is visible is complete
        assert (
            FeatureStore(out).read(sid, "highres").shape[0]
            == FeatureStore(out).slide_info(sid).n_patches
        )
    report = extract_cohort(manifest, out, GRID, EXTRACT, progress=False)
    assert report.ok
    assert sorted(report.skipped) == done_before
    assert len(report.extracted) == 6 - len(done_before)
    assert len(FeatureStore(out).slide_ids()) == 6
    assert not any((out / "_staging").iterdir())


def test_store_with_other_settings_is_refused(tiny_store, tiny_cohort, tmp_path):
    other = GridConfig.from_dict({**TINY["grid"], "zoom": 4})
    with pytest.raises(StoreError, match="zoom"):
        extract_cohort(tiny_cohort, tiny_store, other, EXTRACT, progress=False)


def test_ddp_extraction_with_two_cpu_processes(tmp_path, tiny_cohort):
    manifest = _subset_manifest(tiny_cohort, tmp_path / "m.csv", 4)
    out = tmp_path / "f.zarr"
    proc = subprocess.run(
        [
            *SASHA,
            "extract",
            str(manifest),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--quiet",
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--num-workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(FeatureStore(out).slide_ids()) == 4
    assert "extracted 4 slide(s)" in proc.stdout


def test_prefetch_thread_keeps_order_and_raises_reader_errors():
    from sasha_env.features.extract import _prefetched

    assert list(_prefetched(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise OSError("disk gone")

    it = _prefetched(broken(), depth=2)
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)


def test_low_res_rows_equal_per_patch_reads(tiny_cohort):
    from sasha_env.slides.grid import build_grid
    from sasha_env.slides.patches import LowResRows, read_patch

    record = read_manifest(tiny_cohort).records[0]
    with Slide(record.path) as slide:
        grid, *_ = build_grid(slide, GRID)
        rows = LowResRows(slide, grid)
        for i in range(grid.n):
            np.testing.assert_array_equal(rows[i], read_patch(slide, grid, i)[0])
