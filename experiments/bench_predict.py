"""Compute cost of SASHA on raw slides: SASHA-0.1, SASHA-0.2 and --full, side by side.

    python experiments/bench_predict.py --workdir demo-run [--slides 6] [--split test]

For each mode, on the same slides in one process: wall time per slide (by phase) and the peak
memory the prediction itself adds (``/proc/self/clear_refs`` resets the peak before every
slide; reported is peak RSS minus RSS before the slide, i.e. images, features and activations,
not the libraries and models loaded once). One warm-up slide per mode is not counted.
Targets: --full / SASHA-0.1 >= 5x time, --full / SASHA-0.2 >= 3.5x, SASHA peak <= half of --full's.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from sasha_env.manifest import read_manifest
from sasha_env.predict import Predictor
from sasha_env.workdir import Workdir


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", type=Path, default=Path("demo-run"))
    p.add_argument("--slides", type=int, default=6)
    p.add_argument("--split", default="test")
    args = p.parse_args()

    wd = Workdir(args.workdir)
    records = [r for r in read_manifest(wd.manifest).records if r.split == args.split][
        : args.slides + 1
    ]
    modes = {"sasha-0.1": dict(frac=0.1), "sasha-0.2": dict(frac=0.2), "full": dict(full=True)}
    seconds: dict[str, list[float]] = defaultdict(list)
    peaks: dict[str, list[float]] = defaultdict(list)
    phases: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for mode, kw in modes.items():
        predictor = Predictor(wd.root, **kw)
        predictor.predict(records[0].path)  # warm-up (kernels, caches)
        for record in records[1:]:
            _reset_peak()
            before = _status_kb("VmRSS")
            out = predictor.predict(record.path)
            peaks[mode].append((_status_kb("VmHWM") - before) / 1024)
            seconds[mode].append(out["seconds"]["total"])
            for phase, s in out["seconds"].items():
                if phase != "total":
                    phases[mode][phase] += s / (len(records) - 1)

    print(f"{len(records) - 1} slides of {wd.root} ({args.split}); per slide, mean")
    print("| mode | seconds | peak MiB added | time vs full | memory vs full |")
    print("|---|---|---|---|---|")
    full_t, full_m = np.mean(seconds["full"]), np.mean(peaks["full"])
    for mode in modes:
        t, m = np.mean(seconds[mode]), np.mean(peaks[mode])
        print(f"| {mode} | {t:.3f} | {m:.1f} | {full_t / t:.2f}x faster | {m / full_m:.2f} |")
    print()
    print("where the time goes (seconds per slide):")
    names = sorted({ph for d in phases.values() for ph in d})
    print("| mode | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for mode in modes:
        print(f"| {mode} | " + " | ".join(f"{phases[mode].get(n, 0.0):.3f}" for n in names) + " |")
    r1, r2 = full_t / np.mean(seconds["sasha-0.1"]), full_t / np.mean(seconds["sasha-0.2"])
    mem_ok = max(np.mean(peaks["sasha-0.1"]), np.mean(peaks["sasha-0.2"])) <= full_m / 2
    print(
        f"\nfull/SASHA-0.1 = {r1:.2f}x (target 5x) {'PASS' if r1 >= 5 else 'MISS'}; "
        f"full/SASHA-0.2 = {r2:.2f}x (target 3.5x) {'PASS' if r2 >= 3.5 else 'MISS'}; "
        f"SASHA peak <= half of full's: {'PASS' if mem_ok else 'MISS'}"
    )


if __name__ == "__main__":
    main()
