"""``hafed.temperature``: a temperature fitted on val and folded into HAFED's export, so that
every later stage (the agents' reward first) reads calibrated probabilities."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from sasha_env.pipeline.calibrate import fold_hafed_temperature
from sasha_env.pipeline.runner import Pipeline
from sasha_env.pipeline.stages import file_sha256
from sasha_env.workdir import Workdir
from sasha_models.calibration import fit_calibration
from sasha_models.checkpoint import export_dict, load_checkpoint, load_model, save_export
from sasha_models.data import InMemoryBags
from sasha_models.hafed import HAFED, HAFEDConfig
from sasha_models.lit import predict_probs

D, K = 8, 4


@pytest.fixture
def exported(tmp_path):
    """A HAFED export whose val probabilities are soft (small heads), and its slides."""
    torch.manual_seed(0)
    cfg = HAFEDConfig(d_in=D, d_hidden=8, n_branches=2)
    model = HAFED(cfg)
    with torch.no_grad():  # the slide logit reads feature 0, weakly: right but unsure
        model.level2.slide_head.weight.zero_()
        model.level2.slide_head.weight[:, 0] = torch.tensor([-0.1, 0.1])
        model.level2.slide_head.bias.zero_()
    rng = np.random.default_rng(0)
    labels, highres, splits = {}, {}, {}
    for i in range(24):
        y = i % 2
        hi = rng.normal(size=(10, K, D)).astype(np.float32)
        hi[:5, :, 0] += 8.0 * y  # tumour rows differ in feature 0
        labels[f"s{i}"], highres[f"s{i}"] = y, hi
        splits[f"s{i}"] = "val" if i < 12 else "train"
    bags = InMemoryBags(labels, highres=highres, splits=splits)
    path = save_export(tmp_path / "model.pt", export_dict(model, "hafed", cfg.to_dict()))
    return path, bags


def test_val_temperature_is_the_calibration_fit_folded_into_the_heads(exported):
    path, bags = exported
    _, before, labels = predict_probs(load_model(path), bags, "val", "highres")
    expected = fit_calibration(before, labels, bias=False)
    assert expected.temperature < 0.9  # soft probabilities: a sharpening T

    messages: list[str] = []
    t = fold_hafed_temperature(path, bags, "val", log=messages.append)

    assert t == pytest.approx(expected.temperature)
    _, after, _ = predict_probs(load_model(path), bags, "val", "highres")
    logits = np.log(before) / t
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(after, shifted / shifted.sum(1, keepdims=True), atol=1e-5)
    nll_after = -np.log(after[np.arange(len(labels)), labels]).mean()
    assert nll_after == pytest.approx(expected.nll_after, abs=1e-4)  # the fit's optimum
    meta = load_checkpoint(path)["meta"]["temperature"]
    assert meta["value"] == pytest.approx(t) and meta["fitted_on"] == "val"
    assert meta["n_fit"] == 12
    assert any(f"T = {t:.3f} fitted on 12 val slides" in m for m in messages)

    digest = file_sha256(path)  # an export folded already is never folded again
    assert fold_hafed_temperature(path, bags, "val") == pytest.approx(t)
    assert file_sha256(path) == digest


def test_a_number_is_folded_as_given_and_one_leaves_the_export_alone(exported):
    path, bags = exported
    digest = file_sha256(path)
    assert fold_hafed_temperature(path, bags, 1) == 1.0
    assert file_sha256(path) == digest

    level1 = {k: v for k, v in load_checkpoint(path)["state_dict"].items() if "level1" in k}
    head = load_checkpoint(path)["state_dict"]["level2.slide_head.weight"]
    assert fold_hafed_temperature(path, bags, 0.5) == 0.5
    blob = load_checkpoint(path)
    torch.testing.assert_close(blob["state_dict"]["level2.slide_head.weight"], head / 0.5)
    for k, v in level1.items():  # the distillation, and so the TSU's targets, stay the same
        torch.testing.assert_close(blob["state_dict"][k], v)
    assert blob["meta"]["temperature"] == {"value": 0.5, "fitted_on": None}


def test_the_hafed_stage_folds_the_configured_temperature(tiny_workdir, tmp_path):
    default = Workdir(tiny_workdir)  # the tiny preset sets none: HAFED as trained
    assert "temperature" not in load_checkpoint(default.model("hafed"))["meta"]
    assert "temperature" not in default.marker("hafed").read_text()
    wd = Workdir(tmp_path / "wd")  # a copy: the session's workdir stays as it is
    shutil.copytree(tiny_workdir, wd.root)
    messages: list[str] = []
    Pipeline(
        wd.root,
        preset="tiny",
        overrides={"hafed": {"temperature": 0.5}},
        progress=False,
        log=messages.append,
    ).run(["hafed"])
    assert any("[hafed] temperature T = 0.5 (hafed.temperature)" in m for m in messages)
    assert load_checkpoint(wd.model("hafed"))["meta"]["temperature"]["value"] == 0.5
    # the stage's record names the folded export, so later stages key on it
    marker = wd.marker("hafed").read_text()
    assert file_sha256(wd.model("hafed")) in marker and '"temperature": 0.5' in marker
