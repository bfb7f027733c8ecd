"""RL Baselines3 Zoo trains on Sasha-WSI-v0 from our hyper-parameter files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HYPERPARAMS = Path(__file__).parents[1] / "experiments" / "hyperparams"


@pytest.mark.parametrize(
    ("algo", "overrides"),
    [("ppo", ["n_steps:16", "batch_size:32"]), ("a2c", []), ("dqn", ["learning_starts:16"])],
)
def test_zoo_trains_from_our_hyperparameters(tiny_workdir, tmp_path, algo, overrides):
    pytest.importorskip("rl_zoo3")
    cmd = [
        sys.executable, "-m", "rl_zoo3.train", "--algo", algo, "--env", "Sasha-WSI-v0",
        "--gym-packages", "sasha_env", "--conf-file", str(HYPERPARAMS / f"{algo}.yml"),
        "--env-kwargs", f"workdir:'{tiny_workdir}'", "frac:0.2", "-n", "128",
        "--log-folder", str(tmp_path), "--eval-freq", "-1", "--seed", "0",
    ]  # fmt: skip
    if overrides:
        cmd += ["--hyperparams", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / algo).glob("Sasha-WSI-v0_*")
    assert (run / "Sasha-WSI-v0.zip").is_file()
    monitor = next(run.glob("*monitor.csv")).read_text().splitlines()
    assert len(monitor) > 2  # header lines + finished episodes (Monitor-wrapped by the Zoo)


def test_every_hyperparameter_file_is_for_the_env():
    import yaml

    for path in HYPERPARAMS.glob("*.yml"):
        spec = yaml.safe_load(path.read_text())
        assert list(spec) == ["Sasha-WSI-v0"], path
        assert spec["Sasha-WSI-v0"]["policy"] == "MultiInputPolicy"
