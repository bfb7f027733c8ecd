"""experiments/f02_factors.py: the drift measurement on a small synthetic workdir."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import load_experiment
from sasha_env.envs.wsi import SashaWSIEnv, episode_budget
from sasha_env.testing import make_workdir


@pytest.fixture(scope="module")
def f02():
    return load_experiment("f02_factors")


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    root = tmp_path_factory.mktemp("f02") / "wd"
    make_workdir(root, n_slides=8, n_patches=(10, 20), fracs=(0.1, 0.2), tau=0.8, timesteps=32)
    return root


def test_state_probe_builds_the_oracle_and_off_states(f02, wd):
    env = SashaWSIEnv(wd, split=None, frac=0.2, tau=0.0)  # tau 0: every zoom updates every row
    env.reset(options={"slide_id": env.slide_ids[0]})
    env.step(0)
    slide, clf = env.slide, env.hafed.level2
    updated = np.ones(slide.n, bool)
    updated[0] = False
    got = f02.StateProbe(env)(env.zoomed, updated)

    def p(S):
        with torch.inference_mode():
            return float(torch.softmax(clf.classify(S.float()).reshape(-1), -1)[-1])

    off = slide.z.clone()
    off[0] = slide.v[0]
    assert got["off"][0] == pytest.approx(p(off), abs=1e-6)
    assert got["oracle"][0] == pytest.approx(p(slide.v), abs=1e-6)  # zoomed + updated = all v
    assert got["tsu"][0] == pytest.approx(p(torch.from_numpy(env.state())), abs=1e-6)
    assert got["tsu"][0] != pytest.approx(got["oracle"][0], abs=1e-6)  # an untrained TSU


def test_drift_writes_one_row_per_step_and_a_summary(f02, wd, tmp_path):
    assert (
        f02.main(["drift", "--workdir", str(wd), "--out", str(tmp_path), "--random-seeds", "1"])
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "drift_steps.csv").read_text().splitlines()))
    per_episode: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        per_episode.setdefault((r["policy"], r["slide_id"]), []).append(r)
    policies = {p for p, _ in per_episode}
    assert policies == {
        "sasha-0.1",
        "sasha-0.2",
        "greedy_attention",
        "privileged_topk",
        "random-s0",
    }
    for ep in per_episode.values():
        n = int(ep[0]["n_patches"])
        assert [int(r["t"]) for r in ep] == list(range(episode_budget(0.2, n) + 1))
        assert ep[0]["p_tsu"] == ep[0]["p_oracle"] == ep[0]["p_off"]  # t = 0: the low-res state
        actions = [int(r["action"]) for r in ep[1:]]
        assert len(set(actions)) == len(actions)  # legal zooms only
        for r in ep:  # rows the TSU updated are compared with their true v
            assert (r["cos_tsu"] == "") == (int(r["n_updated_step"]) == 0)
    check = json.loads((tmp_path / "drift_check.json").read_text())
    assert check["identical"] is True
    summary = list(csv.DictReader((tmp_path / "drift_summary.csv").read_text().splitlines()))
    assert len(summary) == 5 * (1 + len(f02.CHECKPOINTS))
    assert "| privileged_topk | 0.1 |" in (tmp_path / "drift_summary.md").read_text()


def test_each_factor_changes_one_thing(f02):
    from dataclasses import asdict

    from sasha_env.agents.config import AgentConfig, steps_for

    base = AgentConfig(total_timesteps=10_000, equal_episodes=True, clip_range=0.2)
    changed = {
        f: {k for k, v in asdict(f02.factor_config(base, f, 0.2)).items() if v != asdict(base)[k]}
        for f in f02.FACTORS
    }
    assert changed == {
        "base": set(),
        "retrain": set(),
        "half-episodes": {"equal_episodes"},
        "double-episodes": {"total_timesteps"},
        "paper-clip-lambda": {"clip_range"},  # λ is 0.95 in both
        "delta-reward": {"reward"},
        "gamma-0.9": {"gamma"},
        "time-aware-critic": {"time_aware_critic"},
        "cosine-lr": {"lr_schedule"},
        "start-from-f0.1": set(),  # the start changes (StartFrom), not the config
    }
    assert steps_for(f02.factor_config(base, "half-episodes", 0.2), 0.2) == 10_000
    assert steps_for(base, 0.2) == 20_000
    assert f02.factor_config(base, "paper-clip-lambda", 0.1).gae_lambda == 0.94
    with pytest.raises(ValueError, match="protocol 'paper' ignores"):
        f02.factor_config(AgentConfig(protocol="paper"), "gamma-0.9", 0.2)
    with pytest.raises(ValueError, match="dqn has no critic"):
        AgentConfig.from_dict({"algo": "dqn", "time_aware_critic": True})


def test_start_from_loads_the_f01_agent_before_the_first_rollout(f02, wd):
    from types import SimpleNamespace

    from sasha_env.agents.export import load_policy
    from sasha_env.workdir import Workdir

    w = Workdir(wd)
    algo = f02.agents_config(w).algo
    f01, f02_dir = (w.agent_dir(f02.agent_config.agent_name(f, algo)) for f in (0.1, 0.2))
    policy = load_policy(f02_dir)
    want = torch.load(f01 / "policy.pt", weights_only=True)
    assert any(not torch.equal(v, want[k]) for k, v in policy.state_dict().items())
    cb = f02.StartFrom(f01)
    cb.model = SimpleNamespace(policy=policy, device=torch.device("cpu"))
    cb._on_training_start()
    got = policy.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_train_from_the_f01_agent_records_its_start_and_the_tumours_found(f02, tmp_path):
    root = tmp_path / "wd"
    made = make_workdir(root, n_slides=8, n_patches=(10, 20), fracs=(0.1, 0.2), timesteps=32)
    (root / "config.yaml").write_text(yaml.safe_dump(made.config))  # the agents' own settings
    start = made.agents[0.1] / "policy.pt"  # shifted by 1: far from any agent trained here
    torch.save(
        {
            k: v + 1 if v.is_floating_point() else v
            for k, v in torch.load(start, weights_only=True).items()
        },
        start,
    )
    out = tmp_path / "out"
    args = ["train", "--workdir", str(root), "--out", str(out), "--frac", "0.2"]
    assert f02.main([*args, "--factor", "start-from-f0.1"]) == 0
    info = json.loads((out / "start-from-f0.1/seed-0/sasha-0.2/eval.json").read_text())
    assert info["start_from"].endswith("sasha-0.1")
    assert info["timesteps"] >= 32

    def weights(agent: str | os.PathLike) -> torch.Tensor:
        state = torch.load(Path(agent) / "policy.pt", weights_only=True)
        return torch.cat([v.flatten().float() for v in state.values()])

    new, f01 = weights(out / "start-from-f0.1/seed-0/sasha-0.2"), weights(made.agents[0.1])
    assert (new - f01).abs().max() < 0.05  # PPO began at the (shifted) f = 0.1 weights
    assert (weights(made.agents[0.2]) - f01).abs().max() > 0.5  # which no other start is near
    test = info["test"]
    assert 0 <= test["tumour_found"] <= test["tumour_slides"] <= sum(test["labels"])
    # no test slide of this workdir has a mask: no area read (None, not 0 or nan)
    assert test["tumour_slides"] == 0 and test["tumour_area_read"] is None
    # the table reads it, and an older eval.json without it or its zooms shows "–"
    older = json.loads((out / "start-from-f0.1/seed-0/sasha-0.2/eval.json").read_text())
    del older["test"]["tumour_area_read"], older["test"]["zoomed"]
    (out / "older").mkdir()
    (out / "older" / "eval.json").write_text(json.dumps({**older, "factor": "retrain"}))
    md = tmp_path / "table.md"
    assert f02.main(["table", str(out), "--md", str(md)]) == 0
    lines = md.read_text().splitlines()
    column = [c.strip() for c in lines[0].split("|")].index("tumour area read per seed")
    rows = [[c.strip() for c in r.split("|")] for r in lines if "| 0.2 |" in r]
    assert len(rows) == 2 and all(r[column] == "–" for r in rows)


def test_base_is_filed_under_the_seed_its_agent_was_trained_with(f02, tmp_path):
    """``train --factor base`` evaluates the workdir's agent: without ``--seed`` it is filed
    under that agent's seed (not 0), and another ``--seed`` is refused rather than mislabelled;
    other factors train with the workdir's seed by default."""
    root = tmp_path / "wd"
    made = make_workdir(root, n_slides=8, n_patches=(10, 20), fracs=(0.2,), timesteps=32)
    (root / "config.yaml").write_text(yaml.safe_dump({**made.config, "seed": 3}))
    meta = json.loads((made.agents[0.2] / "agent.json").read_text())
    meta["seed"] = 3  # as the pipeline trains a seed-3 workdir's agent
    (made.agents[0.2] / "agent.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    args = ["train", "--workdir", str(root), "--out", str(out), "--frac", "0.2"]
    assert f02.main([*args, "--factor", "base"]) == 0
    info = json.loads((out / "base/seed-3/sasha-0.2/eval.json").read_text())
    assert info["seed"] == 3 and not (out / "base/seed-0").exists()
    with pytest.raises(SystemExit, match="trained with seed 3: drop --seed or pass --seed 3"):
        f02.main([*args, "--factor", "base", "--seed", "1"])
    assert f02.main([*args, "--factor", "retrain"]) == 0  # the workdir's seed: 3
    assert json.loads((out / "retrain/seed-3/sasha-0.2/eval.json").read_text())["seed"] == 3


def test_continue_after_hands_over_after_the_first_budget(f02, wd):
    """The first ⌈0.1·N⌉ zooms are the first policy's, the rest the second's, on every slide."""

    def lowest(env, obs):
        return int(np.flatnonzero(env.action_masks())[0])

    def highest(env, obs):
        return int(np.flatnonzero(env.action_masks())[-1])

    env = SashaWSIEnv(wd, split=None, frac=0.2)
    act = f02.continue_after(lowest, highest, 0.1)
    for slide_id in env.slide_ids:
        obs, _ = env.reset(options={"slide_id": slide_id})
        done = False
        while not done:
            obs, _, done, _, _ = env.step(act(env, obs))
        n, head = env.slide.n, episode_budget(0.1, env.slide.n)
        want = list(range(head)) + list(range(n - 1, n - 1 - (episode_budget(0.2, n) - head), -1))
        assert env.zoomed == want


def test_nested_readings_begin_with_the_f01_agents_zooms(f02, wd, tmp_path):
    assert f02.main(["nested", "--workdirs", str(wd), "--out", str(tmp_path)]) == 0
    (got,) = json.loads((tmp_path / "nested.json").read_text()).values()
    assert list(got) == list(f02.NESTED)
    env = SashaWSIEnv(wd, split=None, frac=0.2)
    first = got["sasha-0.1"]["zoomed"]
    for name in ("0.1-then-0.2", "0.1-run-on", "0.1-then-greedy"):
        for slide_id, zooms in got[name]["zoomed"].items():
            assert zooms[: len(first[slide_id])] == first[slide_id]  # SASHA-0.1's, in order
            assert len(zooms) == episode_budget(0.2, env.load_slide(slide_id).n)
    # the table pairs each reading with both agents (one workdir: no interval)
    md = (tmp_path / "nested.md").read_text().splitlines()
    row = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")] for r in md[2:]}
    assert set(row) == set(f02.NESTED)
    assert row["sasha-0.2"][-3] == "–" and row["sasha-0.1"][-2] == "–"
    d = got["0.1-then-0.2"]["auc"] - got["sasha-0.1"]["auc"]
    assert row["0.1-then-0.2"][-2] == f"{d:+.3f}"
    assert row["0.1-then-0.2"][3] == f"{got['0.1-then-0.2']['auc']:.3f}"


def test_nested_zooms_from_repeats_a_recorded_reading(f02, wd, tmp_path):
    """Repeating a workdir's own recorded zooms gives back its readings, probabilities too."""
    first, again = tmp_path / "first", tmp_path / "again"
    assert f02.main(["nested", "--workdirs", str(wd), "--out", str(first)]) == 0
    recorded = first / "nested.json"
    assert (
        f02.main(
            ["nested", "--workdirs", str(wd), "--out", str(again), "--zooms-from", str(recorded)]
        )
        == 0
    )
    (want,) = json.loads(recorded.read_text()).values()
    (got,) = json.loads((again / "nested.json").read_text()).values()
    for name in f02.NESTED:
        assert got[name]["zoomed"] == want[name]["zoomed"]
        assert got[name]["p_positive"] == pytest.approx(want[name]["p_positive"], abs=1e-6)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(SystemExit, match="no workdir named 'other'"):
        f02.main(
            [
                "nested",
                "--workdirs",
                str(other),
                "--out",
                str(tmp_path / "x"),
                "--zooms-from",
                str(recorded),
            ]
        )
