"""``--jobs``: independent stages (and the agents stage's budgets) at once, in worker processes,
with the same outputs as one stage at a time; synthesis over processes, the same cohort."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from sasha_env.cli.common import jobs_value, usable_cores
from sasha_env.config import load_config
from sasha_env.pipeline.parallel import _downstream_depth
from sasha_env.pipeline.runner import Pipeline
from sasha_env.pipeline.stages import REGISTRY
from sasha_env.slides.synth import SynthConfig, synthesize_cohort
from sasha_env.workdir import Workdir


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported model or policy, by its key path."""
    out: dict[str, torch.Tensor] = {}

    def walk(x: object, key: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{key}/{k}")
        elif torch.is_tensor(x):
            out[key] = x

    walk(torch.load(path, map_location="cpu", weights_only=True), "")
    return out


def _json_diff(a: object, b: object, key: str = "") -> list[str]:
    """The key paths where two parsed JSON documents differ (at most 10), with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{key}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in a.keys() & b.keys():
            out += _json_diff(a[k], b[k], f"{key}/{k}")
        return out[:10]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in _json_diff(x, y, f"{key}/{i}")][:10]
    return [] if a == b else [f"{key}: {a!r} != {b!r}"[:300]]


@pytest.mark.slow
def test_two_jobs_give_the_outputs_of_one(tiny_cohort, tiny_store, tiny_workdir, tmp_path, capfd):
    wd = tmp_path / "wd"
    wd.mkdir()
    shutil.copytree(tiny_store, wd / "features.zarr")
    messages: list[str] = []
    markers = Pipeline(
        wd, manifest=tiny_cohort, preset="tiny", progress=False, log=messages.append
    ).run(jobs=2)

    assert list(markers) == list(REGISTRY)  # every stage, in order
    # the agents stage ran its two budgets as units in the workers, each once, and this
    # process only gathered them
    assert "[agents] running: 2 units, up to 2 at once" in messages
    printed = capfd.readouterr().out  # the workers print to the same stdout
    for frac in ("0.1", "0.2"):
        assert printed.count(f"[agents] f={frac}: training") == 1, printed
    assert not any("training" in m for m in messages)
    one, two = Workdir(tiny_workdir), Workdir(wd)
    models = sorted(p.relative_to(one.root) for p in one.root.glob("models/*/model.pt"))
    agents = sorted(p.relative_to(one.root) for p in one.root.glob("agents/*/policy.pt"))
    assert len(models) == 7 and len(agents) == 2
    differ = []  # every model that differs, so that a failure says where the runs part
    for rel in models + agents:
        a, b = _weights(one.root / rel), _weights(two.root / rel)
        assert a.keys() == b.keys() and a, rel
        differ += [f"{rel}{k}" for k in a if not torch.equal(a[k], b[k])][:1]
    results = _json_diff(json.loads(one.results.read_text()), json.loads(two.results.read_text()))
    assert not differ and not results, f"with --jobs 2: {differ} differ; results.json: {results}"
    # a second run finds every stage done, in this process, starting no worker
    messages.clear()
    Pipeline(wd, preset="tiny", progress=False, log=messages.append).run(jobs=2)
    assert len(messages) == len(REGISTRY)
    assert all("done earlier, skipped" in m for m in messages), messages


@pytest.mark.slow
def test_forced_units_train_once_each_to_the_same_agents(tiny_workdir, tmp_path, capfd):
    root = tmp_path / "wd"
    shutil.copytree(tiny_workdir, root)
    wd = Workdir(root)
    before = {f: _weights(wd.agent_dir(f"sasha-{f}") / "policy.pt") for f in ("0.1", "0.2")}
    messages: list[str] = []
    Pipeline(root, preset="tiny", progress=False, log=messages.append).run(
        ["agents"], force=("agents",), jobs=2
    )
    printed = capfd.readouterr().out
    for frac, weights in before.items():
        assert printed.count(f"[agents] f={frac}: training") == 1, printed
        after = _weights(wd.agent_dir(f"sasha-{frac}") / "policy.pt")
        assert all(torch.equal(weights[k], after[k]) for k in weights)  # seeded: the same agent
    assert wd.marker("agents").is_file()


@pytest.mark.slow
def test_a_failing_stage_stops_new_starts_and_keeps_what_finished(tiny_workdir, tmp_path):
    root = tmp_path / "wd"
    shutil.copytree(tiny_workdir, root)
    wd = Workdir(root)
    for name in ("distill", "lowres", "abmil", "meanmil"):
        wd.marker(name).unlink()
    wd.model("hafed").write_bytes(b"not a model")  # distill loads it and fails at once
    messages: list[str] = []
    # lowres trains for a while beside it (100 epochs), so distill fails while it runs
    pipe = Pipeline(
        root,
        preset="tiny",
        overrides={"lowres": {"max_epochs": 100}},
        progress=False,
        log=messages.append,
    )
    with pytest.raises(RuntimeError, match=r"stage\(s\) distill failed"):
        pipe.run(["distill", "lowres", "abmil", "meanmil"], jobs=2)
    assert any(m.startswith("[distill] FAILED") for m in messages), messages
    assert any(m.startswith("waiting for the 1 task(s) running") for m in messages), messages
    assert wd.marker("lowres").is_file()  # ran beside it: finished and kept
    assert not wd.marker("distill").is_file()
    # queued behind them, never started after the failure
    assert not wd.marker("abmil").is_file() and not wd.marker("meanmil").is_file()


def test_the_agents_units_start_with_the_largest_budget(tiny_workdir):
    pipe = Pipeline(tiny_workdir, preset="tiny", progress=False, log=lambda m: None)
    units = REGISTRY["agents"].units
    assert units is not None
    assert units(pipe) == ["sasha-0.2", "sasha-0.1"]
    twice = Pipeline(
        tiny_workdir,
        preset="tiny",
        overrides={"agents": {"fracs": [0.1, 0.2, 0.1]}},
        log=lambda m: None,
    )
    assert units(twice) == ["sasha-0.2", "sasha-0.1"]  # a budget listed twice: one agent
    with pytest.raises(ValueError, match="no unit 'sasha-0.3'"):
        pipe.run_unit(REGISTRY["agents"], "sasha-0.3")


def test_the_longest_chain_starts_first():
    depth = _downstream_depth()
    assert depth["hafed"] > depth["lowres"]  # HAFED -> TSU -> agents before a baseline
    assert depth["agents"] > max(depth[b] for b in ("lowres", "abmil", "transmil"))
    assert depth["evaluate"] == 0


def test_jobs_option(tmp_path):
    assert jobs_value("3") == 3
    assert jobs_value("auto") == usable_cores() >= 1
    for bad in ("0", "-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="number of processes"):
            jobs_value(bad)
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        Pipeline(tmp_path, preset="tiny").run(jobs=0)


def test_synthesis_over_processes_writes_the_same_cohort(tmp_path):
    cfg = SynthConfig.from_dict({**load_config("tiny")["synth"], "n_slides": 4})
    one = synthesize_cohort(tmp_path / "one", cfg, seed=3, progress=False)
    two = synthesize_cohort(tmp_path / "two", cfg, seed=3, progress=False, jobs=2)
    files = sorted(p.relative_to(one.parent) for p in one.parent.rglob("*") if p.is_file())
    assert len(files) == 2 * 4 + 2  # slides, masks, manifest.csv, cohort.json
    for rel in files:
        assert (two.parent / rel).read_bytes() == (one.parent / rel).read_bytes(), rel
