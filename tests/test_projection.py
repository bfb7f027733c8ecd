"""``agents.obs_dim``: the agent reads a fixed PCA projection of the state.

The projection must be the same map everywhere the agent acts: in the environment (kept row
by row), in the exported policy (its buffers), and in every consumer that rebuilds an env for
an exported agent (evaluation, calibration, predict).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sasha_env.agents.config import AgentConfig
from sasha_env.agents.envs import agent_projection, has_agent, load_agent
from sasha_env.agents.episodes import agent_policy, run_episodes
from sasha_env.agents.train import train_agent
from sasha_env.envs.wsi import SashaWSIEnv
from sasha_env.testing import random_models, random_slides, write_workdir
from sasha_env.workdir import Workdir
from sasha_models.actor_critic import SashaActorCritic
from sasha_models.projection import ObsProjection, fit_obs_projection

D = 8


def test_pca_recovers_the_subspace_the_rows_live_in():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(20, 3)))[0]  # a 3-d subspace of R^20
    rows = rng.normal(size=(500, 3)) * [5.0, 3.0, 2.0] @ basis.T + 7.0
    proj = fit_obs_projection(rows, 3)
    np.testing.assert_allclose(proj.basis.T @ proj.basis, np.eye(3), atol=1e-5)
    # the same subspace: projecting onto it and back loses nothing
    centred = rows - proj.mean
    np.testing.assert_allclose(centred @ proj.basis @ proj.basis.T, centred, atol=1e-3)
    np.testing.assert_allclose(proj.mean, rows.mean(0), atol=1e-4)
    with pytest.raises(ValueError, match="obs_dim"):
        fit_obs_projection(rows, 21)


def test_the_network_reads_full_rows_through_its_projection():
    torch.manual_seed(0)
    proj = fit_obs_projection(np.random.default_rng(1).normal(size=(200, 16)), 4)
    net = SashaActorCritic(4, d_hidden=8, project_from=16).eval()
    net.set_projection(proj)
    feats = torch.randn(2, 10, 16)
    visited, valid = torch.zeros(2, 10), torch.ones(2, 10)
    coords = torch.rand(2, 10, 2)
    with torch.inference_mode():
        full = net(feats, visited, valid, coords)
        projected = torch.from_numpy(proj(feats.numpy()))
        small = net(projected, visited, valid, coords)
    for a, b in zip(full, small, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="does not fit"):
        net.set_projection(ObsProjection(np.zeros(16, np.float32), np.zeros((16, 5), np.float32)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    hafed, tsu = random_models(D, tau=0.9)
    return write_workdir(tmp_path_factory.mktemp("proj_wd"), random_slides(d=D), hafed, tsu)


def test_env_keeps_the_projected_rows_equal_to_the_projected_state(workdir):
    proj = fit_obs_projection(np.random.default_rng(2).normal(size=(100, D)), 3)
    env = SashaWSIEnv(workdir, split="train", frac=1.0, obs_projection=proj)
    assert env.observation_space["features"].shape == (env.max_patches, 3)
    obs, info = env.reset(seed=0)
    n, rng = info["n_patches"], np.random.default_rng(0)
    for _ in range(info["budget"]):
        np.testing.assert_allclose(obs["features"][:n], proj(env.state()), atol=1e-5)
        assert not obs["features"][n:].any()
        obs, *_ = env.step(int(rng.choice(np.flatnonzero(env.action_masks()))))
    np.testing.assert_allclose(obs["features"][:n], proj(env.state()), atol=1e-5)
    with pytest.raises(ValueError, match="maps 5 features"):
        SashaWSIEnv(
            workdir,
            obs_projection=ObsProjection(np.zeros(5, np.float32), np.zeros((5, 2), np.float32)),
        )


def test_an_agent_trained_on_projected_states_carries_its_projection(workdir):
    cfg = AgentConfig(obs_dim=3, total_timesteps=128, n_steps=32, n_envs=2, fracs=(0.5,))
    model = train_agent(workdir, frac=0.5, cfg=cfg, progress=False)
    assert model.observation_space["features"].shape[1] == 3
    wd = Workdir(workdir)
    agent = load_agent(wd, 0.5)  # the exported agent (weights only)
    assert (agent.frac, agent.algo, agent.path) == (0.5, "maskable_ppo", wd.agent_dir("sasha-0.5"))
    proj = agent.projection
    assert proj is not None and proj.basis.shape == (D, 3)
    np.testing.assert_array_equal(agent_projection(agent.policy).basis, proj.basis)
    np.testing.assert_array_equal(proj.basis, model.policy.net.projection.basis)
    # the exported agent, in the env it builds with its projection, acts as the trained model
    env = agent.make_env(wd, "test", cfg)
    assert env.obs_projection is proj
    ids = env.slide_ids
    exported = run_episodes(env, agent_policy(agent.policy), ids)
    trained = run_episodes(env, agent_policy(model), ids)
    assert [e["zoomed"] for e in exported] == [e["zoomed"] for e in trained]
    assert has_agent(wd, 0.5) and not has_agent(wd, 0.3)
    with pytest.raises(FileNotFoundError, match="run the 'agents' stage"):
        load_agent(wd, 0.3)
    with pytest.raises(ValueError, match="dqn"):
        AgentConfig.from_dict({"obs_dim": 3, "algo": "dqn"})
