"""Whole processes, as a user runs them: ``sasha predict --frac F`` against ``--full``.

    python experiments/bench_predict_process.py --workdir demo-run            # its test slides
    python experiments/bench_predict_process.py --workdir demo-run --slides-from large/manifest.csv

Each round starts one ``sasha predict`` process per mode on the same slides (start-up, model
loading, every slide; the modes' order rotates between rounds, so that drift of a shared
machine hits all alike) and records its wall time and peak memory (the child's own maximum
RSS, from ``wait4``). Modes: SASHA at ``--frac`` with slides zoomed in lockstep
(``--batch-slides``, the default), SASHA one slide at a time (``--batch-slides 1``, the path
before lockstep) and ``--full``. Prints the medians, the ratios to ``--full`` side by side
and the ratio of each round. Target (issue #27): ``--full`` / SASHA-0.1 >= 5x, peak memory
within the one-at-a-time path's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sasha_env.slides.manifest import read_manifest
from sasha_env.workdir import Workdir


def run_once(cmd: list[str], out: Path) -> tuple[float, float, float, list[dict]]:
    """``(wall seconds, CPU seconds, peak RSS MiB, records)`` of one process (its stdout goes to
    ``out``). CPU seconds (user + system, every thread) are what the process itself used: on
    a shared machine they move less with the load than wall time does."""
    t0 = time.perf_counter()
    with out.open("w") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, unlike getrusage
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):  # 1: some slide failed and was reported
        raise SystemExit(f"{' '.join(cmd)} exited {code}")
    records = [json.loads(line) for line in out.read_text().splitlines() if line]
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, records  # ru_maxrss: kiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", type=Path, required=True, help="a finished pipeline workdir")
    p.add_argument("--split", default="test", help="the workdir's slides to predict")
    p.add_argument(
        "--slides-from", type=Path, default=None, metavar="CSV", help="this manifest's slides"
    )
    p.add_argument("--slides", type=int, default=None, help="at most this many slides")
    p.add_argument("--frac", type=float, default=0.1)
    p.add_argument("--batch-slides", type=int, default=None, help="lockstep B (default: sasha's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-single", action="store_true", help="skip the one-at-a-time mode")
    args = p.parse_args()

    if args.slides_from is not None:
        paths = [r.path for r in read_manifest(args.slides_from).records]
    else:
        records = read_manifest(Workdir(args.workdir).manifest).records
        paths = [r.path for r in records if r.split == args.split]
    paths = paths[: args.slides]
    sasha = shutil.which("sasha") or str(Path(sys.executable).with_name("sasha"))
    base = [sasha, "predict", "--workdir", str(args.workdir), *map(str, paths)]
    lockstep = ["--batch-slides", str(args.batch_slides)] if args.batch_slides else []
    f = f"{args.frac:g}"
    modes = {f"sasha-{f} lockstep": ["--frac", f, *lockstep]}
    if not args.no_single:
        modes[f"sasha-{f} one at a time"] = ["--frac", f, "--batch-slides", "1"]
    modes["full"] = ["--full"]

    walls: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, list[float]] = {m: [] for m in modes}
    zooms: dict[str, list] = {}
    names = list(modes)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in names[r % len(names) :] + names[: r % len(names)]:
                wall, cpu, peak, records = run_once(base + modes[mode], Path(tmp) / "out.jsonl")
                walls[mode].append(wall)
                cpus[mode].append(cpu)
                peaks[mode].append(peak)
                zooms[mode] = [x.get("zoomed_coords") for x in records]
                n = [x["n_patches"] for x in records if "n_patches" in x]
                print(
                    f"round {r + 1}: {mode}: {wall:.1f} s wall, {cpu:.1f} s CPU, "
                    f"peak RSS {peak:.0f} MiB "
                    f"({len(n)} slides, {min(n)}-{max(n)} patches)",
                    flush=True,
                )
    if not args.no_single:  # lockstep changes the batching, never the zooms
        same = zooms[names[0]] == zooms[names[1]]
        print(f"lockstep zooms == one-at-a-time zooms: {same}")

    print(
        f"\n{len(paths)} slides of {args.slides_from or args.workdir}, whole `sasha predict` "
        f"processes, {args.rounds} rounds, medians; {os.cpu_count()} CPUs"
    )
    print("| mode | wall s | CPU s | peak RSS MiB | wall vs full | CPU vs full | memory vs full |")
    print("|---|---|---|---|---|---|---|")
    full_t, full_c = np.median(walls["full"]), np.median(cpus["full"])
    full_m = np.median(peaks["full"])
    for mode in modes:
        t, c, m = np.median(walls[mode]), np.median(cpus[mode]), np.median(peaks[mode])
        print(
            f"| {mode} | {t:.1f} | {c:.1f} | {m:.0f} | {full_t / t:.2f}x | {full_c / c:.2f}x "
            f"| {m / full_m:.2f} |"
        )
    for mode in names[:-1]:
        per_round = [a / b for a, b in zip(walls["full"], walls[mode], strict=True)]
        print(f"full / {mode}, wall, per round: " + ", ".join(f"{x:.2f}x" for x in per_round))
    main_mode = names[0]
    ratio = full_t / np.median(walls[main_mode])
    cpu_ratio = full_c / np.median(cpus[main_mode])
    print(
        f"\nfull / {main_mode} = {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU (target 5x) "
        f"{'PASS' if ratio >= 5 else 'MISS'}"
    )
    if not args.no_single:
        single = names[1]
        mem = np.median(peaks[main_mode]) / np.median(peaks[single])
        print(f"peak memory, lockstep / one at a time = {mem:.2f}")


if __name__ == "__main__":
    main()
