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


@pytest.mark.slow
def test_two_jobs_give_the_outputs_of_one(tiny_cohort, tiny_store, tiny_workdir, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    shutil.copytree(tiny_store, wd / "features.zarr")
    messages: list[str] = []
    markers = Pipeline(
        wd, manifest=tiny_cohort, preset="tiny", progress=False, log=messages.append
    ).run(jobs=2)

    assert list(markers) == list(REGISTRY)  # every stage, in order
    # the agents stage ran its two budgets as units, largest first, and gathered them
    assert "[agents] running: 2 units, up to 2 at once" in messages
    one, two = Workdir(tiny_workdir), Workdir(wd)
    assert json.loads(two.results.read_text()) == json.loads(one.results.read_text())
    models = sorted(p.relative_to(one.root) for p in one.root.glob("models/*/model.pt"))
    agents = sorted(p.relative_to(one.root) for p in one.root.glob("agents/*/policy.pt"))
    assert len(models) == 7 and len(agents) == 2
    for rel in models + agents:
        a, b = _weights(one.root / rel), _weights(two.root / rel)
        assert a.keys() == b.keys() and a, rel
        assert all(torch.equal(a[k], b[k]) for k in a), f"{rel} differs with --jobs 2"
    # a second run finds every stage done, in this process, starting no worker
    messages.clear()
    Pipeline(wd, preset="tiny", progress=False, log=messages.append).run(jobs=2)
    assert all("done earlier, skipped" in m for m in messages), messages


@pytest.mark.slow
def test_a_failing_stage_stops_new_starts_and_keeps_what_finished(tiny_workdir, tmp_path):
    root = tmp_path / "wd"
    shutil.copytree(tiny_workdir, root)
    wd = Workdir(root)
    for name in ("distill", "lowres", "tsu"):
        wd.marker(name).unlink()
    wd.model("hafed").write_bytes(b"not a model")  # distill loads it and fails
    messages: list[str] = []
    pipe = Pipeline(root, preset="tiny", progress=False, log=messages.append)
    with pytest.raises(RuntimeError, match=r"stage\(s\) distill failed"):
        pipe.run(["distill", "tsu", "lowres"], jobs=2)
    assert any(m.startswith("[distill] FAILED") for m in messages), messages
    assert wd.marker("lowres").is_file()  # ran beside it: kept
    assert not wd.marker("distill").is_file() and not wd.marker("tsu").is_file()


def test_the_agents_units_start_with_the_largest_budget(tiny_workdir):
    pipe = Pipeline(tiny_workdir, preset="tiny", progress=False, log=lambda m: None)
    units = REGISTRY["agents"].units
    assert units is not None
    assert units(pipe) == ["sasha-0.2", "sasha-0.1"]


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
