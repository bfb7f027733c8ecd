"""Row-pooled rollout buffers: every observation comes back exactly, the update is SB3's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer
from stable_baselines3.common.vec_env import DummyVecEnv

from sasha_env.agents.buffers import RowPoolMaskableRolloutBuffer
from sasha_env.agents.config import AgentConfig
from sasha_env.agents.train import train_agent
from sasha_env.envs.wsi import SashaWSIEnv
from sasha_env.testing import random_models, random_slides, write_workdir
from sasha_models.policy import SashaActorCriticPolicy
from sasha_models.spaces import ROW_INDEX

D, N_ENVS, N_STEPS = 8, 2, 24


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    hafed, tsu = random_models(D, tau=0.9)
    slides = random_slides(d=D, n_range=(10, 16))
    return write_workdir(tmp_path_factory.mktemp("pool_wd"), slides, hafed, tsu, tiffs=False)


def _fill(workdir, buffers, seed=0):
    """Random legal episodes (f = 0.5) from two envs, added to every buffer alike."""
    venv = DummyVecEnv(
        [lambda i=i: SashaWSIEnv(workdir, split="train", frac=0.5) for i in range(N_ENVS)]
    )
    venv.seed(seed)
    obs, rng = venv.reset(), np.random.default_rng(seed)
    starts = np.ones(N_ENVS, dtype=np.float32)
    for _ in range(N_STEPS):
        masks = np.stack(venv.env_method("action_masks"))
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
        new_obs, rewards, dones, _ = venv.step(actions)
        for buf in buffers:
            buf.add(
                obs, actions.reshape(-1, 1), rewards, starts, torch.zeros(N_ENVS),
                torch.zeros(N_ENVS), action_masks=masks,
            )  # fmt: skip
        obs, starts = new_obs, dones.astype(np.float32)
    for buf in buffers:
        buf.compute_returns_and_advantage(torch.zeros(N_ENVS), dones)
    return venv


def _buffers(venv):
    args = (N_STEPS, venv.observation_space, venv.action_space, "cpu")
    return (
        MaskableDictRolloutBuffer(*args, n_envs=N_ENVS),
        RowPoolMaskableRolloutBuffer(*args, n_envs=N_ENVS),
    )


def _batches(buf, batch_size, seed=3):
    np.random.seed(seed)  # SB3 draws the mini-batch permutation from NumPy's global RNG
    return list(buf.get(batch_size))


def test_every_observation_comes_back_exactly_from_the_distinct_rows(workdir):
    probe = DummyVecEnv([lambda: SashaWSIEnv(workdir, split="train", frac=0.5)] * N_ENVS)
    plain, pooled = _buffers(probe)
    _fill(workdir, [plain, pooled])
    # the pool holds each env's first observation, then only the rows a step changed
    full = {k: v.copy() for k, v in plain.observations.items()}  # (steps, envs, P, ...)
    changed = np.zeros(full["features"].shape[:3], dtype=bool)
    for v in full.values():
        changed[1:] |= (v[1:] != v[:-1]).reshape(*changed[1:].shape, -1).any(-1)
    changed[0] = True
    assert pooled.pool_rows == changed.sum() < changed.size / 3
    for a, b in zip(_batches(plain, 16), _batches(pooled, 16), strict=True):
        index = b.observations[ROW_INDEX]
        assert index.shape == a.observations["features"].shape[:2]
        assert len(torch.unique(index)) == len(b.observations["features"])  # all distinct rows
        for key, value in a.observations.items():
            assert torch.equal(b.observations[key][index], value), key
        for field in ("actions", "advantages", "returns", "action_masks"):
            assert torch.equal(getattr(a, field), getattr(b, field))


def test_the_policy_gives_the_same_outputs_and_gradients_on_pooled_batches(workdir):
    venv = DummyVecEnv([lambda: SashaWSIEnv(workdir, split="train", frac=0.5)] * N_ENVS)
    plain, pooled = _buffers(venv)
    _fill(workdir, [plain, pooled], seed=1)
    policy = SashaActorCriticPolicy(venv.observation_space, venv.action_space, lambda _: 1e-3)
    torch.nn.init.normal_(policy.net.actor_attn.w.weight)  # a far-from-uniform policy
    for a, b in zip(_batches(plain, 32), _batches(pooled, 32), strict=True):
        outs, grads = [], []
        for batch in (a, b):
            policy.zero_grad()
            values, log_prob, entropy = policy.evaluate_actions(
                batch.observations, batch.actions, action_masks=batch.action_masks
            )
            (values.square().sum() + log_prob.sum() + entropy.sum()).backward()
            outs.append((values, log_prob, entropy))
            grads.append([p.grad.clone() for p in policy.parameters()])
        for x, y in zip(*outs, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
        for x, y in zip(*grads, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "over",
    [{}, {"algo": "ppo"}, {"algo": "a2c"}, {"protocol": "paper", "epochs": 1}],
    ids=["maskable_ppo", "ppo", "a2c", "paper"],
)
def test_agents_trained_with_and_without_row_pooling_agree(workdir, over):
    cfg = {"fracs": (0.5,), "total_timesteps": 64, "n_steps": 16, "n_envs": 2, "batch_size": 8}
    models = [
        train_agent(
            workdir, frac=0.5, cfg=AgentConfig(**cfg, **over, row_pool=pool), progress=False
        )
        for pool in (False, True)
    ]
    kinds = [type(m.rollout_buffer).__name__ for m in models]
    assert "RowPool" not in kinds[0] and "RowPool" in kinds[1]
    plain, pooled = (m.policy.state_dict() for m in models)
    for name, value in plain.items():
        if name.endswith("attn.w.bias"):
            # shifts every row's score alike, so no output depends on it: its gradient is 0 up to
            # rounding, which Adam turns into steps of any size (the official network has it too)
            continue
        torch.testing.assert_close(pooled[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert all(m._n_updates > 0 for m in models)  # both were trained


@pytest.mark.parametrize("time_aware", [False, True])
def test_forward_pooled_equals_forward_on_the_expanded_batch(time_aware):
    from sasha_models.actor_critic import SashaActorCritic

    torch.manual_seed(0)
    net = SashaActorCritic(D, d_hidden=16, time_aware_critic=time_aware)
    torch.nn.init.normal_(net.actor_attn.w.weight)
    u = 7
    rows = {
        "features": torch.randn(u, D),
        "visited": torch.randint(0, 2, (u,)).float(),
        "valid": torch.tensor([1, 1, 1, 1, 1, 1, 0]).float(),
        "coords": torch.rand(u, 2),
    }
    # slots may share a row, within one observation too (here rows 0 and 2 twice in the first)
    index = torch.tensor([[0, 2, 2, 0, 1, 3, 6, 6, 5], [4, 5, 6, 1, 2, 3, 0, 6, 6]])
    expanded = {k: v[index] for k, v in rows.items()}
    want = net(expanded["features"], expanded["visited"], expanded["valid"], expanded["coords"])
    got = net.forward_obs({**rows, ROW_INDEX: index})
    for x, y in zip(want, got, strict=True):
        torch.testing.assert_close(y, x)


def test_observations_without_patch_rows_are_refused_with_the_way_out():
    from gymnasium import spaces

    from sasha_env.agents.buffers import RowPoolRolloutBuffer

    space = spaces.Dict({"x": spaces.Box(0, 1, (3,))})
    with pytest.raises(ValueError, match="row_pool: false"):
        RowPoolRolloutBuffer(4, space, spaces.Discrete(3), "cpu")
