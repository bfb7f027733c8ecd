"""Slide reading across writers, tissue segmentation and grid geometry."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CMU_SVS, tissue_image, write_ome_pyramid, write_single_level_tiff
from sasha_env.slides.grid import GridConfig, GridError, build_grid, segment_tissue
from sasha_env.slides.slide import Slide, SlideError


def test_real_aperio_svs_opens_with_mpp():
    with Slide(CMU_SVS) as s:
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499)
        region = s.read(0, 0, 64, 4.0)  # no level at 4: downsampled on read
        assert region.shape == (64, 64, 3) and region.dtype == np.uint8


def test_single_level_tiff_reads_lower_resolutions_by_downsampling(tmp_path):
    img = tissue_image(512, 512)
    slide = Slide(write_single_level_tiff(tmp_path / "single.tif", img))
    assert slide.level_downsamples == (1.0,)
    assert slide.mpp == pytest.approx(0.5)
    low = slide.read(0, 0, 128, 4.0)
    expected = img.reshape(128, 4, 128, 4, 3).mean(axis=(1, 3))
    assert np.abs(low.astype(float) - expected).mean() < 6  # bilinear vs box average


def test_pyramid_from_another_writer_uses_its_levels(tmp_path):
    img = tissue_image(512, 768, seed=1)
    slide = Slide(write_ome_pyramid(tmp_path / "ome.ome.tif", img, downsamples=(1, 2, 4)))
    assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
    assert slide.best_level(4.0) == 2 and slide.best_level(3.0) == 1 and slide.best_level(1.0) == 0
    # Reading at downsample 2 comes from level 1 exactly (no resampling).
    np.testing.assert_array_equal(slide.read(64, 32, 32, 2.0), img[::2, ::2][16:48, 32:64])


def test_own_synthetic_pyramid_levels_match_level0(tiny_cohort):
    from sasha_env.slides.manifest import read_manifest

    record = read_manifest(tiny_cohort).records[0]
    with Slide(record.path) as s:
        assert s.mpp == pytest.approx(0.5)
        assert len(s.level_downsamples) > 1
        full = s.read(0, 0, 256, 1.0).astype(float)
        coarse = s.read(0, 0, 64, 4.0).astype(float)
        box = full.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
        # JPEG + area averaging: 2.9-4.6 grey levels on the tiny cohort's 32 slides, against
        # 10.8-18.4 for the same level read two coarse pixels off
        err = np.abs(coarse - box).mean()
        assert err < 6
        assert err < 0.5 * np.abs(coarse[2:] - box[:-2]).mean()


def test_not_a_slide_and_truncated_file_raise_clear_errors(tmp_path):
    fake = tmp_path / "fake.svs"
    fake.write_text("this is a text file")
    with pytest.raises(SlideError, match="fake.svs"):
        Slide(fake)
    with pytest.raises(SlideError, match="not found"):
        Slide(tmp_path / "absent.svs")


def test_segmentation_finds_tissue_not_glass():
    img = tissue_image(256, 256)
    mask = segment_tissue(img)
    yy, xx = np.mgrid[0:256, 0:256]
    blob = ((yy - 128) / 102.4) ** 2 + ((xx - 128) / 102.4) ** 2 < 1
    assert (mask == blob).mean() > 0.97
    assert not segment_tissue(np.full((64, 64, 3), 240, np.uint8)).any()


def test_grid_geometry_and_sub_patches(tmp_path):
    img = tissue_image(512, 640)
    slide = Slide(write_single_level_tiff(tmp_path / "s.tif", img))
    cfg = GridConfig(patch_px=16, zoom=4, hi_downsample=1.0, min_tissue=0.5)
    grid, thumb, mask, ds = build_grid(slide, cfg)
    assert grid.shape == (512 // 64, 640 // 64)
    assert grid.cell_px == 64 and grid.sub_px == 16
    assert (grid.coords % 64 == 0).all()
    assert (grid.tissue >= 0.5).all()
    np.testing.assert_array_equal(grid.coords[:, ::-1] // 64, grid.cells)
    subs = grid.sub_coords(0)
    assert subs.shape == (16, 2)
    np.testing.assert_array_equal(subs[0], grid.coords[0])
    np.testing.assert_array_equal(subs[5], grid.coords[0] + [16, 16])  # row 1, col 1
    pos = grid.grid_positions()
    assert pos.min() >= 0 and pos.max() <= 1


def test_grid_uses_mpp_when_the_slide_has_one(tmp_path):
    img = tissue_image(512, 512)
    slide = Slide(write_single_level_tiff(tmp_path / "s.tif", img, mpp=0.25))
    grid, *_ = build_grid(slide, GridConfig(patch_px=16, zoom=2, hi_mpp=0.5, hi_downsample=1.0))
    assert grid.hi_downsample == pytest.approx(2.0) and grid.lo_downsample == pytest.approx(4.0)


def test_no_tissue_and_too_small_slides_are_named(tmp_path):
    blank = Slide(
        write_single_level_tiff(tmp_path / "blank.tif", np.full((256, 256, 3), 242, np.uint8))
    )
    with pytest.raises(GridError, match="blank.tif: no tissue"):
        build_grid(blank, GridConfig(patch_px=16, zoom=2))
    small = Slide(write_single_level_tiff(tmp_path / "small.tif", tissue_image(40, 40)))
    with pytest.raises(GridError, match="small.tif.*smaller than one low-res patch"):
        build_grid(small, GridConfig(patch_px=32, zoom=4))
