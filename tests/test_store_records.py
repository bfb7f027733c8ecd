"""The store's attribute records write the keys, values and order stores have always had."""

from __future__ import annotations

from sasha_env.features.records import FORMAT_VERSION, SlideInfo, StoreInfo

EXTRACTED_SLIDE = {
    "label": "tumor",
    "path": "/data/s1.tiff",
    "source": {"size": 10, "mtime_ns": 5, "fingerprint": "ab"},
    "dimensions": [2048, 1024],
    "mpp": None,
    "level_downsamples": [1.0, 4.0],
    "n_patches": 12,
    "shape": [8, 16],
    "hi_downsample": 1.0,
    "lo_downsample": 4.0,
    "patch_px": 32,
    "zoom": 4,
}
IMPORTED_SLIDE = {
    "label": "normal",
    "split": None,
    "path": "/h5/lo/s2.h5",
    "source": {"fingerprint": "cd", "lowres": {}, "highres": {}},
    "dimensions": [512, 256],
    "mpp": None,
    "n_patches": 3,
    "patch_px": 256,
    "zoom": 2,
    "k": 4,
    "hi_downsample": 1.0,
    "lo_downsample": 2.0,
    "cell_px": 512.0,
    "sub_px": 256.0,
    "shape": [1, 3],
    "import": {"tool": "trident", "cells_kept": 3},
}
EXTRACTED_STORE = {
    "backbone": "efficientnet-lite0",
    "backbone_dim": 1280,
    "backbone_input_px": 224,
    "backbone_weights_sha256": "f" * 64,
    "backbone_mean": [0.5, 0.5, 0.5],
    "backbone_std": [0.5, 0.5, 0.5],
    "input_px": 64,
    "patch_px": 32,
    "zoom": 2,
    "k": 4,
    "hi_downsample": 1.0,
    "hi_mpp": None,
    "min_tissue": 0.25,
    "grid": {"hi_downsample": 1.0, "hi_mpp": None, "patch_px": 32, "zoom": 2},
    "format_version": FORMAT_VERSION,
}
IMPORTED_STORE = {
    "backbone": "imported:uni",
    "backbone_dim": 8,
    "backbone_weights_sha256": None,
    "input_px": None,
    "patch_px": 256,
    "zoom": 2,
    "k": 4,
    "hi_downsample": 1.0,
    "hi_mpp": None,
    "lowres_size_level0": 512.0,
    "highres_size_level0": 256.0,
    "imported": {"tool": "clam", "encoder": "uni"},
    "format_version": FORMAT_VERSION,
}


def _same(a: dict, b: dict) -> bool:
    """Equal with the same key order (what makes zarr.json byte-identical)."""
    return list(a.items()) == list(b.items())


def test_attributes_round_trip_key_for_key_and_in_order():
    for attrs in (EXTRACTED_SLIDE, IMPORTED_SLIDE):
        assert _same(SlideInfo.from_attrs(attrs).to_attrs(), attrs)
    for attrs in (EXTRACTED_STORE, IMPORTED_STORE):
        assert _same(StoreInfo.from_attrs(attrs).to_attrs(), attrs)


def test_reads_are_typed_and_missing_keys_read_as_none():
    info = SlideInfo.from_attrs(EXTRACTED_SLIDE)
    assert info.dimensions == (2048, 1024) and info.shape == (8, 16) and info.k == 16
    assert info.fingerprint == "ab" and info.split is None and info.import_info is None
    assert SlideInfo.from_attrs({"n_patches": 3}) == SlideInfo(n_patches=3)
    store = StoreInfo.from_attrs(IMPORTED_STORE)
    assert store.is_imported and store.k == 4 and store.grid is None
    assert not StoreInfo.from_attrs(EXTRACTED_STORE).is_imported


def test_optional_keys_are_written_only_where_set():
    attrs = StoreInfo(backbone="x", backbone_dim=4).to_attrs()
    assert "grid" not in attrs and "imported" not in attrs and attrs["hi_mpp"] is None
    slide = SlideInfo(label="a", split="train").to_attrs()
    assert slide["split"] == "train" and "k" not in slide and "import" not in slide
