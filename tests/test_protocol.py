"""The paper's training protocol: slide-ordered rollouts, an epoch budget, the official optimiser."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from sasha_env.agents.config import AgentConfig, steps_for
from sasha_env.agents.envs import make_env
from sasha_env.agents.export import load_policy
from sasha_env.agents.protocol import SlideSchedule
from sasha_env.agents.train import train_agent
from sasha_env.envs.wsi import episode_budget
from sasha_env.workdir import Workdir
from sasha_models.ppo_config import PPOConfig


def _cfg(**kw) -> AgentConfig:
    return AgentConfig(protocol="paper", d_hidden=16, **kw)


def test_paper_optimiser_per_budget():
    assert (PPOConfig.paper(0.1).clip_range, PPOConfig.paper(0.1).gae_lambda) == (0.2, 0.94)
    assert (PPOConfig.paper(0.2).clip_range, PPOConfig.paper(0.2).gae_lambda) == (0.1, 0.95)
    assert PPOConfig.paper(0.3).clip_range == 0.1  # the nearer of the two
    kw = PPOConfig.paper(0.1).to_sb3_kwargs(episode_len=1)
    assert (kw["ent_coef"], kw["gamma"], kw["max_grad_norm"], kw["n_epochs"]) == (
        0.001,
        1.0,
        0.5,
        4,
    )
    assert kw["learning_rate"] == 1e-5  # constant, as official
    assert kw["policy_kwargs"]["optimizer_class"] is torch.optim.AdamW
    assert kw["policy_kwargs"]["optimizer_kwargs"] == {"weight_decay": 1e-4}


def test_schedule_visits_every_slide_once_per_epoch_in_blocks(tiny_workdir):
    tiny_workdir = Workdir(tiny_workdir)
    env = make_env(tiny_workdir, "train", 0.2, _cfg())
    ids = list(env.slide_ids)
    sched = SlideSchedule(env, episodes_per_slide=2, seed=3)
    seen = [sched.reset()[1]["slide_id"] for _ in range(2 * len(ids) * 2)]  # two epochs
    epochs = [seen[: 2 * len(ids)], seen[2 * len(ids) :]]
    for epoch in epochs:
        assert Counter(epoch) == dict.fromkeys(ids, 2)
        assert all(epoch[i] == epoch[i + 1] for i in range(0, len(epoch), 2))  # back to back
    assert sched.epoch == 2
    again = SlideSchedule(make_env(tiny_workdir, "train", 0.2, _cfg()), 2, seed=3)
    assert [again.reset()[1]["slide_id"] for _ in seen] == seen  # seeded
    named = sched.reset(options={"slide_id": ids[0]})[1]["slide_id"]
    assert named == ids[0] and sched.epoch == 2  # a named slide passes through


class _Rollouts(BaseCallback):
    """Record the slide of every step, per rollout."""

    def __init__(self) -> None:
        super().__init__()
        self.rollouts: list[list[str]] = []

    def _on_rollout_start(self) -> None:
        self.rollouts.append([])

    def _on_step(self) -> bool:
        env = self.training_env.envs[0].unwrapped
        # after an auto-reset the env is on the next slide: the finished episode's info names it
        info = self.locals["infos"][0]
        self.rollouts[-1].append(info.get("slide_id", env.slide.slide_id))
        return True


def test_each_update_sees_whole_episodes_of_one_slide(tiny_workdir, tmp_path, monkeypatch):
    from sasha_env.agents.protocol import SlideOrderedPPO

    recorder = _Rollouts()

    original = SlideOrderedPPO.learn

    def learn(self, *a, callback=None, **kw):
        return original(self, *a, callback=[*callback, recorder], **kw)

    monkeypatch.setattr(SlideOrderedPPO, "learn", learn)
    cfg = _cfg(epochs=1)
    tiny_workdir = Workdir(tiny_workdir)
    out = tmp_path / "agent"
    train_agent(tiny_workdir, 0.2, cfg, out_dir=out, progress=False)
    env = make_env(tiny_workdir, "train", 0.2, cfg)
    budgets = {s: episode_budget(0.2, env.store.n_patches(s)) for s in env.slide_ids}
    assert len(recorder.rollouts) == len(budgets)  # one update per slide per epoch
    for steps in recorder.rollouts:
        assert len(set(steps)) == 1  # one slide per update
        assert len(steps) == 2 * budgets[steps[0]]  # two whole episodes of it
    assert sorted(s[0] for s in recorder.rollouts) == sorted(budgets)
    meta = json.loads((out / "agent.json").read_text())
    assert meta["timesteps"] == 2 * sum(budgets.values())
    # the official agent, recorded resolved and exported so that predict rebuilds it
    assert meta["config"]["policy_arch"] == "official" and meta["config"]["masked_update"] is False
    policy = load_policy(out)
    assert policy.net.arch == "official" and not policy.use_coords and not policy.masked_update


def test_episodes_per_slide_do_not_depend_on_the_budget(tiny_workdir, tmp_path):
    tiny_workdir = Workdir(tiny_workdir)
    counts = {}
    for frac in (0.1, 0.3):
        out = tmp_path / f"a{frac}"
        train_agent(tiny_workdir, frac, _cfg(epochs=2), out_dir=out, progress=False)
        with (out / "episodes.csv").open() as f:
            counts[frac] = Counter(r["slide_id"] for r in csv.DictReader(f))
    n_slides = len(make_env(tiny_workdir, "train", 0.1, _cfg()).slide_ids)
    assert counts[0.1] == counts[0.3] and len(counts[0.1]) == n_slides
    assert set(counts[0.1].values()) == {4}  # 2 epochs x 2 episodes


def test_paper_protocol_is_maskable_ppo_only():
    with pytest.raises(ValueError, match="maskable_ppo only"):
        AgentConfig.from_dict({"protocol": "paper", "algo": "a2c"})
    with pytest.raises(ValueError, match="choose one of sb3, paper"):
        AgentConfig.from_dict({"protocol": "official"})


def test_a_learning_rate_replaces_the_paper_rate(tiny_workdir):
    from stable_baselines3.common.vec_env import DummyVecEnv

    from sasha_env.agents.train import _algorithm

    wd = Workdir(tiny_workdir)
    for lr, schedule, peak, end in (
        (None, None, 1e-5, 1e-5),  # the official rate: constant
        (2e-4, None, 2e-4, 2e-4),
        (2e-4, "cosine", 2e-4, 0.0),  # ours, as an option: the cosine's peak
    ):
        cfg = _cfg(learning_rate=lr, lr_schedule=schedule)
        env = DummyVecEnv([lambda cfg=cfg: SlideSchedule(make_env(wd, "train", 0.1, cfg))])
        model = _algorithm(cfg, env, 0, "cpu", 0.1)
        assert model.lr_schedule(1.0) == pytest.approx(peak)
        assert model.lr_schedule(0.0) == pytest.approx(end)
        assert (model.clip_range(1.0), model.gae_lambda) == (0.2, 0.94)  # f = 0.1


def test_equal_episodes_scales_the_step_budget_with_f(tiny_workdir, tmp_path):
    cfg = AgentConfig(fracs=(0.1, 0.2), total_timesteps=32, n_envs=2, n_steps=16, batch_size=16,
                      n_epochs=1, d_hidden=16, equal_episodes=True)  # fmt: skip
    assert (steps_for(cfg, 0.1), steps_for(cfg, 0.2)) == (32, 64)
    assert steps_for(AgentConfig(total_timesteps=32), 0.2) == 32
    train_agent(Workdir(tiny_workdir), 0.2, cfg, out_dir=tmp_path / "a", progress=False)
    assert json.loads((tmp_path / "a" / "agent.json").read_text())["timesteps"] == 64


def test_the_last_policy_is_validated_after_its_update(tiny_workdir, tmp_path):
    # one epoch, validated at its end: that check runs when the last rollout ends, before
    # its update, so the final policy is new and must be scored too when training ends
    out = tmp_path / "a"
    train_agent(
        Workdir(tiny_workdir), 0.2, _cfg(epochs=1, val_every=1), out_dir=out, progress=False
    )
    with (out / "val_curve.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2


def test_a_one_step_block_trains_without_nan(tiny_workdir, tmp_path):
    import torch as th

    model = train_agent(
        Workdir(tiny_workdir), 0.01, _cfg(epochs=1, episodes_per_slide=1), out_dir=tmp_path / "a",
        progress=False,
    )  # fmt: skip  # f = 0.01: one zoom per episode, one step per update
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
