"""sasha predict: the same zooms and probabilities as the cached-feature evaluation, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from conftest import write_single_level_tiff
from sasha_env.manifest import read_manifest
from sasha_env.predict import Predictor
from sasha_env.slide import Slide
from sasha_env.store import FeatureStore
from sasha_env.workdir import Workdir

SASHA = [sys.executable, "-m", "sasha_env.cli"]


def _test_slides(wd: Workdir):
    return [r for r in read_manifest(wd.manifest).records if r.split == "test"]


def test_predict_matches_cached_evaluation(tiny_workdir):
    wd = Workdir(tiny_workdir)
    store = FeatureStore(wd.store)
    episodes = {
        e["slide_id"]: e for e in json.loads((wd.root / "episodes" / "sasha-0.1.json").read_text())
    }
    predictor = Predictor(wd.root, frac=0.1)
    for record in _test_slides(wd):
        out = predictor.predict(record.path)
        ep = episodes[record.slide_id]
        coords = store.read(record.slide_id, "coords")
        assert out["zoomed_coords"] == coords[ep["zoomed"]].tolist()  # the same patches, in order
        probs = [out["probabilities"][c] for c in predictor.class_names]
        np.testing.assert_allclose(probs, ep["probabilities"], atol=1e-4)
        assert out["frac_read"] == pytest.approx(len(ep["zoomed"]) / out["n_patches"])
        assert out["n_patches"] == store.slide_attrs(record.slide_id)["n_patches"]
        assert {
            "tissue",
            "read_lowres",
            "embed_lowres",
            "read_highres",
            "embed_highres",
            "agent",
        } <= set(out["seconds"])


def test_full_mode_matches_hafed_on_stored_features(tiny_workdir):
    import torch

    from sasha_models.checkpoint import load_model

    wd = Workdir(tiny_workdir)
    hafed = load_model(wd.model("hafed"))
    store = FeatureStore(wd.store)
    predictor = Predictor(wd.root, full=True)
    record = _test_slides(wd)[0]
    out = predictor.predict(record.path)
    with torch.inference_mode():
        logits = hafed(torch.from_numpy(store.read(record.slide_id, "highres")).unsqueeze(0))[
            "slide_logits"
        ][0]
    expected = torch.softmax(logits, -1).numpy()
    np.testing.assert_allclose(
        [out["probabilities"][c] for c in predictor.class_names], expected, atol=1e-4
    )
    assert out["frac_read"] == 1.0 and out["zoomed_coords"] == []


def test_slide_at_another_mpp_is_read_at_the_cohort_resolution(tiny_workdir, tmp_path):
    wd = Workdir(tiny_workdir)
    record = _test_slides(wd)[0]
    with Slide(record.path) as s:
        img = s.read_rect(0, 0, *s.dimensions, 1.0)
    big = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)  # the same tissue scanned at 0.25 um/px
    path = write_single_level_tiff(tmp_path / "hires.tif", big, mpp=0.25)
    out = Predictor(wd.root, frac=0.1).predict(path)
    assert "differs from the cohort" in out["note"]
    assert out["n_patches"] == pytest.approx(
        FeatureStore(wd.store).slide_attrs(record.slide_id)["n_patches"], rel=0.2
    )


def test_bad_slides_get_error_records_and_the_batch_goes_on(tiny_workdir, tmp_path):
    wd = Workdir(tiny_workdir)
    good = _test_slides(wd)[0].path
    (tmp_path / "text.svs").write_text("not a slide")
    blank = write_single_level_tiff(tmp_path / "blank.tif", np.full((256, 256, 3), 241, np.uint8))
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.full((20, 20, 3), 120, np.uint8), photometric="rgb")
    cmd = [
        *SASHA,
        "predict",
        "--workdir",
        str(wd.root),
        str(tmp_path / "text.svs"),
        str(blank),
        str(small),
        str(good),
    ]
    cmd += ["--pictures", str(tmp_path / "pics")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 4
    assert "not a readable whole-slide image" in records[0]["error"]
    assert "no tissue" in records[1]["error"]
    assert "smaller than one low-res patch" in records[2]["error"]
    assert "error" not in records[3] and records[3]["label"] in ("normal", "tumor")
    assert (tmp_path / "pics" / f"{good.stem}.png").is_file()
