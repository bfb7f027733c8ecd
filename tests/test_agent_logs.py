"""The agents' training logs: SB3's progress.csv beside each agent, the same keys in W&B."""

from __future__ import annotations

import csv
from collections import Counter
from types import SimpleNamespace

import pytest

from sasha_env.agents.config import AgentConfig
from sasha_env.agents.train import train_agent

PPO_KEYS = {
    "rollout/ep_rew_mean",
    "rollout/ep_len_mean",
    "time/fps",
    "train/loss",
    "train/policy_gradient_loss",
    "train/value_loss",
    "train/entropy_loss",
    "train/approx_kl",
    "train/clip_fraction",
    "train/explained_variance",
}
VAL_KEYS = {"val/auc", "val/f1", "val/score"}


class FakeRun:
    """Records what a W&B run is given. W&B merges calls that pass the same ``step=`` into
    one history row, so every call with an explicit step that repeats counts as a lost row."""

    def __init__(self, **kwargs):
        self.init_kwargs = kwargs
        self.config = SimpleNamespace(update=lambda d, **kw: self.init_kwargs["config"].update(d))
        self.rows: list[dict] = []
        self.steps: list[int] = []
        self.metrics: dict[str, dict] = {}
        self.finished = False

    def log(self, data, step=None, commit=None):
        if step is not None:
            self.steps.append(step)
            if self.steps.count(step) > 1:  # W&B: same step, same row -> the earlier one is lost
                self.rows.pop()
        self.rows.append(dict(data))

    def define_metric(self, name, step_metric=None, **kw):
        self.metrics[name] = {"step_metric": step_metric}

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    import wandb

    runs: list[FakeRun] = []

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    return runs


def test_progress_csv_and_wandb_rows_like_sb3_and_no_episode_lost(
    tiny_workdir, tmp_path, fake_wandb
):
    cfg = AgentConfig(
        n_envs=4, n_steps=16, batch_size=32, n_epochs=1, total_timesteps=128, val_every=1,
        d_hidden=16,
    )  # fmt: skip
    out = tmp_path / "agent"
    train_agent(tiny_workdir, 0.1, cfg, out_dir=out, progress=False, wandb={}, run_config={"pipeline": {"x": 1}})  # fmt: skip
    rows = list(csv.DictReader((out / "progress.csv").open()))
    assert len(rows) >= 2
    keys = set(rows[0])
    assert keys >= PPO_KEYS | VAL_KEYS, sorted((PPO_KEYS | VAL_KEYS) - keys)
    assert any(r["train/loss"] for r in rows) and any(r["val/auc"] or r["val/score"] for r in rows)
    steps = [int(r["time/total_timesteps"]) for r in rows if r["time/total_timesteps"]]
    assert steps == sorted(steps) and steps[-1] == 128
    assert rows[-1]["train/loss"]  # the last update's keys are written when training ends

    (run,) = fake_wandb
    assert run.finished
    config = run.init_kwargs["config"]
    assert config["agents"]["n_envs"] == 4 and config["agents"]["d_hidden"] == 16
    assert config["pipeline"] == {"x": 1} and config["frac"] == 0.1 and config["algo"]
    assert run.metrics["*"]["step_metric"] == "global_step"
    logged = set().union(*run.rows)
    assert logged >= PPO_KEYS | VAL_KEYS
    assert all("global_step" in r for r in run.rows)

    # several envs finishing on one step: each episode is a row of its own, in both logs
    episodes = list(csv.DictReader((out / "episodes.csv").open()))
    per_step = Counter(r["timestep"] for r in episodes)
    assert max(per_step.values()) > 1, "the test needs episodes that end on the same step"
    wandb_episodes = [r for r in run.rows if "episode/return" in r]
    assert len(wandb_episodes) == len(episodes)
    assert [r["episode/return"] for r in wandb_episodes] == [
        pytest.approx(float(r["episode_return"])) for r in episodes
    ]


def test_the_run_config_names_the_algorithm_and_a2c_logs_its_own_keys(
    tiny_workdir, tmp_path, fake_wandb
):
    from stable_baselines3 import A2C

    cfg = AgentConfig(algo="a2c", n_envs=2, n_steps=8, total_timesteps=64, d_hidden=16)
    model = train_agent(tiny_workdir, 0.1, cfg, out_dir=tmp_path / "a2c", progress=False, wandb={})  # fmt: skip
    assert type(model) is A2C
    rows = list(csv.DictReader((tmp_path / "a2c" / "progress.csv").open()))
    assert {"train/policy_loss", "train/value_loss", "train/entropy_loss"} <= set(rows[0])
    assert "train/clip_fraction" not in rows[0]  # PPO's, not A2C's
    assert fake_wandb[0].init_kwargs["config"]["algo"] == "a2c"


def test_dqn_updates_within_a_short_budget_and_logs_its_loss(tiny_workdir, tmp_path):
    from stable_baselines3 import DQN

    from sasha_env.agents.train import dqn_learning_starts

    cfg = AgentConfig(algo="dqn", n_envs=1, batch_size=8, total_timesteps=64, extra={"buffer_size": 200})  # fmt: skip
    model = train_agent(tiny_workdir, 0.1, cfg, out_dir=tmp_path / "dqn", progress=False)
    assert type(model) is DQN and model.learning_starts == dqn_learning_starts(64) == 6
    assert model._n_updates > 0  # SB3's 100 and the Zoo's 500 would never update in 64 steps
    rows = list(csv.DictReader((tmp_path / "dqn" / "progress.csv").open()))
    assert any(r.get("train/loss") for r in rows) and "rollout/exploration_rate" in rows[0]
