"""Compare ablation studies with the base study, seed by seed, from their study.json files.

    python experiments/ablation_table.py study/study.json \
        no-coords=abl-no-coords/study.json anchor-lowres=abl-lowres/study.json ...

Each ablation is a ``sasha study`` run with the same manifest, preset and seeds plus one
``--config experiments/ablations/<name>.yaml``; seed s of every study has the same split, so
the per-seed difference (ablation − base) is a paired comparison on the same test slides. For
SASHA at each budget, prints the base and ablation mean AUC (and accuracy) over the seeds both
have, and the mean paired difference with its 95 % Student-t interval, as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats


def per_seed(study: dict, method: str, frac: float, metric: str) -> dict[int, float]:
    for m in study["methods"]:
        if m["method"] == method and math.isclose(m["frac"], frac):
            return {r["seed"]: r[metric] for r in m["per_seed"] if r.get(metric) is not None}
    return {}


def paired(
    base: dict[int, float], other: dict[int, float]
) -> tuple[float, list[float] | None, int]:
    """Mean of ``other − base`` over common seeds, its 95 % t interval, and the seed count."""
    seeds = sorted(set(base) & set(other))
    d = np.array([other[s] - base[s] for s in seeds])
    if len(d) < 2:
        return (float(d.mean()) if len(d) else math.nan), None, len(d)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), [float(d.mean() - half), float(d.mean() + half)], len(d)


def _mean(d: dict[int, float], seeds: list[int]) -> float:
    return float(np.mean([d[s] for s in seeds if s in d]))


def table(base: dict, ablations: dict[str, dict], method: str = "sasha") -> str:
    fracs = sorted({m["frac"] for m in base["methods"] if m["method"] == method})
    lines = [
        "| ablation | f | seeds | AUC base → ablation | accuracy base → ablation "
        "| ΔAUC [95% CI] (paired by seed) |",
        "|---|---|---|---|---|---|",
    ]
    for name, study in ablations.items():
        for f in fracs:
            b_auc, a_auc = per_seed(base, method, f, "auc"), per_seed(study, method, f, "auc")
            b_acc = per_seed(base, method, f, "accuracy")
            a_acc = per_seed(study, method, f, "accuracy")
            diff, ci, n = paired(b_auc, a_auc)
            common = sorted(set(b_auc) & set(a_auc))
            if not common:
                continue

            ci_text = "" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
            lines.append(
                f"| {name} | {f:g} | {n} | {_mean(b_auc, common):.3f} → {_mean(a_auc, common):.3f} | "
                f"{_mean(b_acc, common):.3f} → {_mean(a_acc, common):.3f} | {diff:+.3f}{ci_text} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("base", type=Path, help="the base study's study.json")
    p.add_argument("ablations", nargs="+", metavar="NAME=STUDY_JSON")
    args = p.parse_args()
    base = json.loads(args.base.read_text())
    ablations = {}
    for item in args.ablations:
        name, _, path = item.partition("=")
        if not path:
            p.error(f"{item!r}: give NAME=path/to/study.json")
        ablations[name] = json.loads(Path(path).read_text())
    print(table(base, ablations))


if __name__ == "__main__":
    main()
