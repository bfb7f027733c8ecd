"""What adaptive reading fetches from the slide files: ``sasha predict --adaptive`` against
``--frac`` and ``--full``, in compressed bytes, fraction read and seconds, on one split.

    python experiments/bench_adaptive_bytes.py --workdir demo-run [--split test] [--cap 0.2]

Runs ``sasha predict --workdir W --manifest M`` once per mode on the workdir's ``--split``
slides (``M`` is the workdir's manifest cut to that split, written to a temporary folder):
``--full``, ``--frac 0.1``, ``--frac CAP`` and ``--adaptive --frac CAP``. Each run is its own
process; modes are run one after the other on the same slides. ``bytes_read`` is counted at
the reader (:class:`~sasha_env.slides.reader.CountingFile`): the low-resolution pass plus the
zooms, compressed tile bytes as stored in the file. Prints a Markdown table of the sums over
slides and each mode's bytes as a share of ``--full``'s (issue 23's target: adaptive at most
half), the adaptive run's mean and 90th-percentile fraction read, and the shares stopped
``confident`` and ``referred``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def split_manifest(workdir: Path, split: str, out: Path) -> int:
    """Write ``out``: the workdir's manifest rows of ``split``; return how many."""
    with (workdir / "manifest.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r.get("split") == split]
        fields = reader.fieldnames or []
    if not rows:
        raise SystemExit(f"{workdir / 'manifest.csv'}: no slides in split {split!r}")
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def predict(workdir: Path, manifest: Path, mode: list[str]) -> list[dict]:
    """Run ``sasha predict`` in its own process; return its per-slide records."""
    cmd = [sys.executable, "-m", "sasha_env.cli", "predict", "--workdir", str(workdir)]
    cmd += ["--manifest", str(manifest), *mode]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    bad = [r["slide_id"] for r in records if "error" in r]
    if bad:
        raise SystemExit(f"predict {' '.join(mode)} failed on {bad}")
    return records


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", type=Path, required=True, help="a finished pipeline workdir")
    p.add_argument("--split", default="test")
    p.add_argument("--cap", type=float, default=0.2, help="the adaptive agent's budget (cap)")
    args = p.parse_args()
    modes = {
        "--full": ["--full"],
        "--frac 0.1": ["--frac", "0.1"],
        f"--frac {args.cap:g}": ["--frac", f"{args.cap:g}"],
        f"--adaptive (cap {args.cap:g})": ["--adaptive", "--frac", f"{args.cap:g}"],
    }
    with tempfile.TemporaryDirectory(prefix="bench_adaptive_bytes_") as tmp:
        manifest = Path(tmp) / "manifest.csv"
        n = split_manifest(args.workdir, args.split, manifest)
        runs = {name: predict(args.workdir, manifest, mode) for name, mode in modes.items()}
    full = sum(r["bytes_read"] for r in runs["--full"])
    print(f"{n} {args.split} slides of {args.workdir}")
    print(
        "| mode | bytes read (MB) | of which high-res (MB) | share of --full's bytes "
        "| mean fraction read | seconds |"
    )
    print("|---|---|---|---|---|---|")
    for name, records in runs.items():
        total = sum(r["bytes_read"] for r in records)
        hi = sum(r["bytes_read_phases"].get("highres", 0) for r in records)
        frac = float(np.mean([r["fraction_read"] for r in records]))
        secs = sum(float(r["seconds"]["total"]) for r in records)
        print(
            f"| {name} | {total / 1e6:.2f} | {hi / 1e6:.2f} | {total / full:.3f} | {frac:.3f} "
            f"| {secs:.1f} |"
        )
    adaptive = runs[f"--adaptive (cap {args.cap:g})"]
    fr = np.array([r["fraction_read"] for r in adaptive])
    confident = np.mean([r["stopped"] == "confident" for r in adaptive])
    referred = np.mean([bool(r["referred"]) for r in adaptive])
    print(
        f"adaptive: fraction read mean {fr.mean():.3f}, p90 {np.quantile(fr, 0.9):.3f}; "
        f"stopped confident {confident:.0%}, referred {referred:.0%}"
    )


if __name__ == "__main__":
    main()
