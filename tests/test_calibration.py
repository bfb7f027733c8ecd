"""Calibration: temperature and class bias fitted on val, applied in evaluation and predict."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sasha_models.calibration import Calibration, fit_calibration, read_calibrations
from sasha_models.metrics import classification_metrics


def _binary(logit_diff: np.ndarray) -> np.ndarray:
    p1 = 1 / (1 + np.exp(-logit_diff))
    return np.stack([1 - p1, p1], 1)


def _cohort(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True logit differences z and labels drawn from sigmoid(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return z, y


def test_recovers_a_known_temperature():
    z, y = _cohort(4000)
    bunched = _binary(z / 4)  # under-confident by a factor of 4
    c = fit_calibration(bunched, y, bias=False)
    assert c.temperature == pytest.approx(0.25, rel=0.1)
    assert c.nll_after < c.nll_before
    before = classification_metrics(bunched, y)["ece"]
    after = classification_metrics(c.apply(bunched), y)["ece"]
    assert after < before / 2


def test_the_bias_moves_a_shifted_threshold_where_temperature_cannot():
    z, y = _cohort(4000, seed=1)
    shifted = _binary(z - 2.0)  # the positive class is systematically under-called
    t_only = fit_calibration(shifted, y, bias=False)
    both = fit_calibration(shifted, y)
    acc = [classification_metrics(p, y)["accuracy"] for p in (shifted, t_only.apply(shifted))]
    assert acc[0] == pytest.approx(acc[1])  # temperature alone keeps every binary decision
    assert both.bias[0] == 0.0 and both.bias[1] == pytest.approx(2.0, abs=0.3)
    assert classification_metrics(both.apply(shifted), y)["accuracy"] > acc[0] + 0.05


def test_a_separable_validation_set_keeps_a_finite_temperature():
    probs = _binary(np.array([-0.2, -0.1, -0.05, 0.05, 0.1, 0.2]))
    c = fit_calibration(probs, np.array([0, 0, 0, 1, 1, 1]))
    assert 0.01 < c.temperature < 1.0  # sharpened, but the prior keeps it from 0
    out = c.apply(probs)
    assert np.isfinite(out).all() and np.allclose(out.sum(1), 1)


def test_identity_and_multiclass():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(3), 50)
    np.testing.assert_allclose(Calibration(1.0, (0.0, 0.0, 0.0)).apply(p), p, atol=1e-6)
    c = fit_calibration(p, rng.integers(0, 3, 50))
    assert len(c.bias) == 3 and np.allclose(c.apply(p).sum(1), 1, atol=1e-6)


def test_reading_calibrations(tmp_path):
    assert read_calibrations(tmp_path / "missing.json") == {}
    c = Calibration(0.5, (0.0, 1.5), 15, 0.6, 0.3)
    path = tmp_path / "calibration.json"
    t = Calibration(0.7, (0.0, 0.0), 15)
    fits = {"temperature": t.to_dict(), "temperature+bias": c.to_dict()}
    path.write_text(json.dumps({"methods": {"hafed@1": fits}}))
    assert read_calibrations(path) == {"hafed@1": t}
    assert read_calibrations(path, "temperature+bias") == {"hafed@1": c}
    with pytest.raises(ValueError, match="choose one of temperature, temperature"):
        read_calibrations(path, "platt")
    path.write_text(json.dumps({"methods": {"hafed@1": {"temperature": {"temperature": -1}}}}))
    with pytest.raises(ValueError, match="calibration.json.*temperature must be > 0"):
        read_calibrations(path)


def test_the_pipeline_fits_on_val_and_reports_before_and_after(tiny_workdir):
    from sasha_env.pipeline.evaluate import format_table
    from sasha_env.workdir import Workdir

    wd = Workdir(tiny_workdir)
    fitted = json.loads(wd.calibration.read_text())
    assert fitted["split"] == "val" and {"hafed@1", "sasha@0.1"} <= set(fitted["methods"])
    results = json.loads(wd.results.read_text())
    rows = {(m["method"], m["frac"]): m for m in results["methods"]}
    hafed = rows[("hafed", 1.0)]
    for kind in ("temperature", "temperature+bias"):
        fit = fitted["methods"]["hafed@1"][kind]
        assert hafed["calibrated"][kind]["temperature"] == fit["temperature"]
        assert {"accuracy", "ece", "f1", "auc"} <= set(hafed["calibrated"][kind])
    assert fitted["methods"]["hafed@1"]["temperature"]["bias"] == [0.0, 0.0]
    # a temperature alone never changes a decision
    assert hafed["calibrated"]["temperature"]["accuracy"] == pytest.approx(hafed["accuracy"])
    assert "calibrated" not in rows[("random", 0.1)]  # only fitted methods
    assert "Calibrated on the val split" in format_table(results)
