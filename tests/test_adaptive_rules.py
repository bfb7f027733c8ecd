"""experiments/adaptive_rules.py: both stop rules refitted on a finished workdir's val traces."""

from __future__ import annotations

import pytest

from conftest import load_experiment


def test_the_shared_rule_is_the_pipelines_and_the_per_class_rule_is_fitted_beside_it(tmp_path):
    from sasha_env.pipeline.calibrate import calibrate_workdir
    from sasha_env.pipeline.evaluate import evaluate_workdir
    from sasha_env.testing import make_workdir
    from sasha_env.workdir import Workdir

    made = make_workdir(tmp_path / "wd", n_slides=12, n_patches=(10, 16), fracs=(0.5,))
    wd = Workdir(made)
    calibrate_workdir(wd, made.config, log=lambda m: None)
    evaluate_workdir(wd, made.config, log=lambda m: None)
    rules = load_experiment("adaptive_rules")
    rows = rules.rules_on_workdir(made.root, made.config)
    assert [r["frac"] for r in rows] == [0.5]
    row = rows[0]
    # refitted from fresh traces, the shared rule is the one the calibrate stage stored and
    # evaluation measured, to the last digit
    assert row["shared"]["auc"] == pytest.approx(row["results_json_shared"]["auc"], abs=1e-9)
    assert row["shared"]["mean_frac"] == pytest.approx(row["results_json_shared"]["mean_frac"])
    assert len(row["per_class"]["thresholds"]) == 2 and len(row["shared"]["thresholds"]) == 1
    assert 0 < row["per_class"]["mean_frac"] <= 0.5 + 1e-9
    assert "| 0.5 | 1 |" in rules.table(rows)
