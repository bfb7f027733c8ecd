"""experiments/hafed_sharpness.py: HAFED's probabilities on the low-res and all-read states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_experiment
from sasha_env.features.store import FeatureStore
from sasha_env.slides.manifest import read_manifest
from sasha_env.testing import make_workdir
from sasha_env.workdir import Workdir
from sasha_models.checkpoint import load_model


@pytest.fixture(scope="module")
def script():
    return load_experiment("hafed_sharpness")


def test_probabilities_are_hafeds_on_each_state_averaged_by_class(script, tmp_path):
    root = tmp_path / "wd"
    make_workdir(root, n_slides=8, n_patches=(10, 20), fracs=(0.1,), agents=False, tau=0.8)
    out = script.sharpness(root, "test")

    wd = Workdir(root)
    hafed, store = load_model(wd.model("hafed")), FeatureStore(wd.store)
    test = [r for r in read_manifest(wd.manifest).records if r.split == "test"]
    expected: dict[str, list[list[float]]] = {"lowres": [[], []], "highres": [[], []]}
    with torch.inference_mode():
        for r in test:
            z = torch.from_numpy(store.read(r.slide_id, "lowres")).float()
            v = hafed.distill(torch.from_numpy(store.read(r.slide_id, "highres")).float())
            y = int(r.label == "tumor")
            for name, state in (("lowres", z), ("highres", v)):
                p = torch.softmax(hafed.classify(state), -1)[..., -1]
                expected[name][y].append(float(p))
    for name in ("lowres", "highres"):
        neg, pos, n_neg, n_pos = out[name]
        assert (n_neg, n_pos) == (len(expected[name][0]), len(expected[name][1]))
        assert n_neg + n_pos == len(test) > 0
        assert neg == pytest.approx(np.mean(expected[name][0]))
        assert pos == pytest.approx(np.mean(expected[name][1]))
    assert out["rule"] == "first"  # an export without select_ties: the official rule
