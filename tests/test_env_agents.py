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
    """SB3's DummyVecEnv runs each env as a single env does: same observations, rewards,
    masks and terminal observations, and a step changes only the zoomed patch's rows."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    keys = ("features", "visited", "valid", "coords")
    vec = DummyVecEnv([_thunk(str(workdir), s) for s in range(2)])
    singles = [gym.make("Sasha-WSI-v0", workdir=workdir, split="train", frac=0.5) for _ in range(2)]
    try:
        P = vec.action_space.n
        vec.seed(10)  # env i is reset with seed 10 + i
        obs = vec.reset()
        ref = [env.reset(seed=10 + i)[0] for i, env in enumerate(singles)]
        for i, env in enumerate(singles):
            assert vec.reset_infos[i]["slide_id"] == env.unwrapped.slide.slide_id
            for key in keys:
                np.testing.assert_array_equal(obs[key][i], ref[i][key], err_msg=key)
        assert obs["features"].shape == (2, P, D) and obs["visited"].shape == (2, P)

        finished = [0, 0]
        for _ in range(40):
            masks = np.stack(vec.env_method("action_masks"))
            assert masks.shape == (2, P) and masks.dtype == bool
            legal = (obs["valid"] == 1) & (obs["visited"] == 0)
            np.testing.assert_array_equal(masks, legal)
            actions = np.array([int(np.flatnonzero(m)[-1]) for m in masks])
            before = {key: obs[key].copy() for key in keys}
            obs, rewards, dones, infos = vec.step(actions)
            changed = vec.get_attr("changed_rows")
            for i, env in enumerate(singles):
                o, r, terminated, truncated, info = env.step(actions[i])
                assert rewards[i] == np.float32(r) and dones[i] == terminated and not truncated
                assert not infos[i]["illegal_action"]
                if dones[i]:  # the vec env reset it: compare the episode's last observation
                    finished[i] += 1
                    after = infos[i]["terminal_observation"]
                    assert after["visited"].sum() == env.unwrapped.budget
                    o, _ = env.reset()  # the env's own generator, as the vec env's reset does
                    for key in keys:
                        np.testing.assert_array_equal(obs[key][i], o[key], err_msg=key)
                else:
                    after = {key: obs[key][i] for key in keys}
                    for key in keys:
                        np.testing.assert_array_equal(after[key], o[key], err_msg=key)
                    # the zoomed patch, and only it, becomes visited; only its similar rows change
                    rows = changed[i]
                    assert actions[i] in rows
                    np.testing.assert_array_equal(
                        np.flatnonzero(after["visited"] != before["visited"][i]), [actions[i]]
                    )
                    same = np.setdiff1d(np.arange(P), rows)
                    np.testing.assert_array_equal(
                        after["features"][same], before["features"][i][same]
                    )
                    assert not np.array_equal(
                        after["features"][actions[i]], before["features"][i][actions[i]]
                    )
                    np.testing.assert_array_equal(after["valid"], before["valid"][i])
                    np.testing.assert_array_equal(after["coords"], before["coords"][i])
            if min(finished) >= 1:
                break
        assert min(finished) >= 1
    finally:
        vec.close()
        for env in singles:
            env.close()


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
