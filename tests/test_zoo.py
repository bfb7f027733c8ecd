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


def test_the_documented_optuna_command_tunes_on_the_val_split(tiny_workdir, tmp_path):
    """The Zoo's Optuna objective scores trials on its evaluation env, built from
    ``--eval-env-kwargs`` (``--env-kwargs`` when absent, i.e. on the training slides)."""
    pytest.importorskip("rl_zoo3")
    import argparse
    import re
    import shlex

    from rl_zoo3.exp_manager import ExperimentManager
    from rl_zoo3.utils import StoreDict

    docs = (Path(__file__).parents[1] / "docs" / "environment.md").read_text()
    (command,) = [c for c in re.findall(r"python -m rl_zoo3\.train[^`]*?(?=\n\S|\n```)", docs, re.S) if "-optimize" in c]  # fmt: skip
    argv = shlex.split(command.replace("\\\n", " "))
    argv = [a.replace("demo-run", str(tiny_workdir)) for a in argv]
    parser = argparse.ArgumentParser(allow_abbrev=False)  # --env is not --env-kwargs
    parser.add_argument("--env-kwargs", nargs="+", action=StoreDict, default={})
    parser.add_argument("--eval-env-kwargs", nargs="+", action=StoreDict, default=None)
    args, _ = parser.parse_known_args(argv)
    assert args.eval_env_kwargs, "the documented tuning command must set --eval-env-kwargs"

    def splits(eval_kwargs):
        em = ExperimentManager(
            argparse.Namespace(), "ppo", "Sasha-WSI-v0", str(tmp_path), n_timesteps=64,
            env_kwargs=args.env_kwargs, eval_env_kwargs=eval_kwargs,
            config=str(HYPERPARAMS / "ppo.yml"), optimize_hyperparameters=True,
        )  # fmt: skip
        em.setup_experiment()
        return (em.create_envs(1, eval_env=True, no_log=True).get_attr("split")[0],
                em.create_envs(1, no_log=True).get_attr("split")[0])  # fmt: skip

    import sasha_env  # noqa: F401  (registers the env, as --gym-packages does)

    assert splits(args.eval_env_kwargs) == ("val", "train")
    assert splits(None) == ("train", "train")  # without it the Zoo tunes on training slides
