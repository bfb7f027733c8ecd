"""Shared fixtures: small slides written by hand, and the tiny synthetic cohort."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tifffile

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite on one pytest-xdist worker per core: each worker, and the
    # processes its tests start, compute with one thread, so the workers do not oversubscribe
    # the cores (torch's default is a thread per core in every process)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

DATA = Path(__file__).parent / "data"
CMU_SVS = DATA / "cmu_small_region.svs"


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """Every test leaves torch's intra-op thread count as it found it. The session's workdir
    fixtures are built in this process and ``--jobs`` workers take the parent's count, so a
    count changed by one test (an experiment script run in-process sets 1) would make a later
    test's workers compute with other rounding than the fixture it compares against."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def thread_policy_unset(monkeypatch):
    """``OMP_WAIT_POLICY`` and ``SASHA_PASSIVE_THREADS`` unset for the test and put back as they
    were (set or not) after it, so that a policy the code under test sets in this process does
    not reach the processes of later tests. Returns the ``monkeypatch``."""
    for name in ("OMP_WAIT_POLICY", "SASHA_PASSIVE_THREADS"):
        monkeypatch.setenv(name, "x")  # recorded as it was before, then removed
        monkeypatch.delenv(name)
    return monkeypatch


def tissue_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An RGB image with a pink-purple tissue blob on white glass, (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1
    img = np.full((h, w, 3), 240, np.uint8)
    tissue = np.stack(
        [
            200 + 30 * rng.random((h, w)),
            110 + 40 * rng.random((h, w)),
            170 + 30 * rng.random((h, w)),
        ],
        -1,
    )
    img[blob] = tissue[blob].astype(np.uint8)
    return img


def write_single_level_tiff(path: Path, image: np.ndarray, mpp: float | None = 0.5) -> Path:
    """A tiled, single-level TIFF (no pyramid), as some scanners' exports are."""
    kw = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", compression="zlib", **kw)
    return path


def write_ome_pyramid(
    path: Path, image: np.ndarray, downsamples=(1, 2, 4), mpp: float = 0.5
) -> Path:
    """An OME-TIFF pyramid with sub-IFDs, written the way bfconvert/tifffile users write them."""
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        opts = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}
        tif.write(
            image,
            subifds=len(downsamples) - 1,
            metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
            **opts,
        )
        for ds in downsamples[1:]:
            tif.write(image[::ds, ::ds], subfiletype=1, **opts)
    return path


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_experiment(name: str) -> ModuleType:
    """Import ``experiments/<name>.py`` (not a package) as module ``name``; the scripts import
    their neighbours (``bench_env``, ``f02_factors``), so the folder goes on ``sys.path``."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def kill_when(cmd: list[str], ready, timeout: float = 240) -> None:
    """Start ``cmd`` in its own session and SIGKILL its whole process group once ``ready()``.

    Fails if the command ends on its own first or ``ready()`` never comes within ``timeout`` s.
    """
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"{cmd[2:4]} ended before it could be killed"
        assert time.time() < deadline, f"{cmd[2:4]} did not reach the kill point in {timeout} s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path) with the SHA-256 of its content: equal digests
    before and after a test show that it left a shared fixture as built."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """The tiny synthetic cohort (32 slides: 16 train, 8 val, 8 test); returns its manifest."""
    from sasha_env.config import load_config
    from sasha_env.slides.synth import SynthConfig, synthesize_cohort

    out = tmp_path_factory.mktemp("tiny_cohort")
    cfg = SynthConfig.from_dict(load_config("tiny")["synth"])
    return synthesize_cohort(out, cfg, seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_store(tiny_cohort, tmp_path_factory) -> Path:
    """The tiny cohort extracted with the tiny preset."""
    from sasha_env.config import load_config
    from sasha_env.features.extract import ExtractConfig, extract_cohort
    from sasha_env.slides.grid import GridConfig

    cfg = load_config("tiny")
    out = tmp_path_factory.mktemp("tiny_store") / "features.zarr"
    report = extract_cohort(
        tiny_cohort,
        out,
        GridConfig.from_dict(cfg["grid"]),
        ExtractConfig.from_dict(cfg["extract"]),
        progress=False,
    )
    assert report.ok, report.summary()
    return out


@pytest.fixture(scope="session")
def tiny_workdir(tiny_cohort, tiny_store, tmp_path_factory) -> Path:
    """A finished tiny pipeline run (every stage, agents included)."""
    import shutil

    from sasha_env.pipeline.runner import Pipeline

    wd = tmp_path_factory.mktemp("workdir")
    shutil.copytree(tiny_store, wd / "features.zarr")  # extraction then finds every slide done
    Pipeline(wd, manifest=tiny_cohort, preset="tiny", progress=False, log=lambda m: None).run()
    return wd
