"""agents.warm_start: the agent imitates greedy_attention before RL."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sasha_env.agents.config import AgentConfig
from sasha_env.agents.envs import make_env
from sasha_env.agents.episodes import agent_policy, greedy_attention_policy, run_episodes
from sasha_env.agents.export import load_policy
from sasha_env.agents.train import train_agent
from sasha_env.agents.warm_start import clone_policy, collect_demonstrations
from sasha_env.workdir import Workdir


def test_demonstrations_are_the_heuristics_episodes(tiny_workdir):
    cfg = AgentConfig(gamma=1.0)
    env = make_env(Workdir(tiny_workdir), "train", 0.2, cfg)
    ids = list(env.slide_ids)
    demos = collect_demonstrations(env, greedy_attention_policy(), ids)
    episodes = run_episodes(env, greedy_attention_policy(), ids)
    # one step per zoom of each episode, the same zooms in the same order
    assert demos.actions.tolist() == [a for e in episodes for a in e["zoomed"]]
    assert len(demos) == sum(len(e["zoomed"]) for e in episodes)
    assert demos.masks[np.arange(len(demos)), demos.actions].all()  # every action was legal
    # gamma 1: the return from an episode's first step is the episode's return
    starts = np.cumsum([0] + [len(e["zoomed"]) for e in episodes[:-1]])
    assert demos.returns[starts] == pytest.approx([e["return"] for e in episodes], abs=1e-5)
    assert demos.obs["features"].shape[0] == len(demos)
    # the observation before the first step of an episode has nothing visited
    assert demos.obs["visited"][starts].sum() == 0


def test_cloning_makes_the_policy_zoom_as_the_heuristic(tiny_workdir):
    from stable_baselines3.common.vec_env import DummyVecEnv

    from sasha_env.agents.train import _algorithm

    wd = Workdir(tiny_workdir)
    cfg = AgentConfig(d_hidden=32, batch_size=16).resolved()
    env = make_env(wd, "train", 0.2, cfg)
    demos = collect_demonstrations(env, greedy_attention_policy(), list(env.slide_ids))
    model = _algorithm(cfg, DummyVecEnv([lambda: env]), 0, "cpu", 0.2, None, 64)

    history = clone_policy(model.policy, demos, epochs=60, batch_size=16, learning_rate=3e-3)
    assert history[-1]["nll"] < 0.5 * history[0]["nll"]
    assert history[-1]["agreement"] > 0.8
    # acting after cloning: the argmax agent's episodes zoom where the heuristic does
    ours = run_episodes(env, agent_policy(model), list(env.slide_ids))
    theirs = run_episodes(env, greedy_attention_policy(), list(env.slide_ids))
    same = [
        a == b
        for x, y in zip(ours, theirs, strict=True)
        for a, b in zip(x["zoomed"], y["zoomed"], strict=True)
    ]
    assert np.mean(same) > 0.5


def test_warm_start_in_training_is_recorded(tiny_workdir, tmp_path):
    cfg = AgentConfig(
        total_timesteps=64, n_envs=2, n_steps=16, batch_size=16, n_epochs=1, d_hidden=16,
        warm_start="greedy_attention", warm_start_epochs=3,
    )  # fmt: skip
    out = tmp_path / "agent"
    train_agent(Workdir(tiny_workdir), 0.2, cfg, out_dir=out, progress=False)
    warm = json.loads((out / "agent.json").read_text())["warm_start"]
    assert warm["heuristic"] == "greedy_attention" and warm["epochs"] == 3
    assert warm["steps"] > 0 and 0.0 <= warm["last_epoch"]["agreement"] <= 1.0
    assert load_policy(out) is not None


def test_warm_start_settings_are_checked():
    from sasha_env.pipeline.schema import validate_config

    with pytest.raises(ValueError, match="agents.warm_start"):
        AgentConfig.from_dict({"warm_start": "oracle"})
    with pytest.raises(ValueError, match="dqn"):
        AgentConfig.from_dict({"warm_start": "greedy_attention", "algo": "dqn"})
    with pytest.raises(ValueError, match="agents.warm_start_epochs"):
        validate_config({"agents": {"warm_start_epochs": 0}})
