"""Trained agents as weights-only exports: the same actions, and no code from a workdir runs."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from sasha_env.agents.config import ALGORITHMS, AgentConfig
from sasha_env.agents.envs import make_env
from sasha_env.agents.episodes import agent_policy, run_episodes
from sasha_env.agents.export import POLICY_DESCRIPTION, POLICY_WEIGHTS, load_policy
from sasha_env.agents.train import train_agent
from sasha_env.workdir import Workdir

SASHA = [sys.executable, "-m", "sasha_env.cli"]


def _sb3_class(algo: str):
    """The SB3 algorithm class: the test loads the zip it just made (trusted input)."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import A2C, DQN, PPO

    classes = {"maskable_ppo": MaskablePPO, "ppo": PPO, "ppo_unmasked": PPO, "a2c": A2C, "dqn": DQN}
    return classes[algo]


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_exported_policy_acts_like_the_trained_model(tiny_workdir, tmp_path, algo):
    wd = Workdir(tiny_workdir)
    cfg = AgentConfig(
        algo=algo, total_timesteps=64, n_envs=2, n_steps=16, batch_size=16, n_epochs=1, d_hidden=16
    )
    if algo == "dqn":
        cfg.extra = {"buffer_size": 256, "learning_starts": 16}
    out = tmp_path / algo
    train_agent(wd, 0.2, cfg, out_dir=out, progress=False)
    zip_path = out / "agent.zip"
    desc = json.loads((out / POLICY_DESCRIPTION).read_text())
    assert desc["algo"] == algo and (out / POLICY_WEIGHTS).is_file()

    env = make_env(wd, "test", 0.2, cfg)
    trusted = run_episodes(env, agent_policy(_sb3_class(algo).load(zip_path)), env.slide_ids)
    exported = run_episodes(env, agent_policy(load_policy(out)), env.slide_ids)
    assert [e["zoomed"] for e in exported] == [e["zoomed"] for e in trusted]
    np.testing.assert_allclose(
        [e["probabilities"] for e in exported], [e["probabilities"] for e in trusted]
    )


class _Payload:
    """Unpickling this writes a file: the proof that code from a workdir ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_workdir_with_a_code_running_agent_zip_runs_no_code(tiny_workdir, tmp_path):
    wd = Workdir(tmp_path / "wd")
    shutil.copytree(tiny_workdir, wd.root)
    marker = tmp_path / "pwned"
    for agent_dir in (wd.root / "agents").iterdir():
        with zipfile.ZipFile(agent_dir / "agent.zip", "w") as z:  # what SB3's loader unpickles
            z.writestr("data", json.dumps({"policy_class": {":serialized:": ""}}))
            z.writestr("pytorch_variables.pth", pickle.dumps(_Payload(str(marker))))
            z.writestr("policy.pth", pickle.dumps(_Payload(str(marker))))
    slide = next(r for r in wd.manifest.read_text().splitlines()[1:] if ",test," in r).split(",")[1]

    proc = subprocess.run(
        [*SASHA, "predict", "--workdir", str(wd.root), slide, "--frac", "0.1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["label"] in ("normal", "tumor")
    proc = subprocess.run(
        [*SASHA, "pipeline", "--workdir", str(wd.root), "--preset", "tiny", "--quiet"]
        + ["--stages", "evaluate", "--force", "evaluate"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| sasha | 0.10 |" in proc.stdout
    assert not marker.exists()

    for agent_dir in (wd.root / "agents").iterdir():  # nor does anything need the zip
        (agent_dir / "agent.zip").unlink()
    from sasha_env.predict import Predictor

    assert Predictor(wd.root, frac=0.1).predict(slide)["frac_read"] > 0


def test_exports_that_are_missing_or_tampered_with_are_refused(tiny_workdir, tmp_path):
    src = Workdir(tiny_workdir).agent_dir("sasha-0.1")
    with pytest.raises(FileNotFoundError, match="no weights-only agent export"):
        load_policy(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    desc = json.loads((bad / POLICY_DESCRIPTION).read_text())
    (bad / POLICY_DESCRIPTION).write_text(json.dumps({**desc, "policy": "os.system"}))
    with pytest.raises(ValueError, match="not a valid agent description"):
        load_policy(bad)
    (bad / POLICY_DESCRIPTION).write_text(json.dumps({**desc, "feature_dim": 3}))
    with pytest.raises(ValueError, match="does not fit the policy"):
        load_policy(bad)
