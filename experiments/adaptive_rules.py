"""Shared against per-class stop thresholds, on finished workdirs (issue 23, item 6).

    python experiments/adaptive_rules.py study/seed-0 study/seed-1 ... [--out rules.json]

For each workdir and each trained agent (budget f = the cap), the agent's argmax episodes are
run on the val and the test slides, traced zoom by zoom (as the calibrate and evaluate stages
do). Both stop rules are fitted on the val traces only, the same way the calibrate stage fits
them (`adaptive.margin` and `adaptive.max_auto_error` of the workdir's config, the agent's
`temperature+bias` calibration from calibration.json, HAFED's val AUC as the target): the
shared threshold (the default) and one threshold per class (`adaptive.per_class: true`). Each
is then applied to the test traces. Nothing in the workdir is written.

The shared rule's test row must equal the workdir's own `sasha_adaptive` row in results.json
(printed side by side as a check). Prints, per cap, the mean over workdirs of test AUC and
mean fraction read for HAFED, fixed-budget SASHA, and both rules, with the paired differences
(per-class − shared, per-class − HAFED, per-class − SASHA at the cap) and their 95 % t
intervals over the workdirs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import yaml
from scipy import stats


def rules_on_workdir(root: Path, cfg: dict | None = None) -> list[dict]:
    """Per agent: both rules fitted on val, measured on test (see the module docstring).
    ``cfg``: the workdir's configuration (default: its ``config.yaml``)."""
    from sasha_env.agents.adaptive import AdaptiveConfig, traces
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.envs import has_agent, load_agent
    from sasha_env.agents.episodes import agent_policy, run_episodes
    from sasha_env.features.bags import StoreBags
    from sasha_env.features.store import FeatureStore
    from sasha_env.slides.manifest import read_manifest
    from sasha_env.workdir import Workdir
    from sasha_models.calibration import Calibration
    from sasha_models.lit import load_model, predict_probs
    from sasha_models.metrics import classification_metrics
    from sasha_models.stopping import apply_rule, fit_stop_rule

    wd = Workdir(root)
    if cfg is None:
        cfg = yaml.safe_load(wd.config.read_text())
    acfg = AgentConfig.from_dict(cfg.get("agents"))
    adaptive = AdaptiveConfig.from_dict(cfg.get("adaptive"))
    bags = StoreBags(FeatureStore(wd.store), read_manifest(wd.manifest))
    hafed = load_model(wd.model("hafed"))
    hafed_auc = {}
    for split in ("val", "test"):
        _, probs, labels = predict_probs(hafed, bags, split, "highres")
        hafed_auc[split] = float(
            classification_metrics(np.asarray(probs), np.asarray(labels))["auc"]
        )
    calibrations = json.loads(wd.calibration.read_text())["methods"]
    results = json.loads((wd.root / "results.json").read_text())
    out = []
    for frac in acfg.fracs:
        if not has_agent(wd, frac, acfg.algo):
            continue
        agent = load_agent(wd, frac, acfg.algo)
        cal = Calibration.from_dict(calibrations[f"sasha@{frac:g}"][adaptive.calibration])
        eps = {}
        for split in ("val", "test"):
            env = agent.make_env(wd, split, acfg)
            eps[split] = run_episodes(
                env, agent_policy(agent.policy), bags.slide_ids(split), trace=True
            )
        y_val = np.array([e["label"] for e in eps["val"]])
        y_test = np.array([e["label"] for e in eps["test"]])
        fixed = np.stack([e["probabilities"] for e in eps["test"]])
        row = {
            "workdir": str(root),
            "frac": float(frac),
            "n_test": len(y_test),
            "hafed_auc": hafed_auc["test"],
            "sasha_auc": float(classification_metrics(fixed, y_test)["auc"]),
        }
        for name, per_class in (("shared", False), ("per_class", True)):
            rule = fit_stop_rule(
                traces(eps["val"]),
                y_val,
                cal,
                hafed_auc["val"],
                adaptive.margin,
                adaptive.max_auto_error,
                per_class=per_class,
            )
            outs = [apply_rule(p, z, n, rule) for p, z, n in traces(eps["test"])]
            probs = np.stack([o.probabilities for o in outs])
            pos = np.array([o.frac_read for o in outs])[y_test == y_test.max()]
            neg = np.array([o.frac_read for o in outs])[y_test != y_test.max()]
            row[name] = {
                "thresholds": list(rule.class_thresholds or (rule.threshold,)),
                "auc": float(classification_metrics(probs, y_test)["auc"]),
                "mean_frac": float(np.mean([o.frac_read for o in outs])),
                "mean_frac_tumour": float(pos.mean()) if pos.size else None,
                "mean_frac_normal": float(neg.mean()) if neg.size else None,
                "val_auc": rule.info["val_auc"],
                "val_mean_frac": rule.info["val_mean_frac"],
            }
        stored = [
            r
            for r in results["methods"]
            if r["method"] == "sasha_adaptive" and math.isclose(r["frac"], frac)
        ]
        row["results_json_shared"] = (
            {"auc": stored[0]["auc"], "mean_frac": stored[0]["mean_frac"]} if stored else None
        )
        out.append(row)
    return out


def _paired(d: np.ndarray) -> str:
    if len(d) < 2:
        return f"{d.mean():+.3f}"
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]"


def table(rows: list[dict]) -> str:
    """Markdown: per cap, means over workdirs and the paired differences."""
    lines = [
        "| cap | workdirs | HAFED | SASHA (fixed) | shared rule: AUC (read) | per-class rule: AUC "
        "(read; tumour / normal slides) | per-class − shared | per-class − HAFED | "
        "per-class − SASHA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for frac in sorted({r["frac"] for r in rows}):
        rs = [r for r in rows if r["frac"] == frac]
        a = {k: np.array([r[k] for r in rs]) for k in ("hafed_auc", "sasha_auc")}
        sh = np.array([r["shared"]["auc"] for r in rs])
        pc = np.array([r["per_class"]["auc"] for r in rs])
        fr = {k: np.mean([r[k]["mean_frac"] for r in rs]) for k in ("shared", "per_class")}
        ft = np.mean([r["per_class"]["mean_frac_tumour"] for r in rs])
        fn = np.mean([r["per_class"]["mean_frac_normal"] for r in rs])
        lines.append(
            f"| {frac:g} | {len(rs)} | {a['hafed_auc'].mean():.3f} | {a['sasha_auc'].mean():.3f} | "
            f"{sh.mean():.3f} ± {sh.std(ddof=1) if len(sh) > 1 else 0:.3f} ({fr['shared']:.3f}) | "
            f"{pc.mean():.3f} ± {pc.std(ddof=1) if len(pc) > 1 else 0:.3f} ({fr['per_class']:.3f}; "
            f"{ft:.3f} / {fn:.3f}) | {_paired(pc - sh)} | {_paired(pc - a['hafed_auc'])} | "
            f"{_paired(pc - a['sasha_auc'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workdirs", nargs="+", type=Path, help="finished pipeline workdirs")
    ap.add_argument("--out", type=Path, help="write every row as JSON here")
    args = ap.parse_args()
    rows = []
    for root in args.workdirs:
        for r in rules_on_workdir(root):
            rows.append(r)
            check = r["results_json_shared"]
            stored = "-" if check is None else f"{check['auc']:.3f} at {check['mean_frac']:.3f}"
            print(
                f"{root} cap {r['frac']:g}: shared {r['shared']['auc']:.3f} at "
                f"{r['shared']['mean_frac']:.3f} (results.json: {stored}); "
                f"per-class {r['per_class']['thresholds']} {r['per_class']['auc']:.3f} at "
                f"{r['per_class']['mean_frac']:.3f}",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
