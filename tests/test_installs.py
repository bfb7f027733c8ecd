"""The install files: `make` and CI install the versions in requirements/constraints.txt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"


def _name(requirement: str) -> str:
    """PEP 503 normalised project name of a requirement string (extras, markers dropped)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"not an exact pin: {line!r}"
            pins[_name(name)] = version.strip()
    return pins


def test_constraints_pin_every_requirement_of_make_install() -> None:
    """A requirement added to pyproject.toml without `make lock` fails here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["dev"] + extras["docs"]
    missing = sorted({_name(r) for r in wanted} - set(_pins()))
    assert not missing, f"not in {CONSTRAINTS.name} (run `make lock`): {missing}"


def test_constraints_pin_torch_without_the_cuda_stack() -> None:
    pins = _pins()
    assert re.fullmatch(r"\d+\.\d+\.\d+", pins["torch"]), pins["torch"]  # no +cpu label
    cuda = sorted(n for n in pins if n.startswith("nvidia-") or n == "triton")
    assert not cuda, f"the CPU build of torch needs none of {cuda}"


def test_make_installs_from_the_constraints_and_ci_lints_first() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "$(STAMP): pyproject.toml $(CONSTRAINTS)" in makefile
    installs = [ln for ln in makefile.splitlines() if "pip install" in ln and "-e " in ln]
    assert installs and all("-c $(CONSTRAINTS)" in ln for ln in installs), installs
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci.index("make lint") < ci.index("make docs") < ci.index("make test")
