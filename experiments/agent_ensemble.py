"""Issue 22, item 3: does an ensemble of agents trained with different seeds narrow the spread
of one training run?

On the demo cohort a study's SASHA AUC is decided by whether an agent misses one or two of its
seven tumour test slides, and which ones it misses changes with the training seed and even the
CPU's float rounding (docs/budget-f02.md, "Three draws of the ten splits"). An ensemble of K
agents of the same budget, trained on the same workdir with K seeds, acts as
:class:`sasha_models.ensemble.PolicyEnsemble` (the pipeline's ``agents.ensemble``): the legal
patch of highest summed logit, the argmax of the members' mean log-probability; one zoom path
per slide, the prediction HAFED's on the final state as for any agent. Here the members are
any exported agents (e.g. retrained by ``f02_factors.py train --factor retrain``), so members
trained outside the pipeline can be combined and each compared with the whole.

``run`` evaluates every member alone and the ensemble of all of them on the workdir's test
split (argmax actions, the pipeline's env and episodes) and writes one JSON; ``table`` prints
the members' AUCs (each member a draw of one training run), their mean, and the ensemble's,
per budget and seed, with paired differences over seeds.

    # members: agents trained with `f02_factors.py train --factor retrain --seed M`, plus the
    # workdir's own (`agents/sasha-<f>`)
    python experiments/agent_ensemble.py run --workdir study/seed-0 --frac 0.2 \\
        --members study/seed-0/agents/sasha-0.2 ens/s0/retrain/seed-1001/sasha-0.2 \\
                  ens/s0/retrain/seed-1002/sasha-0.2 --out ens/s0-f0.2.json
    python experiments/agent_ensemble.py table ens/s*-f*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sasha_env.agents.episodes import agent_policy
from sasha_env.agents.export import load_policy
from sasha_env.workdir import Workdir
from sasha_models.ensemble import PolicyEnsemble
from sasha_models.stats import t_interval

sys.path.insert(0, str(Path(__file__).parent))
from f02_factors import agents_config, evaluate_policy  # noqa: E402


def run(args: argparse.Namespace) -> int:
    wd = Workdir(args.workdir)
    cfg = agents_config(wd)
    policies = [load_policy(m) for m in args.members]
    out: dict[str, Any] = {
        "workdir": str(wd.root),
        "frac": args.frac,
        "members": [str(m) for m in args.members],
    }
    out["member_results"] = [evaluate_policy(wd, agent_policy(p), args.frac, cfg) for p in policies]
    out["ensemble"] = evaluate_policy(wd, agent_policy(PolicyEnsemble(policies)), args.frac, cfg)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    aucs = ", ".join(f"{r['auc']:.3f}" for r in out["member_results"])
    e = out["ensemble"]
    print(
        f"{wd.root.name} f={args.frac:g}: members {aucs}; ensemble {e['auc']:.3f} "
        f"(tumour found {e['tumour_found']} of {e['tumour_slides']})"
    )
    return 0


def _ci(diffs: list[float]) -> str:
    lo, hi = t_interval(diffs, bounds=(-1.0, 1.0)) or (np.nan, np.nan)
    return f"{np.mean(diffs):+.3f} [{lo:+.3f}, {hi:+.3f}]"


def table(args: argparse.Namespace) -> int:
    runs = [json.loads(Path(p).read_text()) for p in args.files]
    for frac in sorted({r["frac"] for r in runs}):
        rs = sorted((r for r in runs if r["frac"] == frac), key=lambda r: r["workdir"])
        k = len(rs[0]["members"])
        print(f"\n### f = {frac:g}: {len(rs)} seeds, {k} members each\n")
        print("| workdir | " + " | ".join(f"member {i + 1}" for i in range(k)), end="")
        print(" | mean member | ensemble | tumour found (members / ensemble) |")
        print("|---" * (k + 4) + "|")
        mean_member, ens = [], []
        for r in rs:
            aucs = [m["auc"] for m in r["member_results"]]
            found = "/".join(str(m["tumour_found"]) for m in r["member_results"])
            e = r["ensemble"]
            mean_member.append(float(np.mean(aucs)))
            ens.append(e["auc"])
            print(
                f"| {Path(r['workdir']).name} | "
                + " | ".join(f"{a:.3f}" for a in aucs)
                + f" | {np.mean(aucs):.3f} | **{e['auc']:.3f}** | {found} / "
                f"{e['tumour_found']} of {e['tumour_slides']} |"
            )
        members = np.array([[m["auc"] for m in r["member_results"]] for r in rs])
        print(
            "\nmean over seeds: each member "
            + ", ".join(f"{v:.3f}" for v in members.mean(0))
            + f"; mean member {np.mean(mean_member):.3f}; ensemble {np.mean(ens):.3f}"
        )
        if len(rs) > 1:
            print(
                f"ensemble − mean member, paired over seeds: {_ci(list(np.subtract(ens, mean_member)))}"
            )
            for i in range(k):
                print(f"ensemble − member {i + 1}: {_ci(list(np.subtract(ens, members[:, i])))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (python -m pydoc experiments/agent_ensemble.py).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="evaluate each member and their ensemble on the test split")
    r.add_argument("--workdir", required=True, help="a finished pipeline workdir (read only)")
    r.add_argument("--frac", type=float, required=True, help="the members' budget")
    r.add_argument("--members", nargs="+", required=True, help="exported agent folders")
    r.add_argument("--out", required=True, help="JSON to write")
    t = sub.add_parser("table", help="members against the ensemble, over seeds")
    t.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    return run(args) if args.cmd == "run" else table(args)


if __name__ == "__main__":
    raise SystemExit(main())
