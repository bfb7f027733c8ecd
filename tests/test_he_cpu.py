"""The ``he-cpu`` preset (real H&E on a CPU) end to end on the vendored scanner SVS."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import CMU_SVS
from sasha_env.config import load_config
from sasha_env.features.extract import ExtractConfig, extract_cohort
from sasha_env.features.store import FeatureStore
from sasha_env.slides.grid import GridConfig, build_grid
from sasha_env.slides.slide import Slide
from sasha_env.slides.synth import write_pyramid_tiff


def test_he_cpu_fixes_nucleus_sized_patches_at_0_5_um():
    cfg = load_config("he-cpu")
    assert cfg["grid"]["hi_mpp"] == 0.5 and cfg["grid"]["zoom"] == 4
    assert cfg["grid"]["patch_px"] == cfg["extract"]["input_px"] == 128  # no resampling
    assert cfg["extract"]["backbone"] == "efficientnet-lite0"


def test_he_cpu_extracts_the_scanner_svs_at_its_mpp(tmp_path):
    """he-cpu end to end on the vendored Aperio SVS (20x, 0.499 µm/px) and on the same region
    as a 40x pyramid: levels are chosen by mpp, and both give the same grid."""
    cfg = load_config("he-cpu")
    grid_cfg, extract_cfg = (
        GridConfig.from_dict(cfg["grid"]),
        ExtractConfig.from_dict(cfg["extract"]),
    )
    with Slide(CMU_SVS) as slide:
        region = slide.read_rect(0, 0, *slide.dimensions, 1.0)
    big = np.asarray(
        Image.fromarray(region).resize((2 * region.shape[1], 2 * region.shape[0]), Image.BICUBIC)
    )  # the region as a 40x scanner writes it, levels 1, 2, 4
    at40 = tmp_path / "cmu40x.tif"
    write_pyramid_tiff(at40, big, (1, 2, 4), mpp=0.2495, tile_px=256)
    (tmp_path / "m.csv").write_text(f"slide_id,path,label\ncmu,{CMU_SVS},a\n")
    out = tmp_path / "he.zarr"
    manifest = tmp_path / "m.csv"
    report = extract_cohort(manifest, out, grid_cfg, extract_cfg, progress=False)
    assert report.ok, report.summary()
    store = FeatureStore(out)
    info = store.slide_info("cmu")
    assert info.mpp == pytest.approx(0.499) and info.patch_px == 128 and info.zoom == 4
    assert info.hi_downsample == pytest.approx(0.5 / 0.499)
    assert info.lo_downsample == pytest.approx(4 * 0.5 / 0.499)
    n = info.n_patches
    assert n >= 5
    assert store.read("cmu", "lowres").shape == (n, 1280)
    assert store.read("cmu", "highres").shape == (n, 16, 1280)
    assert store.info.hi_mpp == 0.5 and store.info.input_px == 128
    with Slide(at40) as slide:  # 40x: high-res from level 1 (ds 2), low-res from level 2 (ds 4)
        grid, *_ = build_grid(slide, grid_cfg)
        assert grid.hi_downsample == pytest.approx(0.5 / 0.2495)
        assert slide.best_level(grid.hi_downsample) == 1
        assert slide.best_level(grid.lo_downsample) == 2
    np.testing.assert_array_equal(grid.cells, store.read("cmu", "cells"))  # the same tissue
