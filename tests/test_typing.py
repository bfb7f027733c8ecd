"""The public API type-checks as the README uses it (py.typed ships with both packages)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One mypy cache for both checks (the second reuses the analysis of torch and SB3)."""
    return str(tmp_path_factory.mktemp("mypy-cache"))


def test_py_typed_markers_ship():
    for package in ("sasha_env", "sasha_models"):
        assert (ROOT / "src" / package / "py.typed").is_file()


def test_public_api_type_checks(cache):
    pytest.importorskip("mypy")
    cmd = [
        sys.executable, "-m", "mypy", str(ROOT / "tests" / "typing" / "public_api.py"),
        "--follow-imports=silent", "--ignore-missing-imports", "--no-error-summary",
        "--cache-dir", cache,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_a_wrong_use_is_caught(tmp_path, cache):
    pytest.importorskip("mypy")
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from sasha_env import Predictor\n"
        "label: int = Predictor('wd').predict('slide.tiff')['label']\n"
    )
    cmd = [
        sys.executable, "-m", "mypy", str(bad), "--follow-imports=silent",
        "--ignore-missing-imports", "--cache-dir", cache,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 1 and "Incompatible types" in proc.stdout
