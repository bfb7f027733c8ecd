"""Uses the public API the way the README does; `mypy` checks it in tests/test_typing.py.

Not a test module: it is type-checked, never run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sb3_contrib import MaskablePPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CheckpointCallback

from sasha_env import (
    AgentConfig,
    FeatureStore,
    Prediction,
    Predictor,
    SashaWSIEnv,
    Workdir,
    run_episodes,
    train_agent,
)
from sasha_env.testing import SyntheticWorkdir, check_env, make_workdir


def train(workdir: Path) -> BaseAlgorithm:
    env = SashaWSIEnv(workdir, split="train", frac=0.1)
    val = SashaWSIEnv(workdir, split="val", frac=0.1)
    cfg = AgentConfig(protocol="paper", epochs=2, val_every=1)
    callback = CheckpointCallback(save_freq=1000, save_path=str(workdir / "ckpt"))
    model = train_agent(env, cfg=cfg, callbacks=[callback], eval_env=val)
    assert isinstance(model, MaskablePPO)
    return train_agent(Workdir(workdir), 0.2, cfg, seed=1)


def predict(workdir: Path, slide: Path) -> float:
    record: Prediction = Predictor(workdir, frac=0.1).predict(slide)
    label: str = record["label"]
    return record["probabilities"][label]


def features(store: Path) -> np.ndarray:
    fs = FeatureStore(store)
    return fs.read(fs.slide_ids()[0], "lowres")


def episodes(env: SashaWSIEnv) -> int:
    def first_legal(e: SashaWSIEnv, obs: dict) -> int:
        return int(np.flatnonzero(e.action_masks())[0])

    return len(run_episodes(env, first_legal, env.slide_ids))


def testing_kit(tmp: Path) -> BaseAlgorithm:
    made: SyntheticWorkdir = make_workdir(tmp / "wd", n_slides=8, seed=0, fracs=(0.1, 0.2))
    env = SashaWSIEnv(made, split="train", frac=0.1)
    check_env(env)
    agent_dir: Path = made.agents[0.1]
    assert agent_dir.is_dir()
    return train_agent(made, 0.1, AgentConfig(total_timesteps=64), progress=False)
