"""``sasha benchmark``: keyed runs, the algorithms it claims to train, rliable's aggregates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sasha_env.cli import main
from sasha_env.pipeline.benchmark import BenchmarkSpec, agent_settings, load_hyperparams
from sasha_models.stats import iqm, probability_of_improvement


def _bench(wd: Path, out: Path, algos: list[str], frac: str = "0.1", jobs: str = "1") -> dict:
    argv = ["benchmark", "--workdir", str(wd), "--algos", *algos, "--seeds", "0", "1",
            "--frac", frac, "--preset", "tiny", "--timesteps", "64", "--boot", "50",
            "--out", str(out), "--jobs", jobs]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_benchmark_trains_what_it_says_and_never_reuses_a_stale_run(tiny_workdir, tmp_path):
    out = tmp_path / "bench"
    res = _bench(tiny_workdir, out, ["maskable_ppo", "a2c", "ppo_unmasked"])
    runs = {(r["algo"], r["seed"]): r for r in res["runs"]}
    assert {r["class"] for r in res["runs"] if r["algo"] == "a2c"} == {"A2C"}
    assert runs[("ppo_unmasked", 0)]["class"] == "PPO"
    a2c = (Path(runs[("a2c", 0)]["run_dir"]) / "episodes.csv").read_text()
    ppo = (Path(runs[("maskable_ppo", 0)]["run_dir"]) / "episodes.csv").read_text()
    assert a2c != ppo  # A2C's own updates, not MaskablePPO's episodes
    policy = json.loads((Path(runs[("ppo_unmasked", 0)]["run_dir"]) / "policy.json").read_text())
    assert policy["policy_kwargs"]["mask_actions"] is False
    # rliable's aggregates in results.json and table.md, the figures beside them
    scores = {a: np.array([[runs[(a, s)]["auc"]] for s in (0, 1)]) for a in res["algos"]}
    agg = res["aggregates"]["a2c"]
    assert agg["iqm"]["point"] == pytest.approx(iqm(scores["a2c"]))
    assert set(agg) == {"iqm", "median", "mean", "optimality_gap"}
    assert agg["optimality_gap"]["ci"][0] <= agg["optimality_gap"]["point"] <= agg["optimality_gap"]["ci"][1]  # fmt: skip
    poi = {(p["x"], p["y"]): p["p"] for p in res["probability_of_improvement"]}
    assert poi[("maskable_ppo", "a2c")] == pytest.approx(
        probability_of_improvement(scores["maskable_ppo"], scores["a2c"])
    )
    assert len(res["performance_profiles"]["a2c"]["fraction"]) == len(res["performance_profiles"]["taus"])  # fmt: skip
    table = (out / "table.md").read_text()
    assert f"| a2c | {agg['iqm']['point']:.3f} [" in table
    for name in ("aggregates", "performance_profile", "probability_of_improvement", "learning_curves"):  # fmt: skip
        assert (out / f"{name}.png").stat().st_size > 5_000

    # the same OUT at another f: every run is trained again (the old script kept the f = 0.1
    # agents because only total_timesteps was compared), and the report says f = 0.2
    res2 = _bench(tiny_workdir, out, ["a2c"], frac="0.2", jobs="2")
    assert res2["frac"] == 0.2
    for r in res2["runs"]:
        assert r["run_dir"] != runs[("a2c", r["seed"])]["run_dir"]
        assert json.loads((Path(r["run_dir"]) / "agent.json").read_text())["frac"] == 0.2
    # and the same command again reuses every run as it is
    stamps = {r["run_dir"]: (Path(r["run_dir"]) / "agent.json").stat().st_mtime_ns for r in res2["runs"]}  # fmt: skip
    res3 = _bench(tiny_workdir, out, ["a2c"], frac="0.2")
    assert {r["run_dir"]: (Path(r["run_dir"]) / "agent.json").stat().st_mtime_ns for r in res3["runs"]} == stamps  # fmt: skip


def test_runs_are_keyed_on_hyper_parameters_preset_and_budget(tmp_path):
    from dataclasses import asdict

    from sasha_env.pipeline.benchmark import run_key

    spec = BenchmarkSpec(workdirs=[], algos=["dqn"], seeds=[0], frac=0.1, preset="tiny", timesteps=200)  # fmt: skip
    cfg, steps = agent_settings(spec, "dqn")
    assert steps == 200 and 0 < cfg.extra["learning_starts"] < 200
    base = run_key("t", cfg, 0.1, "tiny", 0)
    assert run_key("t", cfg, 0.2, "tiny", 0) != base
    assert run_key("t", cfg, 0.1, "demo", 0) != base
    assert run_key("t", cfg, 0.1, "tiny", 1) != base
    other = type(cfg).from_dict({**asdict(cfg), "learning_rate": 1e-3})
    assert run_key("t", other, 0.1, "tiny", 0) != base
    # new training code (the agents stage's version raised) retrains instead of reusing
    from dataclasses import replace as dc_replace

    from sasha_env.pipeline import stages

    agents = stages.REGISTRY["agents"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(stages.REGISTRY, "agents", dc_replace(agents, version=agents.version + 1))
        assert run_key("t", cfg, 0.1, "tiny", 0) != base
    assert run_key("t", cfg, 0.1, "tiny", 0) == base
    # RL-Zoo files: agents fields set, SB3 arguments go to extra, wrappers are refused
    folder = tmp_path / "hp"
    folder.mkdir()
    (folder / "a2c.yml").write_text("Sasha-WSI-v0:\n  n_steps: 5\n  vf_coef: 0.4\n  n_timesteps: 300\n")  # fmt: skip
    settings, n, _ = load_hyperparams("a2c", folder)
    assert settings == {"n_steps": 5, "extra": {"vf_coef": 0.4}} and n == 300
    (folder / "ppo.yml").write_text("Sasha-WSI-v0:\n  normalize: true\n")
    with pytest.raises(ValueError, match="normalize"):
        load_hyperparams("ppo", folder)
    (folder / "dqn.yml").write_text("Sasha-WSI-v0:\n  learning_starts: 500\n")
    with pytest.raises(ValueError, match="never update"):
        agent_settings(BenchmarkSpec([], ["dqn"], [0], 0.1, "tiny", 256, folder), "dqn")
