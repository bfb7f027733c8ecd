"""The default observations: read-only snapshots that no step changes while held, refreshed row
by row once dropped (``ObservationPool``), equal at every step to the env's own buffers."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import sasha_env  # noqa: F401 - registers Sasha-WSI-v0
from sasha_env.envs.obs_pool import ObservationPool
from sasha_env.testing import random_models, random_slides, write_workdir

D = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    hafed, tsu = random_models(D, tau=0.5)  # a low tau: zooms update several rows
    return write_workdir(tmp_path_factory.mktemp("pool_wd"), random_slides(d=D), hafed, tsu)


def make(workdir, **kw):
    return gym.make("Sasha-WSI-v0", workdir=workdir, **kw).unwrapped


def test_snapshots_equal_the_buffers_and_never_change_while_held(workdir):
    """Three episodes on different slides (resets refill everything), legal and illegal steps,
    frozen steps at the end (``freeze_covered``): every default observation equals the
    ``copy_obs=False`` env's buffers after the same actions; an observation held for a whole
    episode, and a view kept past its observation for a few steps, keep what they held; a
    snapshot made writeable and scribbled on before it was dropped is refilled in full; most
    steps are served by refreshing a dropped snapshot row by row (what is being checked)."""
    env = make(workdir, frac=1.0, freeze_covered=True)
    ref = make(workdir, frac=1.0, freeze_covered=True, copy_obs=False)
    pool = env._copies
    rng = np.random.default_rng(0)
    for episode in range(3):
        obs, info = env.reset(seed=episode)
        buffers, _ = ref.reset(options={"slide_id": info["slide_id"]})
        held, held_copy = obs, {k: np.array(v) for k, v in obs.items()}
        reused_before, steps, widest = pool.reused, 0, 0
        view = view_copy = None
        terminated = False
        while not terminated:
            mask = env.action_masks()
            legal = np.flatnonzero(mask)
            a = int(rng.choice(legal)) if rng.random() > 0.1 else int(np.flatnonzero(~mask)[0])
            obs, _, terminated, _, _ = env.step(a)
            buffers, *_ = ref.step(a)
            steps += 1
            widest = max(widest, len(env.changed_rows))
            for key in obs:
                np.testing.assert_array_equal(obs[key], buffers[key], err_msg=key)
            if terminated:  # the last one is a writable copy (vector envs keep it)
                assert obs["features"].flags.writeable
                break
            assert not obs["features"].flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                obs["features"][0, 0] = 1.0
            if steps == 3:  # a view, kept for three steps
                view, view_copy = obs["features"][:4], obs["features"][:4].copy()
            if steps == 6:
                np.testing.assert_array_equal(view, view_copy)
                view = None
            if steps == 8:  # re-enabled and written, then dropped
                obs["features"].flags.writeable = True
                obs["features"][:] = 7.0
            del obs
        for key in held:
            np.testing.assert_array_equal(held[key], held_copy[key], err_msg=key)
        assert pool.reused - reused_before >= steps - 6  # all but the steps a view was held
        assert widest > 2  # some zoom updated rows beside its own


def test_refresh_past_the_history_refills_in_full():
    pool = ObservationPool(keep=1, history=2)
    buffers = {"x": np.arange(20.0).reshape(10, 2), "m": np.zeros(10, np.int8)}
    first = pool.copy(buffers)
    address = first["x"].ctypes.data
    del first
    for row in range(5):  # five changes, two remembered
        buffers["x"][row] = -1.0
        buffers["m"][row] = 1
        pool.changed(np.array([row]))
    again = pool.copy(buffers)
    assert again["x"].ctypes.data == address
    np.testing.assert_array_equal(again["x"], buffers["x"])
    np.testing.assert_array_equal(again["m"], buffers["m"])
    buffers["x"][9] = 5.0
    pool.changed(np.array([9]))
    other = pool.copy(buffers)  # ``again`` is held: a new, untracked copy
    assert other["x"].ctypes.data != address and again["x"][9, 0] == 18.0
    np.testing.assert_array_equal(other["x"], buffers["x"])
    with pytest.raises(ValueError, match="keep"):
        ObservationPool(keep=-1)
