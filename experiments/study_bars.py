"""Check a demo study against the bars it is held to (issue 11), from its study.json.

    python experiments/study_bars.py study/study.json

Prints each bar with the numbers behind it and whether it is met; exits 1 when one is missed.
The bars, across seeds:
  1. mean SASHA-0.2 AUC >= mean HAFED AUC - 0.02
  2. SASHA-0.1 beats random-0.1: the paired AUC difference's 95% CI over seeds is above 0
  3. mean SASHA-0.1 AUC >= mean attention_topk-0.1 AUC
  4. mean SASHA-0.2 AUC >= mean SASHA-0.1 AUC - 0.01 (more reading must not hurt)

When the study has tumour masks, it then prints (not bars) the paired differences over seeds
of the share of tumour area the zooms read (``tumour_area_read``): SASHA against every other
zoom policy at its budget, and SASHA-0.2 against SASHA-0.1 — mean and 95 % t-interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from sasha_models.stats import t_interval


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


def area_pairs(study: dict) -> list[tuple[str, float, tuple[float, float] | None, int]]:
    """``(comparison, mean difference, 95 % t-interval, seeds)`` of the tumour area read,
    paired by seed: SASHA at each budget against each other policy there, and SASHA-0.2
    against SASHA-0.1. Empty without ``tumour_area_read`` in the study."""
    per = {
        (m["method"], m["frac"]): {e["seed"]: e.get("tumour_area_read") for e in m["per_seed"]}
        for m in study["methods"]
        if m.get("tumour_area_read_mean") is not None
    }
    wanted = [
        ((m, f), (o, f))
        for (m, f) in per
        if m == "sasha"
        for (o, g) in per
        if g == f and o != "sasha"
    ]
    wanted += (
        [(("sasha", 0.2), ("sasha", 0.1))] if {("sasha", 0.1), ("sasha", 0.2)} <= set(per) else []
    )
    out = []
    for a, b in wanted:
        seeds = [s for s in per[a] if per[a][s] is not None and per[b].get(s) is not None]
        if not seeds:
            continue
        d = [per[a][s] - per[b][s] for s in seeds]
        ci = t_interval(d, bounds=(-np.inf, np.inf))  # a difference: not clipped to [0, 1]
        pair = None if ci is None else (ci[0], ci[1])
        out.append((f"{a[0]}-{a[1]:g} − {b[0]}-{b[1]:g}", float(np.mean(d)), pair, len(d)))
    return out


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
    pairs = area_pairs(study)
    if pairs:
        print("Tumour area read, paired by seed (mean [95% CI]):")
    for name, diff, ci, n in pairs:
        interval = "" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        print(f"  {name}: {diff:+.3f}{interval} ({n} seeds)")
    return 0 if all(met for _, met, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
