"""`make demo` end to end, side by side: this checkout against another, or against itself with
one job, in alternating rounds on the same machine.

    python experiments/bench_demo.py --out bench-demo [--rounds 2] \\
        [--baseline /path/to/other/checkout/src] [--baseline-args ...]

Each round runs ``sasha demo DIR`` from scratch (a fresh folder: synthesis, extraction, every
stage, the results table) once per variant, the variants in turn:

- ``this``: this checkout's ``src/`` with its defaults (``--jobs auto``);
- ``baseline``: ``--baseline``'s ``src/`` (e.g. a ``git worktree`` of an earlier commit) with
  ``--baseline-args`` (none by default); without ``--baseline``, this checkout with
  ``--jobs 1`` (what the parallel stages save, alone).

Both run with the interpreter running this script (so with its torch and packages). Printed
and written to ``OUT/bench_demo.json``: wall time and peak RSS of the whole command per run,
each stage's seconds (from the stage markers), the ratio of the means, and whether every
run's ``results.json`` is identical to the first run's (the same results table, not only the
same speed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

HERE = Path(__file__).resolve().parent
THIS_SRC = HERE.parent / "src"


def run_demo(src: Path, args: list[str], out: Path) -> dict:
    """``sasha demo OUT ARGS`` from scratch with ``src`` first on the path; its wall seconds,
    peak RSS of the process tree's largest member (GNU time's ``%M``, KiB), stage seconds."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "sasha_env.cli", "demo", str(out), "--quiet", *args]
    timed = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").is_file() else []
    t0 = time.perf_counter()
    done = subprocess.run([*timed, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise RuntimeError(f"{' '.join(cmd)} failed with status {done.returncode}")
    peak = int(done.stderr.strip().splitlines()[-1]) if timed else None
    stages = {
        p.stem: json.loads(p.read_text())["seconds"]
        for p in sorted((out / "stages").glob("*.json"))
    }
    return {"wall_s": round(wall, 1), "peak_rss_kib": peak, "stages": stages}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("bench-demo"), help="folder for the runs")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every variant (default 2)")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout's src/")
    p.add_argument("--baseline-args", nargs="*", default=None, help="its demo options")
    args = p.parse_args()
    if args.baseline is not None and not (args.baseline / "sasha_env").is_dir():
        p.error(f"--baseline {args.baseline}: no sasha_env package there (give a checkout's src/)")
    variants = {
        "this": (THIS_SRC, []),
        "baseline": (
            (args.baseline, args.baseline_args or [])
            if args.baseline is not None
            else (THIS_SRC, args.baseline_args or ["--jobs", "1"])
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    reference: dict | None = None
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # alternate who is first
        for name in order:
            src, extra = variants[name]
            folder = args.out / f"{name}-r{r}"
            run = {"variant": name, "round": r, **run_demo(src, extra, folder)}
            results = json.loads((folder / "results.json").read_text())
            reference = results if reference is None else reference
            run["same_results"] = results == reference
            runs.append(run)
            print(
                f"round {r} {name:<8} {run['wall_s']:7.1f} s  peak {run['peak_rss_kib']} KiB  "
                f"same results: {run['same_results']}",
                flush=True,
            )
    walls = {n: [x["wall_s"] for x in runs if x["variant"] == n] for n in variants}
    ratio = mean(walls["this"]) / mean(walls["baseline"])
    print("\nstage seconds (mean over rounds):")
    names = list(runs[0]["stages"])
    for n in variants:
        per = {s: mean(x["stages"].get(s, 0.0) for x in runs if x["variant"] == n) for s in names}
        print(f"  {n:<8} " + ", ".join(f"{s} {v:.0f}" for s, v in per.items()))
    print(
        f"\nwall: this {mean(walls['this']):.0f} s, baseline {mean(walls['baseline']):.0f} s; "
        f"this / baseline = {ratio:.2f}; results identical in every run: "
        f"{all(x['same_results'] for x in runs)}"
    )
    summary = {"variants": {n: [str(s), a] for n, (s, a) in variants.items()}, "runs": runs,
               "ratio": round(ratio, 3)}  # fmt: skip
    (args.out / "bench_demo.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
