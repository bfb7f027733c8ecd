"""GeoJSON for slide viewers: zooms in order, TSU updates, per-patch scores, level-0 pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sasha_env.predict import Predictor
from sasha_env.slides.manifest import read_manifest
from sasha_env.workdir import Workdir


def _check_collection(fc: dict, dims: tuple[int, int], zoomed_coords: list, n_patches: int):
    assert fc["type"] == "FeatureCollection"
    w, h = dims
    for f in fc["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        (ring,) = f["geometry"]["coordinates"]
        assert ring[0] == ring[-1] and len(ring) == 5  # a closed square
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert 0 <= min(xs) < max(xs) <= w and 0 <= min(ys) < max(ys) <= h  # inside the slide
        assert f["properties"]["objectType"] in ("annotation", "detection", "tile")
    zooms = [f for f in fc["features"] if f["properties"]["objectType"] == "annotation"]
    assert [f["properties"]["measurements"]["zoom order"] for f in zooms] == list(
        range(1, len(zoomed_coords) + 1)
    )
    # one feature per zoom, in zoom order, at the zoomed patch's level-0 corner
    assert [f["geometry"]["coordinates"][0][0] for f in zooms] == [
        [float(x), float(y)] for x, y in zoomed_coords
    ]
    assert all(f["properties"]["classification"]["name"] == "Zoomed" for f in zooms)
    tiles = [f for f in fc["features"] if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == n_patches
    attention = [t["properties"]["measurements"]["attention"] for t in tiles]
    assert sum(attention) == pytest.approx(1.0, abs=1e-4)
    return zooms


def test_predict_writes_geojson(tiny_workdir, tmp_path):
    wd = Workdir(tiny_workdir)
    record = next(r for r in read_manifest(wd.manifest).records if r.split == "test")
    predictor = Predictor(wd.root, frac=0.2)
    out = predictor.predict(record.path, geojson=tmp_path)
    path = tmp_path / f"{record.slide_id}.geojson"
    assert out["geojson"] == str(path)
    fc = json.loads(path.read_text())
    from sasha_env.slides.slide import Slide

    with Slide(record.path) as s:
        dims = s.dimensions
    zooms = _check_collection(fc, dims, out["zoomed_coords"], out["n_patches"])
    last = zooms[-1]["properties"]["measurements"]
    names = predictor.class_names
    raw = out.get("probabilities_raw", out["probabilities"])
    assert [last[f"P({c}) after zoom"] for c in names] == pytest.approx([raw[c] for c in names])
    with pytest.raises(ValueError, match="needs SASHA mode"):
        Predictor(wd.root, full=True).predict(record.path, geojson=tmp_path)


def test_evaluation_writes_geojson_for_every_test_episode(tiny_workdir):
    from sasha_env.features.store import FeatureStore

    wd = Workdir(tiny_workdir)
    store = FeatureStore(wd.store)
    episodes = json.loads((wd.root / "episodes" / "sasha-0.1.json").read_text())
    folder = wd.root / "figures" / "geojson" / "sasha-0.1"
    assert sorted(p.stem for p in folder.glob("*.geojson")) == sorted(
        e["slide_id"] for e in episodes
    )
    for e in episodes:
        fc = json.loads((folder / f"{e['slide_id']}.geojson").read_text())
        dimensions = store.slide_info(e["slide_id"]).dimensions
        coords = store.read(e["slide_id"], "coords")
        _check_collection(fc, dimensions, coords[e["zoomed"]].tolist(), len(coords))
        updated = [f["properties"]["patch"] for f in fc["features"] if f["properties"]["objectType"] == "detection"]  # fmt: skip
        assert updated == e["updated"]
        np.testing.assert_allclose(
            list(fc["properties"]["probabilities"].values()), e["probabilities"], atol=1e-5
        )


def test_zoom_paths_stay_readable_with_many_zooms():
    import matplotlib.pyplot as plt

    from sasha_env.pipeline.figures import NUMBERED_ZOOMS, _zoom_order

    fig, ax = plt.subplots()
    ax.imshow(np.zeros((100, 100, 3)))
    centres = np.random.default_rng(0).uniform(0, 100, (150, 2))
    _zoom_order(ax, centres)
    assert len(ax.texts) == NUMBERED_ZOOMS  # only the first zooms are numbered
    (dots,) = ax.collections
    assert list(dots.get_array()) == list(range(1, 151))  # the colour is the zoom order
    assert fig.axes[-1].get_ylabel() == "zoom order"  # with a colour bar
    plt.close(fig)
