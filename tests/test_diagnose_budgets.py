"""experiments/diagnose_budgets.py on a small synthetic workdir: replayed episodes, the four
states, per-step tumour hits and drift, and the validation-selection summary."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import load_experiment
from sasha_env import AgentConfig
from sasha_env.agents.envs import make_env
from sasha_env.agents.episodes import random_policy, run_episodes
from sasha_env.testing import make_workdir
from sasha_env.workdir import Workdir


@pytest.fixture(scope="module")
def diag():
    return load_experiment("diagnose_budgets")


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    """A workdir with saved test episodes of a random policy at f = 0.2 (as the evaluation
    stage writes them), no agents."""
    root = tmp_path_factory.mktemp("diag") / "wd"
    make_workdir(root, n_slides=8, n_patches=(10, 20), fracs=(0.2,), agents=False, tau=0.8)
    w = Workdir(root)
    env = make_env(w, "test", 0.2, AgentConfig())
    eps = run_episodes(env, random_policy(0), env.slide_ids)
    keep = ("slide_id", "label", "zoomed", "probabilities")
    out = [{k: np.asarray(e[k]).tolist() for k in keep} for e in eps]
    (root / "episodes").mkdir()
    (root / "episodes" / "random-0.2.json").write_text(json.dumps(out))
    return root


def _p(env, S: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = env.hafed.level2.classify(S.float()).reshape(-1)
        return float(torch.softmax(logits, -1)[-1])


def test_replay_rebuilds_the_four_states_and_counts_hits(diag, wd):
    env = make_env(Workdir(wd), "test", 0.2, AgentConfig(), tau=0.0)  # every zoom updates all
    saved = json.loads((wd / "episodes" / "random-0.2.json").read_text())[0]
    env.reset(options={"slide_id": saved["slide_id"]})
    slide = env.slide
    n = slide.n
    tumour = np.zeros(n, bool)
    tumour[saved["zoomed"][0]] = True  # only the first zoom lands on tumour
    ep = {**saved, "zoomed": saved["zoomed"][:2]}
    rec = diag.replay(env, ep, tumour)
    assert [s["hit"] for s in rec["steps"]] == [True, False]
    # tau 0: the first zoom updates every other row, so after step 1 all n - 1 are TSU rows
    assert rec["steps"][0]["n_updated"] == n - 1
    a0, a1 = ep["zoomed"]
    rest = np.setdiff1d(np.arange(n), [a0, a1])
    cz, rz = diag.row_distance(slide.z.numpy()[rest], slide.v.numpy()[rest])
    assert rec["steps"][1]["cos_z"] == pytest.approx(cz, abs=1e-6)
    assert rec["steps"][1]["rel_z"] == pytest.approx(rz, abs=1e-6)
    off = slide.z.clone()
    off[[a0, a1]] = slide.v[[a0, a1]]
    assert rec["p"]["off"] == pytest.approx(_p(env, off), abs=1e-6)
    assert rec["p"]["oracle"] == pytest.approx(_p(env, slide.v), abs=1e-6)  # all rows true
    assert rec["p"]["full"] == pytest.approx(_p(env, slide.v), abs=1e-6)
    assert rec["p"]["tsu"] == pytest.approx(_p(env, torch.from_numpy(env.state())), abs=1e-6)
    assert rec["p"]["tsu"] != pytest.approx(rec["p"]["oracle"], abs=1e-5)  # an untrained TSU


def test_replay_reproduces_the_saved_episodes(diag, wd):
    out = diag.diagnose(wd, [0.2], ["random"], with_reward=False)
    s = out["budgets"]["0.2"]["methods"]["random"]
    saved = json.loads((wd / "episodes" / "random-0.2.json").read_text())
    assert s["check"] < 1e-6  # the replayed TSU state gives the saved probabilities
    want = diag.auc([e["probabilities"][-1] for e in saved], [e["label"] for e in saved])
    assert s["auc_tsu"] == pytest.approx(want)
    assert s["n_slides"] == len(saved)
    assert [r["t"] for r in s["per_t"]] == list(range(1, len(s["per_t"]) + 1))
    assert out["budgets"]["0.2"]["selection"] is None  # no agent trained


def test_selection_summary_reads_the_kept_point_and_the_curve(diag, tmp_path):
    agent = tmp_path / "sasha-0.2"
    agent.mkdir()
    kept = {"timestep": 200, "auc": 1.0, "ce": 0.6, "score": 0.6}
    (agent / "agent.json").write_text(json.dumps({"timesteps": 1000, "selected_on_val": kept}))
    with open(agent / "val_curve.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestep", "auc", "f1", "accuracy", "ce", "score"])
        for t, a in [(200, 1.0), (400, 0.5), (600, 0.7), (800, 0.8), (1000, 1.0)]:
            w.writerow([t, a, a, a, 0.6, 0.6])
    with open(agent / "episodes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestep", "episode_return", "correct", "slide_id", "wall_s"])
        for i in range(10):
            w.writerow([i, -2.0 * (1 + (i >= 5)), 1, "a", 0.1])  # budget 2: CE 1.0, then 2.0
    s = diag.selection_summary(agent, {"a": 2})
    assert s["kept_at_share"] == pytest.approx(0.2)
    assert s["val_best_auc_ties"] == 2
    assert s["val_auc_second_half"] == pytest.approx(np.mean([0.7, 0.8, 1.0]))
    assert s["train_ce_per_step_by_fifth"] == pytest.approx([1.0, 1.0, 1.5, 2.0, 2.0])


def test_cli_writes_json_and_tables(diag, wd, tmp_path, capsys):
    out = tmp_path / "d.json"
    args = [str(wd), "--fracs", "0.2", "--methods", "random", "--no-reward-range"]
    assert diag.main([*args, "--out", str(out)]) == 0
    assert json.loads(out.read_text())[0]["budgets"]["0.2"]["methods"]["random"]["n_slides"] > 0
    assert "| wd | 0.2 | random |" in capsys.readouterr().out
