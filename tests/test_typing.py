"""The public API type-checks as the README uses it (py.typed ships with both packages)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


#: Libraries whose sources mypy does not analyse here (their names are ``Any``): torch alone
#: took most of a minute. Our own signatures, numpy's and the standard library's are checked.
NOT_FOLLOWED = (
    "torch", "lightning", "torchmetrics", "stable_baselines3", "sb3_contrib", "gymnasium",
    "zarr", "scipy", "matplotlib", "wandb", "tiffslide", "PIL", "pandas", "transformers",
)  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One mypy cache for both checks (the second reuses the first's analysis)."""
    return str(tmp_path_factory.mktemp("mypy-cache"))


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
    """A mypy config: imports followed silently, the big libraries in :data:`NOT_FOLLOWED`
    skipped, missing stubs ignored."""
    path = tmp_path_factory.mktemp("mypy-config") / "mypy.ini"
    skipped = ",".join(f"{name}.*" for name in NOT_FOLLOWED)
    path.write_text(
        "[mypy]\nfollow_imports = silent\nignore_missing_imports = True\n\n"
        f"[mypy-{skipped}]\nfollow_imports = skip\n"
    )
    return str(path)


def test_py_typed_markers_ship():
    for package in ("sasha_env", "sasha_models"):
        assert (ROOT / "src" / package / "py.typed").is_file()


def test_public_api_type_checks(cache, config):
    pytest.importorskip("mypy")
    cmd = [
        sys.executable, "-m", "mypy", str(ROOT / "tests" / "typing" / "public_api.py"),
        "--config-file", config, "--no-error-summary", "--cache-dir", cache,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_a_wrong_use_is_caught(tmp_path, cache, config):
    pytest.importorskip("mypy")
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from sasha_env import Predictor\n"
        "label: int = Predictor('wd').predict('slide.tiff')['label']\n"
    )
    cmd = [sys.executable, "-m", "mypy", str(bad), "--config-file", config, "--cache-dir", cache]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 1 and "Incompatible types" in proc.stdout
