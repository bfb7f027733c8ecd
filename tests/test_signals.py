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


def _long(tmp_path: Path) -> Path:
    """A config whose model fits would run for minutes, were they not stopped: a stop that
    waited for them fails the tests' time limits."""
    path = tmp_path / "long.yaml"
    path.write_text("hafed: {max_epochs: 5000}\nlowres: {max_epochs: 5000}\n")
    return path


def _spawned_workers(pid: int) -> list[int]:
    """``pid``'s multiprocessing workers (not its resource tracker)."""
    return [c for c in _children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _all_end(pids: list[int], within: float = STOPS_WITHIN_S) -> bool:
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


def _start(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, text=True, start_new_session=True, **kw)


@pytest.fixture(autouse=True, scope="module")
def _ctrl_c_reaches_the_commands():
    """SIGINT at its default action in the commands started here, as in a terminal's foreground
    job. Started from a shell's background job (``make test &``, ``nohup``), the test run
    ignores SIGINT, every process it starts inherits that, and Python then keeps Ctrl-C
    ignored. A signal with a handler is reset to its default action in a started program, so
    this process handles SIGINT (as Python does by default) while the module runs."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _cleanup(proc: subprocess.Popen) -> None:
    """Whatever a failed test left running: the whole session of the command."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _study(tmp_path: Path, tiny_store: Path, tiny_cohort: Path) -> tuple[list[str], Path]:
    root = tmp_path / "study"
    root.mkdir()
    shutil.copytree(tiny_store, root / "features.zarr")
    cmd = [*SASHA, "study", "--manifest", str(tiny_cohort), "--workdir", str(root), "--preset", "tiny", "--config", str(_long(tmp_path)), "--seeds", "2", "--quiet", "--jobs", "2"]  # fmt: skip
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
    cmd = [*SASHA, "pipeline", "--manifest", str(tiny_cohort), "--workdir", str(root), "--preset", "tiny", "--config", str(_long(tmp_path))]  # fmt: skip
    proc = _start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:  # inside HAFED's fit: its CSV log exists once the first epochs have been logged
        _wait_for(lambda: any((root / "models" / "hafed").glob("logs/*/metrics.csv")), proc)
        proc.send_signal(sig)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == status, (proc.returncode, err[-2000:])
        assert time.monotonic() - t0 < STOPS_WITHIN_S
        assert f"{said}; finished work is kept and a re-run resumes" in err
        assert (root / "stages" / "extract.json").is_file()  # what finished stays
        assert not (root / "stages" / "hafed.json").is_file()  # what did not is not done
    finally:
        _cleanup(proc)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_study_stops_its_helpers(tiny_cohort, tiny_store, tmp_path, sig):
    """SIGINT to the study process alone (an IDE's stop button; a terminal's Ctrl-C reaches
    the helpers anyway): Lightning's ``SystemExit`` inside the study's own fit is a stop too."""
    cmd, root = _study(tmp_path, tiny_store, tiny_cohort)
    proc = _start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        fitting = [root / f"seed-{s}" / "models" / "hafed" for s in (0, 1)]
        _wait_for(lambda: all(any(d.glob("logs/*/metrics.csv")) for d in fitting), proc)
        helpers = _children(proc.pid)
        assert helpers, "no helper process"
        proc.send_signal(sig)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (EXIT_TERMINATED, EXIT_INTERRUPTED), (proc.returncode, err[-2000:])  # fmt: skip
        assert time.monotonic() - t0 < STOPS_WITHIN_S, "the study waited for its helpers' seeds"
        assert _all_end(helpers), "a helper outlived the stopped study"
    finally:
        _cleanup(proc)


@pytest.mark.slow
def test_a_killed_study_takes_its_helpers_down(tiny_cohort, tiny_store, tmp_path):
    cmd, root = _study(tmp_path, tiny_store, tiny_cohort)
    proc = _start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: all((root / f"seed-{s}" / "models").is_dir() for s in (0, 1)), proc)
        helpers = _children(proc.pid)
        assert helpers, "no helper process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _all_end(helpers), "a helper outlived the killed study"
    finally:
        _cleanup(proc)


@pytest.mark.slow
@pytest.mark.parametrize("kill", [False, True], ids=["terminated", "killed"])
def test_a_stopped_pipeline_takes_its_workers_down(tiny_cohort, tiny_store, tmp_path, kill):
    """Terminated, it terminates its workers; killed outright, the kernel does (each worker
    dies at once on SIGTERM, inside a Lightning fit too, which would otherwise only stop the
    fit and leave the worker waiting for work)."""
    root = tmp_path / "wd"
    root.mkdir()
    shutil.copytree(tiny_store, root / "features.zarr")
    cmd = [*SASHA, "pipeline", "--manifest", str(tiny_cohort), "--workdir", str(root), "--preset", "tiny", "--config", str(_long(tmp_path)), "--quiet", "--jobs", "2"]  # fmt: skip
    proc = _start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:  # two fits at once, each in a worker: HAFED and the low-res classifier
        fitting = [root / "models" / m for m in ("hafed", "lowres")]
        _wait_for(lambda: all(any(d.glob("logs/*/metrics.csv")) for d in fitting), proc)
        workers = _spawned_workers(proc.pid)
        assert len(workers) == 2, workers
        t0 = time.monotonic()
        if kill:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == EXIT_TERMINATED, (proc.returncode, err[-2000:])
            assert time.monotonic() - t0 < STOPS_WITHIN_S, "the pipeline waited for its workers"
        assert _all_end(workers), "a worker outlived the stopped pipeline"
    finally:
        _cleanup(proc)


def _stubborn(started: str) -> None:
    """A task with a SIGTERM handler like Lightning's while it fits or predicts: it notes the
    signal, calls the handler it replaced, and goes on (here for a minute)."""
    import signal as sig

    previous = sig.getsignal(sig.SIGTERM)

    def note(signum, frame):
        if callable(previous):
            previous(signum, frame)

    sig.signal(sig.SIGTERM, note)
    Path(started).touch()
    time.sleep(60)


def test_a_pool_worker_dies_on_sigterm_even_under_a_chaining_handler(tmp_path):
    """What makes :func:`~sasha_env.processes.worker_pool`'s stop prompt inside Lightning's
    loops: its workers' own SIGTERM handler ends them, and Lightning calls it after its own."""
    from sasha_env.processes import worker_pool

    started = tmp_path / "started"
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), worker_pool(1) as pool:
        pool.submit(_stubborn, str(started))
        while not started.exists():
            assert time.monotonic() - t0 < 60, "the task never started"
            time.sleep(0.05)
        t0 = time.monotonic()
        raise KeyboardInterrupt  # a stop: the pool terminates its worker
    assert time.monotonic() - t0 < STOPS_WITHIN_S, "the worker ran its task on"
