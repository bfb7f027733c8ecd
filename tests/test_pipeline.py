"""The cached, resumable pipeline on the tiny cohort, and results.json's contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import kill_when, tree_digest
from sasha_env.agents.config import AgentConfig
from sasha_env.config import load_config
from sasha_env.features.store import FeatureStore
from sasha_env.pipeline.evaluate import tumour_fractions, tumour_patches
from sasha_env.pipeline.runner import STAGES, Pipeline
from sasha_env.workdir import Workdir

SASHA = [sys.executable, "-m", "sasha_env.cli"]
CONTRACT_KEYS = {"method", "frac", "accuracy", "auc", "f1", "ece"}
#: the same-harness baselines at every budget, each paired with SASHA at the trained ones
SAMPLERS = ("random", "attention_topk", "greedy_attention", "lowres_attention_topk")


def check_results_values(results: dict, agents: AgentConfig) -> None:
    """results.json's values, not only its keys: metrics in range, each interval around its
    number, paired differences equal to the rows' differences, every method at each budget."""
    fracs = sorted(set(agents.fracs) | set(agents.curve_fracs))
    assert results["split"] == "test" and results["n_slides"] > 0
    by_name = {}
    for m in results["methods"]:
        assert set(m) >= CONTRACT_KEYS, m
        assert m["n_slides"] == results["n_slides"], m
        for metric in ("auc", "accuracy", "f1", "ece"):
            assert m[metric] is None or 0.0 <= m[metric] <= 1.0, (m["method"], metric, m[metric])
        for metric in ("auc", "accuracy", "f1"):
            ci = m[f"{metric}_ci"]
            assert ci is not None and len(ci) == 2 and 0.0 <= ci[0] <= ci[1] <= 1.0, (m, metric)
            assert ci[0] - 1e-6 <= m[metric] <= ci[1] + 1e-6, (m["method"], m["frac"], metric)
        name = f"{m['method']}@{m['frac']:g}"
        assert name not in by_name, f"{name} twice"
        by_name[name] = m
    for frac in fracs:  # the sampling methods at every budget, the agent at the trained ones
        for method in SAMPLERS:
            assert f"{method}@{frac:g}" in by_name, (method, frac)
        assert (f"sasha@{frac:g}" in by_name) == (frac in agents.fracs), frac
    assert {m["frac"] for m in results["methods"] if m["method"] == "sasha"} == set(agents.fracs)
    assert results["paired"]
    pairs = {(p["a"], p["b"], p["metric"]) for p in results["paired"]}
    for frac in agents.fracs:
        for other in (*(f"{m}@{frac:g}" for m in SAMPLERS), "hafed@1"):
            for metric in ("auc", "accuracy"):
                assert (f"sasha@{frac:g}", other, metric) in pairs, (frac, other, metric)
    for p in results["paired"]:
        a, b = by_name[p["a"]], by_name[p["b"]]
        assert p["diff"] == pytest.approx(a[p["metric"]] - b[p["metric"]], abs=1e-9), p
        lo, hi = p["ci"]
        assert -1.0 <= lo <= hi <= 1.0, p
    check_learned_stop_rows(results)


def check_learned_stop_rows(results: dict) -> None:
    """The ``sasha_learned_stop`` rows (``agents.stop: learned``), if any: the adaptive rows'
    shape (cap, fractions read), and paired with the threshold rule at the same cap, SASHA at
    its cap and HAFED."""
    names = {f"{m['method']}@{m['frac']:g}" for m in results["methods"]}
    pairs = {(p["a"], p["b"], p["metric"]) for p in results["paired"]}
    for m in results["methods"]:
        if m["method"] != "sasha_learned_stop":
            continue
        assert 0.0 < m["frac"] <= 1.0 and m["zoom_cost"] >= 0.0, m
        assert 0.0 <= m["frac_p50"] <= m["frac_p90"] <= 1.0, m
        assert 0.0 <= m["mean_frac"] <= 1.0 and 0.0 <= m["share_stopped"] <= 1.0, m
        for metric in ("auc", "accuracy", "f1"):
            assert m[f"{metric}_ci"] is not None, (m, metric)
        a = f"sasha_learned_stop@{m['frac']:g}"
        for b in (f"sasha_adaptive@{m['frac']:g}", f"sasha@{m['frac']:g}", "hafed@1"):
            if b in names:
                assert {(a, b, "auc"), (a, b, "accuracy")} <= pairs, (a, b)


def printed_row(stdout: str, method: str, frac: str) -> list[str]:
    """The cells of ``method`` whose frac cell reads ``frac`` in the printed results table (the
    first table)."""
    lines = stdout.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("| method | frac | AUC"))
    body = []
    for line in lines[top + 2 :]:
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    rows = [cells for cells in body if cells[:2] == [method, frac]]
    assert len(rows) == 1, (method, frac, stdout[-3000:])
    return rows[0]


def formatted(m: dict, metric: str) -> str:
    """How the table prints a metric: three decimals, its interval with two."""
    if m[metric] is None:
        return "n/a"
    lo, hi = m[f"{metric}_ci"]
    return f"{m[metric]:.3f} [{lo:.2f}, {hi:.2f}]"


def test_pipeline_writes_every_stage_and_results_contract(tiny_workdir):
    wd = Workdir(tiny_workdir)
    for stage in STAGES:
        assert wd.marker(stage).is_file(), stage
    for name in ("hafed", "tsu", "lowres", "abmil", "meanmil", "maxmil", "transmil"):
        assert wd.model(name).is_file()
    store = FeatureStore(wd.store)
    sid = store.slide_ids()[0]
    v = store.read(sid, "distilled")
    assert v.shape == store.read(sid, "lowres").shape
    results = json.loads(wd.results.read_text())
    methods = {m["method"]: m for m in results["methods"]}
    assert {"hafed", "lowres_only", "abmil", "meanmil", "maxmil", "transmil"} <= set(methods)
    by_frac = {(m["method"], m["frac"]) for m in results["methods"]}
    for frac in (0.1, 0.2):
        assert {("sasha", frac), *((m, frac) for m in SAMPLERS)} <= by_frac
    for frac in (0.05, 0.3, 0.5):  # the AUC-against-budget curve of the baselines
        assert {(m, frac) for m in SAMPLERS} <= by_frac
        assert ("sasha", frac) not in by_frac  # no agent trained at that budget
    assert (tiny_workdir / "figures" / "budget_curve.png").is_file()
    for m in results["methods"]:  # every number comes with its interval over the test slides
        for metric in ("auc", "accuracy", "f1"):
            ci = m[f"{metric}_ci"]
            assert ci is None or (len(ci) == 2 and ci[0] - 1e-6 <= m[metric] <= ci[1] + 1e-6), (
                m,
                metric,
            )
    pairs = {(p["a"], p["b"], p["metric"]) for p in results["paired"]}
    for frac in ("0.1", "0.2"):
        for other in (*(f"{m}@{frac}" for m in SAMPLERS), "hafed@1"):
            assert (f"sasha@{frac}", other, "auc") in pairs
    for m in results["methods"]:
        if m["method"] in ("sasha", *SAMPLERS):  # synthetic cohort: masks known
            assert 0.0 <= m["tumour_hit_rate"] <= 1.0 and 0.0 < m["chance_hit_rate"] < 1.0
            assert 0.0 <= m["tumour_found"] <= 1.0 and 0.0 < m["chance_found"] <= 1.0
            assert 0.0 <= m["tumour_area_read"] <= 1.0 and 0.0 < m["chance_area_read"] < 1.0
    # tumour found: the test slides with tumour on which a zoom of the agent landed on it
    episodes = json.loads((wd.root / "episodes" / "sasha-0.1.json").read_text())
    tumour = tumour_patches(wd, FeatureStore(wd.store), [e["slide_id"] for e in episodes])
    on_tumour = [bool(tumour[e["slide_id"]][e["zoomed"]].any()) for e in episodes if e["label"]]
    sasha = next(m for m in results["methods"] if m["method"] == "sasha" and m["frac"] == 0.1)
    assert on_tumour and sasha["tumour_slides"] == len(on_tumour)
    assert sasha["tumour_found"] == pytest.approx(np.mean(on_tumour))
    # tumour area read: the share of each tumour slide's tumour area in its zoomed patches
    fractions = tumour_fractions(wd, FeatureStore(wd.store), [e["slide_id"] for e in episodes])
    read = [
        fractions[e["slide_id"]][np.unique(e["zoomed"])].sum() / fractions[e["slide_id"]].sum()
        for e in episodes
        if e["label"]
    ]
    assert sasha["tumour_area_read"] == pytest.approx(np.mean(read))
    assert (wd.root / "figures" / "learning_curves.png").is_file()
    assert list((wd.root / "figures" / "paths").glob("*-sasha-0.1.png"))
    check_results_values(results, AgentConfig.from_dict(load_config("tiny")["agents"]))
    assert methods["hafed"]["frac"] == 1.0 and methods["lowres_only"]["frac"] == 0.0
    tsu_marker = json.loads(wd.marker("tsu").read_text())
    assert 0.0 < tsu_marker["outputs"]["tau"] < 1.0


def test_second_run_skips_cached_stages_and_config_change_reruns(tiny_workdir, tmp_path):
    built = tree_digest(tiny_workdir)
    wd = Workdir(tmp_path / "wd")  # a copy: the retrain must not change the session's workdir
    shutil.copytree(tiny_workdir, wd.root)
    messages: list[str] = []
    Pipeline(wd.root, preset="tiny", progress=False, log=messages.append).run()
    assert all(any(f"[{s}] done earlier, skipped" in m for m in messages) for s in STAGES)
    before = wd.model("abmil").stat().st_mtime
    messages.clear()
    Pipeline(
        wd.root,
        preset="tiny",
        overrides={"baselines": {"max_epochs": 2, "models": {"abmil": {"patience": 1}}}},
        progress=False,
        log=messages.append,
    ).run(["abmil"])
    assert any("[abmil] configuration or upstream changed" in m for m in messages)
    assert wd.model("abmil").stat().st_mtime > before
    meta = torch.load(wd.model("abmil"), weights_only=True)["meta"]
    assert (meta["max_epochs"], meta["patience"]) == (2, 1)  # the section reached the fit
    assert tree_digest(tiny_workdir) == built


def test_a_moved_workdir_keeps_its_trained_agents(tiny_workdir, tmp_path):
    first = tmp_path / "first"
    shutil.copytree(tiny_workdir, first)
    for unit in (first / "stages" / "agents.units").glob("*.json"):  # as if trained here
        done = json.loads(unit.read_text())
        trained = Path(done["outputs"]["agent"])
        done["outputs"]["agent"] = str(first / trained.relative_to(tiny_workdir))
        unit.write_text(json.dumps(done))
    quiet = {"preset": "tiny", "progress": False, "log": lambda m: None}
    moved = tmp_path / "moved"
    first.rename(moved)  # the recorded paths now name a folder that is gone
    agent = Workdir(moved).agent_dir("sasha-0.1") / "policy.pt"
    before = agent.stat().st_mtime_ns
    messages: list[str] = []
    # a change only the learned-stop agents depend on: the stage runs, its fixed-budget units
    # keep their key, and the agents trained before the move stand
    overrides = {"agents": {"zoom_cost": 0.02}}
    Pipeline(moved, **quiet | {"log": messages.append}, overrides=overrides).run(["agents"])
    assert any("[agents] configuration or upstream changed" in m for m in messages)
    assert sum("trained earlier, kept" in m for m in messages) == 2, messages
    assert agent.stat().st_mtime_ns == before


def test_unknown_config_key_and_missing_upstream_are_clear(tiny_cohort, tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        Pipeline(tmp_path / "w", manifest=tiny_cohort, preset="tiny", log=lambda m: None).run(
            ["nope"]
        )
    with pytest.raises(FileNotFoundError, match="needs stage 'hafed' first"):
        Pipeline(tmp_path / "w2", manifest=tiny_cohort, preset="tiny", log=lambda m: None).run(
            ["distill"]
        )


def test_killed_pipeline_resumes_without_redoing_finished_stages(tiny_cohort, tiny_store, tmp_path):
    wd = Workdir(tmp_path / "wd")
    wd.root.mkdir()
    shutil.copytree(tiny_store, wd.store)
    cmd = [
        *SASHA,
        "pipeline",
        "--manifest",
        str(tiny_cohort),
        "--workdir",
        str(wd.root),
        "--preset",
        "tiny",
        "--quiet",
    ]
    kill_when(cmd, wd.marker("hafed").is_file)
    hafed_marker = wd.marker("hafed").read_text()
    assert not wd.results.exists()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[hafed] done earlier, skipped" in out.stdout
    assert wd.marker("hafed").read_text() == hafed_marker
    results = json.loads(wd.results.read_text())
    for m in results["methods"]:  # the printed table holds results.json's numbers
        frac = f"{m['frac']:.2f}"
        if "mean_frac" in m:  # adaptive rows: the mean fraction read, and the cap
            frac = f"{m['mean_frac']:.2f} (cap {frac})"
        cells = printed_row(out.stdout, m["method"], frac)
        assert cells[2:4] == [formatted(m, "auc"), formatted(m, "accuracy")], (m, cells)


def test_ddp_training_with_two_cpu_processes(tiny_workdir, tmp_path):
    wd = tmp_path / "ddp"
    shutil.copytree(tiny_workdir, wd)
    proc = subprocess.run(
        [
            *SASHA,
            "train",
            "hafed",
            "--workdir",
            str(wd),
            "--preset",
            "tiny",
            "--quiet",
            "--devices",
            "2",
            "--strategy",
            "ddp",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker = json.loads(Workdir(wd).marker("hafed").read_text())
    import torch

    blob = torch.load(Workdir(wd).model("hafed"), map_location="cpu", weights_only=True)
    assert blob["meta"]["world_size"] == 2
    assert marker["stage"] == "hafed"


def test_agent_training_logs_to_wandb_offline(tiny_workdir, tmp_path, monkeypatch):
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.train import train_agent

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = AgentConfig(total_timesteps=64, n_envs=2, n_steps=16, batch_size=16, n_epochs=1)
    out = tmp_path / "agent"
    train_agent(
        Workdir(tiny_workdir), 0.2, cfg, out_dir=out, wandb={"mode": "offline"}, progress=False
    )
    assert (out / "agent.zip").is_file()
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = (out / "episodes.csv").read_text().splitlines()
    assert rows[0] == "timestep,episode_return,correct,slide_id,wall_s" and len(rows) > 2


def test_ddp_pipeline_runs_rank_zero_stages_once(tiny_cohort, tiny_store, tmp_path):
    """`sasha pipeline --devices 2 --strategy ddp`: Lightning relaunches the whole command, yet
    only the Lightning stages run on both processes; distill, agents and evaluation run once."""
    wd = Workdir(tmp_path / "ddp")
    wd.root.mkdir()
    shutil.copytree(tiny_store, wd.store)
    proc = subprocess.run(
        [
            *SASHA, "pipeline", "--manifest", str(tiny_cohort), "--workdir", str(wd.root),
            "--preset", "tiny", "--quiet", "--devices", "2", "--strategy", "ddp",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("[hafed] running") == 2  # a Lightning stage: both processes train
    once_only = ("[distill] running", "[calibrate] running", "[evaluate] running")
    for once in (*once_only, "[agents] f=0.1: training"):
        assert out.count(once) == 1, (once, out[-3000:])
    assert out.count("| method | frac | AUC") == 1  # the table is printed by rank 0 alone
    assert json.loads(wd.results.read_text())["methods"]
    assert not list(wd.root.rglob("*.tmp"))
