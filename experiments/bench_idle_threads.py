"""Processes sharing the cores: OpenMP's spinning idle threads against sleeping ones.

    python experiments/bench_idle_threads.py WORKDIR [WORKDIR ...] [--rounds 2] [--stage evaluate]

Copies each finished pipeline workdir (e.g. the seeds of a study) into a temporary folder,
then, per round, re-runs one stage (``sasha pipeline --stages STAGE --force STAGE``) in every
copy at once, one process per copy, as ``sasha study --jobs`` runs seeds side by side:

- ``spin``: ``SASHA_PASSIVE_THREADS=0``, OpenMP's own wait policy (idle threads spin a while
  before they sleep; what every run did before the CLI set the policy);
- ``sleep``: ``OMP_WAIT_POLICY=PASSIVE``, what ``sasha study --jobs`` and the ``--jobs``
  process pools set for their processes (:func:`sasha_env.threads.let_idle_threads_sleep`).

The two alternate within each round, and the first copy's stage also runs alone once per
mode. Printed: wall seconds per run, their means and the ratio spin / sleep, and whether the
stage's output (``results.json`` for ``evaluate``; the stage marker's outputs otherwise) is
identical in every run: the policy changes when an idle thread waits, not what it computes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

SASHA = [sys.executable, "-m", "sasha_env.cli"]
MODES = {"spin": {"SASHA_PASSIVE_THREADS": "0"}, "sleep": {"OMP_WAIT_POLICY": "PASSIVE"}}


def _output_digest(wd: Path, stage: str) -> str:
    """SHA-256 of what the stage computed (timings left out)."""
    if stage == "evaluate":
        data = (wd / "results.json").read_bytes()
    else:
        data = json.dumps(json.loads((wd / "stages" / f"{stage}.json").read_text())["outputs"])
        data = data.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def run_side_by_side(copies: list[Path], stage: str, mode: str) -> tuple[float, list[str]]:
    """The stage in every copy at once under ``mode``; wall seconds and output digests."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", *MODES["spin"])}
    # one `sasha pipeline` each: single processes, which keep OpenMP's policy unless told
    env.update(MODES[mode])
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                *SASHA,
                "pipeline",
                "--workdir",
                str(wd),
                "--stages",
                stage,
                "--force",
                stage,
                "--quiet",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for wd in copies
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"sasha pipeline failed ({mode}):\n{err[-2000:]}")
    return time.perf_counter() - t0, [_output_digest(wd, stage) for wd in copies]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("workdirs", nargs="+", type=Path, help="finished pipeline workdirs")
    p.add_argument("--stage", default="evaluate", help="the stage re-run (default: evaluate)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_idle_threads_") as tmp:
        copies = []
        for i, wd in enumerate(args.workdirs):
            copy = Path(tmp) / f"wd{i}"
            shutil.copytree(wd, copy, symlinks=True)
            copies.append(copy)
        n = len(copies)
        print(f"{n} processes side by side on {os.cpu_count()} cores, stage {args.stage!r}")
        print("| round | mode | processes | wall s |")
        print("|---|---|---|---|")
        walls: dict[tuple[str, int], list[float]] = {}
        digests: set[tuple[str, ...]] = set()
        for r in range(args.rounds):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for mode in order:
                for group in ([copies[0]], copies) if r == 0 else (copies,):
                    wall, dig = run_side_by_side(group, args.stage, mode)
                    walls.setdefault((mode, len(group)), []).append(wall)
                    if len(group) == n:
                        digests.add(tuple(dig))
                    print(f"| {r} | {mode} | {len(group)} | {wall:.1f} |", flush=True)
        spin, sleep = mean(walls[("spin", n)]), mean(walls[("sleep", n)])
        alone = {m: walls[(m, 1)][0] for m in MODES}
        print(
            f"\n{n} at once: spin {spin:.1f} s, sleep {sleep:.1f} s: sleeping idle threads "
            f"{spin / sleep:.2f}x faster; one alone: spin {alone['spin']:.1f} s, "
            f"sleep {alone['sleep']:.1f} s"
        )
        print("outputs identical in every run:", len(digests) == 1)


if __name__ == "__main__":
    main()
