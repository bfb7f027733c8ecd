"""Killed anywhere, the same result.

``sasha pipeline`` on the tiny cohort is SIGKILLed (its whole process group) at points spread
over the run by time — during start-up, extraction, training, the agents, calibration and
evaluation — and resumed after each kill; the run that finally completes must write the
``results.json`` of an uninterrupted run, value by value (floats exactly: every stage is
seeded and runs on the CPU, so a resumed stage recomputes the same bits).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sasha_env.features.store import FeatureStore
from sasha_env.pipeline.runner import STAGES
from sasha_env.workdir import Workdir

SASHA = [sys.executable, "-m", "sasha_env.cli"]
#: where the kills land: a stage of the uninterrupted run and a fraction of its wall time there
#: (by time, not at a marker). A first try at fractions of the whole run put four of six kills
#: in evaluate, the longest stage; one point per stage spreads them over the run.
KILL_AT = (
    ("startup", 0.5),
    ("extract", 0.5),
    ("hafed", 0.5),
    ("tsu", 0.5),
    ("agents", 0.5),
    ("calibrate", 0.5),
    ("evaluate", 0.5),
)
#: slides taken out of the copied store, so that extraction has work to be killed in
REEXTRACT = 2


class Run:
    """``cmd`` in its own session, its stdout lines recorded with their time since the start."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def started(self, stage: str) -> float | None:
        """Seconds since the start at which ``[stage] running`` was printed, or ``None``."""
        return next((t for t, line in self.lines if line == f"[{stage}] running"), None)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def timeline(run: Run, end: float) -> list[tuple[str, float, float]]:
    """``(stage, start, end)`` of an uninterrupted run, in seconds since its start; the time
    before the first stage is ``startup``."""
    starts = [("startup", 0.0)]
    starts += [(s, t) for s in STAGES if (t := run.started(s)) is not None]
    ends = [t for _, t in starts[1:]] + [end]
    return [(s, t, e) for (s, t), e in zip(starts, ends, strict=True)]


def kill_points(spans: list[tuple[str, float, float]]) -> list[tuple[str, float]]:
    """Each of :data:`KILL_AT` as ``(stage, seconds into that stage)``."""
    duration = {stage: end - start for stage, start, end in spans}
    return [(stage, q * duration[stage]) for stage, q in KILL_AT]


def killed_at(run: Run, stage: str, offset: float, timeout: float = 600) -> str | None:
    """SIGKILL ``run``'s process group ``offset`` s into ``stage`` (into the first later stage
    it reaches when ``stage`` was done before the kill); ``None`` if it ended first, else what
    it was running when killed."""
    later = STAGES[STAGES.index(stage) :] if stage in STAGES else STAGES
    deadline = time.monotonic() + timeout
    while run.proc.poll() is None:
        assert time.monotonic() < deadline, f"no kill point in {timeout} s:\n{run.text()[-2000:]}"
        if stage == "startup":
            began = 0.0
        else:
            began = min((t for s in later if (t := run.started(s)) is not None), default=None)
        if began is not None and run.elapsed() >= began + offset:
            running = [s for s in STAGES if run.started(s) is not None]
            run.kill()
            return running[-1] if running else "startup"
        time.sleep(0.02)
    return None


def fresh_workdir(root: Path, tiny_store: Path) -> Workdir:
    """A workdir holding the tiny store without its last :data:`REEXTRACT` slides."""
    wd = Workdir(root)
    root.mkdir()
    shutil.copytree(tiny_store, wd.store)
    for sid in FeatureStore(wd.store).slide_ids()[-REEXTRACT:]:
        shutil.rmtree(wd.store / "slides" / sid)
    return wd


@pytest.mark.slow
def test_pipeline_killed_anywhere_resumes_to_the_same_results(tiny_cohort, tiny_store, tmp_path):
    def command(wd: Workdir) -> list[str]:
        return [*SASHA, "pipeline", "--manifest", str(tiny_cohort), "--workdir", str(wd.root),
                "--preset", "tiny", "--quiet"]  # fmt: skip

    reference = fresh_workdir(tmp_path / "uninterrupted", tiny_store)
    run = Run(command(reference))
    assert run.wait() == 0, run.text()[-3000:]
    spans = timeline(run, run.elapsed())
    assert [s for s, _, _ in spans] == ["startup", *STAGES], run.text()[-3000:]
    expected = json.loads(reference.results.read_text())

    wd = fresh_workdir(tmp_path / "killed", tiny_store)
    kills = []
    for stage, offset in kill_points(spans):
        run = Run(command(wd))
        where = killed_at(run, stage, offset)
        if where is None:  # the run got there before the kill: the rest has nothing to cut
            assert run.proc.returncode == 0, run.text()[-3000:]
            break
        kills.append((stage, round(offset, 1), where))
    assert len(kills) >= 5, kills
    assert len({where for *_, where in kills}) >= 5, kills  # spread over the stages
    run = Run(command(wd))
    assert run.wait() == 0, (kills, run.text()[-3000:])
    differ = differences(expected, json.loads(wd.results.read_text()))
    assert not differ, (kills, differ[:20])  # the values that differ, by path


def differences(a: object, b: object, path: str = "") -> list[str]:
    """Where two JSON values differ: ``"path: a != b"`` for each leaf (a list's dict items
    named by their ``method@frac`` where they have one), so a failure says what changed."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [
            f"{path}/{k}: only in {'the first' if k in a else 'the second'}"
            for k in a.keys() ^ b.keys()
        ]
        for k in a.keys() & b.keys():
            out += differences(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            name = f"{x['method']}@{x.get('frac')}" if isinstance(x, dict) and "method" in x else i
            out += differences(x, y, f"{path}[{name}]")
        return out
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_differences_name_the_changed_values():
    a = {"methods": [{"method": "hafed", "frac": 1.0, "ece": 0.1}], "n": 3, "x": [1, 2]}
    b = {"methods": [{"method": "hafed", "frac": 1.0, "ece": 0.2}], "n": 3, "x": [1], "y": 0}
    assert sorted(differences(a, b)) == [
        "/methods[hafed@1.0]/ece: 0.1 != 0.2",
        "/x: [1, 2] != [1]",
        "/y: only in the second",
    ]
    assert differences(a, a) == []
