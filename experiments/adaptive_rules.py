"""Ways of fitting the stop rule, compared on finished workdirs (issue 23, item 6).

    python experiments/adaptive_rules.py study/seed-* [--cache rules-cache] [--out rows.json]
        [--variants shared per_class nll0.1 ...]

For each workdir and each trained agent (budget f = the cap), the agent's argmax episodes are
run on the val and the test slides, traced zoom by zoom, as the calibrate and evaluate stages
do (with ``--cache DIR`` the traces are kept there as JSON, one file per workdir, and read back
on the next run). Every variant of the rule is fitted on the val traces only, as the calibrate
stage fits it (the workdir's ``adaptive`` settings, the agent's calibration from
calibration.json, HAFED's val AUC as the target) with the variant's options on top, then
applied to the test traces. Nothing in the workdir is written.

Variants (``VARIANTS``, each a set of ``adaptive`` settings): ``workdir`` (the workdir's own
settings: it must reproduce the workdir's ``sasha_adaptive`` row of results.json, printed as a
check), ``shared`` (one threshold for every class, held to val AUC), ``per_class``
(``adaptive.per_class``), ``nll<m>`` (``adaptive.nll_margin: m``: also held to the val
likelihood), ``per_class+nll<m>``, ``rule_in`` (``adaptive.stop_classes``: only the last class,
tumour, may stop a slide early; the others read to the cap), ``rule_in+nll0``, and
``rule_in+mean<m>`` (``adaptive.mean_frac: m``: the cap lowered until the rule reads at most m
on average on val).

Prints, per cap and variant, the mean over workdirs of test AUC and of the mean fraction read
(tumour / normal slides), with paired differences against ``workdir``, HAFED and fixed-budget
SASHA at the cap (95 % t intervals over the workdirs).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

#: The traces' format: a ``--cache`` file of another is collected again.
CACHE_VERSION = 2

#: What every variant but ``workdir`` starts from: the shared threshold, read to the budget.
BASE: dict[str, Any] = {
    "per_class": False,
    "stop_classes": None,
    "nll_margin": None,
    "mean_frac": None,
}

#: Variant name → ``adaptive`` settings over the workdir's (``None``: the workdir's own);
#: ``stop_classes: "last"`` is the last class (tumour).
VARIANTS: dict[str, dict[str, Any] | None] = {
    "workdir": None,
    "shared": {},
    "per_class": {"per_class": True},
    "nll0": {"nll_margin": 0.0},
    "nll0.05": {"nll_margin": 0.05},
    "nll0.1": {"nll_margin": 0.1},
    "nll0.2": {"nll_margin": 0.2},
    "per_class+nll0.1": {"per_class": True, "nll_margin": 0.1},
    "rule_in": {"stop_classes": "last"},
    "rule_in+nll0": {"stop_classes": "last", "nll_margin": 0.0},
    "rule_in+mean0.1": {"stop_classes": "last", "mean_frac": 0.1},
}


def settings(adaptive: dict[str, Any], variant: str, class_names: list[str]) -> dict[str, Any]:
    """The ``adaptive`` section a variant fits with, over the workdir's ``adaptive``."""
    over = VARIANTS[variant]
    if over is None:
        return dict(adaptive)
    out = {**adaptive, **BASE, **over}
    if out["stop_classes"] == "last":
        out["stop_classes"] = [class_names[-1]]
    return out


def collect(root: Path, cfg: dict | None = None) -> dict[str, Any]:
    """What the variants are fitted and measured on: HAFED's val and test AUC, and per agent
    its calibration, val and test traces, and fixed-budget test AUC. JSON-ready."""
    from sasha_env.agents.adaptive import AdaptiveConfig
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.envs import has_agent, load_agent
    from sasha_env.agents.episodes import agent_policy, run_episodes
    from sasha_env.features.bags import StoreBags
    from sasha_env.features.store import FeatureStore
    from sasha_env.slides.manifest import read_manifest
    from sasha_env.workdir import Workdir
    from sasha_models.lit import load_model, predict_probs
    from sasha_models.metrics import classification_metrics

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
    agents = []
    for frac in acfg.fracs:
        if not has_agent(wd, frac, acfg.algo):
            continue
        agent = load_agent(wd, frac, acfg.algo)
        entry: dict[str, Any] = {
            "frac": float(frac),
            "calibration": calibrations[f"sasha@{frac:g}"][adaptive.calibration],
        }
        for split in ("val", "test"):
            env = agent.make_env(wd, split, acfg)
            eps = run_episodes(env, agent_policy(agent.policy), bags.slide_ids(split), trace=True)
            entry[split] = [
                {
                    "label": int(e["label"]),
                    "step_probabilities": np.asarray(e["step_probabilities"]).tolist(),
                    "step_zoomed": [int(z) for z in e["step_zoomed"]],
                    "n_patches": int(e["n_patches"]),
                    "probabilities": np.asarray(e["probabilities"]).tolist(),
                }
                for e in eps
            ]
        fixed = np.array([e["probabilities"] for e in entry["test"]], np.float32)
        y_test = np.array([e["label"] for e in entry["test"]])
        entry["sasha_auc"] = float(classification_metrics(fixed, y_test)["auc"])
        stored = [
            r
            for r in results["methods"]
            if r["method"] == "sasha_adaptive" and math.isclose(r["frac"], frac)
        ]
        entry["results_json_row"] = (
            {"auc": stored[0]["auc"], "mean_frac": stored[0]["mean_frac"]} if stored else None
        )
        agents.append(entry)
    return {
        "version": CACHE_VERSION,
        "workdir": str(root),
        "class_names": list(bags.class_names),
        "adaptive": adaptive.to_dict(),
        "hafed_auc": hafed_auc,
        "agents": agents,
    }


def measure(data: dict[str, Any], variants: list[str]) -> list[dict[str, Any]]:
    """One row per agent and variant: the rule fitted on val, its test AUC and reading."""
    from sasha_env.agents.adaptive import AdaptiveConfig, fit_agent_rule
    from sasha_models.calibration import Calibration
    from sasha_models.metrics import classification_metrics
    from sasha_models.stopping import apply_rule

    rows = []
    for a in data["agents"]:
        cal = Calibration.from_dict(a["calibration"])
        tr = {
            split: [
                (np.array(e["step_probabilities"], np.float32), e["step_zoomed"], e["n_patches"])
                for e in a[split]
            ]
            for split in ("val", "test")
        }
        y_val = np.array([e["label"] for e in a["val"]])
        y_test = np.array([e["label"] for e in a["test"]])
        tumour = y_test == y_test.max()
        val = [
            {"label": y, "step_probabilities": p, "step_zoomed": z, "n_patches": n}
            for y, (p, z, n) in zip(y_val, tr["val"], strict=True)
        ]
        for name in variants:
            acfg = AdaptiveConfig.from_dict(settings(data["adaptive"], name, data["class_names"]))
            rule = fit_agent_rule(
                val, acfg, cal, data["hafed_auc"]["val"], a["frac"], data["class_names"]
            )
            outs = [apply_rule(p, z, n, rule) for p, z, n in tr["test"]]
            probs = np.stack([o.probabilities for o in outs])
            fr = np.array([o.frac_read for o in outs])
            rows.append(
                {
                    "workdir": data["workdir"],
                    "frac": a["frac"],
                    "variant": name,
                    "thresholds": list(rule.class_thresholds or (rule.threshold,)),
                    "max_frac": rule.max_frac,
                    "auc": float(classification_metrics(probs, y_test)["auc"]),
                    "mean_frac": float(fr.mean()),
                    "mean_frac_tumour": float(fr[tumour].mean()) if tumour.any() else None,
                    "mean_frac_normal": float(fr[~tumour].mean()) if (~tumour).any() else None,
                    "hafed_auc": data["hafed_auc"]["test"],
                    "sasha_auc": a["sasha_auc"],
                    "results_json_row": a["results_json_row"],
                    "n_test": len(y_test),
                }
            )
    return rows


def _paired(d: np.ndarray) -> str:
    if len(d) < 2:
        return f"{d.mean():+.3f}"
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per cap and variant, means over workdirs and the paired differences."""
    lines = [
        "| cap | rule | workdirs | AUC (mean ± sd) | read (tumour / normal) | − workdir | − HAFED "
        "| − SASHA at the cap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for frac in sorted({r["frac"] for r in rows}):
        base = {r["workdir"]: r for r in rows if r["frac"] == frac and r["variant"] == "workdir"}
        first = next(r for r in rows if r["frac"] == frac)
        n = sum(1 for r in rows if r["frac"] == frac and r["variant"] == first["variant"])
        ref = [r for r in rows if r["frac"] == frac and r["variant"] == first["variant"]]
        lines.append(
            f"| {frac:g} | HAFED / SASHA (fixed) | {n} | "
            f"{np.mean([r['hafed_auc'] for r in ref]):.3f} / "
            f"{np.mean([r['sasha_auc'] for r in ref]):.3f} | 1 / {frac:g} | | | |"
        )
        for v in variants:
            rs = [r for r in rows if r["frac"] == frac and r["variant"] == v]
            auc = np.array([r["auc"] for r in rs])
            sd = auc.std(ddof=1) if len(auc) > 1 else 0.0
            vs_workdir = (
                _paired(np.array([r["auc"] - base[r["workdir"]]["auc"] for r in rs]))
                if v != "workdir" and all(r["workdir"] in base for r in rs)
                else ""
            )
            ft = np.mean([r["mean_frac_tumour"] for r in rs])
            fn = np.mean([r["mean_frac_normal"] for r in rs])
            lines.append(
                f"| {frac:g} | {v} | {len(rs)} | {auc.mean():.3f} ± {sd:.3f} | "
                f"{np.mean([r['mean_frac'] for r in rs]):.3f} ({ft:.3f} / {fn:.3f}) | "
                f"{vs_workdir} | {_paired(auc - np.array([r['hafed_auc'] for r in rs]))} | "
                f"{_paired(auc - np.array([r['sasha_auc'] for r in rs]))} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workdirs", nargs="+", type=Path, help="finished pipeline workdirs")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--cache", type=Path, help="keep each workdir's traces here (JSON)")
    ap.add_argument("--out", type=Path, help="write every row as JSON here")
    args = ap.parse_args()
    variants = ["workdir", *(v for v in args.variants if v != "workdir")]
    rows, skipped = [], []
    for root in args.workdirs:
        if not (root / "results.json").is_file():
            print(f"skipping {root}: no results.json (its pipeline has not finished)", flush=True)
            skipped.append(root)
            continue
        cached = None
        if args.cache is not None:
            args.cache.mkdir(parents=True, exist_ok=True)
            cached = args.cache / f"{root.resolve().parent.name}-{root.name}.json"
        data = json.loads(cached.read_text()) if cached is not None and cached.is_file() else None
        if data is None or data.get("version") != CACHE_VERSION:
            data = collect(root)
            if cached is not None:
                cached.write_text(json.dumps(data))
        for r in measure(data, variants):
            rows.append(r)
            if r["variant"] == "workdir":
                check = r["results_json_row"]
                stored = "-" if check is None else f"{check['auc']:.3f} at {check['mean_frac']:.3f}"
                print(
                    f"{root} cap {r['frac']:g}: workdir {r['auc']:.3f} at {r['mean_frac']:.3f} "
                    f"(results.json: {stored})",
                    flush=True,
                )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    if rows:
        print(table(rows))
    if skipped:
        raise SystemExit(f"{len(skipped)} workdir(s) skipped: {', '.join(map(str, skipped))}")


if __name__ == "__main__":
    main()
