"""Check a demo study against the bars it is held to (issue 11), from its study.json.

    python experiments/study_bars.py study/study.json

Prints each bar with the numbers behind it and whether it is met; exits 1 when one is missed.
The bars, across seeds:
  1. mean SASHA-0.2 AUC >= mean HAFED AUC - 0.02
  2. SASHA-0.1 beats random-0.1: the paired AUC difference's 95% CI over seeds is above 0
  3. mean SASHA-0.1 AUC >= mean attention_topk-0.1 AUC
  4. mean SASHA-0.2 AUC >= mean SASHA-0.1 AUC - 0.01 (more reading must not hurt)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def bars(study: dict) -> list[tuple[str, bool, str]]:
    """``(bar, met, numbers)`` for each bar."""
    auc = {(m["method"], m["frac"]): m["auc_mean"] for m in study["methods"]}
    paired = {(p["a"], p["b"], p["metric"]): p for p in study["paired"]}
    s1, s2 = auc[("sasha", 0.1)], auc[("sasha", 0.2)]
    hafed, topk = auc[("hafed", 1.0)], auc[("attention_topk", 0.1)]
    vs_random = paired[("sasha@0.1", "random@0.1", "auc")]
    lo = None if vs_random["ci"] is None else vs_random["ci"][0]
    return [
        ("SASHA-0.2 >= HAFED - 0.02", s2 >= hafed - 0.02, f"{s2:.3f} vs {hafed:.3f}"),
        (
            "SASHA-0.1 beats random-0.1 (paired CI above 0)",
            lo is not None and lo > 0,
            f"diff {vs_random['diff_mean']:+.3f}, CI lower bound {lo}",
        ),
        ("SASHA-0.1 >= attention_topk-0.1", s1 >= topk, f"{s1:.3f} vs {topk:.3f}"),
        ("SASHA-0.2 >= SASHA-0.1 - 0.01", s2 >= s1 - 0.01, f"{s2:.3f} vs {s1:.3f}"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("study_json", type=Path)
    args = p.parse_args(argv)
    study = json.loads(args.study_json.read_text())
    results = bars(study)
    print(f"{len(study['seeds'])} seeds, preset {study['preset']}")
    for name, met, numbers in results:
        print(f"  [{'met' if met else 'MISSED'}] {name}: {numbers}")
    return 0 if all(met for _, met, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
