"""``sasha sweep`` and ``sasha trial``: W&B sweep files run locally, trials scored on held-out
validation slides, and the trial function under ``wandb agent``."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from sasha_env.cli import main
from sasha_env.pipeline.sweep import load_sweep
from sasha_env.pipeline.trial import agent_config, split_val, trial_wandb_mode

RANDOM_SWEEP = """
name: tiny-random
method: random
metric: {name: holdout/score, goal: minimize}
parameters:
  algo: {values: [maskable_ppo, a2c]}
  learning_rate: {distribution: log_uniform_values, min: 0.0001, max: 0.003}
  frac: {value: 0.1}
  total_timesteps: {value: 32}
  n_envs: {value: 2}
  n_steps: {value: 8}
  batch_size: {value: 16}
  n_epochs: {value: 1}
  d_hidden: {value: 16}
"""


def _sweep_file(tmp_path: Path, text: str = RANDOM_SWEEP) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_a_four_trial_random_sweep_runs_offline_end_to_end_and_resumes(tiny_workdir, tmp_path, monkeypatch):  # fmt: skip
    import shutil

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    wd = tmp_path / "wd"  # the sweep writes into the workdir: a copy keeps the fixture clean
    shutil.copytree(tiny_workdir, wd, ignore=shutil.ignore_patterns("sweeps"))
    sweep = _sweep_file(tmp_path)
    assert main(["sweep", str(sweep), "--workdir", str(wd), "--count", "4"]) == 0
    folder = wd / "sweeps" / "tiny-random"
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["complete"] * 4
    assert {"trial", "holdout/score", "algo", "learning_rate", "frac"} <= set(rows[0])
    assert all(float(r["holdout/score"]) > 0 for r in rows)
    assert len({r["learning_rate"] for r in rows}) == 4  # random draws
    assert all(1e-4 <= float(r["learning_rate"]) <= 3e-3 for r in rows)
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 4  # each trial an offline W&B run
    for r in rows:  # each trial's agent has SB3's log with val/* and holdout/* rows
        progress = list(csv.DictReader((Path(r["agent_dir"]) / "progress.csv").open()))
        assert {"val/score", "holdout/score", "rollout/ep_rew_mean"} <= set(progress[0])
    best = json.loads((folder / "best.json").read_text())
    scores = {int(r["trial"]): float(r["holdout/score"]) for r in rows}
    assert best["trial"] == min(scores, key=lambda t: (scores[t], t))
    assert set(best["test"]) >= {"auc", "accuracy", "f1"}
    assert best["holdout"]["holdout/score"] == pytest.approx(scores[best["trial"]])

    # resumable: asking for 5 runs one more trial and keeps the first four as they are
    first = {r["trial"]: (Path(r["agent_dir"]) / "agent.json").stat().st_mtime_ns for r in rows}
    assert main(["sweep", str(sweep), "--workdir", str(wd), "--count", "5", "--wandb", "disabled"]) == 0  # fmt: skip
    rows5 = list(csv.DictReader((folder / "trials.csv").open()))
    assert len(rows5) == 5 and rows5[:4] == rows
    assert {t: (Path(r["agent_dir"]) / "agent.json").stat().st_mtime_ns for t, r in
            ((r["trial"], r) for r in rows5[:4])} == first  # fmt: skip


def test_the_val_halves_are_disjoint_stratified_and_fixed():
    ids = [f"s{i}" for i in range(10)]
    labels = ["a"] * 6 + ["b"] * 4
    select, holdout = split_val(ids, labels, seed=3)
    assert sorted(select + holdout) == sorted(ids) and not set(select) & set(holdout)
    assert sum(s in select for s in ids[:6]) == 3 and sum(s in select for s in ids[6:]) == 2
    assert split_val(ids, labels, seed=3) == (select, holdout)
    with pytest.raises(ValueError, match="at least 2 validation slides"):
        split_val(["one"], ["a"])


def test_sweep_files_are_checked_before_anything_runs(tmp_path):
    spec = load_sweep(_sweep_file(tmp_path))
    assert spec.name == "tiny-random" and spec.method == "random" and spec.goal == "minimize"
    bad = {
        "metric: {name: val/auc, goal: maximize}": "holdout half",
        "method: hyperopt": "method 'hyperopt'",
        "parameters: {lr: {values: [1]}}": "not agents settings",
        "parameters: {learning_rate: {distribution: normal, min: 0, max: 1}}": "not supported",
        "parameters: {ensemble: {values: [1, 3]}}": "a trial trains and scores one agent",
    }
    base = "method: random\nmetric: {name: holdout/auc, goal: maximize}\nparameters: {ent_coef: {values: [0.0]}}\n"  # fmt: skip
    for line, message in bad.items():
        key = line.split(":")[0]
        text = "\n".join(x for x in base.splitlines() if not x.startswith(key)) + "\n" + line
        with pytest.raises(ValueError, match=message):
            load_sweep(_sweep_file(tmp_path, text))
    grid = base.replace("random", "grid") + "  learning_rate: {min: 0.001, max: 0.01}\n"
    grid = grid.replace("parameters: {ent_coef: {values: [0.0]}}", "parameters:\n  ent_coef: {values: [0.0]}")  # fmt: skip
    with pytest.raises(ValueError, match="grid sweep needs value/values"):
        load_sweep(_sweep_file(tmp_path, grid))


def test_a_trial_of_an_ensemble_workdir_trains_one_agent():
    """A workdir whose agents stage trains ensembles sweeps one agent per trial (with the
    members' settings), so an algorithm an ensemble refuses can still be swept."""
    cfg, frac, seed = agent_config({"ensemble": 3, "fracs": [0.2]}, {"algo": "dqn", "seed": 4})
    assert (cfg.ensemble, cfg.algo, frac, seed) == (1, "dqn", 0.2, 4)


def test_a_trial_under_wandb_agent_keeps_the_agents_mode(tiny_workdir, tmp_path, monkeypatch):
    """``wandb agent`` sets WANDB_SWEEP_ID and not WANDB_MODE: the trial must not force
    offline (the old sweep_agent.py did, so its metric never reached the controller)."""
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert trial_wandb_mode() == "offline"  # on its own: offline by default
    monkeypatch.setenv("WANDB_MODE", "online")
    assert trial_wandb_mode() is None  # the user's WANDB_MODE decides
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    assert trial_wandb_mode() is None

    seen: dict = {}

    class Run:
        id = "run1"
        config: dict = {}
        summary: dict = {}

        def __init__(self, **kw):
            seen.update(kw, env_mode=os.environ.get("WANDB_MODE"))
            self.config = type("C", (dict,), {"update": lambda s, d, **k: dict.update(s, d)})(kw["config"])  # fmt: skip
            self.logged: list = []

        def log(self, d, **kw):
            self.logged.append(d)

        def define_metric(self, *a, **k):
            pass

        def finish(self):
            seen["finished"] = True

    monkeypatch.setattr(wandb, "init", lambda **kw: Run(**kw))
    argv = ["trial", "--workdir", str(tiny_workdir), "--out", str(tmp_path / "t"),
            "--total_timesteps=16", "--n_envs=2", "--n_steps=8", "--batch_size=16",
            "--n_epochs=1", "--d_hidden=16", "--frac=0.1", "--algo", "a2c", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert seen["mode"] is None and seen["env_mode"] is None and seen["finished"]
    assert "WANDB_MODE" not in os.environ
    assert seen["config"]["algo"] == "a2c" and seen["config"]["total_timesteps"] == 16
    assert json.loads((tmp_path / "t" / "agent.json").read_text())["config"]["algo"] == "a2c"


def test_the_shipped_sweep_file_is_valid_for_sasha_sweep_and_wandb_agent():
    import yaml

    path = Path(__file__).resolve().parents[1] / "experiments" / "sweep.yaml"
    spec = load_sweep(path)
    assert spec.method == "bayes" and spec.metric.startswith("holdout/") and spec.early_terminate
    assert "algo" in spec.parameters  # the algorithm is swept
    command = yaml.safe_load(path.read_text())["command"]
    assert command[:2] == ["sasha", "trial"] and command[-1] == "${args}"


def test_a_pruned_trial_stops_training_at_the_validation_that_pruned_it(tiny_workdir, tmp_path):
    import optuna

    from sasha_env.pipeline.sweep import _pruner
    from sasha_env.pipeline.trial import run_trial
    from sasha_env.workdir import Workdir

    params = {"frac": 0.1, "total_timesteps": 64, "n_envs": 2, "n_steps": 8, "batch_size": 16,
              "n_epochs": 1, "d_hidden": 16}  # fmt: skip
    seen = []
    result = run_trial(Workdir(tiny_workdir), {}, params, tmp_path / "t",
                       report=lambda metrics, i: seen.append((i, metrics)) or i == 2)  # fmt: skip
    assert result["pruned"] and [i for i, _ in seen] == [1, 2]
    assert set(seen[0][1]) == {"auc", "f1", "accuracy", "ce", "score"}
    steps = json.loads((tmp_path / "t" / "agent.json").read_text())["timesteps"]
    assert steps < 64  # stopped after the second validation's rollout, not at the budget
    spec = load_sweep(_sweep_file(tmp_path, RANDOM_SWEEP + "early_terminate: {type: hyperband, min_iter: 2, eta: 3}\n"))  # fmt: skip
    pruner = _pruner(spec)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner) and pruner._min_resource == 2


@pytest.mark.slow
def test_a_grid_sweep_on_two_processes_runs_each_point_once(tiny_workdir, tmp_path):
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(tiny_workdir, wd, ignore=shutil.ignore_patterns("sweeps", "wandb"))
    grid = RANDOM_SWEEP.replace("name: tiny-random", "name: tiny-grid").replace(
        "method: random", "method: grid"
    ).replace("learning_rate: {distribution: log_uniform_values, min: 0.0001, max: 0.003}",
              "ent_coef: {values: [0.0, 0.01]}")  # fmt: skip
    sweep = _sweep_file(tmp_path, grid)
    assert main(["sweep", str(sweep), "--workdir", str(wd), "--jobs", "2", "--wandb", "disabled"]) == 0  # fmt: skip
    rows = list(csv.DictReader((wd / "sweeps" / "tiny-grid" / "trials.csv").open()))
    points = sorted((r["algo"], r["ent_coef"]) for r in rows)
    assert points == sorted({(a, e) for a in ("maskable_ppo", "a2c") for e in ("0.0", "0.01")})
    assert {r["state"] for r in rows} == {"complete"}


def test_trials_cut_short_by_a_kill_are_run_again(tmp_path):
    from optuna.trial import TrialState

    from sasha_env.pipeline.sweep import _recover, _study, suggest

    spec = load_sweep(_sweep_file(tmp_path))
    study = _study(spec, tmp_path, seed=0)
    killed = study.ask()  # a trial that was running when the sweep was killed
    params = suggest(killed, spec)
    assert _recover(_study(spec, tmp_path, seed=0)) == 1
    trials = _study(spec, tmp_path, seed=0).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    again = _study(spec, tmp_path, seed=0).ask()  # the next trial taken is the same point
    assert suggest(again, spec) == params
