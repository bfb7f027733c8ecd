"""The paper agent against the official SASHA agent at 6385fe6, and the options that make it so.

``experiments/parity_agent.py`` compares our ``protocol: paper`` agent with the official
``rl_algorithms/ppo.py`` and ``step6_rl_training.py`` (run from an untouched checkout, never
vendored); the official numbers are recorded as ``tests/data/official_parity/agent.npz``
(numbers only). Here those checks run against the fixture, and the options behind them are
unit-tested: the official network (padding masked), the unmasked update, two optimisers
clipped per network, a constant learning rate, and what ``--preset paper`` resolves to.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sasha_env.agents.config import AgentConfig
from sasha_env.config import load_config
from sasha_models.actor_critic import SashaActorCritic
from sasha_models.optim import PerNetworkClipMixin, PerNetworkOptimizer
from sasha_models.policy import SashaActorCriticPolicy
from sasha_models.spaces import action_space, observation_space

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FIXTURES = Path(__file__).resolve().parent / "data" / "official_parity"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest's _torch_threads_kept restores the count


# ------------------------------------------------------------------ the differential check
def test_the_paper_agent_matches_the_official_fixtures():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import parity_agent

        checks = parity_agent.checks(None, FIXTURES, write=False)
    finally:
        sys.path.remove(str(EXPERIMENTS))
    counted = [c for c in checks if c.counted]
    failed = [c.line() for c in counted if not c.ok]
    assert not failed, "\n".join(failed)
    names = {c.name for c in counted}
    for name in (
        "agent.actor.logits",
        "agent.actor.acting",
        "agent.critic.value",
        "agent.ppo_update.loss_terms",
        "agent.ppo_update.actor_params",
        "agent.ppo_update.critic_params",
        "agent.paper.lr",
        "agent.paper.epochs",
        "agent.paper.clip_per_network",
    ):
        assert name in names
    (masked,) = [c for c in checks if not c.counted]
    assert masked.max_abs_diff > 1e-3  # our masked update is not the official one


# ------------------------------------------------------------------------------- options
def test_paper_preset_resolves_to_the_official_agent():
    cfg = AgentConfig.from_dict(load_config("paper")["agents"]).resolved()
    assert (cfg.protocol, cfg.epochs, cfg.episodes_per_slide) == ("paper", 15, 2)
    assert (cfg.policy_arch, cfg.masked_update, cfg.two_optimizers) == ("official", False, True)
    assert (cfg.lr_schedule, cfg.use_coords, cfg.learning_rate) == ("constant", False, None)


@pytest.mark.parametrize(
    ("preset", "schedule"),
    [("demo", "cosine"), ("tiny", "constant"), ("he-cpu", "constant"), ("large", "cosine")],
)
def test_other_presets_keep_our_agent(preset, schedule):
    cfg = AgentConfig.from_dict(load_config(preset)["agents"]).resolved()
    assert (cfg.policy_arch, cfg.masked_update, cfg.two_optimizers) == ("sasha", True, False)
    assert (cfg.lr_schedule, cfg.use_coords) == (schedule, True)


def test_demo_agents_learning_rate_decays_to_zero():
    """The demo preset's agents start at 3e-4 and end at 0 (a cosine), so the late policies
    validation chooses among stop moving (docs/budget-f02.md, "A cosine learning rate")."""
    from sasha_env.agents.train import _algorithm

    cfg = AgentConfig.from_dict({**load_config("demo")["agents"], "d_hidden": 8})
    model = _algorithm(cfg, _SpacesEnv(), 0, "cpu", 0.2)
    assert model.lr_schedule(1.0) == pytest.approx(3e-4)
    assert model.lr_schedule(0.5) == pytest.approx(1.5e-4)
    assert model.lr_schedule(0.0) == pytest.approx(0.0)


def test_options_that_do_not_go_together_are_refused():
    with pytest.raises(ValueError, match="use_coords"):
        AgentConfig.from_dict({"protocol": "paper", "use_coords": True})
    with pytest.raises(ValueError, match="two_optimizers needs protocol 'paper'"):
        AgentConfig.from_dict({"two_optimizers": True})
    with pytest.raises(ValueError, match="policy_arch 'mlp'"):
        AgentConfig.from_dict({"policy_arch": "mlp"})
    with pytest.raises(ValueError, match="lr_schedule"):
        AgentConfig.from_dict({"lr_schedule": "linear"})
    # ours in the paper protocol, as named options
    cfg = AgentConfig.from_dict(
        {"protocol": "paper", "policy_arch": "sasha", "masked_update": True,
         "two_optimizers": False, "lr_schedule": "cosine"}
    ).resolved()  # fmt: skip
    assert cfg.use_coords is True


class _SpacesEnv:
    """Spaces only: the agent is built, never stepped."""

    def __new__(cls, n: int = 12, d: int = 8):
        import gymnasium as gym

        class Env(gym.Env):
            observation_space = observation_space(n, d)
            action_space = action_space(n)

        return Env()


def test_paper_learning_rate_is_constant_and_cosine_is_an_option():
    from sasha_env.agents.train import _algorithm

    for extra, end in (({}, 1e-5), ({"lr_schedule": "cosine"}, 0.0)):
        cfg = AgentConfig.from_dict({"protocol": "paper", "d_hidden": 8, **extra})
        model = _algorithm(cfg, _SpacesEnv(), 0, "cpu", 0.1)
        assert model.lr_schedule(1.0) == pytest.approx(1e-5)
        assert model.lr_schedule(0.0) == pytest.approx(end)
        assert (model.clip_range(1.0), model.gae_lambda) == (0.2, 0.94)  # f = 0.1
    sb3 = _algorithm(AgentConfig(d_hidden=8), _SpacesEnv(), 0, "cpu", 0.1)
    assert sb3.lr_schedule(0.0) == sb3.lr_schedule(1.0) == 3e-4
    assert type(sb3.policy.optimizer) is torch.optim.Adam  # SB3's own, as before


def test_the_agents_stage_builds_a_time_aware_critic_on_request_under_both_protocols():
    from sasha_env.agents.train import _algorithm

    for protocol in ("sb3", "paper"):
        cfg = {"protocol": protocol, "d_hidden": 8}
        default = _algorithm(AgentConfig.from_dict(cfg), _SpacesEnv(), 0, "cpu", 0.2)
        aware = AgentConfig.from_dict({**cfg, "time_aware_critic": True})
        model = _algorithm(aware, _SpacesEnv(), 0, "cpu", 0.2)
        assert not default.policy.net.time_aware_critic and model.policy.net.time_aware_critic
        assert (
            model.policy.net.value_head.in_features == default.policy.net.value_head.in_features + 1
        )


def test_official_network_masks_padding():
    torch.manual_seed(0)
    net = SashaActorCritic(8, d_hidden=16, use_coords=False, arch="official").eval()
    x = torch.randn(2, 10, 8)
    visited = torch.zeros(2, 10)
    visited[0, 3] = 1
    logits, value = net(x, visited, torch.ones(2, 10))
    padded = torch.cat([x, torch.randn(2, 4, 8) * 5], 1)  # padding rows with junk in them
    valid = torch.cat([torch.ones(2, 10), torch.zeros(2, 4)], 1)
    logits_p, value_p = net(padded, torch.cat([visited, torch.zeros(2, 4)], 1), valid)
    torch.testing.assert_close(logits_p[:, :10], logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(value_p, value, rtol=0, atol=1e-6)
    # the input is the state alone: the visited flag does not change any output
    logits_v, value_v = net(x, torch.ones(2, 10), torch.ones(2, 10))
    assert torch.equal(logits_v, logits) and torch.equal(value_v, value)
    # the critic pools the raw rows: value = head(softmax(scores) @ x)
    w = torch.softmax(net.critic_attn(x).squeeze(-1), -1)
    torch.testing.assert_close(value, net.value_head(torch.einsum("bn,bnd->bd", w, x)))
    with pytest.raises(ValueError, match="use_coords must be False"):
        SashaActorCritic(8, arch="official")


def _policy(masked_update: bool) -> SashaActorCriticPolicy:
    torch.manual_seed(0)
    return SashaActorCriticPolicy(
        observation_space(12, 8), action_space(12), lambda _: 1e-3, d_hidden=16,
        arch="official", use_coords=False, masked_update=masked_update,
    )  # fmt: skip


def test_unmasked_update_ignores_visited_and_masks_only_padding():
    rng = np.random.default_rng(0)
    obs = {
        "features": torch.as_tensor(rng.normal(size=(3, 12, 8)), dtype=torch.float32),
        "visited": torch.zeros(3, 12),
        "valid": torch.ones(3, 12),
    }
    obs["valid"][:, 10:] = 0  # two padding rows
    obs["visited"][:, :4] = 1  # four patches zoomed
    actions = torch.tensor([0, 2, 7])  # two of them visited
    env_masks = np.zeros((3, 12), bool)  # whatever the buffer's masks say, they are ignored
    env_masks[:, 5] = True
    for masked in (False, True):
        policy = _policy(masked)
        _, log_prob, entropy = policy.evaluate_actions(obs, actions, action_masks=env_masks)
        logits = policy.net.forward_obs(obs)[0]
        legal = obs["valid"] > 0.5
        if masked:
            legal &= (obs["visited"] < 0.5) & torch.as_tensor(env_masks)
        hand = torch.log_softmax(logits.masked_fill(~legal, float("-inf")), -1)
        ent = -(hand.exp() * hand.nan_to_num(neginf=0.0)).sum(-1)
        if masked:  # visited actions are impossible, the only legal one is certain
            assert (log_prob[:2] < -1e6).all() and entropy.abs().max() < 1e-6
        else:
            torch.testing.assert_close(log_prob, hand.gather(1, actions[:, None])[:, 0])
            torch.testing.assert_close(entropy, ent)
        # acting stays masked either way
        dist = policy.get_distribution(obs)
        assert (dist.distribution.probs[:, :4] == 0).all() and (
            dist.distribution.probs[:, 10:] == 0
        ).all()


def test_two_optimizers_step_each_network():
    policy = SashaActorCriticPolicy(
        observation_space(12, 8), action_space(12), lambda _: 1e-3, d_hidden=16,
        arch="official", use_coords=False, two_optimizers=True,
        optimizer_class=torch.optim.AdamW, optimizer_kwargs={"weight_decay": 1e-4},
    )  # fmt: skip
    opt = policy.optimizer
    assert isinstance(opt, PerNetworkOptimizer) and set(opt.optimizers) == {"actor", "critic"}
    actor = {id(p) for p in opt.params["actor"]}
    assert actor == {id(p) for p in policy.net.actor_attn.parameters()}
    assert {id(p) for p in opt.params["critic"]} | actor == {id(p) for p in policy.parameters()}
    for group in opt.param_groups:
        assert (group["lr"], group["weight_decay"]) == (1e-3, 1e-4)
    state = opt.state_dict()
    opt.load_state_dict(state)  # SB3's save/load round trip
    with pytest.raises(ValueError, match="no entry"):
        opt.load_state_dict({"actor": state["actor"]})


class _Nets(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.actor = nn.Linear(3, 1, bias=False)
        self.critic = nn.Linear(3, 1, bias=False)


class _SB3LikeTrain:
    """The shape of SB3's update: zero_grad, backward, joint clip to max_grad_norm, step."""

    def __init__(self, policy: nn.Module, optimizer, max_grad_norm: float) -> None:
        self.policy, self.max_grad_norm = policy, max_grad_norm
        self.policy.optimizer = optimizer

    def train(self) -> None:
        x = torch.ones(1, 3)
        loss = 10 * self.policy.actor(x).sum() + 0.01 * self.policy.critic(x).sum()
        self.policy.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.policy.optimizer.step()


class _PerNetworkTrain(PerNetworkClipMixin, _SB3LikeTrain):
    pass


@pytest.mark.parametrize("per_network", [True, False])
def test_per_network_clipping(per_network):
    torch.manual_seed(0)
    nets = _Nets()
    before = {k: v.detach().clone() for k, v in nets.state_dict().items()}
    if per_network:
        opt = PerNetworkOptimizer(
            {"actor": nets.actor.parameters(), "critic": nets.critic.parameters()},
            torch.optim.SGD,
            lr=1.0,
        )
        algo = _PerNetworkTrain(nets, opt, max_grad_norm=0.5)
    else:
        algo = _SB3LikeTrain(nets, torch.optim.SGD(nets.parameters(), lr=1.0), 0.5)
    algo.train()
    step = {k: (v - before[k]).norm().item() for k, v in nets.state_dict().items()}
    grad_critic = 0.01 * 3**0.5  # below the limit
    if per_network:
        assert step["actor.weight"] == pytest.approx(0.5, rel=1e-5)  # clipped on its own
        assert step["critic.weight"] == pytest.approx(grad_critic, rel=1e-5)  # untouched
        assert algo.max_grad_norm == 0.5  # restored after the update
    else:  # SB3's joint clip scales the critic's small gradient down with the actor's
        assert step["critic.weight"] < 0.1 * grad_critic
