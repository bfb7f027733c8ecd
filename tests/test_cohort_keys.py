"""The pipeline's cache sees the cohort: added, relabelled, re-split or changed slides are never
silently reused, while a run with the same cohort skips everything."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from sasha_env.pipeline.runner import Pipeline
from sasha_env.workdir import Workdir


def _rows(manifest: Path) -> list[dict]:
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["path"] = str((manifest.parent / r["path"]).resolve())
        r.pop("mask", None)
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["slide_id", "path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture()
def workdir(tiny_workdir, tmp_path) -> Workdir:
    wd = Workdir(tmp_path / "wd")
    shutil.copytree(tiny_workdir, wd.root)
    return wd


def _run(wd: Workdir, manifest: Path, stages: list[str]) -> list[str]:
    log: list[str] = []
    Pipeline(wd.root, manifest=manifest, preset="tiny", progress=False, log=log.append).run(stages)
    return log


def _report(wd: Workdir) -> dict:
    return json.loads((wd.store / "extract_report.json").read_text())


def test_same_cohort_skips_and_a_relabel_retrains(workdir, tiny_cohort, tmp_path):
    rows = _rows(tiny_cohort)
    same = _run(workdir, _write(tmp_path / "same.csv", rows), ["extract", "hafed"])
    assert any("[extract] done earlier" in m for m in same)
    assert any("[hafed] done earlier" in m for m in same)

    rows[0]["label"] = "normal" if rows[0]["label"] == "tumor" else "tumor"
    log = _run(workdir, _write(tmp_path / "relabel.csv", rows), ["extract", "hafed", "lowres"])
    assert any("[extract] configuration or upstream changed" in m for m in log)
    assert _report(workdir)["extracted"] == []  # nothing to re-embed for a new label
    assert any("[hafed] configuration or upstream changed" in m for m in log)
    assert any("[lowres] configuration or upstream changed" in m for m in log)


def test_a_new_split_retrains(workdir, tiny_cohort, tmp_path):
    rows = _rows(tiny_cohort)
    i = next(k for k, r in enumerate(rows) if r["split"] == "train")
    rows[i]["split"] = "test"
    log = _run(workdir, _write(tmp_path / "resplit.csv", rows), ["extract", "hafed"])
    assert any("[hafed] configuration or upstream changed" in m for m in log)


def test_added_and_changed_slides_are_extracted_alone(workdir, tiny_cohort, tmp_path):
    rows = _rows(tiny_cohort)
    extra = dict(rows[1], slide_id="syn_new", path=str(tmp_path / "new.tiff"))
    shutil.copy(rows[1]["path"], extra["path"])
    changed = tmp_path / "changed.tiff"
    shutil.copy(rows[2]["path"], changed)  # syn_000 now points at another slide's pixels
    rows[0]["path"] = str(changed)
    log = _run(workdir, _write(tmp_path / "grown.csv", [*rows, extra]), ["extract", "hafed"])
    assert sorted(_report(workdir)["extracted"]) == sorted(["syn_new", rows[0]["slide_id"]])
    assert any("[hafed] configuration or upstream changed" in m for m in log)


def test_a_copied_cohort_is_not_extracted_again(workdir, tiny_cohort, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_cohort.parent, copy)  # new file times, same content
    rows = _rows(copy / "manifest.csv")
    log = _run(workdir, _write(tmp_path / "copied.csv", rows), ["extract", "hafed"])
    assert any("[extract] configuration or upstream changed" in m for m in log)  # paths moved
    assert _report(workdir)["extracted"] == []
    assert any("[hafed] done earlier" in m for m in log)  # the models saw the same cohort


def test_redistilling_with_the_same_hafed_retrains_nothing(workdir):
    log: list[str] = []
    pipe = Pipeline(workdir.root, preset="tiny", progress=False, log=log.append)
    pipe.run(["distill"], force=("distill",))
    assert any("[distill] running" in m for m in log)
    log.clear()
    pipe.run(["tsu", "agents"])
    assert any("[tsu] done earlier" in m for m in log)
    assert any("[agents] done earlier" in m for m in log)


def test_a_stage_whose_code_changed_its_output_runs_again(workdir, tiny_cohort):
    import dataclasses

    from sasha_env.pipeline.stages import REGISTRY

    p = Pipeline(workdir.root, manifest=tiny_cohort, preset="tiny", progress=False)
    agents = REGISTRY["agents"]
    keys = {v: p.key(dataclasses.replace(agents, version=v)) for v in (1, 2, 3)}
    assert len(set(keys.values())) == 3
    # version 3 (protocol paper = the official agent): agents trained before train again
    assert agents.version == 3 and p.key(agents) == keys[3]
