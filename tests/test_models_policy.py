"""SASHA's SB3 actor-critic: masks when acting and in the PPO update, equivariance, learning."""

from __future__ import annotations

import ast
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from stable_baselines3 import PPO

from sasha_models.actor_critic import SashaActorCritic, legal_action_mask, masked_log_prob
from sasha_models.policy import SashaActorCriticPolicy, SashaPPOPolicy
from sasha_models.ppo_config import CosineLR, PPOConfig
from sasha_models.spaces import action_space, observation_space

N, D, N_PAD, N_TARGETS, EPISODE = 12, 8, 3, 3, 4
POLICIES = [SashaActorCriticPolicy, SashaPPOPolicy]


class ZoomEnv(gym.Env):
    """Toy zoom task with the environment's observation contract.

    ``n`` patch rows, ``N_PAD`` of them padding (at random positions), ``N_TARGETS`` hidden
    targets among the valid ones whose features are shifted by +2 on the first dimension.
    Episode = ``EPISODE`` zooms; reward 1 for zooming a target, else 0. An illegal action
    raises, so a policy that ever samples one fails loudly.
    """

    def __init__(self, n: int = N, d: int = D) -> None:
        self.n, self.d = n, d
        self.observation_space = observation_space(n, d)
        self.action_space = action_space(n)

    def _obs(self) -> dict[str, np.ndarray]:
        return {
            "features": self.features.copy(),
            "visited": self.visited.copy(),
            "valid": self.valid.copy(),
            "coords": self.coords.copy(),
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        self.valid = np.ones(self.n, np.int8)
        self.valid[rng.choice(self.n, N_PAD, replace=False)] = 0
        self.visited = np.zeros(self.n, np.int8)
        self.features = rng.normal(size=(self.n, self.d)).astype(np.float32)
        self.targets = rng.choice(np.flatnonzero(self.valid), N_TARGETS, replace=False)
        self.features[self.targets, 0] += 2.0
        self.features[self.valid == 0] = 0.0
        self.coords = rng.random((self.n, 2)).astype(np.float32)
        self.t = 0
        return self._obs(), {}

    def action_masks(self) -> np.ndarray:
        return (self.valid == 1) & (self.visited == 0)

    def step(self, action):
        action = int(action)
        if not self.action_masks()[action]:
            raise AssertionError(f"illegal action {action}")
        self.visited[action] = 1
        self.t += 1
        reward = float(action in self.targets)
        return self._obs(), reward, self.t >= EPISODE, False, {}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: intra-op threads only add contention (10x slower on a busy 2-core box)."""
    torch.set_num_threads(1)  # conftest's _torch_threads_kept restores the count


def make_policy(cls, env: ZoomEnv | None = None, **kwargs):
    env = env or ZoomEnv()
    torch.manual_seed(0)
    return cls(env.observation_space, env.action_space, lambda _: 1e-3, **kwargs)


def batch_obs(n_obs: int = 6, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Observations mid-episode (0..3 patches visited), stacked; and their env masks."""
    env, rng = ZoomEnv(), np.random.default_rng(seed)
    obs_list, masks = [], []
    for i in range(n_obs):
        obs, _ = env.reset(seed=seed + i)
        for _ in range(i % EPISODE):
            obs, *_ = env.step(rng.choice(np.flatnonzero(env.action_masks())))
        obs_list.append(obs)
        masks.append(env.action_masks())
    stacked = {k: np.stack([o[k] for o in obs_list]) for k in obs_list[0]}
    return stacked, np.stack(masks)


def hand_log_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log softmax with illegal logits at -inf, ``(B, N)``."""
    return torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


# ----------------------------------------------------------------------------- (a) masks


def test_masked_log_prob_matches_hand() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, N, generator=g) * 3
    mask = torch.rand(5, N, generator=g) > 0.4
    mask[:, 0] = True
    actions = torch.stack([m.nonzero().flatten()[-1] for m in mask])
    expected = hand_log_probs(logits, mask).gather(1, actions[:, None]).squeeze(1)
    torch.testing.assert_close(masked_log_prob(logits, mask, actions), expected)


@pytest.mark.parametrize("cls", POLICIES)
def test_evaluate_actions_matches_hand_computation(cls) -> None:
    policy = make_policy(cls)
    np_obs, env_masks = batch_obs()
    obs, _ = policy.obs_to_tensor(np_obs)
    legal = torch.as_tensor(env_masks)
    assert torch.equal(legal_action_mask(obs), legal)
    with torch.no_grad():
        logits, values = policy.net.forward_obs(obs)
    actions = torch.stack([m.nonzero().flatten()[0] for m in legal])
    hand = hand_log_probs(logits, legal)
    expected = hand.gather(1, actions[:, None]).squeeze(1)
    hand_entropy = -(hand.exp() * hand.masked_fill(~legal, 0.0)).sum(-1)

    with torch.no_grad():
        for masks in (None, env_masks, np.ones_like(env_masks)):  # forgotten / given / all-ones
            v, log_prob, entropy = policy.evaluate_actions(obs, actions, action_masks=masks)
            torch.testing.assert_close(log_prob, expected)
            torch.testing.assert_close(entropy, hand_entropy)
            torch.testing.assert_close(v, values)

        # Stricter explicit masks are intersected with the observation's legal set.
        stricter = legal.clone()
        stricter[
            torch.arange(len(actions)), torch.stack([m.nonzero().flatten()[-1] for m in legal])
        ] = False
        _, log_prob, _ = policy.evaluate_actions(obs, actions, action_masks=stricter.numpy())
        expected_strict = hand_log_probs(logits, stricter).gather(1, actions[:, None]).squeeze(1)
        torch.testing.assert_close(log_prob, expected_strict)

        # A visited patch has (numerically) zero probability in the update too.
        visited_action = torch.stack([(~m).nonzero().flatten()[0] for m in legal])
        _, log_prob, _ = policy.evaluate_actions(obs, visited_action)
        assert (log_prob < -1e6).all()


# ----------------------------------------------------------------------------- (b) legality


@pytest.mark.parametrize("cls", POLICIES)
def test_illegal_actions_never_sampled(cls) -> None:
    policy = make_policy(cls)
    with torch.no_grad():  # spread the logits so illegal rows would often win if unmasked
        policy.net.actor_attn.w.weight.mul_(500.0)
    np_obs, env_masks = batch_obs(n_obs=8, seed=3)
    reps = 250
    many = {k: np.repeat(v, reps, axis=0) for k, v in np_obs.items()}
    legal = np.repeat(env_masks, reps, axis=0)

    actions, _ = policy.predict(many, deterministic=False)
    assert legal[np.arange(len(actions)), actions].all()
    greedy, _ = policy.predict(many, deterministic=True)
    assert legal[np.arange(len(greedy)), greedy].all()

    obs, _ = policy.obs_to_tensor(np_obs)
    with torch.no_grad():
        probs = policy.get_distribution(obs).distribution.probs
    assert (probs[~torch.as_tensor(env_masks)] == 0).all()

    if cls is SashaActorCriticPolicy:  # explicit, stricter masks are honoured too
        stricter = legal.copy()
        stricter[:, : N // 2] = False
        stricter[~stricter.any(1), N - 1] = True
        stricter &= legal
        keep = stricter.any(1)
        sub = {k: v[keep] for k, v in many.items()}
        actions, _ = policy.predict(sub, action_masks=stricter[keep], deterministic=False)
        assert stricter[keep][np.arange(len(actions)), actions].all()


# ----------------------------------------------------------------------------- (c, d) sets


def random_inputs(b: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, n, D, generator=g)
    visited = (torch.rand(b, n, generator=g) < 0.3).to(torch.int8)
    valid = (torch.rand(b, n, generator=g) < 0.8).to(torch.int8)
    valid[:, 0] = 1
    coords = torch.rand(b, n, 2, generator=g)
    return features, visited, valid, coords


def test_permutation_equivariance() -> None:
    torch.manual_seed(0)
    net = SashaActorCritic(D, d_hidden=32).eval()
    features, visited, valid, coords = random_inputs(3, N)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, value = net(features, visited, valid, coords)
        p_logits, p_value = net(
            features[:, perm], visited[:, perm], valid[:, perm], coords[:, perm]
        )
    torch.testing.assert_close(p_logits, logits[:, perm])
    torch.testing.assert_close(p_value, value)


def test_other_max_patches_same_weights() -> None:
    trained = make_policy(SashaActorCriticPolicy)  # built for N = 12
    net = trained.net.eval()
    features, visited, valid, coords = random_inputs(2, N)
    n_big = 30
    pad = n_big - N  # the same slide with more padding rows appended
    with torch.no_grad():
        logits, value = net(features, visited, valid, coords)
        big_logits, big_value = net(
            torch.cat([features, torch.randn(2, pad, D)], 1),
            torch.cat([visited, torch.zeros(2, pad, dtype=torch.int8)], 1),
            torch.cat([valid, torch.zeros(2, pad, dtype=torch.int8)], 1),
            torch.cat([coords, torch.rand(2, pad, 2)], 1),
        )
    assert big_logits.shape == (2, n_big)
    torch.testing.assert_close(big_logits[:, :N], logits)
    torch.testing.assert_close(big_value, value)  # padding is outside the critic's pooling

    # A policy for another max_patches loads the same state dict and acts legally.
    big_env = ZoomEnv(n=n_big)
    big = make_policy(SashaActorCriticPolicy, big_env)
    big.load_state_dict(trained.state_dict())
    obs, _ = big_env.reset(seed=0)
    action, _ = big.predict(obs, deterministic=True)
    assert big_env.action_masks()[int(action)]


# ----------------------------------------------------------------------------- (e) learning

LEARN_KW = {"n_steps": 128, "batch_size": 64, "n_epochs": 10, "learning_rate": 3e-3}


def hit_rate(act, n_episodes: int = 60, seed: int = 1000) -> float:
    """Fraction of zooms that land on a target patch over fixed held-out episodes."""
    env, hits, steps = ZoomEnv(), 0.0, 0
    for k in range(n_episodes):
        obs, _ = env.reset(seed=seed + k)
        done = False
        while not done:
            obs, reward, done, _, _ = env.step(act(obs, env))
            hits, steps = hits + reward, steps + 1
    return hits / steps


@pytest.mark.parametrize(
    ("algo", "cls"), [(MaskablePPO, SashaActorCriticPolicy), (PPO, SashaPPOPolicy)]
)
def test_learns_to_zoom_on_targets(algo, cls) -> None:
    model = algo(cls, ZoomEnv(), seed=0, policy_kwargs={"d_hidden": 64}, **LEARN_KW)
    model.learn(512)  # the env raises on any illegal action taken during the rollouts
    rng = np.random.default_rng(0)
    random = hit_rate(lambda o, e: int(rng.choice(np.flatnonzero(e.action_masks()))))

    def greedy(obs, env):
        kw = {"action_masks": env.action_masks()} if algo is MaskablePPO else {}
        return int(model.predict(obs, deterministic=True, **kw)[0])

    learned = hit_rate(greedy)
    # random ≈ 1/3 (3 targets among 9 valid rows); a perfect policy gets 3/4.
    assert random < 0.45
    assert learned > 0.5, (learned, random)


# ----------------------------------------------------------------------------- (f) save/load


@pytest.mark.parametrize("time_aware", [False, True])
@pytest.mark.parametrize(
    ("algo", "cls"), [(MaskablePPO, SashaActorCriticPolicy), (PPO, SashaPPOPolicy)]
)
def test_save_load_round_trip(algo, cls, time_aware, tmp_path: Path) -> None:
    kwargs = {"time_aware_critic": True} if time_aware else {}
    model = algo(
        cls, ZoomEnv(), seed=0, n_steps=32, batch_size=32, n_epochs=1, policy_kwargs=kwargs
    )
    model.learn(32)
    model.save(tmp_path / "agent")
    loaded = algo.load(tmp_path / "agent", device="cpu")
    assert isinstance(loaded.policy, cls)
    np_obs, masks = batch_obs(n_obs=8, seed=5)
    kw = {"action_masks": masks} if algo is MaskablePPO else {}
    a, _ = model.predict(np_obs, deterministic=True, **kw)
    b, _ = loaded.predict(np_obs, deterministic=True, **kw)
    np.testing.assert_array_equal(a, b)
    for k, v in model.policy.state_dict().items():
        torch.testing.assert_close(loaded.policy.state_dict()[k], v)
    assert loaded.policy.net.time_aware_critic is time_aware  # the flag is saved with it


@pytest.mark.parametrize("arch", ["sasha", "official"])
def test_a_time_aware_critic_reads_the_share_of_the_slide_zoomed(arch) -> None:
    """The value head reads ``[pooled critic rows, zoomed / real patches]``; the actor and the
    default critic do not depend on the option."""
    features, visited, valid, coords = random_inputs(3, 10)
    valid[:] = 1
    valid[2, 7:] = 0  # a padded slide: the share counts its real patches only
    visited[:] = 0
    visited[0, :2], visited[1, :5], visited[2, [0, 3, 6, 8]] = 1, 1, 1  # 8 is padding
    use = None if arch == "official" else coords
    torch.manual_seed(0)
    plain = SashaActorCritic(D, d_hidden=16, arch=arch, use_coords=arch == "sasha")
    torch.manual_seed(0)
    aware = SashaActorCritic(
        D, d_hidden=16, arch=arch, use_coords=arch == "sasha", time_aware_critic=True
    )
    assert plain.value_head.in_features + 1 == aware.value_head.in_features
    with torch.no_grad():
        aware.load_state_dict(
            {k: v for k, v in plain.state_dict().items() if not k.startswith("value_head")},
            strict=False,
        )
        logits_p, value_p = plain(features, visited, valid, use)
        logits_a, value_a = aware(features, visited, valid, use)
        torch.testing.assert_close(logits_a, logits_p)  # the actor is the same network
        # the same pooled rows as the plain critic's, by hand, and the share read
        aware.value_head.weight[:, :-1] = plain.value_head.weight
        aware.value_head.bias[:] = plain.value_head.bias
        aware.value_head.weight[:, -1] = 2.0
        _, value_a = aware(features, visited, valid, use)
    read = torch.tensor([2 / 10, 5 / 10, 3 / 7])
    torch.testing.assert_close(value_a[:, 0], value_p[:, 0] + 2.0 * read)


# ----------------------------------------------------------------------------- config, misc


def test_ppo_config_to_sb3_kwargs() -> None:
    cfg = PPOConfig()
    kw = cfg.to_sb3_kwargs(episode_len=10)
    assert kw["n_steps"] == 20 and kw["batch_size"] == 20  # two episodes, one full batch
    assert (kw["gamma"], kw["gae_lambda"], kw["clip_range"], kw["n_epochs"]) == (1.0, 0.95, 0.1, 4)
    assert kw["policy_kwargs"]["optimizer_class"] is torch.optim.AdamW
    assert kw["learning_rate"] == 1e-5  # constant, as official
    lr = PPOConfig(n_steps=64, cosine=True).to_sb3_kwargs()["learning_rate"]  # ours, an option
    assert isinstance(lr, CosineLR) and lr(1.0) == pytest.approx(1e-5) and lr(0.0) == 0.0

    model = MaskablePPO(
        SashaActorCriticPolicy,
        ZoomEnv(),
        **cfg.to_sb3_kwargs(EPISODE, policy_kwargs={"d_hidden": 16}),
    )
    assert model.policy.net.d_hidden == 16
    assert isinstance(model.policy.optimizer, torch.optim.AdamW)


def test_rejects_wrong_observation_space() -> None:
    env = ZoomEnv()
    no_coords = spaces.Dict({k: v for k, v in env.observation_space.items() if k != "coords"})
    with pytest.raises(ValueError, match="coords"):
        SashaActorCriticPolicy(no_coords, env.action_space, lambda _: 1e-3)
    policy = SashaActorCriticPolicy(no_coords, env.action_space, lambda _: 1e-3, use_coords=False)
    obs, _ = env.reset(seed=0)
    obs.pop("coords")
    assert env.action_masks()[int(policy.predict(obs, deterministic=True)[0])]


@pytest.mark.parametrize("module", ["actor_critic", "policy", "ppo_config"])
def test_policy_modules_import_nothing_from_sasha_env(module) -> None:
    import importlib

    mod = importlib.import_module(f"sasha_models.{module}")
    tree = ast.parse(Path(mod.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(name.startswith("sasha_env") for name in names)


@pytest.mark.parametrize("use_coords", [True, False])
def test_actor_logits_of_a_few_rows_equal_the_full_forward(use_coords):
    """Rows are scored on their own: re-scoring a subset gives the forward pass's logits
    (what lets ``sasha predict`` re-score only the rows a zoom changed)."""
    torch.manual_seed(0)
    net = SashaActorCritic(16, d_hidden=8, use_coords=use_coords).eval()
    feats, coords = torch.randn(1, 40, 16), torch.rand(1, 40, 2)
    visited = (torch.rand(1, 40) < 0.3).to(torch.int8)
    valid = torch.ones(1, 40, dtype=torch.int8)
    with torch.inference_mode():
        logits, _ = net(feats, visited, valid, coords if use_coords else None)
        rows = torch.tensor([3, 17, 39])
        some = net.actor_logits(
            feats[0, rows], visited[0, rows], coords[0, rows] if use_coords else None
        )
    torch.testing.assert_close(some, logits[0, rows])


@pytest.mark.parametrize("use_coords", [True, False])
def test_acting_recomputes_only_the_changed_rows_and_never_serves_stale_outputs(use_coords):
    """While acting, rows equal to the last call's are served from the cache; a changed row,
    changed weights or another batch shape are computed afresh."""
    torch.manual_seed(0)
    net = SashaActorCritic(16, d_hidden=8, use_coords=use_coords).eval()
    torch.nn.init.normal_(net.actor_attn.w.weight)
    seen: list[int] = []
    net.actor_attn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        return [
            torch.randn(3, 20, 16, generator=g),
            (torch.rand(3, 20, generator=g) < 0.3).float(),
            torch.ones(3, 20),
            torch.rand(3, 20, 2, generator=g) if use_coords else None,
        ]

    def fresh(args):  # no cache with gradients on
        with torch.enable_grad():
            return [t.detach() for t in net(*args)]

    args = batch(0)
    with torch.no_grad():
        net(*args)
        args[0][0, 3] += 1.0  # a TSU update
        args[1][1, 5] = 1 - args[1][1, 5]  # a zoom's visited flag alone
        if use_coords:
            args[3][2, 7, 1] += 0.5
        seen.clear()
        got = net(*args)
        assert seen == [3 if use_coords else 2]  # only the changed rows went through the network
        for x, y in zip(got, fresh(args), strict=True):
            torch.testing.assert_close(x, y)
        with torch.no_grad():
            net.critic_mlp[0].weight.mul_(1.5)  # an optimiser step
        for x, y in zip(net(*args), fresh(args), strict=True):
            torch.testing.assert_close(x, y)
        other = [None if t is None else t[:2, :11] for t in batch(1)]
        for x, y in zip(net(*other), fresh(other), strict=True):
            torch.testing.assert_close(x, y)
