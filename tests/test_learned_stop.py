"""Learned stopping (issue 23, item 2): the env's stop action and zoom cost, the policy's stop
logit, the agents stage's learned-stop agent and the ``sasha_learned_stop`` row.

Fast: random slides and models (sasha_env.testing), agents trained for a few dozen steps.
"""

from __future__ import annotations

import json
import math
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch

import sasha_env  # noqa: F401 - registers Sasha-WSI-v0
from sasha_env.testing import check_env, random_models, random_slides, write_workdir
from sasha_models.actor_critic import SashaActorCritic
from sasha_models.policy import SashaActorCriticPolicy, SashaPPOPolicy
from sasha_models.spaces import action_space, observation_space, with_stop
from sasha_models.stopping import StopRule

D = 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: intra-op threads only add contention on a busy 2-core box."""
    torch.set_num_threads(1)  # conftest's _torch_threads_kept restores the count


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Six random slides (4 train), d = 8, random-init HAFED and TSU (tau 0.9)."""
    hafed, tsu = random_models(D, tau=0.9)
    return write_workdir(tmp_path_factory.mktemp("stop_wd"), random_slides(d=D), hafed, tsu)


def make(workdir, **kw):
    kw.setdefault("frac", 0.5)
    return gym.make("Sasha-WSI-v0", workdir=workdir, **kw).unwrapped


def first_legal(env) -> int:
    """The lowest-index legal patch (never the stop action)."""
    return int(np.flatnonzero(env.action_masks()[: env.max_patches])[0])


def neg_ce(env) -> float:
    """−CE of HAFED's prediction on the env's current state, from its probabilities."""
    return float(np.log(env.probabilities[env.slide.label]))


# ----------------------------------------------------------------------------- environment


def test_the_stop_action_is_one_more_action_and_always_legal(workdir):
    env, plain = make(workdir, frac=1.0, stop_action=True), make(workdir, frac=1.0)
    P = env.max_patches
    assert env.action_space == gym.spaces.Discrete(P + 1)
    assert plain.action_space == gym.spaces.Discrete(P)
    assert env.observation_space == plain.observation_space
    _, info = env.reset(options={"slide_id": "slide00"})
    plain.reset(options={"slide_id": "slide00"})
    n = info["n_patches"]
    masks = [info["action_mask"]]
    for _ in range(n - 1):  # every patch but one zoomed: stop is still legal
        a = first_legal(env)
        _, _, terminated, _, info = env.step(a)
        plain.step(a)
        assert not terminated
        masks.append(info["action_mask"])
        np.testing.assert_array_equal(info["action_mask"], env.action_masks())
    for mask in masks:
        assert mask.shape == (P + 1,) and mask.dtype == bool and mask[P]
    np.testing.assert_array_equal(masks[-1][:P], plain.action_masks())
    assert masks[-1][:P].sum() == 1
    _, _, terminated, _, info = env.step(first_legal(env))  # the last patch: the cap
    assert terminated and info["stopped"] == "cap" and info["frac_read"] == 1.0
    with pytest.raises(RuntimeError, match="reset"):
        env.step(P)


@pytest.mark.parametrize("reward", ["ce", "delta"])
@pytest.mark.parametrize("zooms", [0, 2])
def test_stop_ends_the_episode_on_the_current_state(workdir, reward, zooms):
    bonus = 0.25
    env = make(workdir, stop_action=True, zoom_cost=0.05, reward=reward, correct_bonus=bonus)
    plain = make(workdir, frac=1.0)  # steps to the same state without ending the episode
    _, info = env.reset(options={"slide_id": "slide02"})
    plain.reset(options={"slide_id": "slide02"})
    n, budget = info["n_patches"], info["budget"]
    assert budget > zooms
    rng = np.random.default_rng(3)
    zoomed = []
    r_plain = neg_ce(plain)  # the classification reward ("ce") of the low-res state
    for _ in range(zooms):
        a = int(rng.choice(np.flatnonzero(env.action_masks()[: env.max_patches])))
        env.step(a)
        _, r_plain, *_ = plain.step(a)
        zoomed.append(a)
    assert r_plain == pytest.approx(neg_ce(plain), abs=1e-6)
    obs, r, terminated, truncated, info = env.step(env.max_patches)
    assert terminated and not truncated and not info["illegal_action"]
    assert info["stopped"] == "learned" and info["zoomed"] == zoomed
    assert info["frac_read"] == zooms / n and obs["visited"].sum() == zooms
    np.testing.assert_array_equal(env.state(), plain.state())
    np.testing.assert_allclose(info["probabilities"], plain.probabilities, atol=1e-6)
    assert info["correct"] == (int(np.argmax(plain.probabilities)) == env.slide.label)
    # the rest of the budget on the state held (ce) or no change (delta); no zoom cost
    held = (budget - zooms) * r_plain if reward == "ce" else 0.0
    assert r == pytest.approx(held + bonus * info["correct"], abs=1e-5)
    assert env.changed_rows.size == 0
    with pytest.raises(RuntimeError, match="reset"):
        env.step(first_legal(env))


def test_every_zoom_pays_the_zoom_cost_and_nothing_else_does(workdir):
    cost = 0.07
    env = make(workdir, stop_action=True, zoom_cost=cost, illegal_penalty=-2.0)
    costed = make(workdir, zoom_cost=cost)  # the cost alone, without the stop action
    plain = make(workdir, illegal_penalty=-2.0)
    for e in (env, costed, plain):
        _, info = e.reset(options={"slide_id": "slide01"})
    budget = info["budget"]
    assert budget >= 3
    first = first_legal(plain)
    for t in range(budget):  # zoom, zoom the same patch again (illegal), then zoom on
        a = first if t < 2 else first_legal(plain)
        _, r_env, done_env, _, i_env = env.step(a)
        _, r_cost, _, _, _ = costed.step(a)
        _, r_plain, done_plain, _, i_plain = plain.step(a)
        assert done_env == done_plain == (t == budget - 1)
        if i_plain["illegal_action"]:
            assert r_env == r_plain == -2.0 and i_env["illegal_action"]
        else:
            assert r_env == pytest.approx(r_plain - cost, abs=1e-9)
            assert r_cost == pytest.approx(r_plain - cost, abs=1e-9)
    assert i_env["stopped"] == "cap" and "stopped" not in i_plain
    assert i_env["frac_read"] == i_plain["frac_read"]


def test_without_the_option_nothing_changes(workdir):
    env = make(workdir, frac=1.0)
    assert not env.stop_action and env.zoom_cost == 0.0
    _, info = env.reset(options={"slide_id": "slide00"})
    P = env.max_patches
    assert env.action_masks().shape == (P,) and info["action_mask"].shape == (P,)
    _, r, terminated, _, info = env.step(P)  # no stop action: an out-of-range, illegal step
    assert info["illegal_action"] and r == -1.0 and not terminated
    while not terminated:
        _, _, terminated, _, info = env.step(first_legal(env))
    assert "stopped" not in info


def test_incompatible_options_are_refused(workdir):
    with pytest.raises(ValueError, match="two stopping rules"):
        make(workdir, stop_action=True, stop_rule=StopRule(0.9))
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="zoom_cost"):
            make(workdir, stop_action=True, zoom_cost=bad)


def test_env_checkers_with_the_stop_action(workdir):
    check_env(gym.make("Sasha-WSI-v0", workdir=workdir, frac=0.5, stop_action=True, zoom_cost=0.01))


# ----------------------------------------------------------------------------- policy


def random_batch(b: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, n, D, generator=g)
    visited = (torch.rand(b, n, generator=g) < 0.3).to(torch.int8)
    valid = torch.ones(b, n, dtype=torch.int8)
    valid[:, -2:] = 0  # padding
    visited[:, -2:] = 0
    return features, visited, valid, torch.rand(b, n, 2, generator=g)


@pytest.mark.parametrize("arch", ["sasha", "official"])
def test_the_stop_logit_is_one_more_logit_invariant_to_row_order(arch):
    torch.manual_seed(0)
    kw = {"use_coords": arch == "sasha", "arch": arch}
    net = SashaActorCritic(D, d_hidden=16, stop_action=True, **kw).eval()
    torch.nn.init.normal_(net.actor_stop.weight)  # its small initial gain hides dependencies
    feats, visited, valid, coords = random_batch(3, 12)
    coords = coords if arch == "sasha" else None
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, value = net(feats, visited, valid, coords)
        p_logits, p_value = net(
            feats[:, perm],
            visited[:, perm],
            valid[:, perm],
            None if coords is None else coords[:, perm],
        )
        moved, _ = net(feats + 0.5, visited, valid, coords)  # another state
        more, _ = net(feats, torch.ones_like(visited) * valid, valid, coords)  # more read
    assert logits.shape == (3, 13)
    torch.testing.assert_close(p_logits[:, :12], logits[:, :12][:, perm])
    torch.testing.assert_close(p_logits[:, 12], logits[:, 12])
    torch.testing.assert_close(p_value, value)
    assert not torch.allclose(moved[:, 12], logits[:, 12])
    assert not torch.allclose(more[:, 12], logits[:, 12])
    # without the option: the same weights drawn for everything else, no stop parameters
    torch.manual_seed(0)
    plain = SashaActorCritic(D, d_hidden=16, **kw)
    shared = plain.state_dict()
    assert all(not k.startswith("actor_stop") for k in shared)
    for k, v in shared.items():
        torch.testing.assert_close(net.state_dict()[k], v)
    stop_params = {id(p) for n, p in net.named_parameters() if n.startswith("actor_stop")}
    assert stop_params and stop_params <= {id(p) for p in net.actor_parameters()}


def test_row_pooled_and_cached_passes_give_the_stop_logit_of_a_full_pass():
    torch.manual_seed(0)
    net = SashaActorCritic(D, d_hidden=16, stop_action=True)
    torch.nn.init.normal_(net.actor_stop.weight)
    feats, visited, valid, coords = random_batch(4, 10)
    feats[1] = feats[0]  # slots sharing rows, as consecutive steps do
    with torch.no_grad():
        full_logits, full_value = net.eval()(feats, visited, valid, coords)
        flat = torch.cat([feats.reshape(-1, D), visited.reshape(-1, 1).float(),
                          valid.reshape(-1, 1).float(), coords.reshape(-1, 2)], 1)  # fmt: skip
        rows, index = torch.unique(flat, dim=0, return_inverse=True)
        pooled = net.forward_pooled(
            rows[:, :D], rows[:, D], rows[:, D + 1], rows[:, D + 2 :], index.reshape(4, 10)
        )
        torch.testing.assert_close(pooled[0], full_logits)
        torch.testing.assert_close(pooled[1], full_value)
        feats[2, 3] += 1.0  # one row changes: the cached pass re-scores it alone
        cached = net(feats, visited, valid, coords)
    with torch.enable_grad():
        fresh = [t.detach() for t in net(feats, visited, valid, coords)]
    for x, y in zip(cached, fresh, strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("arch", ["sasha", "official"])
def test_row_wise_actor_outputs_give_the_forward_logits_and_stop_logit(arch):
    """``actor_outputs`` of a few rows are those rows' part of the forward pass, and
    ``stop_logit`` on every row's outputs is its last logit: what ``sasha predict`` keeps row
    by row for a learned-stop agent."""
    torch.manual_seed(0)
    kw = {"use_coords": arch == "sasha", "arch": arch}
    net = SashaActorCritic(D, d_hidden=16, stop_action=True, **kw).eval()
    torch.nn.init.normal_(net.actor_stop.weight)
    torch.nn.init.normal_(net.actor_stop_attn.w.weight, std=5.0)  # a pooling far from uniform
    feats, visited, valid, coords = random_batch(2, 12)
    valid[:] = 1  # one slide's real rows, as predict holds them
    coords = coords if arch == "sasha" else None
    with torch.no_grad():
        logits, _ = net(feats, visited, valid, coords)
        outs = net.actor_outputs(feats, visited, coords)
        stop = net.stop_logit(outs[1], outs[2], visited, valid)
        rows = torch.tensor([0, 5, 11])
        some = net.actor_outputs(
            feats[1, rows], visited[1, rows], None if coords is None else coords[1, rows]
        )
    assert len(outs) == 3 and outs[1].shape[:2] == (2, 12)
    torch.testing.assert_close(outs[0], logits[:, :12])
    torch.testing.assert_close(stop, logits[:, 12:])
    for kept, fresh in zip(outs, some, strict=True):
        torch.testing.assert_close(fresh, kept[1, rows])
    plain = SashaActorCritic(D, d_hidden=16, **kw)
    assert len(plain.actor_outputs(feats, visited, coords)) == 1
    with pytest.raises(ValueError, match="no stop action"):
        plain.stop_logit(outs[1], outs[2], visited, valid)


@pytest.mark.parametrize("cls", [SashaActorCriticPolicy, SashaPPOPolicy])
def test_policies_mask_patches_and_never_stop(cls):
    P = 6
    policy = cls(observation_space(P, D), action_space(P, stop=True), lambda _: 1e-3)
    assert policy.net.stop_action
    feats, visited, valid, coords = random_batch(2, P)
    obs = {"features": feats, "visited": visited, "valid": valid, "coords": coords}
    legal = with_stop((valid > 0) & (visited == 0))
    with torch.no_grad():
        probs = policy.get_distribution(obs).distribution.probs
        assert probs.shape == (2, P + 1)
        assert torch.all(probs[~legal] == 0) and torch.all(probs[legal] > 0)
        assert torch.all(probs[:, P] > 0)  # stop, whatever was read
        given = legal.clone()
        given[:, 0] = False  # a mask handed over by MaskablePPO narrows it further
        narrowed = policy.get_distribution(obs, action_masks=given.numpy()).distribution.probs
        assert torch.all(narrowed[:, 0] == 0) and torch.all(narrowed[:, P] > 0)
        actions, _, _ = policy(obs)
        assert all(legal[i, a] for i, a in enumerate(actions.tolist()))
    official = cls(
        observation_space(P, D), action_space(P, stop=True), lambda _: 1e-3, masked_update=False
    )
    with torch.no_grad():  # the official update masks padding alone; stop stays in
        _, log_prob, _ = official.evaluate_actions(obs, torch.tensor([P, P]))
        assert torch.all(torch.isfinite(log_prob))
    with pytest.raises(ValueError, match="Discrete"):
        cls(observation_space(P, D), gym.spaces.Discrete(P + 2), lambda _: 1e-3)


def test_the_stop_action_is_taken_when_its_logit_wins(workdir):
    """A hand-set stop head: stop once more than 30 % of the slide is read (every patch logit
    0, the stop logit 1000·(read − 0.3)), so the stops are known in advance."""
    from sasha_env.agents.episodes import agent_policy, run_episodes

    env = make(workdir, frac=0.8, stop_action=True, split=None)
    policy = SashaActorCriticPolicy(env.observation_space, env.action_space, lambda _: 1e-3)
    set_stop_after(policy, 0.3)
    episodes = run_episodes(env, agent_policy(policy), env.slide_ids)
    for e in episodes:
        n = e["n_patches"]
        assert e["stopped"] == "learned" and len(e["zoomed"]) == math.floor(0.3 * n) + 1
        assert e["zoomed"] == sorted(e["zoomed"])  # ties: the lowest index first


def set_stop_after(policy, read: float) -> None:
    """Patch logits all 0; stop logit 1000·(fraction read − ``read``)."""
    net = policy.net
    with torch.no_grad():
        net.actor_attn.w.weight.zero_()
        net.actor_attn.w.bias.zero_()
        net.actor_stop.weight.zero_()
        net.actor_stop.weight[0, -1] = 1000.0
        net.actor_stop.bias.fill_(-1000.0 * read)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("algo", ["maskable_ppo", "ppo", "a2c", "dqn"])
def test_every_algorithm_trains_and_exports_a_stop_agent(workdir, tmp_path, algo):
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.export import load_policy
    from sasha_env.agents.train import train_agent

    cfg = AgentConfig(
        algo=algo, total_timesteps=48, n_envs=1, n_steps=16, batch_size=16, n_epochs=1, d_hidden=16
    )
    env = make(workdir, stop_action=True, zoom_cost=0.02)
    model = train_agent(env, cfg=cfg, out_dir=tmp_path, progress=False)
    P = env.max_patches
    desc = json.loads((tmp_path / "policy.json").read_text())
    assert desc["n_actions"] == P + 1 and model.action_space.n == P + 1
    assert json.loads((tmp_path / "agent.json").read_text())["learned_stop"] == {"zoom_cost": 0.02}
    loaded = load_policy(tmp_path)
    assert loaded.action_space.n == P + 1
    obs, _ = env.reset(options={"slide_id": "slide00"})
    if algo == "dqn":
        q = model.policy.q_net(model.policy.obs_to_tensor(obs)[0])
        torch.testing.assert_close(loaded.q_net(loaded.obs_to_tensor(obs)[0]), q)
    else:
        want = model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0])
        got = loaded.get_distribution(loaded.obs_to_tensor(obs)[0])
        torch.testing.assert_close(got.distribution.probs, want.distribution.probs)


def test_exports_with_another_action_count_are_refused(workdir, tmp_path):
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.export import load_policy
    from sasha_env.agents.train import train_agent

    cfg = AgentConfig(total_timesteps=16, n_envs=1, n_steps=16, batch_size=16, n_epochs=1)
    train_agent(make(workdir), cfg=cfg, out_dir=tmp_path, progress=False)
    desc = json.loads((tmp_path / "policy.json").read_text())
    assert desc["n_actions"] == desc["max_patches"]  # a fixed-budget agent: as before
    assert load_policy(tmp_path).action_space.n == desc["max_patches"]
    (tmp_path / "policy.json").write_text(
        json.dumps({**desc, "n_actions": desc["max_patches"] + 2})
    )
    with pytest.raises(ValueError, match="n_actions"):
        load_policy(tmp_path)


# ----------------------------------------------------------------------------- configuration


def test_the_agents_config_checks_the_learned_stop_options():
    from sasha_env.agents.config import AgentConfig, agent_name
    from sasha_env.config import load_config
    from sasha_env.pipeline.schema import ConfigError, validate_config

    cfg = AgentConfig.from_dict({"stop": "learned", "zoom_cost": 0.02})
    assert (cfg.stop, cfg.zoom_cost) == ("learned", 0.02)
    assert AgentConfig().stop == "none" and AgentConfig().zoom_cost == 0.01
    assert agent_name(0.1, "maskable_ppo", learned_stop=True) == "sasha-0.1-stop"
    assert agent_name(0.2, "ppo") == "ppo-0.2"
    for bad, match in (
        ({"stop": "auto"}, "agents.stop"),
        ({"zoom_cost": -0.5}, "agents.zoom_cost"),
        ({"zoom_cost": math.nan}, "agents.zoom_cost"),
        ({"stop": "learned", "protocol": "paper"}, "protocol 'sb3'"),
    ):
        with pytest.raises(ValueError, match=match):
            AgentConfig.from_dict(bad)
    validate_config(load_config("tiny", overrides={"agents": {"stop": "learned", "zoom_cost": 0}}))
    for bad, match in (
        ({"stop": "auto"}, "none or learned"),
        ({"zoom_cost": -1.0}, ">= 0"),
        ({"zoom_cost": "high"}, "not of type float"),
    ):
        with pytest.raises(ConfigError, match=match):
            validate_config(load_config("tiny", overrides={"agents": bad}))


# ----------------------------------------------------------------------------- workdir


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from sasha_env.testing import make_workdir

    return make_workdir(
        tmp_path_factory.mktemp("learned") / "wd", n_slides=12, n_patches=(10, 16), fracs=(0.5,)
    )


def test_the_agents_stage_trains_a_learned_stop_agent_beside_the_fixed_one(made, tmp_path):
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.envs import load_agent
    from sasha_env.pipeline.runner import Pipeline
    from sasha_env.pipeline.stages import REGISTRY, StageContext
    from sasha_env.workdir import Workdir

    root = tmp_path / "wd"
    shutil.copytree(made.root, root)
    stage, messages = REGISTRY["agents"], []

    def run(section: dict) -> tuple[Pipeline, dict]:
        p = Pipeline(
            root,
            preset="tiny",
            overrides={"agents": section, "seed": made.config["seed"]},
            progress=False,
            log=messages.append,
        )
        ctx = StageContext(stage, p.key(stage), root / "stages" / "agents.units")
        return p, stage.run(p, ctx)

    learned = {**made.config["agents"], "stop": "learned", "zoom_cost": 0.02}
    p, out = run(learned)
    assert set(out) == {"agents", "algo", "learned_stop"}
    assert set(out["agents"]) == set(out["learned_stop"]) == {"0.5"}
    fixed_dir, stop_dir = root / "agents" / "sasha-0.5", root / "agents" / "sasha-0.5-stop"
    assert out["learned_stop"]["0.5"]["agent"] == str(stop_dir / "policy.pt")
    fixed, stop = (json.loads((d / "policy.json").read_text()) for d in (fixed_dir, stop_dir))
    assert stop["n_actions"] == fixed["n_actions"] + 1 == fixed["max_patches"] + 1
    meta = json.loads((stop_dir / "agent.json").read_text())
    assert meta["learned_stop"] == {"zoom_cost": 0.02} and meta["frac"] == 0.5
    wd, cfg = Workdir(root), AgentConfig.from_dict(learned)
    agent = load_agent(wd, 0.5, learned_stop=True)
    env = agent.make_env(wd, "test", cfg)
    assert agent.learned_stop and env.stop_action and env.zoom_cost == 0.02
    assert not load_agent(wd, 0.5).make_env(wd, "test", cfg).stop_action
    shutil.copytree(stop_dir, root / "agents" / "sasha-0.7")  # a stop agent where none belongs
    with pytest.raises(ValueError, match="with the stop action"):
        load_agent(wd, 0.7)
    # the fixed agent's unit is keyed without the stop options: a run without them keeps it
    plain_p, plain_out = run(made.config["agents"])
    unit = json.loads((root / "stages" / "agents.units" / "sasha-0.5.json").read_text())
    assert unit["key"] == plain_p.key(stage) == p.key(stage, drop=("stop", "zoom_cost"))
    assert plain_p.key(stage) != p.key(stage)
    assert "learned_stop" not in plain_out and plain_out["agents"] == out["agents"]
    assert "[agents] f=0.5: trained earlier, kept" in messages
    # another cost retrains the learned-stop agent alone
    messages.clear()
    _, again = run({**learned, "zoom_cost": 0.05})
    assert messages.count("[agents] f=0.5: trained earlier, kept") == 1
    assert any("learned stop at 0.05 per zoom" in m for m in messages)
    assert again["agents"] == out["agents"]
    assert json.loads((stop_dir / "agent.json").read_text())["learned_stop"]["zoom_cost"] == 0.05


def test_evaluation_reports_the_learned_rule_beside_the_threshold_rule(made):
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.envs import load_agent
    from sasha_env.agents.episodes import agent_policy, run_episodes
    from sasha_env.agents.export import POLICY_WEIGHTS
    from sasha_env.agents.train import train_agent
    from sasha_env.pipeline.calibrate import calibrate_workdir
    from sasha_env.pipeline.evaluate import evaluate_workdir, format_table
    from sasha_env.workdir import Workdir
    from sasha_models.metrics import classification_metrics
    from test_pipeline import check_learned_stop_rows

    wd = Workdir(made)
    section = {**made.config["agents"], "stop": "learned", "zoom_cost": 0.02}
    config = {**made.config, "agents": section}
    cfg = AgentConfig.from_dict(section)
    train_agent(wd, 0.5, cfg, seed=0, progress=False, learned_stop=True)
    # hand-set heads, so that where it stops is known: once more than 30 % is read
    agent = load_agent(wd, 0.5, learned_stop=True)
    set_stop_after(agent.policy, 0.3)
    torch.save(agent.policy.state_dict(), agent.path / POLICY_WEIGHTS)
    calibrate_workdir(wd, config, log=lambda m: None)
    results = evaluate_workdir(wd, config, log=lambda m: None)
    by = {(m["method"], m["frac"]): m for m in results["methods"]}
    row = by[("sasha_learned_stop", 0.5)]
    saved = json.loads((made.root / "episodes" / "sasha_learned_stop-0.5.json").read_text())
    test_ids = [s for s, split in made.splits.items() if split == "test"]
    assert [e["slide_id"] for e in saved] == test_ids and len(saved) == row["n_slides"]
    stopper = load_agent(wd, 0.5, learned_stop=True)  # as evaluation read it back
    online = run_episodes(stopper.make_env(wd, "test", cfg), agent_policy(stopper.policy), test_ids)
    for e, o in zip(saved, online, strict=True):
        assert e["zoomed"] == o["zoomed"] and e["stopped"] == o["stopped"] == "learned"
        assert len(e["zoomed"]) == math.floor(0.3 * o["n_patches"]) + 1
        assert e["frac_read"] == pytest.approx(len(e["zoomed"]) / o["n_patches"])
    fr = np.array([e["frac_read"] for e in saved])
    assert row["mean_frac"] == pytest.approx(fr.mean())
    assert row["frac_p50"] == pytest.approx(np.percentile(fr, 50))
    assert row["frac_p90"] == pytest.approx(np.percentile(fr, 90))
    assert row["share_stopped"] == 1.0 and row["zoom_cost"] == 0.02
    probs = np.stack([o["probabilities"] for o in online])
    metrics = classification_metrics(probs, np.array([o["label"] for o in online]))
    assert row["accuracy"] == pytest.approx(metrics["accuracy"])
    assert "temperature" in row["calibrated"]  # fitted on val where it stopped there
    assert ("sasha_adaptive", 0.5) in by and ("sasha", 0.5) in by
    pairs = {(p["a"], p["b"], p["metric"]) for p in results["paired"]}
    for other in ("sasha_adaptive@0.5", "sasha@0.5", "hafed@1"):
        for metric in ("auc", "accuracy"):
            assert ("sasha_learned_stop@0.5", other, metric) in pairs
    check_learned_stop_rows(results)
    table = format_table(results)
    assert f"| sasha_learned_stop | {row['mean_frac']:.2f} (cap 0.50) |" in table
    from sasha_env.pipeline.figures import write_adaptive_figures

    assert write_adaptive_figures(wd, results)[0].stat().st_size > 0
    # the threshold rule's row and the fixed agent's are those of a run without learned stopping
    plain = evaluate_workdir(wd, made.config, log=lambda m: None)
    assert not [m for m in plain["methods"] if m["method"] == "sasha_learned_stop"]
    plain_by = {(m["method"], m["frac"]): m for m in plain["methods"]}
    for key in (("sasha_adaptive", 0.5), ("sasha", 0.5)):
        assert plain_by[key]["auc"] == by[key]["auc"]
        assert plain_by[key].get("mean_frac") == by[key].get("mean_frac")


def test_the_study_aggregates_the_learned_rule_like_the_threshold_rule():
    from sasha_env.pipeline.study import aggregate, format_study

    def results(auc, mean_frac, stopped):
        rows = [
            {"method": method, "frac": 0.2, "auc": auc, "accuracy": 0.9, "f1": 0.9, "ece": 0.1,
             "mean_frac": mean_frac, "frac_p50": mean_frac, "frac_p90": 0.2, **extra}
            for method, extra in (
                ("sasha_learned_stop", {"share_stopped": stopped}),
                ("sasha_adaptive", {"share_confident": 0.5}),
            )
        ]  # fmt: skip
        paired = [
            {"a": "sasha_learned_stop@0.2", "b": "sasha_adaptive@0.2", "metric": "auc",
             "diff": auc - 0.9, "ci": [-0.1, 0.1]}
        ]  # fmt: skip
        return {"n_slides": 10, "paired": paired, "methods": rows}

    summary = aggregate({0: results(0.9, 0.05, 0.5), 1: results(1.0, 0.15, 1.0)}, "demo")
    row = next(r for r in summary["methods"] if r["method"] == "sasha_learned_stop")
    assert row["auc_mean"] == pytest.approx(0.95) and row["mean_frac_mean"] == pytest.approx(0.1)
    assert row["share_stopped_mean"] == pytest.approx(0.75)
    assert [p["mean_frac"] for p in row["per_seed"]] == [0.05, 0.15]
    (pair,) = summary["paired"]
    assert pair["a"] == "sasha_learned_stop@0.2" and pair["diff_mean"] == pytest.approx(0.05)
    curve = {(c["method"], c["frac"]): c for c in summary["budget_curve"]}
    assert curve[("sasha_learned_stop", 0.2)]["mean_frac_mean"] == pytest.approx(0.1)
    assert "| sasha_learned_stop | 0.10 (cap 0.20) | 0.950 ± 0.071" in format_study(summary)
