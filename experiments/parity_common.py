"""Shared pieces of the differential check against the official SASHA code (issue 21).

The official code (coglabiisc/SASHA at 6385fe6, a non-commercial licence) is never vendored:
:func:`run_official` runs a script against an untouched checkout of it in a subprocess, with
numbers in and numbers out (``.npz``, no pickles). What it returns can be saved as a fixture
under ``tests/data/official_parity/<check>.npz`` (numbers only) so that the tests compare
against it without the checkout.

A ``parity_*.py`` module next to this one provides
``checks(official: Path | None, fixtures: Path, write: bool) -> list[Check]``: with
``official`` it runs the official code (and, with ``write``, saves the numbers as fixtures);
without it it compares against the saved fixtures. ``experiments/official_parity.py`` runs
them all.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "OFFICIAL_COMMIT",
    "OFFICIAL_FILES",
    "TOL",
    "Check",
    "compare",
    "fixture_path",
    "load_fixture",
    "official_or_fixture",
    "run_official",
    "save_fixture",
    "verify_checkout",
]

OFFICIAL_COMMIT = "6385fe6bfcf4f1591b8f691ada2407c83002f62e"
TOL = 1e-5
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "data" / "official_parity"

# sha256 of the files the checks import or read, at 6385fe6 (numbers, not code): a checkout
# that differs in any of them is not the code the fixtures were recorded from.
OFFICIAL_FILES = {
    "envs/WSI_cosine_env.py": "28ae28320cf1364c2fb02f38e8041e4bfae468d312e3906ab38a8cfe2a37f76c",
    "modules/fglobal_mlp.py": "a3a1446abe9486922f31f3d72861d2d09f751047959f4bdfb4319965dd655f9b",
    "rl_algorithms/ppo.py": "54ecbd5e82c9385d1d0a17ad23d1bc6bb19fa705bccaf86784443b1e78fdfe85",
    "architecture/transformer.py": (
        "a9fa7d79049defcf8f80d64b4665514cb6eae21adfea713ad66d4776c7737958"
    ),
    "step5_tsu_training.py": "b83915c8b53256b8830937a4d5bdb0975f542afc90cec8ad6c6f9e8e8adcb91b",
    "step6_rl_training.py": "e374f786d05327c095204abeec64d2b7270df5b2cbecd0d196258b662ce3e80d",
    "config/camelyon_rl_config.yml": (
        "466f19d11f34ef6f3ad074222466df5a1d3f979ffe6fdeab7b80a65feff7b85d"
    ),
    "config/camelyon_tsu_config.yml": (
        "c550f518a6079589bcd9e1786b28988ada131672c658f440f710d5fb08acfad5"
    ),
    "config/camelyon_config.yml": (
        "61e9d00f66aca1346a980695ea2807c65423f8094597ef62cee2c1d829a74099"
    ),
}

HOW_TO_CHECKOUT = (
    "make an untouched checkout outside this repository: mkdir -p DIR && git --git-dir="
    "<clone of https://github.com/coglabiisc/SASHA>/.git archive 6385fe6 | tar -x -C DIR"
)


@dataclass
class Check:
    """One line of the parity report.

    Attributes:
        name: what is compared (``env.episode.N20_f0.2_frozen``).
        max_abs_diff: largest absolute difference between ours and the official numbers.
        tol: tolerance; ``ok`` is ``max_abs_diff <= tol`` unless set otherwise.
        ok: whether the check passed.
        note: a short explanation (where the numbers come from, why ours differs).
        counted: ``False`` for informational lines (ours differs on purpose: by how much);
            they are printed but not part of ``parity: K/M``.
    """

    name: str
    max_abs_diff: float
    tol: float = TOL
    ok: bool = True
    note: str = ""
    counted: bool = True

    def line(self) -> str:
        """``name  max|diff|  ok/FAIL/info  note`` for the report."""
        status = "info" if not self.counted else ("ok" if self.ok else "FAIL")
        note = f"  {self.note}" if self.note else ""
        return f"{self.name:<48s} {self.max_abs_diff:11.3e}  {status}{note}"


def max_abs_diff(ours: object, theirs: object) -> float:
    """Largest ``|ours − theirs|`` over arrays of the same shape; ``inf`` if shapes differ."""
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    if (
        not (np.isfinite(a) == np.isfinite(b)).all()
        or not (a[~np.isfinite(a)] == b[~np.isfinite(b)]).all()
    ):
        return float("inf")
    fin = np.isfinite(a)
    return float(np.abs(a[fin] - b[fin]).max()) if fin.any() else 0.0


def compare(
    name: str,
    ours: Mapping[str, object] | object,
    theirs: Mapping[str, object] | object,
    tol: float = TOL,
    note: str = "",
    counted: bool = True,
) -> Check:
    """A :class:`Check` of ours against theirs: arrays, or dicts of arrays with the same keys
    (the max over keys; a missing key or a shape mismatch is ``inf``)."""
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        keys = set(ours) | set(theirs)
        diffs = [
            max_abs_diff(ours[k], theirs[k]) if k in ours and k in theirs else float("inf")
            for k in sorted(keys)
        ]
        diff = max(diffs) if diffs else 0.0
    else:
        diff = max_abs_diff(ours, theirs)
    return Check(name, diff, tol, bool(diff <= tol), note, counted)


# --------------------------------------------------------------------- the official checkout
def verify_checkout(official: Path) -> Path:
    """``official`` resolved, after checking it is an untouched checkout of 6385fe6 (the files
    the checks use have their 6385fe6 contents); a clear ``SystemExit`` otherwise."""
    root = Path(official).expanduser().resolve()
    if not root.is_dir():
        raise SystemExit(f"--official {official}: no such directory; {HOW_TO_CHECKOUT}")
    for rel, digest in OFFICIAL_FILES.items():
        path = root / rel
        if not path.is_file():
            raise SystemExit(
                f"--official {official}: {rel} is missing, so this is not a checkout of "
                f"coglabiisc/SASHA at 6385fe6; {HOW_TO_CHECKOUT}"
            )
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise SystemExit(
                f"--official {official}: {rel} differs from its contents at 6385fe6 (another "
                f"commit, or edited); {HOW_TO_CHECKOUT}"
            )
    return root


# What runs in the subprocess before the caller's script: the official directory first on
# sys.path, then stand-ins for the packages the official modules import but the checks never
# call (notes §8). torchmetrics and sklearn.metrics are imported before the torchvision
# stand-in, since lightning_utilities calls find_spec('torchvision'), which fails on a module
# without a spec.
_PRELUDE = """
import sys, types
sys.path.insert(0, {root!r})
for _name in ("torchmetrics", "sklearn.metrics"):
    try:
        __import__(_name)
    except ImportError:
        pass

def _stub(name, **attrs):
    if name in sys.modules:
        return sys.modules[name]
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod

class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("stubbed for the parity check; not available")

try:
    import prettytable  # noqa: F401
except ImportError:
    _stub("prettytable", PrettyTable=_Unavailable)
try:
    import timm.utils  # noqa: F401
except ImportError:
    _timm = _stub("timm")
    _timm.utils = _stub("timm.utils", accuracy=_Unavailable)
try:
    import torch.utils.tensorboard  # noqa: F401
except ImportError:
    _stub("torch.utils.tensorboard", SummaryWriter=_Unavailable)
try:
    import torchvision  # noqa: F401
except ImportError:
    _tv = _stub("torchvision")
    _tv.transforms = _stub("torchvision.transforms")

import numpy as np
import torch
torch.set_num_threads(1)
_data = np.load({inputs!r}, allow_pickle=False)
inputs = {{k: _data[k] for k in _data.files}}
outputs = {{}}
"""

_EPILOGUE = """
np.savez({outputs!r}, **{{k: np.asarray(v) for k, v in outputs.items()}})
"""


def run_official(
    official_dir: Path | str, script: str, inputs: Mapping[str, np.ndarray], timeout: float = 600
) -> dict[str, np.ndarray]:
    """Run ``script`` against the official code in a fresh Python process.

    The script sees ``inputs`` (a dict of numpy arrays), ``np`` and ``torch``, may import the
    official modules (``from envs.WSI_cosine_env import WSICosineObservationEnv``), and puts
    its results (arrays or numbers) into the dict ``outputs``. The official directory is first
    on ``sys.path``; the stand-ins of notes §8 are installed before the script runs; the
    process runs in a temporary directory with one torch thread.

    Args:
        official_dir: an untouched checkout of coglabiisc/SASHA at 6385fe6
            (:func:`verify_checkout` is applied).
        script: Python source.
        inputs: arrays the script reads, exchanged as ``.npz`` (no pickles).
        timeout: seconds before the subprocess is killed.

    Returns:
        ``outputs`` as numpy arrays.
    """
    root = verify_checkout(Path(official_dir))
    with tempfile.TemporaryDirectory(prefix="sasha-parity-") as tmp:
        tmpdir = Path(tmp)
        in_path, out_path = tmpdir / "inputs.npz", tmpdir / "outputs.npz"
        np.savez(in_path, **{k: np.asarray(v) for k, v in inputs.items()})
        source = (
            _PRELUDE.format(root=str(root), inputs=str(in_path))
            + "\n"
            + textwrap.dedent(script)
            + _EPILOGUE.format(outputs=str(out_path))
        )
        runner = tmpdir / "run_official.py"
        runner.write_text(source)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run(
            [sys.executable, str(runner)],
            cwd=tmpdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"the official-side script failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        with np.load(out_path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


# --------------------------------------------------------------------------------- fixtures
def fixture_path(fixtures: Path, name: str) -> Path:
    """``fixtures / f"{name}.npz"``."""
    return Path(fixtures) / f"{name}.npz"


def save_fixture(fixtures: Path, name: str, arrays: Mapping[str, object]) -> Path:
    """Save numbers (the official outputs and the inputs they came from) as ``<name>.npz``."""
    path = fixture_path(fixtures, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def load_fixture(fixtures: Path, name: str) -> dict[str, np.ndarray]:
    """The arrays of ``<name>.npz``; a clear error naming the file when it is missing."""
    path = fixture_path(fixtures, name)
    if not path.is_file():
        raise FileNotFoundError(
            f"parity fixture {path} is missing; record it with "
            "`python experiments/official_parity.py --official DIR --write-fixtures`"
        )
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def official_or_fixture(
    official: Path | None,
    fixtures: Path,
    write: bool,
    name: str,
    script: str,
    inputs: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The official outputs for ``inputs``: run now (``official`` given; saved as fixture
    ``name`` with the inputs, under keys ``in.*`` and ``out.*``, when ``write``), else read
    from the fixture. The fixture's inputs must equal ``inputs`` (else the fixture is stale)."""
    if official is not None:
        out = run_official(official, script, inputs)
        if write:
            blob = {f"in.{k}": v for k, v in inputs.items()}
            blob.update({f"out.{k}": v for k, v in out.items()})
            save_fixture(fixtures, name, blob)
        return out
    blob = load_fixture(fixtures, name)
    stored = {k[3:]: v for k, v in blob.items() if k.startswith("in.")}
    if set(stored) != set(inputs) or any(
        stored[k].shape != np.asarray(inputs[k]).shape
        or not np.array_equal(stored[k], np.asarray(inputs[k]))
        for k in inputs
    ):
        raise ValueError(
            f"parity fixture {fixture_path(fixtures, name)} was recorded from other inputs; "
            "re-record it with `python experiments/official_parity.py --official DIR "
            "--write-fixtures`"
        )
    return {k[4:]: v for k, v in blob.items() if k.startswith("out.")}
