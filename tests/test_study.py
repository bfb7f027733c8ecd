"""`sasha study`: the pipeline over seeds, numbers across them, resumable, safe to share."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import kill_when, load_experiment
from sasha_env.pipeline.study import Study, aggregate, format_study
from sasha_env.slides.manifest import read_manifest

SASHA = [sys.executable, "-m", "sasha_env.cli"]


def test_aggregate_over_seeds_by_hand():
    def results(auc_s, auc_r):
        return {
            "n_slides": 10,
            "methods": [
                {"method": "sasha", "frac": 0.1, "auc": auc_s, "accuracy": 0.8, "f1": 0.7, "ece": 0.1},
                {"method": "random", "frac": 0.1, "auc": auc_r, "accuracy": 0.5, "f1": 0.5, "ece": 0.2},
            ],
            "paired": [
                {"a": "sasha@0.1", "b": "random@0.1", "metric": "auc", "diff": auc_s - auc_r, "ci": None}
            ],
        }  # fmt: skip

    summary = aggregate({0: results(0.9, 0.6), 1: results(0.8, 0.6), 2: results(1.0, 0.7)}, "demo")
    sasha = next(m for m in summary["methods"] if m["method"] == "sasha")
    assert sasha["auc_mean"] == pytest.approx(0.9) and sasha["auc_sd"] == pytest.approx(0.1)
    half = stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3)  # 4.303 * 0.1 / 1.732
    assert sasha["auc_ci"] == pytest.approx([0.9 - half, 1.0])  # 0.9 + half > 1: clipped
    assert [p["seed"] for p in sasha["per_seed"]] == [0, 1, 2]
    (pair,) = summary["paired"]
    assert pair["diff_mean"] == pytest.approx(np.mean([0.3, 0.2, 0.3]))
    assert pair["ci"][0] > 0  # consistently better across seeds
    assert {"method": "random", "frac": 0.1, "auc_mean": pytest.approx(0.6333333), "auc_sd": pytest.approx(0.0577350)} in summary["budget_curve"]  # fmt: skip
    assert "| sasha | 0.10 | 0.900 ± 0.100 [" in format_study(summary)


def test_calibrated_numbers_are_aggregated_over_seeds():
    def results(acc):
        row = {"method": "hafed", "frac": 1.0, "auc": 1.0, "accuracy": 0.8, "f1": 0.8, "ece": 0.3}
        fits = {"temperature": {"accuracy": 0.8, "ece": 0.2}, "temperature+bias": {"accuracy": acc, "ece": 0.1}}  # fmt: skip
        return {"n_slides": 10, "paired": [], "methods": [row | {"calibrated": fits}]}

    summary = aggregate({0: results(0.9), 1: results(1.0)}, "demo")
    c = summary["methods"][0]["calibrated"]["temperature+bias"]
    assert c["accuracy_mean"] == pytest.approx(0.95) and c["ece_mean"] == pytest.approx(0.1)
    table = format_study(summary)
    assert "| hafed | 1.00 | 0.800 ± 0.000 → 0.800 ± 0.000 → 0.950 ± 0.071 |" in table


def test_tumour_slides_found_are_counted_over_seeds():
    def results(found, hit, area):
        row = {"method": "sasha", "frac": 0.2, "auc": 1.0, "accuracy": 1.0, "f1": 1.0, "ece": 0.1}
        tumour = {"tumour_found": found, "tumour_slides": 7, "tumour_hit_rate": hit}
        tumour["tumour_area_read"] = area
        return {"n_slides": 14, "paired": [], "methods": [row | tumour, {**row, "method": "hafed"}]}

    summary = aggregate({0: results(6 / 7, 0.2, 0.5), 1: results(1.0, 0.4, 0.7)}, "demo")
    sasha, hafed = summary["methods"]
    assert sasha["tumour_slides_total"] == 14 and sasha["tumour_missed_total"] == 1
    assert sasha["tumour_found_mean"] == pytest.approx(13 / 14)
    assert sasha["tumour_hit_rate_mean"] == pytest.approx(0.3)
    assert [e["tumour_found"] for e in sasha["per_seed"]] == [6 / 7, 1.0]
    assert "tumour_found_mean" not in hafed  # reads everything: nothing to find
    assert sasha["tumour_area_read_mean"] == pytest.approx(0.6)
    assert [e["tumour_area_read"] for e in sasha["per_seed"]] == [0.5, 0.7]
    row = "| sasha | 0.20 | 13 of 14 | 0.929 ± 0.101 | 0.300 | 0.600 ± 0.141 |"
    assert row in format_study(summary)


def _study_dir(tmp_path, tiny_store):
    root = tmp_path / "study"
    root.mkdir()
    shutil.copytree(tiny_store, root / "features.zarr")  # extracted once, before the seeds
    return root


def _check_each_seed_on_its_own_split_with_shared_features(root, tiny_cohort):
    """A finished 2-seed tiny study in ``root``: the Python API gives study.json's summary
    (every seed found done), with each method's per-seed rows, the paired baselines and the
    budget curve; each seed drew its own split; the seeds share the extracted features (hard
    links) and distil into their own stores."""
    study = Study(
        root, tiny_cohort, seeds=(0, 1), preset="tiny", progress=False, log=lambda m: None
    )
    summary = study.run()
    assert summary == json.loads((root / "study.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["preset"] == "tiny"
    for m in summary["methods"]:
        assert {"auc_mean", "auc_sd", "auc_ci", "accuracy_mean", "f1_mean", "ece_mean"} <= set(m)
        assert [p["seed"] for p in m["per_seed"]] == [0, 1]
    assert {p["a"] for p in summary["paired"]} == {
        "sasha@0.1",
        "sasha@0.2",
        "sasha_adaptive@0.1",  # adaptive reading, capped at each trained budget
        "sasha_adaptive@0.2",
    }
    for frac in (0.1, 0.2):  # adaptive reading against HAFED and SASHA at a fixed budget
        against = {p["b"] for p in summary["paired"] if p["a"] == f"sasha_adaptive@{frac:g}"}
        assert "hafed@1" in against and any(b.startswith("sasha@") for b in against), against
    rows = {(m["method"], m["frac"]) for m in summary["methods"]}
    baselines = ("random", "attention_topk", "greedy_attention", "lowres_attention_topk")
    for frac in (0.1, 0.2):  # every same-harness baseline, paired with SASHA at its budget
        assert {(b, frac) for b in baselines} <= rows
        assert {p["b"] for p in summary["paired"] if p["a"] == f"sasha@{frac:g}"} == {
            *(f"{b}@{frac:g}" for b in baselines),
            "hafed@1",
        }
    assert {(c["method"], c["frac"]) for c in summary["budget_curve"]} >= {
        ("hafed", 1.0),
        ("random", 0.1),
    }
    assert (root / "study.md").read_text().startswith("Over 2 seeds")
    assert (root / "budget_curve.png").stat().st_size > 10_000

    splits = [
        {r.slide_id: r.split for r in read_manifest(study.seed_dir(s).manifest).records}
        for s in (0, 1)
    ]
    assert splits[0] != splits[1]  # each seed draws its own split
    shared = root / "features.zarr" / "slides"
    sid = next(p.name for p in shared.iterdir())
    chunk = next(
        p for p in (shared / sid / "highres").rglob("*") if p.is_file() and p.name != "zarr.json"
    )
    linked = (
        study.seed_dir(1).store
        / "slides"
        / sid
        / "highres"
        / chunk.relative_to(shared / sid / "highres")
    )
    assert linked.stat().st_ino == chunk.stat().st_ino  # shared, not copied
    assert study.seed_dir(0).store.joinpath("slides", sid, "distilled").is_dir()
    assert not (shared / sid / "distilled").exists()  # each seed distils into its own store


def _cmd(root, manifest):
    return [*SASHA, "study", "--manifest", str(manifest), "--workdir", str(root), "--preset", "tiny", "--seeds", "2", "--quiet"]  # fmt: skip


def test_a_killed_study_resumes_at_the_seed_it_was_on(tiny_cohort, tiny_store, tmp_path):
    root = _study_dir(tmp_path, tiny_store)
    kill_when(
        _cmd(root, tiny_cohort), (root / "seed-1" / "stages" / "hafed.json").is_file, timeout=600
    )
    done = (root / "seed-0" / "stages" / "evaluate.json").read_text()
    proc = subprocess.run(_cmd(root, tiny_cohort), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[seed 0] [agents] done earlier" in proc.stdout
    assert "[seed 1] [hafed] done earlier" in proc.stdout
    assert (root / "seed-0" / "stages" / "evaluate.json").read_text() == done
    assert json.loads((root / "study.json").read_text())["seeds"] == [0, 1]


def test_two_processes_on_one_study_never_train_a_seed_twice(tiny_cohort, tiny_store, tmp_path):
    """``--jobs 2``: a second process of the same command shares the folder through the claims
    (as processes on other machines would), and the first prints the study at the end; then
    what the study holds (:func:`_check_each_seed_on_its_own_split_with_shared_features`)."""
    root = _study_dir(tmp_path, tiny_store)
    proc = subprocess.run(
        [*_cmd(root, tiny_cohort), "--jobs", "2"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for seed in (0, 1):
        assert text.count(f"[seed {seed}] [hafed] running") == 1, text[-3000:]
        assert text.count(f"[seed {seed}] [agents] f=0.1: training") == 1
    # a seed the other process of the same command held is said to be left to it (at least
    # one: which seeds overlap depends on timing), never reported as another command's
    assert "left to process " in text and "another --jobs process of this study" in text
    assert "another command on this study folder" not in text
    assert json.loads((root / "study.json").read_text())["seeds"] == [0, 1]
    assert "| method |" in text  # the summary table, whichever process finished last
    # the same study, read through the Python API (one tiny study fewer for the suite)
    _check_each_seed_on_its_own_split_with_shared_features(root, tiny_cohort)


def test_a_claim_held_by_another_command_is_reported_with_what_to_do(tmp_path):
    """A seed claimed by this study's own ``--jobs`` process is logged as left to it; one
    claimed by another command (another study on the same folder, or a claim written before
    claims named their command) is named, with the file to delete if that process is gone;
    a claim file not yet written is being claimed this moment."""
    from sasha_env.pipeline.study import _Claim

    path = tmp_path / "seed-0" / ".claim"
    holder = _Claim(path, group=111)
    assert holder.acquire()
    assert not _Claim(path, group=111).acquire()
    same = _Claim(path, group=111).describe_holder()
    assert same == f"left to process {os.getpid()}, another --jobs process of this study"
    other = _Claim(path, group=222).describe_holder()
    assert f"process {os.getpid()} on " in other and "skipped" in other and str(path) in other
    holder.release()
    path.write_text(json.dumps({"host": "elsewhere", "pid": 7}))  # an older claim: no group
    assert "process 7 on elsewhere is running it (another command" in _Claim(path).describe_holder()
    path.write_text("")  # created, its holder not yet written
    assert "being claimed by another process right now" in _Claim(path).describe_holder()
    path.unlink()
    assert _Claim(path, group=222).acquire()


def test_jobs_helpers_run_one_job_each_even_with_an_abbreviated_option():
    from sasha_env.cli import build_parser
    from sasha_env.cli.run import _helper_command

    argv = ["study", "--manifest", "m.csv", "--workdir", "w", "--job", "4"]
    helper = _helper_command(argv)
    assert helper[1:3] == ["-m", "sasha_env.cli"]
    assert build_parser().parse_args(helper[3:]).jobs == 1


def test_study_bars_script_reads_study_json(tmp_path):
    mod = load_experiment("study_bars")

    def results(s1, s2, r1, h):
        rows = [
            ("sasha", 0.1, s1),
            ("sasha", 0.2, s2),
            ("random", 0.1, r1),
            ("attention_topk", 0.1, 0.6),
            ("hafed", 1.0, h),
        ]
        return {
            "methods": [{"method": m, "frac": f, "auc": a} for m, f, a in rows],
            "paired": [{"a": "sasha@0.1", "b": "random@0.1", "metric": "auc", "diff": s1 - r1}],
        }  # fmt: skip

    good = aggregate(
        {0: results(0.9, 0.95, 0.6, 0.96), 1: results(0.92, 0.93, 0.61, 0.94), 2: results(0.91, 0.94, 0.62, 0.95)},
        "demo",
    )  # fmt: skip
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert mod.main([str(tmp_path / "good.json")]) == 0
    bad = aggregate({0: results(0.9, 0.8, 0.6, 0.96), 1: results(0.92, 0.85, 0.7, 0.94)}, "demo")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert mod.main([str(tmp_path / "bad.json")]) == 1
    met = {name: ok for name, ok, _ in mod.bars(bad)}
    assert not met["SASHA-0.2 >= HAFED - 0.02"] and met["SASHA-0.1 >= attention_topk-0.1"]
    assert mod.area_pairs(good) == []  # no masks: no area read

    def with_area(s1, s2, r1):  # the tumour area the zooms read, per budget
        res = results(0.9, 0.95, 0.6, 0.96)
        area = {("sasha", 0.1): s1, ("sasha", 0.2): s2, ("random", 0.1): r1}
        for m in res["methods"]:
            if (m["method"], m["frac"]) in area:
                m["tumour_area_read"] = area[(m["method"], m["frac"])]
        return res

    study = aggregate({0: with_area(0.5, 0.6, 0.1), 1: with_area(0.7, 0.6, 0.2)}, "demo")
    pairs = {name: (diff, ci, n) for name, diff, ci, n in mod.area_pairs(study)}
    assert set(pairs) == {"sasha-0.1 − random-0.1", "sasha-0.2 − sasha-0.1"}
    diff, ci, n = pairs["sasha-0.1 − random-0.1"]
    half = stats.t.ppf(0.975, 1) * np.std([0.4, 0.5], ddof=1) / np.sqrt(2)
    assert (
        diff == pytest.approx(0.45) and ci == pytest.approx((0.45 - half, 0.45 + half)) and n == 2
    )
    assert pairs["sasha-0.2 − sasha-0.1"][0] == pytest.approx(0.0)


def test_ablation_table_pairs_seeds(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    def study(aucs):
        rows = [{"seed": s, "auc": a, "accuracy": 0.9} for s, a in enumerate(aucs)]
        return {"methods": [{"method": "sasha", "frac": 0.1, "per_seed": rows}]}

    (tmp_path / "base.json").write_text(json.dumps(study([0.9, 0.8, 1.0])))
    (tmp_path / "abl.json").write_text(json.dumps(study([0.8, 0.8, 0.8])))
    script = Path(__file__).parents[1] / "experiments" / "ablation_table.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "base.json"), f"x={tmp_path / 'abl.json'}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    d = np.array([-0.1, 0.0, -0.2])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert (
        f"| x | 0.1 | 3 | 0.900 → 0.800 | 0.900 → 0.900 | -0.100 [{-0.1 - half:+.3f}, {-0.1 + half:+.3f}] |"
        in out
    )
