"""experiments/adaptive_rules.py: stop-rule variants refitted on a finished workdir's val traces."""

from __future__ import annotations

import json

import pytest

from conftest import load_experiment


def test_the_shared_variant_is_the_pipelines_rule_and_the_others_are_fitted_beside_it(tmp_path):
    from sasha_env.pipeline.calibrate import calibrate_workdir
    from sasha_env.pipeline.evaluate import evaluate_workdir
    from sasha_env.testing import make_workdir
    from sasha_env.workdir import Workdir

    made = make_workdir(tmp_path / "wd", n_slides=12, n_patches=(10, 16), fracs=(0.5,))
    wd = Workdir(made)
    calibrate_workdir(wd, made.config, log=lambda m: None)
    evaluate_workdir(wd, made.config, log=lambda m: None)
    rules = load_experiment("adaptive_rules")
    data = json.loads(json.dumps(rules.collect(made.root, made.config)))  # as cached
    rows = rules.measure(data, list(rules.VARIANTS))
    assert {r["variant"] for r in rows} == set(rules.VARIANTS) and len(rows) == len(rules.VARIANTS)
    shared = next(r for r in rows if r["variant"] == "shared")
    # refitted from fresh traces, the shared rule is the one the calibrate stage stored and
    # evaluation measured
    assert shared["auc"] == pytest.approx(shared["results_json_shared"]["auc"], abs=1e-9)
    assert shared["mean_frac"] == pytest.approx(shared["results_json_shared"]["mean_frac"])
    per_class = next(r for r in rows if r["variant"] == "per_class")
    assert len(per_class["thresholds"]) == 2 and len(shared["thresholds"]) == 1
    # no rule reads past the cap: the fixed agent's episodes (ceil(0.5 N) zooms each)
    capped = json.loads((made.root / "episodes" / "sasha-0.5.json").read_text())
    cap = sum(e["frac_read"] for e in capped) / len(capped)
    assert all(0 < r["mean_frac"] <= cap + 1e-9 for r in rows)
    rule_in = next(r for r in rows if r["variant"] == "rule_in")
    assert rule_in["thresholds"][0] == 1.0  # normal never stops a slide
    assert "| 0.5 | per_class | 1 |" in rules.table(rows)
