"""Sasha-WSI-v0 with SB3 / sb3-contrib agents and under SB3's and Gymnasium's vector envs."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import sasha_env  # noqa: F401 - registers Sasha-WSI-v0
from sasha_env.testing import random_models, random_slides, write_workdir

D = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    hafed, tsu = random_models(D, tau=0.9)
    return write_workdir(
        tmp_path_factory.mktemp("agents_wd"), random_slides(d=D), hafed, tsu, tiffs=False
    )


def _thunk(workdir, seed=0):
    def make():
        import gymnasium

        # "module:id" imports sasha_env (which registers the env) in a fresh worker process
        env = gymnasium.make("sasha_env:Sasha-WSI-v0", workdir=workdir, split="train", frac=0.5)
        env.reset(seed=seed)
        return env

    return make


@pytest.mark.parametrize("algo", ["PPO", "A2C", "DQN", "MaskablePPO"])
def test_short_learn(workdir, algo):
    import stable_baselines3 as sb3
    from sb3_contrib import MaskablePPO

    env = gym.make("Sasha-WSI-v0", workdir=workdir, split="train", frac=0.5)
    kw = {
        "PPO": {"n_steps": 32, "batch_size": 16, "n_epochs": 1},
        "MaskablePPO": {"n_steps": 32, "batch_size": 16, "n_epochs": 1},
        "A2C": {"n_steps": 8},
        "DQN": {"learning_starts": 16, "buffer_size": 256, "train_freq": 4, "batch_size": 16},
    }[algo]
    cls = MaskablePPO if algo == "MaskablePPO" else getattr(sb3, algo)
    model = cls("MultiInputPolicy", env, seed=0, device="cpu", **kw)
    model.learn(total_timesteps=64)
    obs, _ = env.reset(seed=1)
    if algo == "MaskablePPO":
        action, _ = model.predict(
            obs, action_masks=env.unwrapped.action_masks(), deterministic=True
        )
        assert env.unwrapped.action_masks()[int(action)]
    else:
        action, _ = model.predict(obs, deterministic=True)
    assert 0 <= int(action) < env.action_space.n


def test_subproc_vec_env_masks_and_maskable_ppo(workdir):
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.vec_env import SubprocVecEnv

    vec = SubprocVecEnv([_thunk(str(workdir), s) for s in range(2)])
    try:
        obs = vec.reset()
        P = vec.action_space.n
        for _ in range(12):
            masks = np.stack(vec.env_method("action_masks"))
            assert masks.shape == (2, P) and masks.dtype == bool
            actions = np.array([np.flatnonzero(m)[0] for m in masks])
            obs, rewards, dones, infos = vec.step(actions)
            assert not any(info["illegal_action"] for info in infos)
            for done, info in zip(dones, infos, strict=True):
                if done:
                    assert {"probabilities", "prediction", "zoomed", "terminal_observation"} <= set(
                        info
                    )
        assert obs["features"].shape == (2, P, D)
        MaskablePPO("MultiInputPolicy", vec, n_steps=16, batch_size=16, n_epochs=1, seed=0).learn(
            32
        )
    finally:
        vec.close()


def test_dummy_vec_env(workdir):
    from stable_baselines3.common.vec_env import DummyVecEnv

    vec = DummyVecEnv([_thunk(str(workdir), s) for s in range(2)])
    vec.reset()
    masks = np.stack(vec.env_method("action_masks"))
    vec.step(np.array([np.flatnonzero(m)[0] for m in masks]))
    vec.close()


@pytest.mark.parametrize("how", ["make_vec", "SyncVectorEnv"])
def test_gymnasium_vector_api(workdir, how):
    if how == "make_vec":
        envs = gym.make_vec(
            "Sasha-WSI-v0", num_envs=2, vectorization_mode="sync", workdir=workdir, frac=0.5
        )
    else:
        envs = gym.vector.SyncVectorEnv(
            [lambda: gym.make("Sasha-WSI-v0", workdir=workdir, frac=0.5)] * 2
        )
    obs, info = envs.reset(seed=[3, 4])
    assert obs["features"].shape == (2, envs.single_action_space.n, D)
    finished = 0
    for _ in range(30):
        masks = np.stack(envs.call("action_masks"))
        actions = np.array([np.flatnonzero(m)[0] if m.any() else 0 for m in masks])
        obs, rewards, terminated, truncated, info = envs.step(actions)
        if terminated.any():
            assert set(info["_probabilities"].nonzero()[0]) == set(terminated.nonzero()[0])
            finished += int(terminated.sum())
    assert finished >= 2
    envs.close()
