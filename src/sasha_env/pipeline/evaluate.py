"""Evaluation on the test split → ``results.json`` (contract in design.md).

``{"methods": [{"method", "frac", "accuracy", "auc", "f1", "ece", "n_slides", "auc_ci",
"accuracy_ci", "f1_ci", ...}, ...], "paired": [{"a": "sasha@0.1", "b": "random@0.1",
"metric": "auc", "diff", "ci"}, ...], "split": "test", "class_names": [...], ...}``; intervals
are 95 % stratified bootstrap intervals over the test slides (:func:`add_uncertainty`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sasha_models.stats import percentile_ci, stratified_resamples

from ..agents.config import AgentConfig
from ..atomic import write_json
from ..config import say
from ..features.bags import StoreBags
from ..features.store import FeatureStore
from ..slides.manifest import read_manifest
from ..slides.tumour import area_read, found_rate, hit_rate, patch_tumour_fraction
from ..workdir import Workdir
from .adaptive import LEARNED_METHOD, METHOD, adaptive_results, nearest, reading_stats
from .calibrate import method_name
from .report import cap_label, markdown_table

__all__ = [
    "evaluate_workdir",
    "add_uncertainty",
    "format_table",
    "FULL_RES_METHODS",
    "PAIRED_BASELINES",
]

#: Bootstrap resamples of the test slides behind every interval, and the interval's level.
N_BOOT = 2000
CI_LEVEL = 0.95

#: methods read from a trained model: (method, model folder, feature kind, frac)
FULL_RES_METHODS = (
    ("hafed", "hafed", "highres", 1.0),
    ("lowres_only", "lowres", "lowres", 0.0),
    ("abmil", "abmil", "highres", 1.0),
    ("meanmil", "meanmil", "highres", 1.0),
    ("maxmil", "maxmil", "highres", 1.0),
    ("transmil", "transmil", "highres", 1.0),
)

#: the same-harness baselines SASHA is compared with, paired, at each trained budget
PAIRED_BASELINES = ("random", "attention_topk", "greedy_attention", "lowres_attention_topk")


def evaluate_workdir(
    wd: Workdir, cfg: dict, split: str = "test", log: Callable[[str], None] = say
) -> dict:
    """Metrics of every method whose model exists in ``wd``, written to ``wd.results``."""
    from sasha_models.lit import load_model, predict_probs  # lazy: Lightning
    from sasha_models.metrics import classification_metrics  # lazy: torchmetrics

    manifest = read_manifest(wd.manifest)
    bags = StoreBags(FeatureStore(wd.store), manifest)
    if not bags.slide_ids(split):
        raise RuntimeError(f"no slide of split '{split}' is in the store; cannot evaluate")
    rows = []
    predictions: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    for method, folder, kind, frac in FULL_RES_METHODS:
        path = wd.model(folder)
        if not path.is_file():
            continue
        model = load_model(path)
        ids, probs, labels = predict_probs(model, bags, split, kind)
        metrics = classification_metrics(probs, labels)
        rows.append({"method": method, "frac": frac, **_clean(metrics), "n_slides": len(ids)})
        predictions[method_name(method, frac)] = (list(ids), [np.asarray(probs)])
        log(f"[evaluate] {method}: AUC {metrics['auc']:.3f}, accuracy {metrics['accuracy']:.3f}")
    adaptive: dict[float, tuple[Any, list[dict]]] = {}
    rows += evaluate_sampling(wd, cfg, bags, split, log, predictions, adaptive)
    slide_ids = bags.slide_ids(split)
    labels = np.array([bags.label(s) for s in slide_ids])
    seed = int(cfg.get("seed", 0))
    curve: list[dict] = []
    referral: list[dict] = []
    if adaptive:  # each agent's stop rule (fitted on val) on its traced test episodes
        episodes = wd.root / "episodes"
        a_rows, curve, referral, a_predictions = adaptive_results(
            adaptive, slide_ids, labels, seed, N_BOOT, CI_LEVEL, episodes, log
        )
        rows += a_rows
        predictions.update(a_predictions)
    paired = add_uncertainty(rows, predictions, slide_ids, labels, seed=seed)
    add_calibrated(rows, predictions, slide_ids, labels, wd, log)
    results = {
        "split": split,
        "class_names": bags.class_names,
        "preset": cfg.get("preset"),
        "seed": cfg.get("seed", 0),
        "n_slides": len(slide_ids),
        "bootstrap": {"resamples": N_BOOT, "level": CI_LEVEL, "stratified_by_class": True},
        "methods": rows,
        "paired": paired,
        "adaptive_curve": curve,
        "referral": referral,
    }
    write_json(wd.results, results)
    return results


def tumour_fractions(
    wd: Workdir, store: FeatureStore, slide_ids: list[str]
) -> dict[str, np.ndarray]:
    """Per slide with a tumour mask in the manifest: ``(N,)`` float32, the share of each
    low-res patch's area that is tumour."""
    masks = {r.slide_id: r.mask for r in read_manifest(wd.manifest).records if r.mask}
    out = {}
    for sid in slide_ids:
        if sid in masks and Path(masks[sid]).is_file():
            info = store.slide_info(sid)
            cell = store.cell_px(sid)
            out[sid] = patch_tumour_fraction(
                masks[sid], info.dimensions, store.read(sid, "coords"), cell
            )
    return out


def tumour_patches(wd: Workdir, store: FeatureStore, slide_ids: list[str]) -> dict[str, np.ndarray]:
    """Per slide with a tumour mask in the manifest: ``(N,)`` bool, the patch overlaps tumour."""
    return {sid: frac > 0 for sid, frac in tumour_fractions(wd, store, slide_ids).items()}


def add_uncertainty(
    rows: list[dict],
    predictions: dict[str, tuple[list[str], list[np.ndarray]]],
    slide_ids: list[str],
    labels: np.ndarray,
    seed: int = 0,
    n_boot: int | None = None,
) -> list[dict]:
    """Add 95 % bootstrap intervals to every row, and return the paired comparisons.

    Every method is scored on the same ``n_boot`` resamples of the test slides (drawn with
    replacement within each class), so that ``auc_ci``, ``accuracy_ci`` and ``f1_ci`` say how
    much the numbers would move with other slides of the same kind, and a paired difference's
    interval (``paired``: SASHA against each of :data:`PAIRED_BASELINES` at its budget and
    against HAFED, on AUC and accuracy; ``sasha_adaptive`` against the fixed budgets nearest its
    mean fraction read and HAFED; ``sasha_learned_stop`` against ``sasha_adaptive`` and SASHA at
    its cap, the fixed budgets nearest its mean fraction read and HAFED) says whether one
    method beats another on these slides.
    Methods with several runs (random over seeds) are averaged over runs inside each resample.
    """
    from sasha_models.metrics import bootstrap_metrics  # lazy: torchmetrics

    idx = stratified_resamples(labels, n_boot or N_BOOT, seed)
    position = {s: i for i, s in enumerate(slide_ids)}
    boots: dict[str, dict[str, np.ndarray]] = {}
    for name, (ids, runs) in predictions.items():
        order = np.array([position[s] for s in ids])
        aligned = [np.empty_like(r) for r in runs]
        for dst, run in zip(aligned, runs, strict=True):
            dst[order] = run  # rows in slide_ids order
        boots[name] = bootstrap_metrics(aligned, labels, idx)
    for row in rows:
        boot = boots.get(method_name(row["method"], row["frac"]))
        if boot is not None:
            for metric in ("auc", "accuracy", "f1"):
                row[f"{metric}_ci"] = percentile_ci(boot[metric], CI_LEVEL)
    by_name = {method_name(r["method"], r["frac"]): r for r in rows}
    paired = []
    for row in rows:
        a = method_name(row["method"], row["frac"])
        if row["method"] == "sasha":
            against = [method_name(m, row["frac"]) for m in PAIRED_BASELINES]
        elif row["method"] == METHOD:  # the fixed budgets nearest its mean fraction
            against = [nearest(rows, m, row["mean_frac"]) for m in ("sasha", "random")]
        elif row["method"] == LEARNED_METHOD:  # the threshold rule and the agent at its cap
            against = [method_name(m, row["frac"]) for m in (METHOD, "sasha")]
            against += [nearest(rows, m, row["mean_frac"]) for m in ("sasha", "random")]
        else:
            continue
        for b in dict.fromkeys((*against, "hafed@1")):  # each once, in order
            if b not in boots:
                continue
            for metric in ("auc", "accuracy"):
                va, vb = by_name[a].get(metric), by_name[b].get(metric)
                diff = None if va is None or vb is None else float(va - vb)
                ci = percentile_ci(boots[a][metric] - boots[b][metric], CI_LEVEL)
                paired.append({"a": a, "b": b, "metric": metric, "diff": diff, "ci": ci})
    return paired


def add_calibrated(
    rows: list[dict],
    predictions: dict[str, tuple[list[str], list[np.ndarray]]],
    slide_ids: list[str],
    labels: np.ndarray,
    wd: Workdir,
    log: Callable[[str], None] = say,
) -> None:
    """Add ``calibrated: {kind: {temperature, bias, accuracy, f1, ece, auc}}`` for each of
    :data:`~sasha_models.calibration.KINDS` to every row that ``calibration.json`` covers (the
    metrics after the val-fitted calibration); the row's own metrics stay the raw ones."""
    from sasha_models.calibration import KINDS, read_calibrations  # lazy: torch
    from sasha_models.metrics import classification_metrics  # lazy: torchmetrics

    position = {s: i for i, s in enumerate(slide_ids)}
    for kind in KINDS:
        calibrations = read_calibrations(wd.calibration, kind)
        for row in rows:
            name = method_name(row["method"], row["frac"])
            if name not in calibrations:
                continue
            ids, runs = predictions[name]
            y = labels[[position[s] for s in ids]]
            c = calibrations[name]
            metrics = _clean(classification_metrics(c.apply(runs[0]), y))
            fitted = {"temperature": c.temperature, "bias": list(c.bias), **metrics}
            row.setdefault("calibrated", {})[kind] = fitted
            log(
                f"[evaluate] {name} calibrated ({kind}) on val: accuracy "
                f"{_fmt(row['accuracy'])} -> {_fmt(metrics['accuracy'])}, "
                f"ECE {_fmt(row['ece'])} -> {_fmt(metrics['ece'])}"
            )


def evaluate_sampling(
    wd: Workdir,
    cfg: dict,
    bags: StoreBags,
    split: str,
    log: Callable[[str], None] = say,
    predictions: dict[str, tuple[list[str], list[np.ndarray]]] | None = None,
    adaptive: dict[float, tuple[Any, list[dict]]] | None = None,
) -> list[dict]:
    """Rows for ``sasha`` (trained agents, argmax) and the same-harness baselines per budget.

    The baselines (:mod:`~sasha_env.agents.episodes`) zoom in SASHA's env, so each prediction
    is HAFED's on the final TSU-updated state; only the choice of patches differs: ``random``,
    ``greedy_attention`` (HAFED's attention on the current state, each step),
    ``attention_topk`` (HAFED's attention on the low-res state) and ``lowres_attention_topk``
    (the low-res classifier's attention; left out when ``models/lowres/model.pt`` is absent).
    Episodes are saved to ``WORKDIR/episodes/<method>-<f>.json`` (zoomed patches, probabilities)
    for figures and analysis. Tumour-hit rates are added when the manifest has masks.
    ``adaptive``, when given, receives for each agent with a stop rule (``adaptive.json``)
    ``{f: (rule, its test episodes traced zoom by zoom)}``
    (:mod:`~sasha_env.pipeline.adaptive`). With ``agents.stop: learned``, each learned-stop
    agent (``agents/<algo>-<f>-stop/``) runs in its own environment (with the stop action) and
    gives a ``sasha_learned_stop`` row at its cap f: the metrics of HAFED's probabilities where
    it stopped, ``mean_frac``, ``frac_p50``, ``frac_p90``, ``share_stopped`` (before the cap)
    and the ``zoom_cost`` it was trained with.
    """
    # lazy: SB3 and torch load only when agents are evaluated
    from ..agents.adaptive import read_stop_rule
    from ..agents.envs import has_agent, load_agent, make_env
    from ..agents.episodes import (
        agent_policy,
        attention_topk_policy,
        greedy_attention_policy,
        lowres_attention_topk_policy,
        random_policy,
        run_episodes,
    )

    acfg = AgentConfig.from_dict(cfg.get("agents"))
    ids = bags.slide_ids(split)
    tumour = tumour_fractions(wd, bags.store, ids)
    lowres = None
    if wd.model("lowres").is_file():  # optional: the low-res classifier's choice of patches
        from sasha_models.checkpoint import load_model  # lazy: torch

        lowres = load_model(wd.model("lowres"), kinds=("mil:attention_mil",))
    rows: list[dict] = []
    (wd.root / "episodes").mkdir(exist_ok=True)
    for frac in sorted(set(acfg.fracs) | set(acfg.curve_fracs)):
        methods: list[tuple[str, list]] = []
        agent = None
        if frac in acfg.fracs and has_agent(wd, frac, acfg.algo):  # weights only: no unpickling
            agent = load_agent(wd, frac, acfg.algo, ensemble=acfg.ensemble)
            methods.append(("sasha", [agent_policy(agent.policy)]))
        # the agent's environment, which the baselines share at this budget
        env = make_env(wd, split, frac, acfg) if agent is None else agent.make_env(wd, split, acfg)
        methods.append(("random", [random_policy(1000 + s) for s in range(acfg.random_seeds)]))
        methods.append(("attention_topk", [attention_topk_policy()]))
        methods.append(("greedy_attention", [greedy_attention_policy()]))
        if lowres is not None:
            methods.append(("lowres_attention_topk", [lowres_attention_topk_policy(lowres)]))
        rule = None if agent is None or adaptive is None else read_stop_rule(agent.path)
        if agent is not None and adaptive is not None and rule is None:
            log(f"[evaluate] sasha f={frac:g} has no stop rule (adaptive.json): run calibrate")
        for method, policies in methods:
            trace = method == "sasha" and rule is not None
            runs = [run_episodes(env, policy, ids, trace) for policy in policies]
            if trace:
                adaptive[frac] = (rule, runs[0])  # type: ignore[index]
            rows.append(_sampling_row(wd, bags, method, frac, runs, tumour, predictions, log))
        if frac in acfg.fracs and acfg.stop == "learned":  # the learned rule, capped at f
            if not has_agent(wd, frac, acfg.algo, learned_stop=True):
                log(f"[evaluate] no learned-stop agent at cap {frac:g}: run the agents stage")
                continue
            stopper = load_agent(wd, frac, acfg.algo, learned_stop=True)
            stop_env = stopper.make_env(wd, split, acfg)
            runs = [run_episodes(stop_env, agent_policy(stopper.policy), ids)]
            row = _sampling_row(wd, bags, LEARNED_METHOD, frac, runs, tumour, predictions, log)
            row |= reading_stats(np.array([e["frac_read"] for e in runs[0]]))
            row["share_stopped"] = float(np.mean([e["stopped"] == "learned" for e in runs[0]]))
            row["zoom_cost"] = acfg.zoom_cost
            rows.append(row)
            log(
                f"[evaluate] {LEARNED_METHOD} cap {frac:g}: mean fraction read "
                f"{row['mean_frac']:.3f}, {row['share_stopped']:.2f} stopped before the cap"
            )
    return rows


def _sampling_row(
    wd: Workdir,
    bags: StoreBags,
    method: str,
    frac: float,
    runs: list[list[dict]],
    tumour: dict[str, np.ndarray],
    predictions: dict[str, tuple[list[str], list[np.ndarray]]] | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The row of a zoom policy at budget ``frac`` from its runs (one per seed) of
    :func:`~sasha_env.agents.episodes.run_episodes` over the test slides: metrics (averaged over
    runs), tumour-hit, found and area-read rates when masks are known (``tumour``: per slide,
    each patch's tumour share); its probabilities go to ``predictions`` and
    its first run to ``WORKDIR/episodes/<method>-<f>.json``."""
    from sasha_models.metrics import classification_metrics  # lazy: torchmetrics

    if predictions is not None:
        predictions[method_name(method, frac)] = (
            [e["slide_id"] for e in runs[0]],
            [np.stack([e["probabilities"] for e in run]) for run in runs],
        )
    per_run = []
    for episodes in runs:
        probs = np.stack([e["probabilities"] for e in episodes])
        labels = np.array([e["label"] for e in episodes])
        per_run.append(_clean(classification_metrics(probs, labels)))
    metrics = {k: _mean([m[k] for m in per_run]) for k in per_run[0]}
    row: dict[str, Any] = {
        "method": method,
        "frac": float(frac),
        **metrics,
        "n_slides": len(runs[0]),
    }
    if len(runs) > 1:
        row["n_seeds"] = len(runs)
        row["auc_sd"] = float(np.std([m["auc"] for m in per_run if m["auc"] is not None]))
    if tumour:
        positive = bags.class_names[-1]
        pos = [
            e
            for run in runs
            for e in run
            if e["slide_id"] in tumour and bags.class_names[e["label"]] == positive
        ]
        zooms = [np.array(e["zoomed"]) for e in pos]
        fractions = [tumour[e["slide_id"]] for e in pos]
        masks = [f > 0 for f in fractions]
        hit, chance = hit_rate(zooms, masks)
        row["tumour_hit_rate"], row["chance_hit_rate"] = _nan_none(hit), _nan_none(chance)
        found, chance_found = found_rate(zooms, masks)
        row["tumour_found"], row["chance_found"] = _nan_none(found), _nan_none(chance_found)
        area, chance_area = area_read(zooms, fractions)
        row["tumour_area_read"], row["chance_area_read"] = _nan_none(area), _nan_none(chance_area)
        row["tumour_slides"] = len(pos) // len(runs)
    _save_episodes(wd.root / "episodes" / f"{method}-{frac:g}.json", runs[0])
    log(
        f"[evaluate] {method} f={frac:g}: AUC {_fmt(row['auc'])}, hit rate {_fmt(row.get('tumour_hit_rate'))}"
    )
    return row


def _save_episodes(path: Path, episodes: list[dict]) -> None:
    keep = ("slide_id", "label", "prediction", "zoomed", "updated", "return", "frac_read")
    keep += ("stopped",)  # learned-stop episodes: "learned" or "cap"
    data = [
        {k: e[k] for k in keep if k in e}
        | {"probabilities": [float(p) for p in e["probabilities"]]}
        for e in episodes
    ]
    write_json(path, data, indent=None)


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _nan_none(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _clean(metrics: dict) -> dict:
    return {
        k: (None if isinstance(v, float) and math.isnan(v) else float(v))
        for k, v in metrics.items()
    }


def _found(row: dict) -> str:
    """``found of slides (chance)``: the tumour slides with a zoom on tumour."""
    found, n = row.get("tumour_found"), row.get("tumour_slides")
    if found is None or not n:
        return ""
    return f"{found * n:.3g} of {n} (chance {row['chance_found'] * n:.1f})"


def format_table(results: dict | str | Path) -> str:
    """The results as Markdown tables: every method, then paired differences and calibration."""
    data: dict = results if isinstance(results, dict) else json.loads(Path(results).read_text())
    rows = []
    for m in data["methods"]:
        hit = m.get("tumour_hit_rate")
        frac = f"{m['frac']:.2f}"
        if "mean_frac" in m:  # adaptive: what it read on average, and its cap
            frac = f"{m['mean_frac']:.2f} (cap {cap_label(m['frac'], m.get('max_frac'))})"
        rows.append(
            [m["method"], frac, _with_ci(m, "auc"), _with_ci(m, "accuracy")]
            + ["n/a" if m.get(k) is None else f"{m[k]:.3f}" for k in ("f1", "ece")]
            + ["" if hit is None else f"{hit:.2f} (chance {m['chance_hit_rate']:.2f})"]
            + [_found(m)]
        )
    columns = ["method", "frac", "AUC [95% CI]", "accuracy [95% CI]", "F1", "ECE"]
    tables = [markdown_table([*columns, "tumour-hit rate", "tumour found"], rows)]
    if data.get("paired"):
        rows = []
        for p in data["paired"]:
            diff = "n/a" if p["diff"] is None else f"{p['diff']:+.3f}"
            ci = "" if p["ci"] is None else f" [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]"
            rows.append([f"{p['a']} − {p['b']}", p["metric"], diff + ci])
        n = data.get("n_slides", "the")
        tables.append(
            markdown_table(
                ["comparison", "metric", "difference [95% CI]"],
                rows,
                f"Paired differences on the same {n} test slides (95% bootstrap CI):",
            )
        )
    if data.get("referral"):
        rows = [
            [
                f"{r['method']}@{r['frac']:g}",
                f"{r['share_referred']:.2f}",
                _fmt(r["sensitivity"]),
                _fmt(r["specificity"]),
                _fmt(r["cleared_at_full_sensitivity"]),
                _fmt(r["aurc"]),
            ]
            for r in data["referral"]
        ]
        tables.append(
            markdown_table(
                [
                    "method",
                    "referred",
                    "sensitivity",
                    "specificity",
                    "cleared at 100% sens.",
                    "AURC",
                ],
                rows,
                "Adaptive reading on the test slides: share referred; sensitivity and specificity "
                "of the slides decided automatically; share cleared automatically without missing "
                "a positive; area under the risk-coverage curve:",
            )
        )
    calibrated = [m for m in data["methods"] if m.get("calibrated")]
    if calibrated:
        rows = []
        for m in calibrated:
            t, tb = m["calibrated"]["temperature"], m["calibrated"]["temperature+bias"]
            rows.append(
                [
                    m["method"],
                    f"{m['frac']:.2f}",
                    f"{t['temperature']:.2f}",
                    f"{tb['temperature']:.2f}, {tb['bias'][-1]:+.2f}",
                    f"{_fmt(m['accuracy'])} → {_fmt(t['accuracy'])} → {_fmt(tb['accuracy'])}",
                    f"{_fmt(m['ece'])} → {_fmt(t['ece'])} → {_fmt(tb['ece'])}",
                ]
            )
        tables.append(
            markdown_table(
                ["method", "frac", "T", "T, b (with bias)", "accuracy", "ECE"],
                rows,
                "Calibrated on the val split, on the test slides: raw → temperature T → "
                "temperature and class bias b:",
            )
        )
    return "\n\n".join(tables)


def _with_ci(row: dict, metric: str) -> str:
    value, ci = row.get(metric), row.get(f"{metric}_ci")
    if value is None:
        return "n/a"
    return f"{value:.3f}" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")
