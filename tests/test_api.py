"""train_agent in stable-baselines3's idiom: user envs, callbacks, an eval env, Monitor."""

from __future__ import annotations

import pytest
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback

import sasha_env
from sasha_env import AgentConfig, SashaWSIEnv, train_agent


class _Count(BaseCallback):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def _on_step(self) -> bool:
        self.steps += 1
        return True


def test_train_agent_on_user_envs_with_callbacks_and_an_eval_env(tiny_workdir, tmp_path):
    envs = [SashaWSIEnv(tiny_workdir, split="train", frac=0.2) for _ in range(2)]
    val = SashaWSIEnv(tiny_workdir, split="val", frac=0.2)
    cfg = AgentConfig(
        total_timesteps=64, n_steps=16, batch_size=16, n_epochs=1, d_hidden=16, val_every=1
    )
    count = _Count()
    before = {f: f.stat().st_mtime_ns for f in tiny_workdir.rglob("*") if f.is_file()}
    model = train_agent(envs, cfg=cfg, callbacks=[count], eval_env=val, progress=False)
    after = {f: f.stat().st_mtime_ns for f in tiny_workdir.rglob("*") if f.is_file()}
    assert after == before  # envs and no out_dir: nothing written
    assert isinstance(model, MaskablePPO) and count.steps == model.num_timesteps // 2
    assert len(model.ep_info_buffer) > 0  # Monitor-wrapped: SB3 logs rollout/ep_rew_mean
    # an agent trained on one split acts on another (max_patches="cohort" by default)
    test = SashaWSIEnv(tiny_workdir, split="test", frac=0.2)
    obs, _ = test.reset(seed=0)
    action, _ = model.predict(obs, action_masks=test.action_masks(), deterministic=True)
    assert test.action_masks()[int(action)]


def test_paper_protocol_on_a_user_env_and_what_it_refuses(tiny_workdir, tmp_path):
    env = SashaWSIEnv(tiny_workdir, split="train", frac=0.3)
    model = train_agent(env, cfg=AgentConfig(protocol="paper", epochs=1, d_hidden=16), progress=False, out_dir=tmp_path / "a")  # fmt: skip
    assert (tmp_path / "a" / "policy.pt").is_file() and model.num_timesteps > 0
    two = [SashaWSIEnv(tiny_workdir, split="train", frac=0.3) for _ in range(2)]
    with pytest.raises(ValueError, match="one environment"):
        train_agent(two, cfg=AgentConfig(protocol="paper"))
    with pytest.raises(ValueError, match="pass eval_env"):
        train_agent(env, cfg=AgentConfig(total_timesteps=32, n_steps=16, batch_size=16, val_every=1))  # fmt: skip
    with pytest.raises(TypeError, match="trains on a workdir"):
        train_agent(42)  # type: ignore[arg-type]


def test_public_api_names_load_lazily():
    for name in sasha_env.__all__:
        assert getattr(sasha_env, name) is not None
    assert "probabilities" in sasha_env.Prediction.__annotations__


def test_the_callers_envs_stay_open_and_frac_must_agree(tiny_workdir):
    from stable_baselines3.common.vec_env import DummyVecEnv

    vec = DummyVecEnv([lambda: SashaWSIEnv(tiny_workdir, split="train", frac=0.2)])
    cfg = AgentConfig(total_timesteps=32, n_steps=16, batch_size=16, n_epochs=1, d_hidden=16)
    model = train_agent(vec, cfg=cfg, progress=False)
    model.learn(16)  # the VecEnv we were given is still usable
    with pytest.raises(ValueError, match="frac=0.1 but the environment zooms with frac=0.2"):
        train_agent(vec, 0.1, cfg=cfg)
