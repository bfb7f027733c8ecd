"""sasha_env.testing: make_workdir builds a workdir the env, the checkers, training and the agent
loader accept, the same for the same seed; importing it stays light."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import sasha_env  # noqa: F401 - registers Sasha-WSI-v0
from sasha_env import AgentConfig, FeatureStore, train_agent
from sasha_env.agents.export import load_policy
from sasha_env.testing import EXPECTED_CHECKER_WARNINGS, check_env, make_workdir
from sasha_env.workdir import Workdir
from sasha_models.checkpoint import load_checkpoint, load_model

ARRAYS = ("lowres", "highres", "coords", "cells", "tissue", "distilled")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("made") / "wd", seed=0, fracs=(0.1,))


def test_importing_it_loads_no_lightning_wandb_or_sb3():
    probe = (
        "import sys, json, sasha_env.testing\n"
        "print(json.dumps([m for m in ('lightning', 'wandb', 'stable_baselines3', "
        "'sb3_contrib') if m in sys.modules]))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_the_workdir_has_every_stage_output(made):
    wd = Workdir(made)
    assert made.slide_ids == tuple(f"slide{i:02d}" for i in range(8))
    assert sorted(made.splits.values()) == ["test"] * 2 + ["train"] * 4 + ["val"] * 2
    for name in ("hafed", "tsu"):
        assert load_checkpoint(wd.model(name))["kind"] == name
    assert set(made.agents) == {0.1} and made.agents[0.1] == wd.agent_dir("sasha-0.1")
    # distilled by the pipeline's own stage, from the exported HAFED: v = level 1 of highres
    store = FeatureStore(wd.store)
    hafed = load_model(wd.model("hafed"))
    for sid in made.slide_ids:
        assert store.array_attrs(sid, "distilled")["hafed_sha256"]
        with torch.inference_mode():
            v = hafed.distill(torch.from_numpy(store.read(sid, "highres"))).numpy()
        np.testing.assert_allclose(store.read(sid, "distilled"), v, rtol=1e-6, atol=1e-6)
        assert store.read(sid, "lowres").shape == (store.n_patches(sid), made.d)


def test_the_env_passes_gymnasiums_and_sb3s_checkers(made):
    env = gym.make("Sasha-WSI-v0", workdir=made, split="train", frac=0.1)
    check_env(env)  # warnings are errors, except the ones the env gives by design
    # both checkers on their own, warnings recorded: only the expected ones, and all of them
    from gymnasium.utils.env_checker import check_env as gymnasium_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gymnasium_check_env(gym.make("Sasha-WSI-v0", workdir=made.root, frac=0.1).unwrapped)
        sb3_check_env(gym.make("Sasha-WSI-v0", workdir=made.root, frac=0.1), warn=True)
    messages = {str(w.message) for w in caught}
    for message in messages:
        assert any(re.search(p, message) for p in EXPECTED_CHECKER_WARNINGS), message
    for pattern in EXPECTED_CHECKER_WARNINGS:
        assert any(re.search(pattern, m) for m in messages), f"{pattern} no longer warned"


def test_check_env_turns_other_warnings_into_errors(made):
    class Warns(gym.Wrapper):
        def reset(self, **kw):
            warnings.warn("something unexpected", UserWarning, stacklevel=2)
            return self.env.reset(**kw)

    env = Warns(gym.make("Sasha-WSI-v0", workdir=made, split="train", frac=0.1))
    with pytest.raises(UserWarning, match="something unexpected"):
        check_env(env)


def _legal_greedy_actions(policy, env, n_episodes: int = 2) -> None:
    raw = env.unwrapped
    for seed in range(n_episodes):
        obs, info = env.reset(seed=seed)
        done = False
        while not done:
            action, _ = policy.predict(obs, action_masks=raw.action_masks(), deterministic=True)
            assert raw.action_masks()[int(action)]
            obs, _, terminated, truncated, info = env.step(int(action))
            done = terminated or truncated
        assert {"probabilities", "prediction"} <= set(info)


def test_train_agent_on_it_and_the_exports_load(made, tmp_path):
    cfg = AgentConfig(total_timesteps=64, n_envs=1, n_steps=32, batch_size=32, n_epochs=1)
    model = train_agent(made, 0.1, cfg, seed=1, out_dir=tmp_path / "agent", progress=False)
    assert model.num_timesteps == 64
    env = gym.make("Sasha-WSI-v0", workdir=made, split="test", frac=0.1)
    for folder in (tmp_path / "agent", made.agents[0.1]):  # ours and make_workdir's
        policy = load_policy(folder)
        desc = json.loads((folder / "policy.json").read_text())
        assert desc["max_patches"] == env.unwrapped.max_patches
        assert desc["feature_dim"] == made.d
        _legal_greedy_actions(policy, env)


def test_the_same_seed_gives_the_same_workdir(made, tmp_path):
    again = make_workdir(tmp_path / "again", seed=0, tiffs=False)
    other = make_workdir(tmp_path / "other", seed=1, agents=False, tiffs=False)
    a, b, c = (FeatureStore(Workdir(m).store) for m in (made, again, other))
    assert a.slide_ids() == b.slide_ids() == list(made.slide_ids)
    for sid in made.slide_ids:
        for name in ARRAYS:
            np.testing.assert_array_equal(a.read(sid, name), b.read(sid, name), err_msg=name)
    assert not np.array_equal(a.read("slide00", "lowres"), c.read("slide00", "lowres"))
    for name in ("hafed", "tsu"):
        x, y, z = (
            load_checkpoint(Workdir(m).model(name))["state_dict"] for m in (made, again, other)
        )
        assert all(torch.equal(x[k], y[k]) for k in x)
        assert not all(torch.equal(x[k], z[k]) for k in x)
    assert again.splits == made.splits and again.config == made.config
    x, y = (torch.load(m.agents[0.1] / "policy.pt", weights_only=True) for m in (made, again))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_calibration_and_evaluation_accept_it(made):
    from sasha_env.pipeline.calibrate import calibrate_workdir
    from sasha_env.pipeline.evaluate import evaluate_workdir

    wd = Workdir(made)
    calibrate_workdir(wd, made.config, log=lambda m: None)
    results = evaluate_workdir(wd, made.config, log=lambda m: None)
    methods = {(m["method"], m["frac"]) for m in results["methods"]}
    assert {("hafed", 1.0), ("sasha", 0.1), ("random", 0.1), ("attention_topk", 0.1)} <= methods
    assert ("greedy_attention", 0.1) in methods
    # no models/lowres/model.pt here: the low-res classifier's baseline is skipped
    assert not wd.model("lowres").is_file()
    assert all(m["method"] != "lowres_attention_topk" for m in results["methods"])
    assert results["n_slides"] == 2
