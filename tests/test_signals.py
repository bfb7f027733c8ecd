"""Terminated (SIGTERM, as a batch scheduler ends a job), interrupted or killed, a run says so
and ends, and so do the processes it started.

``sasha`` exits with status 143 (128 + SIGTERM) when terminated and 130 when interrupted,
inside a fit too; ``sasha study --jobs J`` takes its helper processes down with it and
``sasha pipeline --jobs J`` its workers, whether terminated or killed outright.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sasha_env.cli.common import EXIT_INTERRUPTED, EXIT_TERMINATED

SASHA = [sys.executable, "-m", "sasha_env.cli"]
#: seconds a process has to end after the signal (a tiny seed's pipeline takes longer)
STOPS_WITHIN_S = 15


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux ``/proc``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; its parent has not reaped it yet


def _wait_for(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the signal"
        assert time.monotonic() < deadline, f"not ready in {timeout} s"
        time.sleep(0.05)


def _study(tmp_path: Path, tiny_store: Path, tiny_cohort: Path) -> tuple[list[str], Path]:
    root = tmp_path / "study"
    root.mkdir()
    shutil.copytree(tiny_store, root / "features.zarr")
    cmd = [*SASHA, "study", "--manifest", str(tiny_cohort), "--workdir", str(root), "--preset", "tiny", "--seeds", "2", "--quiet", "--jobs", "2"]  # fmt: skip
    return cmd, root


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "status", "said"),
    [(signal.SIGTERM, EXIT_TERMINATED, "terminated"), (signal.SIGINT, EXIT_INTERRUPTED, "interrupted")],
)  # fmt: skip
def test_stopped_inside_a_fit_says_so_and_keeps_what_finished(
    tiny_cohort, tiny_store, tmp_path, sig, status, said
):
    """Lightning ends a fit stopped by Ctrl-C with ``sys.exit(1)`` and one stopped by SIGTERM
    with a ``SystemExit`` of status 0; ``sasha`` exits 130 and 143."""
    root = tmp_path / "wd"
    root.mkdir()
    shutil.copytree(tiny_store, root / "features.zarr")
    cmd = [*SASHA, "pipeline", "--manifest", str(tiny_cohort), "--workdir", str(root), "--preset", "tiny"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # inside HAFED's fit: its CSV log exists once the first epoch has been logged
    _wait_for(lambda: any((root / "models" / "hafed").glob("logs/*/metrics.csv")), proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, (proc.returncode, err[-2000:])
    assert f"{said}; finished work is kept and a re-run resumes" in err
    assert (root / "stages" / "extract.json").is_file()  # what finished stays
    assert not (root / "stages" / "hafed.json").is_file()  # what did not is not marked done


@pytest.mark.slow
def test_a_terminated_study_terminates_its_helpers(tiny_cohort, tiny_store, tmp_path):
    cmd, root = _study(tmp_path, tiny_store, tiny_cohort)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: all((root / f"seed-{s}" / "models").is_dir() for s in (0, 1)), proc)
    helpers = _children(proc.pid)
    assert helpers, "no helper process"
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_TERMINATED, (proc.returncode, err[-2000:])
    assert time.monotonic() - t0 < STOPS_WITHIN_S, "the study waited for its helpers' seeds"
    deadline = time.monotonic() + STOPS_WITHIN_S
    while any(_alive(h) for h in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(h) for h in helpers), "a helper outlived the terminated study"


@pytest.mark.slow
def test_a_killed_study_takes_its_helpers_down(tiny_cohort, tiny_store, tmp_path):
    cmd, root = _study(tmp_path, tiny_store, tiny_cohort)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: all((root / f"seed-{s}" / "models").is_dir() for s in (0, 1)), proc)
    helpers = _children(proc.pid)
    assert helpers, "no helper process"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + STOPS_WITHIN_S
    while any(_alive(h) for h in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(h) for h in helpers), "a helper outlived the killed study"


@pytest.mark.slow
def test_a_terminated_pipeline_terminates_its_workers(tiny_cohort, tiny_store, tmp_path):
    root = tmp_path / "wd"
    root.mkdir()
    shutil.copytree(tiny_store, root / "features.zarr")
    long = tmp_path / "long.yaml"  # stages that would run for minutes, were they not stopped
    long.write_text("hafed: {max_epochs: 2000}\nlowres: {max_epochs: 2000}\n")
    cmd = [*SASHA, "pipeline", "--manifest", str(tiny_cohort), "--workdir", str(root), "--preset", "tiny", "--config", str(long), "--quiet", "--jobs", "2"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        # two stages at once, each in a worker: HAFED's chain and the low-res classifier
        _wait_for(lambda: all((root / "models" / m).is_dir() for m in ("hafed", "lowres")), proc)
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_TERMINATED, (proc.returncode, err[-2000:])
        assert time.monotonic() - t0 < STOPS_WITHIN_S, "the pipeline waited for its workers"
        deadline = time.monotonic() + STOPS_WITHIN_S
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "a worker outlived the terminated pipeline"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
