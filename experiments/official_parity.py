"""Differential check of ``--preset paper`` against the official SASHA code (issue 21).

    python experiments/official_parity.py --official DIR            # run the official code
    python experiments/official_parity.py --official DIR --write-fixtures
    python experiments/official_parity.py                            # against tests/data fixtures
    python experiments/official_parity.py --only env                 # report the checks whose name has "env"

DIR is an untouched checkout of coglabiisc/SASHA at 6385fe6, outside this repository (the
project never vendors its code; its licence is non-commercial):

    mkdir -p DIR && git --git-dir=<clone>/.git archive 6385fe6 | tar -x -C DIR

Every ``experiments/parity_*.py`` module with a ``checks(official, fixtures, write)`` function
contributes checks: the official modules run in a subprocess on the same random inputs, seeds
and (copied) weights as ours. One line per check: name, max absolute difference, ``ok`` or
``FAIL`` (tolerance 1e-5 in float32 unless the line says otherwise), or ``info`` for lines that
show by how much an option of ours differs on purpose (not counted). The last line is
``parity: K/M checks``; the exit status is 1 unless K = M.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the parity_* modules sit next to this script
    sys.path.insert(0, str(HERE))

from parity_common import FIXTURES, Check, verify_checkout  # noqa: E402


def parity_modules() -> list[str]:
    """Names of the ``parity_*.py`` modules next to this script that define ``checks``."""
    names = []
    for path in sorted(HERE.glob("parity_*.py")):
        if path.stem == "parity_common":
            continue
        mod = importlib.import_module(path.stem)
        if callable(getattr(mod, "checks", None)):
            names.append(path.stem)
    return names


def run_checks(
    official: Path | None, fixtures: Path, write: bool, only: str | None = None
) -> list[Check]:
    """Every check of every parity module (those whose name contains ``only``, if given)."""
    out: list[Check] = []
    for name in parity_modules():
        mod = importlib.import_module(name)
        try:
            checks = mod.checks(official, fixtures, write)
        except Exception as err:  # one broken module is a FAIL line, not a crash
            checks = [Check(f"{name}: error", float("inf"), ok=False, note=repr(err)[:200])]
        out.extend(c for c in checks if only is None or only in c.name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Without --official the official numbers come from the fixtures under "
            "tests/data/official_parity (recorded with --write-fixtures). Output: one line "
            "per check (name, max |ours - official|, ok/FAIL/info), then 'parity: K/M checks'; "
            "exit 1 unless every counted check passes."
        ),
    )
    parser.add_argument(
        "--official",
        type=Path,
        default=None,
        help="an untouched checkout of coglabiisc/SASHA at 6385fe6 (run the official code)",
    )
    parser.add_argument(
        "--write-fixtures",
        action="store_true",
        help="save the official numbers as fixtures (needs --official)",
    )
    parser.add_argument(
        "--fixtures", type=Path, default=FIXTURES, help=f"fixture folder (default {FIXTURES})"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="report and count only the checks whose name contains this (all still run)",
    )
    args = parser.parse_args(argv)
    if args.write_fixtures and args.official is None:
        parser.error("--write-fixtures needs --official DIR")
    official = verify_checkout(args.official) if args.official is not None else None

    t0 = time.perf_counter()
    checks = run_checks(official, args.fixtures, args.write_fixtures, args.only)
    for check in checks:
        print(check.line())
    counted = [c for c in checks if c.counted]
    k = sum(c.ok for c in counted)
    source = f"official code at {official}" if official else f"fixtures in {args.fixtures}"
    print(f"# against the {source}; {time.perf_counter() - t0:.1f} s")
    print(f"parity: {k}/{len(counted)} checks")
    return 0 if counted and k == len(counted) else 1


if __name__ == "__main__":
    sys.exit(main())
