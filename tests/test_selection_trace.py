"""experiments/selection_trace.py: every validated policy scored on test, the training
trajectory unchanged by the test passes."""

from __future__ import annotations

import csv

import pytest
import yaml

from conftest import load_experiment
from sasha_env.agents.config import AgentConfig
from sasha_env.agents.train import train_agent
from sasha_env.testing import make_workdir
from sasha_env.workdir import Workdir

AGENTS = {
    "total_timesteps": 96, "n_envs": 2, "n_steps": 16, "batch_size": 16, "n_epochs": 1,
    "d_hidden": 16, "val_every": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def trace():
    return load_experiment("selection_trace")


def test_keep_follows_val_start(trace):
    rows = [{"timestep": t, "score": s} for t, s in ((10, 0.1), (20, 0.5), (30, 0.3), (40, 0.9))]
    assert trace.keep(rows, 0)["timestep"] == 10
    assert trace.keep(rows, 15)["timestep"] == 30
    assert trace.keep(rows, 1000)["timestep"] == 40  # the last always competes


def test_trace_scores_each_validation_and_leaves_training_alone(trace, tmp_path, capsys):
    root = tmp_path / "wd"
    make_workdir(root, n_slides=8, n_patches=(10, 20), fracs=(0.2,), agents=False)
    (root / "config.yaml").write_text(yaml.safe_dump({"seed": 3, "agents": AGENTS}))
    out = tmp_path / "out"
    assert trace.main([str(root), "--frac", "0.2", "--out", str(out)]) == 0
    with open(out / "trace-0.2-s3.csv") as fh:
        rows = list(csv.DictReader(fh))
    with open(out / "agent-0.2-s3" / "val_curve.csv") as fh:
        val = list(csv.DictReader(fh))
    assert [r["timestep"] for r in rows] == [r["timestep"] for r in val] and len(rows) >= 3
    assert all(0.0 <= float(r["test_auc"]) <= 1.0 for r in rows)
    assert "rule best: keeps step" in capsys.readouterr().out
    # the same training without the test passes: the same episodes, return for return
    cfg = AgentConfig.from_dict({**AGENTS, "val_start": 0.999})
    plain = tmp_path / "plain"
    train_agent(Workdir(root), 0.2, cfg, seed=3, out_dir=plain, progress=False)
    assert (plain / "episodes.csv").read_text().splitlines()[1:] != []
    runs = (plain, out / "agent-0.2-s3")
    cut = [[line.split(",")[:2] for line in (p / "episodes.csv").read_text().splitlines()] for p in runs]  # fmt: skip
    assert cut[0] == cut[1]
