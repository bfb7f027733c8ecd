"""The hafed stage's ``partial_states``: HAFED's level 2 also trained on partial states."""

from __future__ import annotations

import shutil

import torch

from sasha_env.pipeline.runner import Pipeline
from sasha_env.workdir import Workdir
from sasha_models.checkpoint import load_checkpoint


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
