"""The hafed stage's level-2 options: ``partial_states`` (level 2 also trained on partial
states) and ``row_norm`` (each state row layer-normalised)."""

from __future__ import annotations

import shutil

import pytest
import torch

from sasha_env.config import load_config
from sasha_env.pipeline.runner import Pipeline
from sasha_env.workdir import Workdir
from sasha_models.checkpoint import load_checkpoint, load_model


def _train_hafed(src, dest, overrides: dict) -> dict:
    wd = Workdir(dest)
    shutil.copytree(src, wd.root)  # a copy: the session's workdir stays as it is
    Pipeline(wd.root, preset="tiny", overrides=overrides, progress=False, log=lambda m: None).run(
        ["hafed"]
    )
    return load_checkpoint(wd.model("hafed"))


def test_the_hafed_stage_trains_on_partial_states_when_asked(tiny_workdir, tmp_path):
    default = load_checkpoint(Workdir(tiny_workdir).model("hafed"))
    assert default["config"]["partial_states"] == 0.0  # the official setting, the default
    same = _train_hafed(tiny_workdir, tmp_path / "same", {"hafed": {"partial_states": 0.0}})
    partial = _train_hafed(tiny_workdir, tmp_path / "partial", {"hafed": {"partial_states": 1.0}})
    assert partial["config"]["partial_states"] == 1.0
    # 0.0 retrains the very same model (training is deterministic), so the difference below is
    # the partial states: the low-res rows reached level 2 through the stage's data module
    for k, w in default["state_dict"].items():
        assert torch.equal(same["state_dict"][k], w), k
    assert any(
        not torch.equal(partial["state_dict"][k], w) for k, w in default["state_dict"].items()
    )


def test_the_hafed_stage_layer_normalises_level_twos_rows_when_asked(tiny_workdir, tmp_path):
    default = load_model(Workdir(tiny_workdir).model("hafed"))
    assert isinstance(default.level2.row_norm, torch.nn.Identity)  # raw rows, the official
    blob = _train_hafed(tiny_workdir, tmp_path / "norm", {"hafed": {"row_norm": True}})
    assert blob["config"]["row_norm"] is True
    model = load_model(Workdir(tmp_path / "norm").model("hafed"))
    assert isinstance(model.level2.row_norm, torch.nn.LayerNorm)
    # the gain and bias were trained (they start at 1 and 0), and the export reads back whole
    assert not torch.equal(
        model.level2.row_norm.weight, torch.ones_like(model.level2.row_norm.weight)
    )
    assert torch.equal(model.level2.row_norm.weight, blob["state_dict"]["level2.row_norm.weight"])


@pytest.mark.parametrize(
    ("preset", "row_norm"),
    [("demo", True), ("large", True), ("he-cpu", False), ("paper", False), ("tiny", False)],
)
def test_which_presets_layer_normalise_level_twos_rows(preset, row_norm):
    """The demo (and the large preset built on it) adopted the row norm on the 10-seed study;
    he-cpu keeps raw rows (its real-texture numbers were measured so), paper is the official."""
    assert (load_config(preset)["hafed"] or {}).get("row_norm", False) is row_norm
