"""experiments/adaptive_rules.py: stop-rule variants refitted on a finished workdir's val traces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_experiment


def test_the_workdir_variant_is_the_pipelines_rule_and_the_others_are_fitted_beside_it(
    tmp_path, monkeypatch
):
    from sasha_env.envs.wsi import episode_budget
    from sasha_env.pipeline.calibrate import calibrate_workdir
    from sasha_env.pipeline.evaluate import evaluate_workdir
    from sasha_env.testing import make_workdir
    from sasha_env.workdir import Workdir

    made = make_workdir(tmp_path / "wd", n_slides=12, n_patches=(10, 16), fracs=(0.5,))
    made.config["adaptive"] = {"stop_classes": ["tumor"]}  # the demo preset's rule
    wd = Workdir(made)
    calibrate_workdir(wd, made.config, log=lambda m: None)
    evaluate_workdir(wd, made.config, log=lambda m: None)
    rules = load_experiment("adaptive_rules")
    data = json.loads(json.dumps(rules.collect(made.root, made.config)))  # as cached
    rows = rules.measure(data, list(rules.VARIANTS))
    assert {r["variant"] for r in rows} == set(rules.VARIANTS) and len(rows) == len(rules.VARIANTS)
    by = {r["variant"]: r for r in rows}
    # refitted from fresh traces, the workdir's rule is the one the calibrate stage stored and
    # evaluation measured
    own = by["workdir"]
    assert own["auc"] == pytest.approx(own["results_json_row"]["auc"], abs=1e-9)
    assert own["mean_frac"] == pytest.approx(own["results_json_row"]["mean_frac"])
    assert own["thresholds"] == by["rule_in"]["thresholds"]
    assert len(by["per_class"]["thresholds"]) == 2 and len(by["shared"]["thresholds"]) == 1
    # no rule reads past the cap: the fixed agent's episodes (ceil(0.5 N) zooms each)
    capped = json.loads((made.root / "episodes" / "sasha-0.5.json").read_text())
    cap = sum(e["frac_read"] for e in capped) / len(capped)
    assert all(0 < r["mean_frac"] <= cap + 1e-9 for r in rows)
    assert by["rule_in"]["thresholds"][0] == 1.0  # normal never stops a slide
    # a mean budget no cap meets (0.01 of N <= 16 patches) takes the smallest cap: one zoom
    tight = rules.VARIANTS["rule_in+mean0.1"] | {"mean_frac": 0.01}
    monkeypatch.setitem(rules.VARIANTS, "rule_in+mean0.01", tight)
    (mean,) = rules.measure(data, ["rule_in+mean0.01"])
    n = np.array([e["n_patches"] for e in data["agents"][0]["test"]])
    assert all(episode_budget(mean["max_frac"], int(k)) == 1 for k in n)
    assert mean["mean_frac"] == pytest.approx(float(np.mean(1 / n)))
    assert "| 0.5 | per_class | 1 |" in rules.table(rows)
