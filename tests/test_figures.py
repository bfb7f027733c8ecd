"""Which agents the pipeline's figures draw."""

from __future__ import annotations

import json

from sasha_env.pipeline.figures import agent_files, evaluated_episodes
from sasha_env.workdir import Workdir


def test_curves_are_drawn_for_the_agents_the_stage_kept_not_for_stale_folders(tmp_path):
    wd = Workdir(tmp_path / "moved")  # recorded paths name the folder the run was made in
    for folder in ("sasha-0.1", "sasha-0.1-m2", "sasha-0.1-stop", "sasha-0.5", "sasha-0.1-m3"):
        (wd.root / "agents" / folder).mkdir(parents=True)
        (wd.root / "agents" / folder / "episodes.csv").write_text("step,reward\n")
    assert set(agent_files(wd, "episodes.csv")) == {  # no record yet: every folder
        "sasha-0.1", "sasha-0.1-m2", "sasha-0.1-stop", "sasha-0.5", "sasha-0.1-m3",
    }  # fmt: skip

    def unit(folder: str) -> dict:
        return {"agent": f"elsewhere/agents/{folder}/policy.pt", "sha256": "0"}

    wd.marker("agents").parent.mkdir(parents=True)
    wd.marker("agents").write_text(
        json.dumps(
            {
                "stage": "agents",
                "outputs": {
                    "agents": {"0.1": unit("sasha-0.1")},
                    "algo": "maskable_ppo",
                    "members": {"0.1": [unit("sasha-0.1-m2")]},
                    "learned_stop": {"0.1": unit("sasha-0.1-stop")},
                },
            }
        )
    )
    files = agent_files(wd, "episodes.csv")
    # sasha-0.5: a budget dropped since; sasha-0.1-m3: a member of a larger ensemble before
    assert set(files) == {"sasha-0.1", "sasha-0.1-m2", "sasha-0.1-stop"}
    assert files["sasha-0.1"] == wd.root / "agents" / "sasha-0.1" / "episodes.csv"
    assert agent_files(wd, "val_curve.csv") == {}  # only folders that have the file


def test_zoom_paths_are_drawn_for_the_budgets_evaluated_last(tmp_path):
    wd = Workdir(tmp_path / "wd")
    (wd.root / "episodes").mkdir(parents=True)
    for name in ("sasha-0.1", "sasha-0.2", "sasha-0.5", "sasha_adaptive-0.2", "random-0.1"):
        (wd.root / "episodes" / f"{name}.json").write_text("[]")
    names = [p.stem for p in evaluated_episodes(wd, "sasha")]
    assert names == ["sasha-0.1", "sasha-0.2", "sasha-0.5"]  # no results.json: every file
    wd.results.write_text(
        json.dumps(
            {
                "methods": [
                    {"method": "sasha", "frac": 0.2},
                    {"method": "sasha", "frac": 0.1},
                    {"method": "sasha_adaptive", "frac": 0.2},
                    {"method": "random", "frac": 0.5},
                ]
            }
        )
    )
    # sasha-0.5: a budget the last evaluation no longer had
    assert [p.stem for p in evaluated_episodes(wd, "sasha")] == ["sasha-0.1", "sasha-0.2"]
    assert [p.stem for p in evaluated_episodes(wd, "sasha_adaptive")] == ["sasha_adaptive-0.2"]
