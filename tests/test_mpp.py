"""Resolution by µm/px: every preset fixes the high-res level in mpp, a slide whose mpp is
unknown stops naming ``--mpp`` (or takes ``--mpp`` / a manifest's ``mpp``), a cohort mixing
scanners is read at one physical resolution, and ``sasha inspect`` reports what a file says."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import CMU_SVS, tissue_image, write_single_level_tiff
from sasha_env.config import PRESETS, load_config
from sasha_env.features.extract import ExtractConfig, extract_cohort
from sasha_env.features.records import SlideInfo, StoreInfo
from sasha_env.features.store import FeatureStore, StoreError
from sasha_env.slides.grid import GridConfig, build_grid
from sasha_env.slides.manifest import ManifestError, read_manifest, read_manifest_lenient
from sasha_env.slides.slide import Slide, SlideError

SASHA = [sys.executable, "-m", "sasha_env.cli"]
TINY = load_config("tiny")
GRID = GridConfig.from_dict(TINY["grid"])
EXTRACT = ExtractConfig.from_dict(TINY["extract"])


def _manifest(path: Path, rows: list[dict]) -> Path:
    fields = ["slide_id", "path", "label", *(k for k in ("mpp",) if any(k in r for r in rows))]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def _upscaled(image: np.ndarray, factor: int) -> np.ndarray:
    """The same tissue at ``factor`` times the pixels per µm (a finer scanner)."""
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * factor, h * factor), Image.BICUBIC))


# ---------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_fixes_the_high_res_level_in_mpp(preset):
    grid = load_config(preset)["grid"]
    assert grid["hi_mpp"] is not None and grid["hi_mpp"] > 0
    assert GridConfig.from_dict(grid).hi_mpp == grid["hi_mpp"]


def test_tiny_and_demo_grids_are_those_they_had_by_downsample(tiny_cohort, tmp_path):
    """tiny/demo now name the resolution synth writes (0.5 µm/px): their grids are unchanged."""
    from sasha_env.slides.synth import SynthConfig, synthesize_cohort

    demo = load_config("demo")
    assert TINY["grid"]["hi_mpp"] == TINY["synth"]["mpp"] == 0.5
    assert demo["grid"]["hi_mpp"] == demo["synth"]["mpp"] == 0.5
    demo_synth = replace(  # the demo's pyramid and mpp, on smaller slides (seconds)
        SynthConfig.from_dict(demo["synth"]), n_slides=2, size_px=(640, 768), split=(1.0, 0.0, 0.0)
    )
    demo_cohort = synthesize_cohort(tmp_path / "demo", demo_synth, seed=1, progress=False)
    for manifest, cfg in ((tiny_cohort, TINY), (demo_cohort, demo)):
        grid_cfg = GridConfig.from_dict(cfg["grid"])
        before = replace(grid_cfg, hi_mpp=None, hi_downsample=1.0)  # what the preset said
        for record in read_manifest(manifest).records[:2]:
            with Slide(record.path) as slide:
                now, *_ = build_grid(slide, grid_cfg)
                then, *_ = build_grid(slide, before)
            np.testing.assert_array_equal(now.coords, then.coords)
            assert (now.hi_downsample, now.lo_downsample, now.shape) == (
                then.hi_downsample,
                then.lo_downsample,
                then.shape,
            )


# ---------------------------------------------------------------------------- unknown mpp


def test_a_slide_without_usable_mpp_stops_naming_the_slide_and_mpp(tmp_path):
    img = tissue_image(256, 256)
    none = write_single_level_tiff(tmp_path / "no_mpp.tif", img, mpp=None)
    dpi = tmp_path / "dpi72.tif"  # an image tool's default: 72 dpi = 353 µm/px
    tifffile.imwrite(dpi, img, tile=(64, 64), resolution=(72, 72), resolutionunit="INCH")
    grid = GridConfig(patch_px=16, zoom=2, hi_mpp=0.5)
    for path, why in ((none, "declares none"), (dpi, "352.8 um/px is not a microscope scan")):
        with Slide(path) as slide:
            assert slide.mpp is None and why in slide.mpp_problem
            with pytest.raises(SlideError) as err:
                build_grid(slide, grid)
        message = str(err.value)
        assert str(path) in message and "--mpp" in message and "\n" not in message
    # --mpp assumes a value where the metadata has none; a manifest's mpp wins over metadata
    with Slide(none, fallback_mpp=0.25) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.25, "assumed")
        assert build_grid(slide, grid)[0].hi_downsample == pytest.approx(2.0)
    scanned = write_single_level_tiff(tmp_path / "half.tif", img, mpp=0.5)
    with Slide(scanned, fallback_mpp=0.25) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.5, "metadata")
    with Slide(scanned, mpp=0.25) as slide:
        assert (slide.mpp, slide.mpp_source, slide.metadata_mpp) == (0.25, "manifest", 0.5)
    with pytest.raises(ValueError, match="--mpp: 300 um/px is not a microscope scan"):
        Slide(none, fallback_mpp=300)
    # null hi_mpp is the explicit opt-out: read by downsample, no mpp needed
    with Slide(none) as slide:
        hi_ds = build_grid(slide, replace(grid, hi_mpp=None, hi_downsample=2.0))[0].hi_downsample
        assert hi_ds == 2.0


def test_the_manifest_mpp_column_is_checked_and_kept(tmp_path):
    img = tissue_image(64, 64)
    a = write_single_level_tiff(tmp_path / "a.tif", img)
    rows = [
        {"slide_id": "a", "path": str(a), "label": "x", "mpp": "0.25"},
        {"slide_id": "b", "path": str(a), "label": "y", "mpp": ""},
        {"slide_id": "c", "path": str(a), "label": "y", "mpp": "fast"},
        {"slide_id": "d", "path": str(a), "label": "x", "mpp": "0"},
    ]
    parsed = read_manifest_lenient(_manifest(tmp_path / "m.csv", rows))
    assert [r.mpp for r in parsed.manifest.records] == [0.25, None]
    assert "line 4: mpp of slide 'c': 'fast' is not a number" in parsed.errors["c"]
    assert "line 5: mpp of slide 'd': 0 um/px is not a microscope scan" in parsed.errors["d"]
    with pytest.raises(ManifestError, match="mpp of slide 'c'"):
        read_manifest(tmp_path / "m.csv")
    parsed.manifest.write(tmp_path / "copy.csv")  # the workdir's copy keeps the column
    assert [r.mpp for r in read_manifest(tmp_path / "copy.csv").records] == [0.25, None]


# ---------------------------------------------------------------------------- cohorts


def test_a_cohort_mixing_scanners_is_read_at_one_physical_resolution(tmp_path):
    """The same tissue scanned at 0.5 and 0.25 µm/px gives the same grid in µm and nearly the
    same features; a slide without mpp fails naming --mpp until a value is given."""
    img = tissue_image(256, 320, seed=3)
    at_half = write_single_level_tiff(tmp_path / "s20x.tif", img, mpp=0.5)
    at_quarter = write_single_level_tiff(tmp_path / "s40x.tif", _upscaled(img, 2), mpp=0.25)
    no_mpp = write_single_level_tiff(tmp_path / "nompp.tif", _upscaled(img, 2), mpp=None)
    rows = [
        {"slide_id": "s20x", "path": str(at_half), "label": "a"},
        {"slide_id": "s40x", "path": str(at_quarter), "label": "b"},
        {"slide_id": "column", "path": str(no_mpp), "label": "a", "mpp": "0.25"},
        {"slide_id": "nompp", "path": str(no_mpp), "label": "b"},
    ]
    manifest = _manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "f.zarr"
    report = extract_cohort(manifest, out, GRID, EXTRACT, progress=False)
    assert sorted(report.extracted) == ["column", "s20x", "s40x"]
    assert "nompp.tif: no usable mpp metadata" in report.failed["nompp"]
    assert "--mpp" in report.failed["nompp"]
    store = FeatureStore(out)
    info = {sid: store.slide_info(sid) for sid in store.slide_ids()}
    assert info["s20x"].hi_downsample == pytest.approx(1.0)
    assert info["s40x"].hi_downsample == pytest.approx(2.0)
    assert info["column"].hi_downsample == pytest.approx(2.0)
    assert (info["column"].mpp, info["column"].mpp_source) == (0.25, "manifest")
    assert info["s40x"].mpp_source == "metadata"
    for sid in ("s40x", "column"):  # the same cells, in µm and in number
        assert store.cell_px(sid) * info[sid].mpp == pytest.approx(
            store.cell_px("s20x") * info["s20x"].mpp
        )
        np.testing.assert_array_equal(store.read(sid, "cells"), store.read("s20x", "cells"))
        lo, ref = store.read(sid, "lowres"), store.read("s20x", "lowres")
        cos = (lo * ref).sum(1) / np.linalg.norm(lo, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > 0.9, cos  # resampling differs a little; the tissue does not

    # --mpp assumes a value for the slide without one; the others are kept
    again = extract_cohort(manifest, out, GRID, replace(EXTRACT, mpp=0.25), progress=False)
    assert again.extracted == ["nompp"] and again.ok
    assert FeatureStore(out).slide_info("nompp").mpp_source == "assumed"
    # another --mpp re-reads it (and only it) at the new resolution
    third = extract_cohort(manifest, out, GRID, replace(EXTRACT, mpp=0.5), progress=False)
    assert third.extracted == ["nompp"]
    assert FeatureStore(out).slide_info("nompp").hi_downsample == pytest.approx(1.0)


def test_a_store_made_by_downsample_at_the_same_mpp_is_adopted(tmp_path):
    """Workdirs from before tiny/demo fixed hi_mpp resume: their store's slides were read at
    0.5 µm/px, so a run asking for hi_mpp 0.5 keeps it; a store read at another mpp is refused."""
    old_grid = replace(GRID, hi_mpp=None, hi_downsample=1.0)
    old = StoreInfo(backbone="b", backbone_dim=4, patch_px=32, zoom=2, hi_downsample=1.0,
                    hi_mpp=None, grid=asdict(old_grid))  # fmt: skip
    new = replace(old, hi_mpp=0.5, grid=asdict(GRID))
    arrays = {"lowres": np.zeros((1, 4), np.float32), "highres": np.zeros((1, 4, 4), np.float32)}
    for name, mpp in (("half", 0.5), ("quarter", 0.25)):
        store = FeatureStore.create(tmp_path / f"{name}.zarr", old)
        store.write_slide("s", arrays, SlideInfo(mpp=mpp, hi_downsample=1.0, n_patches=1))
    adopted = FeatureStore.create(tmp_path / "half.zarr", new)
    assert adopted.info.hi_mpp == 0.5 and adopted.info.grid["hi_mpp"] == 0.5
    assert FeatureStore(tmp_path / "half.zarr").info.hi_mpp == 0.5  # written, not just read
    with pytest.raises(StoreError, match="hi_mpp: store has None, run asks 0.5"):
        FeatureStore.create(tmp_path / "quarter.zarr", new)
    with pytest.raises(StoreError, match="patch_px"):  # only the mpp may be named anew
        FeatureStore.create(tmp_path / "half.zarr", replace(new, patch_px=16))


# ---------------------------------------------------------------------------- inspect


def test_inspect_reports_levels_mpp_and_tissue_and_goes_on_past_bad_files(tmp_path):
    nompp = write_single_level_tiff(tmp_path / "nompp.tif", tissue_image(256, 256), mpp=None)
    (tmp_path / "text.svs").write_text("not a slide")
    cmd = [*SASHA, "inspect", str(CMU_SVS), str(tmp_path / "text.svs"), str(nompp)]
    proc = subprocess.run(
        [*cmd, "--json", "--preset", "he-cpu"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    cmu, text, none = (json.loads(line) for line in proc.stdout.splitlines())
    assert (cmu["vendor"], cmu["objective_power"], cmu["dimensions"]) == (
        "aperio",
        20,
        [2220, 2967],
    )
    assert cmu["levels"] == [
        {"level": 0, "downsample": 1.0, "width": 2220, "height": 2967, "mpp": 0.499}
    ]
    assert cmu["mpp_source"] == "metadata" and 0.2 < cmu["tissue_fraction"] < 0.6
    assert cmu["grid"]["hi_level"] == 0 and cmu["grid"]["hi_downsample"] == pytest.approx(
        1.002, abs=1e-3
    )
    assert "text.svs: not a readable whole-slide image" in text["error"]
    assert none["mpp"] is None and "declares none" in none["mpp_problem"]
    assert "--mpp" in none["grid"]["error"]
    # as text: one block per readable file, an error line for the other; --mpp fills in
    proc = subprocess.run([*cmd, "--mpp", "0.5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "aperio, 20x objective, 2220 x 2967 px" in proc.stdout
    assert "mpp: 0.5 um/px at level 0 (assumed" in proc.stdout
    assert "sasha inspect: error:" in proc.stderr and "text.svs" in proc.stderr
    ok = subprocess.run(
        [*SASHA, "inspect", str(CMU_SVS)], capture_output=True, text=True, timeout=300
    )
    assert ok.returncode == 0 and "tissue:" in ok.stdout


def test_every_verb_that_reads_slides_takes_mpp(tmp_path):
    from sasha_env.cli import build_parser
    from sasha_env.cli.run import _overrides

    parser = build_parser()
    verbs = {
        "extract": ["extract", "m.csv", "--out", "s.zarr"],
        "pipeline": ["pipeline", "--workdir", "w"],
        "study": ["study", "--manifest", "m.csv", "--workdir", "w"],
        "predict": ["predict", "--workdir", "w", "s.svs"],
        "inspect": ["inspect", "s.svs"],
    }
    for name, argv in verbs.items():
        args = parser.parse_args([*argv, "--mpp", "0.25"])
        assert args.mpp == 0.25, name
        if name in ("pipeline", "study"):  # into the config: extract.mpp, in the stage keys
            assert _overrides(args) == {"extract": {"mpp": 0.25}}
    store = tmp_path / "s.zarr"
    proc = subprocess.run(
        [*SASHA, "extract", str(tmp_path / "m.csv"), "--out", str(store), "--mpp", "300"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and not store.exists()
    assert "--mpp: 300 um/px is not a microscope scan's level-0 resolution" in proc.stderr
