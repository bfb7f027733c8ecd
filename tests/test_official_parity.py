"""Parity with the official SASHA code at 6385fe6, and the options that make ``paper`` match it.

``experiments/official_parity.py`` runs the official code (an untouched checkout, never
vendored) beside ours; its numbers are recorded once as fixtures under
``tests/data/official_parity`` (numbers only). Here every ``experiments/parity_*.py`` check runs
against those fixtures, and the options behind the env/TSU checks are unit-tested: the frozen
state once every patch is covered, one TSU per budget, the anchor in its own target, and the
official TSU validation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sasha_env.config import load_config
from sasha_env.envs.wsi import SashaWSIEnv
from sasha_env.features.bags import StoreBags
from sasha_env.features.store import FeatureStore
from sasha_env.pipeline.schema import ConfigError, validate_config
from sasha_env.pipeline.stages import REGISTRY, StageContext, tsu_configs
from sasha_env.slides.manifest import read_manifest
from sasha_env.testing import (
    CLASS_NAMES,
    SlideSpec,
    export_model,
    lattice_cells,
    random_models,
    write_workdir,
)
from sasha_env.workdir import Workdir
from sasha_models.checkpoint import load_model
from sasha_models.data import TSUPairDataModule
from sasha_models.lit import TSUModule
from sasha_models.toy import tsu_problem
from sasha_models.tsu import TSUConfig, sample_tsu_pairs

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FIXTURES = Path(__file__).resolve().parent / "data" / "official_parity"


# ------------------------------------------------------------------ the differential check
def test_every_parity_check_passes_against_the_official_fixtures():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        from official_parity import run_checks

        checks = run_checks(None, FIXTURES, write=False)
    finally:
        sys.path.remove(str(EXPERIMENTS))
    counted = [c for c in checks if c.counted]
    failed = [c.line() for c in counted if not c.ok]
    assert not failed, "\n".join(failed)
    names = {c.name for c in counted}
    assert len(counted) >= 10
    for prefix in (
        "env.episode.",
        "env.budget",
        "tsu.forward",
        "tsu.train_step",
        "hafed.",
        "preset.",
    ):
        assert any(n.startswith(prefix) for n in names), prefix
    # the informational lines show that our defaults do differ where they say so
    info = {c.name: c for c in checks if not c.counted}
    assert info["tsu.train_step.ours_default"].max_abs_diff > 1e-3
    assert all(c.max_abs_diff > 1e-3 for n, c in info.items() if n.startswith("env.episode."))


def test_run_official_refuses_a_directory_that_is_not_6385fe6(tmp_path):
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        from parity_common import run_official

        with pytest.raises(SystemExit, match="envs/WSI_cosine_env.py is missing"):
            run_official(tmp_path, "outputs['x'] = 1", {})
        (tmp_path / "envs").mkdir()
        (tmp_path / "envs" / "WSI_cosine_env.py").write_text("# edited\n")
        with pytest.raises(SystemExit, match="differs from its contents at 6385fe6"):
            run_official(tmp_path, "outputs['x'] = 1", {})
    finally:
        sys.path.remove(str(EXPERIMENTS))


# ------------------------------------------------------------------ freeze once all covered
D = 8


def _one_group_workdir(root: Path, freeze: bool) -> Path:
    """One slide of 10 collinear rows (one zoom covers them all) and one of 10 random rows."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(D)
    z = np.array([s * base for s in np.linspace(0.5, 2, 10)], np.float32)
    v = rng.standard_normal((10, D)).astype(np.float32)
    hafed, tsu = random_models(D, tau=0.9)
    tsu.cfg.freeze_covered = freeze
    other = rng.standard_normal((10, D)).astype(np.float32)
    slides = [
        SlideSpec("one", "tumor", "train", z, v, lattice_cells(10)),
        SlideSpec("two", "normal", "train", other, v, lattice_cells(10)),
    ]
    return write_workdir(root, slides, hafed, tsu, tiffs=False)


@pytest.mark.parametrize("freeze", [True, False])
def test_state_freezes_once_every_patch_is_covered_only_with_the_option(tmp_path, freeze):
    root = _one_group_workdir(tmp_path, freeze)
    env = SashaWSIEnv(root, split=None, frac=0.5)  # 5 steps; freeze_covered from the TSU
    assert env.freeze_covered is freeze
    obs, _ = env.reset(options={"slide_id": "one"})
    assert env.zooms_into(0)
    obs, r1, term, _, info = env.step(0)  # covers all 10 rows (the TSU updates 9)
    assert not info["frozen"] and len(env.updated) == 9
    S1 = obs["features"].copy()
    assert not env.zooms_into(0)  # zoomed: illegal
    assert env.zooms_into(4) is not freeze  # a frozen step reads no v (sasha predict: no pixels)
    obs, r2, term, _, info = env.step(4)
    assert info["frozen"] is freeze
    if freeze:  # the action is spent and marked, nothing else changes; reward of the same state
        np.testing.assert_array_equal(obs["features"], S1)
        assert r2 == pytest.approx(r1) and env.zoomed == [0] and obs["visited"][4] == 1
        assert not env.action_masks()[4] and 4 in env.updated
        assert env.changed_rows.tolist() == [4]
    else:  # the zoom goes on: row 4 now holds v_4
        assert env.zoomed == [0, 4] and not np.array_equal(obs["features"], S1)
    for a in (5, 6, 7):
        obs, _, term, _, info = env.step(a)
        assert info["frozen"] is freeze
    assert term and info["zoomed"] == ([0] if freeze else [0, 4, 5, 6, 7])
    assert info["frac_read"] == pytest.approx(0.1 if freeze else 0.5)


def test_freeze_argument_overrides_the_tsu_setting(tmp_path):
    root = _one_group_workdir(tmp_path, freeze=False)
    env = SashaWSIEnv(root, split=None, frac=0.5, freeze_covered=True)
    env.reset(options={"slide_id": "one"})
    env.step(0)
    assert env.step(1)[4]["frozen"]


# ------------------------------------------------------------------ one TSU per budget
def _budget_workdir(root: Path) -> Workdir:
    rng = np.random.default_rng(1)
    slides = [
        SlideSpec(
            f"s{i}",
            CLASS_NAMES[i % 2],
            ("train", "train", "train", "train", "val", "val", "test", "test")[i],
            rng.standard_normal((12, D)).astype(np.float32),
            rng.standard_normal((12, D)).astype(np.float32),
            lattice_cells(12),
        )
        for i in range(8)
    ]
    hafed, tsu = random_models(D, tau=0.9)
    write_workdir(root, slides, hafed, tsu, tiffs=False)
    return Workdir(root)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_env_loads_the_tsu_of_its_budget(tmp_path):
    wd = _budget_workdir(tmp_path)
    shared = load_model(wd.model("tsu"))
    assert _same_weights(SashaWSIEnv(wd.root, split=None, frac=0.1).tsu, shared)
    tsus = {}
    for i, f in enumerate((0.1, 0.2)):
        tsus[f] = random_models(D, tau=0.9, seed=10 + i)[1]
        export_model(tsus[f], "tsu", wd.tsu_dir(f) / "model.pt")
    wd.model("tsu").unlink()
    for f, expect in ((0.1, 0.1), (0.2, 0.2), (0.05, 0.1), (0.3, 0.2), (0.15, 0.2)):
        env = SashaWSIEnv(wd.root, split=None, frac=f)
        assert _same_weights(env.tsu, tsus[expect]), (f, expect)
    with pytest.raises(FileNotFoundError, match="one TSU per zoom budget"):
        wd.tsu_model(None)


class _Run:
    """The parts of a pipeline run the tsu stage uses."""

    def __init__(self, wd: Workdir, section: dict, log=lambda msg: None) -> None:
        self.wd, self._section, self.seed = wd, section, 0
        self.log = log

    def key(self, stage, drop=()):
        return json.dumps({k: v for k, v in self._section.items() if k not in drop}, default=str)

    def section(self, stage):
        return dict(self._section)

    def bags(self):
        return StoreBags(FeatureStore(self.wd.store), read_manifest(self.wd.manifest))

    def train_kwargs(self):
        return {"seed": 0, "progress": False, "cpu_threads": 1}


def test_tsu_stage_trains_one_tsu_per_budget_and_removes_the_other_layout(tmp_path):
    wd = _budget_workdir(tmp_path / "wd")
    stage = REGISTRY["tsu"]
    ctx = StageContext(stage, "k", tmp_path / "units")
    section = {
        "anchor_in_target": True,
        "budgets": {0.1: {"max_epochs": 1}, 0.2: {"max_epochs": 2}},
    }
    out = stage.run(_Run(wd, section), ctx)
    assert sorted(out["models"]) == ["0.1", "0.2"] and not wd.model("tsu").exists()
    for f, epochs in ((0.1, 1), (0.2, 2)):
        tsu = SashaWSIEnv(wd.root, split=None, frac=f).tsu
        assert tsu.cfg.max_epochs == epochs and tsu.cfg.anchor_in_target
    # each budget's TSU is a unit: a run killed in the f = 0.2 fit keeps the f = 0.1 TSU
    first = load_model(wd.model("tsu-f0.2"))
    wd.model("tsu-f0.2").unlink()
    messages: list[str] = []
    again = stage.run(_Run(wd, section, messages.append), ctx)
    assert messages == ["[tsu] f=0.1: trained earlier, kept", "[tsu] f=0.2: 2 epochs"]
    assert again["models"]["0.1"] == out["models"]["0.1"]
    assert _same_weights(load_model(wd.model("tsu-f0.2")), first)  # the same seed, the same TSU
    # a budget added, one changed: the others are kept; a dropped budget's folder goes, even
    # one a kill left without its model
    (wd.tsu_dir(0.5) / "checkpoints").mkdir(parents=True)
    (wd.tsu_dir(0.5) / "checkpoints" / "resume.ckpt").write_bytes(b"a killed fit's")
    messages.clear()
    more = {
        **section,
        "budgets": {0.1: {"max_epochs": 1}, 0.2: {"max_epochs": 3}, 0.3: {"max_epochs": 1}},
    }
    stage.run(_Run(wd, more, messages.append), ctx)
    assert messages[0] == "[tsu] f=0.1: trained earlier, kept"
    assert messages[1:] == ["[tsu] f=0.2: 3 epochs", "[tsu] f=0.3: 1 epochs"]
    assert sorted(wd.budget_tsu_dirs()) == [0.1, 0.2, 0.3]
    out = stage.run(_Run(wd, {"max_epochs": 1}), ctx)  # back to one shared TSU
    assert wd.budget_tsus() == {} and Path(out["model"]) == wd.model("tsu")
    assert SashaWSIEnv(wd.root, split=None, frac=0.2).tsu.cfg.max_epochs == 1


def test_paper_preset_resolves_one_tsu_per_budget_with_the_official_epochs():
    cfg = validate_config(load_config("paper"))
    configs = tsu_configs(cfg["tsu"], 384, 0.95)
    assert {f: c.max_epochs for f, c in configs.items()} == {0.1: 200, 0.2: 1000}
    assert all(c.anchor_in_target and c.freeze_covered for c in configs.values())
    assert all(c.validation == "official" for c in configs.values())
    assert list(tsu_configs(load_config("demo")["tsu"] or {}, 8, 0.9)) == [None]
    demo = tsu_configs(load_config("demo")["tsu"] or {}, 8, 0.9)[None]
    assert not demo.freeze_covered and not demo.anchor_in_target and demo.validation == "fixed"
    with pytest.raises(ConfigError, match="tsu.budgets.0.1"):
        validate_config(load_config("paper", overrides={"tsu": {"budgets": {0.1: {"epochs": 3}}}}))
    with pytest.raises(ConfigError, match="tsu.budgets"):
        validate_config(load_config("paper", overrides={"tsu": {"budgets": {2.0: {}}}}))


def test_paper_preset_keeps_hafeds_first_best_checkpoint_as_the_official_script():
    # step3_WSI_classification_HAFED.py at 6385fe6 saves on a strictly higher val AUC + F1
    assert validate_config(load_config("paper"))["hafed"]["select_ties"] == "first"
    assert "select_ties" not in (load_config("demo")["hafed"] or {})  # ours: the lowest val loss


# ------------------------------------------------------------------ TSU training and validation
def test_anchor_in_target_adds_the_anchor_pair_only_with_the_option():
    base = torch.randn(6)
    z = torch.stack([base * s for s in (1.0, -2.0, 0.5)] + [torch.randn(6) for _ in range(3)])
    v = torch.randn(6, 6)
    a = torch.tensor([0])
    without = sample_tsu_pairs(z, v, 0.95, anchors=a)
    with_anchor = sample_tsu_pairs(z, v, 0.95, anchors=a, include_anchor=True)
    assert without[3].shape[0] == 2 and with_anchor[3].shape[0] == 3
    torch.testing.assert_close(with_anchor[2][0], z[0])  # target rows in row order: a first
    torch.testing.assert_close(with_anchor[3][0], v[0])
    lonely = sample_tsu_pairs(z, v, 0.95, anchors=torch.tensor([4]), include_anchor=True)
    assert lonely[3].shape[0] == 1  # never empty with the anchor in


def test_official_validation_draws_fresh_anchors_and_averages_per_slide():
    source = tsu_problem(n_slides=6, d=8, n_patches=20)
    data = TSUPairDataModule(source, tau=0.9, eval_anchors=1, eval_resample=True)
    data.setup()
    val = data.datasets["val"]
    draws = {tuple(val[0][0][0].tolist()) for _ in range(12)}
    assert len(draws) > 1  # a new anchor at every pass
    fixed = TSUPairDataModule(source, tau=0.9, eval_anchors=1)
    fixed.setup()
    assert torch.equal(fixed.datasets["val"][0][0], fixed.datasets["val"][0][0])

    torch.manual_seed(0)
    small = tuple(torch.randn(1, 8) for _ in range(4))
    big = tuple(torch.randn(5, 8) for _ in range(4))
    losses = {}
    for mode in ("official", "fixed"):
        module = TSUModule(TSUConfig(d=8, validation=mode), seed=0)
        module.on_validation_epoch_start()
        module.validation_step(small, 0)
        module.validation_step(big, 1)
        losses[mode] = (module._val_sums[0] / module._val_sums[2]).item()
    with torch.no_grad():
        mse = [
            torch.nn.functional.mse_loss(module.model(*b[:3]), b[3]).item() for b in (small, big)
        ]
        pooled = (mse[0] * 8 + mse[1] * 40) / 48
    assert losses["official"] == pytest.approx(np.mean(mse), rel=1e-5)
    assert losses["fixed"] == pytest.approx(pooled, rel=1e-5)
