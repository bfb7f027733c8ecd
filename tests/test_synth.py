"""The synthetic cohort: determinism, file formats, manifest, masks, resumability and the
low-resolution tumour/mimic look-alike property."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tiffslide
from PIL import Image
from scipy import ndimage as ndi

from sasha_env.slides.synth import (
    MASK_DOWNSAMPLE,
    SynthConfig,
    block_mean,
    plan_cohort,
    render_layers,
    render_slide,
    synthesize_cohort,
    write_pyramid_tiff,
)

CFG = SynthConfig(
    n_slides=4,
    positive_fraction=0.5,
    size_px=(512, 512),
    downsamples=(1, 2, 4),
    tile_px=128,
    n_foci=(1, 2),
    focus_radius_px=(30, 40),
    n_mimics=(1, 2),
    mimic_radius_px=(30, 40),
)
LOW_RES_TOLERANCE = 5.0  # max per-channel gap of mean RGB at downsample 4, tumour vs mimic


def slide_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def read_level0(path: Path) -> np.ndarray:
    with tiffslide.TiffSlide(path) as slide:
        return slide.read_region((0, 0), 0, slide.dimensions, as_array=True)


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A 4-slide cohort from seed 0; returns its manifest."""
    return synthesize_cohort(tmp_path_factory.mktemp("cohort"), CFG, seed=0, progress=False)


def test_render_is_deterministic_and_shaped():
    image, mask = render_slide(CFG, 1, slide_rng(0, 1))
    again, mask_again = render_slide(CFG, 1, slide_rng(0, 1))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert mask.dtype == bool and mask.shape == image.shape[:2]
    assert np.array_equal(image, again) and np.array_equal(mask, mask_again)
    assert mask.shape == (512, 512)
    assert (image[:8, :8] > 225).all(), "the slide corner is glass"


def test_same_seed_same_cohort_other_seed_differs(cohort, tmp_path):
    again = synthesize_cohort(tmp_path / "again", CFG, seed=0, progress=False)
    other = synthesize_cohort(tmp_path / "other", CFG, seed=1, progress=False)
    assert again.read_bytes() == cohort.read_bytes()
    for row in read_manifest(cohort):
        a, b = read_level0(cohort.parent / row["path"]), read_level0(again.parent / row["path"])
        assert np.array_equal(a, b), row["slide_id"]
        mask = Path("masks") / f"{row['slide_id']}.png"
        assert (cohort.parent / mask).read_bytes() == (again.parent / mask).read_bytes()
    first = read_level0(other.parent / "slides/syn_000.tiff")
    reference = read_level0(cohort.parent / "slides/syn_000.tiff")
    assert first.shape != reference.shape or not np.array_equal(first, reference)


def test_tiffslide_reads_the_pyramid(cohort):
    path = cohort.parent / "slides" / "syn_000.tiff"
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_downsamples == pytest.approx(CFG.downsamples)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(CFG.mpp)
        assert float(slide.properties["tiffslide.mpp-y"]) == pytest.approx(CFG.mpp)
        for level, (w, h) in enumerate(slide.level_dimensions):
            region = slide.read_region((0, 0), level, (min(w, 100), min(h, 80)), as_array=True)
            assert region.shape == (min(h, 80), min(w, 100), 3)
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert len(levels) == len(CFG.downsamples)
        for page in (level.pages[0] for level in levels):
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.is_tiled and (page.tilewidth, page.tilelength) == (128, 128)


def test_pyramid_of_odd_size_ceil_divides_levels(tmp_path):
    yy, xx = np.mgrid[0:301, 0:250]
    image = np.stack([xx * 255 / 249, yy * 255 / 300, 128 + 60 * np.sin(xx / 9)], -1).astype(
        np.uint8
    )
    path = tmp_path / "odd.tiff"
    write_pyramid_tiff(path, image, (1, 4, 16), mpp=0.25, tile_px=64)
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_dimensions == ((250, 301), (63, 76), (16, 19))
        assert slide.level_downsamples == pytest.approx((1, 4, 16), rel=0.03)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
        low = slide.read_region((0, 0), 1, (63, 76), as_array=True).astype(float)
    assert np.abs(low - block_mean(image, 4)).mean() < 3  # area average, through JPEG
    assert [p.name for p in tmp_path.iterdir()] == ["odd.tiff"], "no temp file left behind"


def test_level_spacing_tifffile_cannot_group_is_rejected(tmp_path):
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="pyramid"):
        write_pyramid_tiff(tmp_path / "x.tiff", image, (1, 2, 8), mpp=0.5, tile_px=16)
    with pytest.raises(ValueError, match="downsamples"):
        SynthConfig(downsamples=(1, 2, 8))
    assert not list(tmp_path.iterdir())


def test_manifest(cohort):
    with cohort.open(newline="") as f:
        assert f.readline().rstrip("\r\n") == "slide_id,path,label,split,mask"
    rows = read_manifest(cohort)
    assert [r["slide_id"] for r in rows] == [f"syn_{i:03d}" for i in range(4)]
    for r in rows:
        assert not Path(r["path"]).is_absolute()
        assert (cohort.parent / r["path"]).is_file()
    assert Counter(r["label"] for r in rows) == {"normal": 2, "tumor": 2}
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert {r["label"] for r in rows if r["split"] == "train"} == {"normal", "tumor"}
    record = json.loads((cohort.parent / "cohort.json").read_text())
    assert record["seed"] == 0 and record["config"]["size_px"] == [512, 512]
    assert set(record["slides"]) == {r["slide_id"] for r in rows}


def test_plan_is_stratified_and_seeded():
    cfg = SynthConfig(n_slides=40, positive_fraction=0.3, split=(0.5, 0.2, 0.3))
    plan = plan_cohort(cfg, seed=3)
    assert plan == plan_cohort(cfg, seed=3)
    assert [p.label for p in plan] != [p.label for p in plan_cohort(cfg, seed=4)]
    counts = Counter((p.label, p.split) for p in plan)
    n_label = Counter(p.label for p in plan)
    assert n_label == {"tumor": 12, "normal": 28}
    for label, n in n_label.items():
        for split, share in zip(("train", "val", "test"), cfg.split, strict=True):
            assert abs(counts[label, split] - n * share) <= 1, (label, split, counts)


def test_masks(cohort):
    record = json.loads((cohort.parent / "cohort.json").read_text())
    for row in read_manifest(cohort):
        sid = row["slide_id"]
        mask = np.asarray(Image.open(cohort.parent / "masks" / f"{sid}.png"))
        with tiffslide.TiffSlide(cohort.parent / row["path"]) as slide:
            w, h = slide.dimensions
        assert mask.shape == (-(-h // MASK_DOWNSAMPLE), -(-w // MASK_DOWNSAMPLE))
        assert set(np.unique(mask)) <= {0, 255}
        stats = record["slides"][sid]
        if row["label"] == "normal":
            assert not mask.any() and stats["n_foci"] == 0 and stats["tumour_share"] == 0
        else:
            assert mask.any() and stats["n_foci"] >= 1
            assert 0 < stats["tumour_share"] < 0.15


def test_tumour_looks_like_a_mimic_at_low_res_but_not_at_full_res(cohort):
    """At downsample 4 tumour foci and lymphoid aggregates have about the same mean colour;
    at level 0 the dark nuclear blobs of tumour are several times larger."""
    low = {"tumour": [], "mimic": []}
    blob_area = {"tumour": [], "mimic": []}
    for index, row in enumerate(read_manifest(cohort)):
        if row["label"] != "tumor":
            continue
        layers = render_layers(CFG, 1, slide_rng(0, index))
        image = read_level0(cohort.parent / row["path"])  # as written: through JPEG
        low_image = block_mean(image, 4)
        grey = image.astype(np.float32).mean(axis=2)
        for name, region in (("tumour", layers.tumour), ("mimic", layers.mimic)):
            low[name].append(low_image[block_mean(region, 4) >= 0.5])
            core = ndi.binary_erosion(region, iterations=6)
            dark = ndi.binary_opening((grey < np.median(grey[core])) & core)
            labels, n = ndi.label(dark)
            blob_area[name].append(np.bincount(labels.ravel())[1:])
    gap = np.concatenate(low["tumour"]).mean(0) - np.concatenate(low["mimic"]).mean(0)
    assert np.abs(gap).max() < LOW_RES_TOLERANCE, gap
    tumour_area = np.concatenate(blob_area["tumour"]).mean()
    mimic_area = np.concatenate(blob_area["mimic"]).mean()
    assert tumour_area > 1.5 * mimic_area, (tumour_area, mimic_area)


def test_resume_skips_done_slides_and_ignores_temp_files(tmp_path):
    manifest = synthesize_cohort(tmp_path, CFG, seed=5, progress=False)
    slides = sorted((tmp_path / "slides").glob("*.tiff"))
    before = {p.name: p.stat().st_mtime_ns for p in slides}
    pixels = read_level0(tmp_path / "slides" / "syn_001.tiff")

    # A run killed while writing syn_001 leaves only a temp file behind.
    (tmp_path / "slides" / "syn_001.tiff").unlink()
    leftover = tmp_path / "slides" / ".syn_001.tiff.999.dead.tmp"
    leftover.write_bytes(b"half a slide")

    assert synthesize_cohort(tmp_path, CFG, seed=5, progress=False) == manifest
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "slides").glob("*.tiff")}
    assert set(after) == set(before)
    for name in before:
        if name != "syn_001.tiff":
            assert after[name] == before[name], f"{name} was rewritten"
    assert np.array_equal(read_level0(tmp_path / "slides" / "syn_001.tiff"), pixels)
    assert not leftover.exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_resume_refuses_another_config(tmp_path):
    synthesize_cohort(tmp_path, SynthConfig(n_slides=1, size_px=(256, 256)), progress=False)
    with pytest.raises(ValueError, match="another folder"):
        synthesize_cohort(tmp_path, SynthConfig(n_slides=1, size_px=(256, 300)), progress=False)


def test_a_cohort_written_before_a_config_field_existed_still_resumes(tmp_path):
    """``cohort.json`` of an older version lacks later fields (``mosaic``...): their defaults
    are what it was made with, so a re-run resumes instead of refusing the folder."""
    cfg = SynthConfig(n_slides=1, size_px=(256, 256))
    synthesize_cohort(tmp_path, cfg, progress=False)
    record = json.loads((tmp_path / "cohort.json").read_text())
    for key in ("mosaic", "distinct_sections"):
        del record["config"][key]
    (tmp_path / "cohort.json").write_text(json.dumps(record))
    synthesize_cohort(tmp_path, cfg, progress=False)  # no error
    with pytest.raises(ValueError, match="another folder"):  # a real difference still counts
        synthesize_cohort(tmp_path, replace(cfg, mosaic=(2, 2)), progress=False)


def test_from_dict():
    cfg = SynthConfig.from_dict({"n_slides": 3, "size_px": [256, 320], "split": [0.6, 0.2, 0.2]})
    assert cfg.size_px == (256, 320) and cfg.split == (0.6, 0.2, 0.2) and cfg.n_slides == 3
    with pytest.raises(ValueError, match="n_slide") as err:
        SynthConfig.from_dict({"n_slide": 3})
    assert "n_slides" in str(err.value), "the message lists the valid keys"
    with pytest.raises(ValueError, match="downsamples"):
        SynthConfig(downsamples=(1, 3))
    with pytest.raises(ValueError, match="n_foci"):
        SynthConfig(n_foci=(0, 2))


def test_tumour_masks_map_onto_patches(tmp_path):
    """The manifest's mask column locates tumour on the patch grid (used for hit rates)."""
    from sasha_env.slides.grid import GridConfig, build_grid
    from sasha_env.slides.manifest import read_manifest
    from sasha_env.slides.slide import Slide
    from sasha_env.slides.tumour import hit_rate, patch_tumour_fraction

    cfg = SynthConfig(n_slides=2, size_px=(512, 512), split=(1.0, 0.0, 0.0), positive_fraction=0.5)
    manifest = read_manifest(synthesize_cohort(tmp_path, cfg, seed=3, progress=False))
    for record in manifest.records:
        with Slide(record.path) as slide:
            grid, *_ = build_grid(slide, GridConfig(patch_px=16, zoom=2, min_tissue=0.1))
            frac = patch_tumour_fraction(record.mask, slide.dimensions, grid.coords, grid.cell_px)
        assert frac.shape == (grid.n,) and frac.min() >= 0 and frac.max() <= 1
        if record.label == "tumor":
            assert (frac > 0).any() and (frac > 0).mean() < 0.5
            tumour = frac > 0
            on = np.flatnonzero(tumour)[:2]
            assert hit_rate([on], [tumour]) == (1.0, pytest.approx(tumour.mean()))
        else:
            assert not (frac > 0).any()


def test_found_rate_counts_slides_with_a_zoom_on_tumour_and_its_chance():
    from itertools import combinations

    from sasha_env.slides.tumour import found_rate

    a = np.array([1, 1, 0, 0, 0, 0], bool)  # N = 6, T = 2
    b = np.array([0, 0, 0, 1], bool)  # N = 4, T = 1
    found, chance = found_rate([np.array([0, 5]), np.array([0, 1])], [a, b])
    assert found == 0.5  # the first slide's zooms reach tumour, the second's do not
    # chance by enumeration: every k-subset equally likely
    exact = [np.mean([t[list(c)].any() for c in combinations(range(len(t)), 2)]) for t in (a, b)]
    assert chance == pytest.approx(np.mean(exact))  # (1 - 6/15 + 1 - 3/6) / 2
    assert found_rate([np.arange(5)], [a]) == (1.0, 1.0)  # more zooms than normal patches
    assert all(np.isnan(found_rate([], [])))


def test_area_read_weighs_each_zoom_by_the_tumour_it_read():
    """A zoom on a focus's rim counts as found but reads little of it; the core reads most."""
    from sasha_env.slides.tumour import area_read, found_rate

    # one focus: a core patch (fully tumour) and four rim patches (5-10 %), N = 10
    f = np.array([0.0, 0.05, 0.1, 1.0, 0.05, 0.1, 0.0, 0.0, 0.0, 0.0])
    rim, core = np.array([1, 2, 8]), np.array([3, 9])
    assert found_rate([rim], [f > 0])[0] == found_rate([core], [f > 0])[0] == 1.0
    read_rim, chance = area_read([rim], [f])
    assert read_rim == pytest.approx(0.15 / 1.3) and chance == pytest.approx(3 / 10)
    read_core, chance = area_read([core], [f])
    assert read_core == pytest.approx(1.0 / 1.3) and chance == pytest.approx(2 / 10)
    # slides without tumour area are skipped; repeated indices count once
    normal = np.zeros(4)
    assert area_read([core, np.array([0])], [f, normal]) == (read_core, pytest.approx(0.2))
    assert area_read([np.array([3, 3])], [f])[0] == pytest.approx(1.0 / 1.3)
    assert all(np.isnan(area_read([np.array([0])], [normal])))
    # chance: the mean share a uniform random choice of k patches reads is k / N
    rng = np.random.default_rng(0)
    draws = [area_read([rng.choice(10, 3, replace=False)], [f])[0] for _ in range(4000)]
    assert np.mean(draws) == pytest.approx(0.3, abs=0.01)


def test_a_mosaic_slide_reuses_its_sections_and_keeps_tumour_in_one():
    """``--preset large``'s construction, small: the sections are symmetries of
    ``distinct_sections`` rendered ones, and a positive slide's tumour is in one place."""
    from sasha_env.slides.synth import render_mosaic

    cfg = SynthConfig(
        size_px=(256, 256), mosaic=(2, 3), distinct_sections=2, downsamples=(1, 2, 4),
        focus_radius_px=(20, 30), n_mimics=(1, 1), mimic_radius_px=(20, 30),
    )  # fmt: skip
    side = 256

    def blocks(a):
        return [
            a[r * side : (r + 1) * side, c * side : (c + 1) * side]
            for r in range(2)
            for c in range(3)
        ]

    def canonical(block):  # the same for all 8 symmetries of a block
        return min(
            np.rot90(block, k % 4, axes=(0, 1))[:, :: (-1 if k >= 4 else 1)].tobytes()
            for k in range(8)
        )

    positive = render_mosaic(cfg, 1, np.random.default_rng(0))
    assert positive.image.shape == (2 * side, 3 * side, 3)
    kinds = [canonical(b) for b in blocks(positive.image)]
    assert len(set(kinds)) == 2  # two rendered sections fill six places
    with_tumour = [b.any() for b in blocks(positive.tumour)]
    assert sum(with_tumour) == 1 and positive.n_foci >= 1
    assert kinds.count(kinds[with_tumour.index(True)]) == 1  # the tumour section is placed once
    negative = render_mosaic(cfg, 0, np.random.default_rng(1))
    assert not negative.tumour.any() and negative.tissue.any()
    assert len({canonical(b) for b in blocks(negative.image)}) <= 2


def test_large_preset_reaches_camelyon_size_on_the_demo_grid():
    """The large preset's slides are 12 x 12 sections: >= 8,000 tissue patches needs about 56
    per 1,536-px section, which demo-model sections exceed (checked on one rendered section)."""
    from sasha_env.config import load_config
    from sasha_env.slides.grid import GridConfig
    from sasha_env.slides.synth import block_mean, render_layers

    cfg = load_config("large")
    synth, grid = SynthConfig.from_dict(cfg["synth"]), GridConfig.from_dict(cfg["grid"])
    assert grid == GridConfig.from_dict(load_config("demo")["grid"])  # the demo's resolution
    rows, cols = synth.mosaic
    cell = grid.patch_px * grid.zoom * grid.hi_downsample
    section = replace(synth, mosaic=(1, 1), size_px=(synth.size_px[0],) * 2)
    tissue = render_layers(section, 0, np.random.default_rng(0)).tissue
    per_cell = block_mean(tissue, int(cell))
    patches = int((per_cell >= grid.min_tissue).sum())
    assert patches * rows * cols >= 8000, patches
