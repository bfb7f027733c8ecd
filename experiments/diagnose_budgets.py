"""Why does SASHA trail HAFED at f = 0.1 and 0.2? Measurements on finished pipeline workdirs.

Issue 22, item 3. Nothing is trained and nothing is written into a workdir: the script replays
the zoom sequences the evaluation stage saved (``WORKDIR/episodes/<method>-<f>.json``, test
split) in the workdir's own environment (:func:`sasha_env.agents.envs.make_env`: its store,
HAFED and TSU) and reads the agents' training logs. Per workdir, budget f and method
(``sasha``, ``greedy_attention``, ``attention_topk``, ``random`` by default; ``random`` is the
evaluation's first random seed, the one it saves):

(a) **where the zooms land** — share of zoomed patches that overlap tumour (the manifest's
    masks, :func:`sasha_env.pipeline.evaluate.tumour_patches`) on tumour slides, and the share
    of tumour slides hit at least once; both per step t;
(b) **TSU drift** — after t zooms, the rows the TSU updated and no zoom read since, against
    their true high-res vectors ``v`` (HAFED level 1 on the slide's high-res sub-patches):
    mean cosine and relative L2 ``‖S_j − v_j‖ / ‖v_j‖``, beside the same for the low-res rows
    ``z_j`` they replaced;
(c) **the state ceiling** — test AUC of HAFED's classifier, for the same zooms, on the states
    ``tsu`` (the environment's: what SASHA is scored on), ``oracle`` (TSU-updated rows
    replaced by their true ``v``: a perfect TSU), ``off`` (zoomed rows ``v``, every other row
    ``z``: no TSU) and ``full`` (every row ``v``: HAFED, independent of the zooms). ``tsu``
    reproduces the evaluation's ``results.json`` (``check`` column: largest probability
    difference from the saved episode). ``full − off`` is what the zoom choice leaves on the
    table; ``oracle − tsu`` what a better TSU could add;
(d) **the agent's validation selection** — from ``agents/sasha-<f>/val_curve.csv`` and
    ``agent.json``: the kept checkpoint's step and val AUC/CE, how many val points tie at the
    best AUC, the mean val AUC over the second half of training, the training return
    (``episodes.csv``) per fifth of training, as mean CE per step so that budgets compare, and
    the policy's entropy per fifth (``progress.csv``; a uniform policy over N patches has
    ln N, about 4.4 on the demo): whether the kept agent had left the uniform policy.

Unless ``--no-reward-range``, also: HAFED's mean CE and AUC on the low-res state (every row
``z``) and on the full state, per split (the range the CE reward moves in); per budget, the
test AUC of ``privileged_topk`` zooms (the top patches of HAFED's attention on the full
high-res state: what the budget allows with ideal zooms), and the reward signal on the train
slides: the spread of uniform-random episodes' returns within a slide (what the zooms decide)
against the spread of their means across slides (what the critic must explain away).

Prints Markdown tables and writes everything to ``--out`` (JSON).

Example::

    python experiments/diagnose_budgets.py /work/runs/study-demo/seed-{0,1,2} \\
        --out /work/runs/diag/diagnose.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sasha_env.agents.config import AgentConfig, agent_name
from sasha_env.agents.envs import make_env
from sasha_env.agents.episodes import greedy_attention_policy, random_policy, run_episodes
from sasha_env.envs.wsi import SashaWSIEnv
from sasha_env.features.store import FeatureStore
from sasha_env.pipeline.evaluate import tumour_patches
from sasha_env.slides.manifest import read_manifest
from sasha_env.workdir import Workdir
from sasha_models.metrics import classification_metrics

METHODS = ("sasha", "greedy_attention", "attention_topk", "random")
STATES = ("tsu", "oracle", "off", "full")


# --------------------------------------------------------------------------- helpers
def agents_config(wd: Workdir) -> AgentConfig:
    """The workdir's ``agents`` section (its ``config.yaml``; defaults without one)."""
    cfg = (yaml.safe_load(wd.config.read_text()) or {}) if wd.config.is_file() else {}
    return AgentConfig.from_dict(cfg.get("agents"))


def auc(p_pos: Sequence[float], labels: Sequence[int]) -> float:
    """AUROC of positive-class probabilities against binary labels (NaN with one class)."""
    if len(set(labels)) < 2:
        return math.nan
    probs = np.stack([1.0 - np.asarray(p_pos), np.asarray(p_pos)], axis=1)
    return float(classification_metrics(probs, np.asarray(labels))["auc"])


def row_distance(rows: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean cosine and mean relative L2 ``‖x − v‖ / ‖v‖`` of ``rows`` against ``truth`` (r, d)."""
    eps = 1e-8
    nt = np.linalg.norm(truth, axis=1)
    cos = (rows * truth).sum(1) / (np.linalg.norm(rows, axis=1) * nt + eps)
    rel = np.linalg.norm(rows - truth, axis=1) / (nt + eps)
    return float(cos.mean()), float(rel.mean())


def classify(env: SashaWSIEnv, S: torch.Tensor) -> np.ndarray:
    """HAFED's class probabilities ``(C,)`` on a state ``S (N, d)``."""
    clf = getattr(env.hafed, "level2", env.hafed)
    with torch.inference_mode():
        return torch.softmax(clf.classify(S.float()).float().reshape(-1), -1).numpy()


def _nanmean(x: Sequence[float]) -> float:
    x = [v for v in x if v is not None and not math.isnan(v)]
    return float(np.mean(x)) if x else math.nan


# --------------------------------------------------------------------------- (a)-(c)
def replay(env: SashaWSIEnv, episode: dict, tumour: np.ndarray | None) -> dict[str, Any]:
    """Replay one saved episode's zooms; per-step tumour hits and drift, final-state probes.

    Returns ``{"steps": [{t, hit, cos_tsu, rel_tsu, cos_z, rel_z, n_updated}], "p": {state:
    p_positive}, "check": max |p_tsu − saved probabilities|, "label", "tumour_slide"}``.
    """
    env.reset(options={"slide_id": episode["slide_id"]})
    slide = env.slide
    assert slide is not None
    z, v = slide.z.numpy(), slide.v.numpy()
    steps = []
    for t, a in enumerate(episode["zoomed"], start=1):
        env.step(int(a))
        upd = np.asarray(env.updated, dtype=np.int64)  # updated and not zoomed since
        rec: dict[str, Any] = {"t": t, "n_updated": len(upd)}
        rec["hit"] = None if tumour is None else bool(tumour[int(a)])
        if len(upd):
            S = env.state()
            rec["cos_tsu"], rec["rel_tsu"] = row_distance(S[upd], v[upd])
            rec["cos_z"], rec["rel_z"] = row_distance(z[upd], v[upd])
        steps.append(rec)
    tsu = torch.from_numpy(env.state())
    oracle = tsu.clone()
    upd_t = torch.as_tensor(env.updated, dtype=torch.long)
    oracle[upd_t] = slide.v[upd_t]
    off = slide.z.clone()
    zoomed = torch.as_tensor(env.zoomed, dtype=torch.long)
    off[zoomed] = slide.v[zoomed]
    states = {"tsu": tsu, "oracle": oracle, "off": off, "full": slide.v}
    p = {name: float(classify(env, S)[-1]) for name, S in states.items()}
    saved = np.asarray(episode["probabilities"], dtype=np.float64)
    return {
        "slide_id": episode["slide_id"],
        "label": int(slide.label),
        "tumour_slide": tumour is not None and bool(tumour.any()),
        "steps": steps,
        "p": p,
        "check": float(np.abs(env.probabilities - saved).max()),
    }


def summarise_method(eps: list[dict]) -> dict[str, Any]:
    """Per method and budget: AUC per state, tumour hits, drift; and per step t."""
    labels = [e["label"] for e in eps]
    out: dict[str, Any] = {"n_slides": len(eps)}
    for s in STATES:
        out[f"auc_{s}"] = auc([e["p"][s] for e in eps], labels)
    out["check"] = max(e["check"] for e in eps)
    tum = [e for e in eps if e["label"] == 1 and e["tumour_slide"]]
    out["tumour_slides"] = len(tum)
    out["hit_share"] = _nanmean([float(st["hit"]) for e in tum for st in e["steps"]])
    out["slides_hit"] = _nanmean([float(any(st["hit"] for st in e["steps"])) for e in tum])
    t_max = max(len(e["steps"]) for e in eps)
    per_t = []
    for t in range(1, t_max + 1):
        at = [e["steps"][t - 1] for e in eps if len(e["steps"]) >= t]
        tum_at = [e for e in tum if len(e["steps"]) >= t]
        row = {
            "t": t,
            "slides": len(at),
            "hit_share": _nanmean([float(e["steps"][t - 1]["hit"]) for e in tum_at]),
            "slides_hit": _nanmean(
                [float(any(st["hit"] for st in e["steps"][:t])) for e in tum_at]
            ),
            "n_updated": _nanmean([r["n_updated"] for r in at]),
        }
        for k in ("cos_tsu", "rel_tsu", "cos_z", "rel_z"):
            row[k] = _nanmean([r[k] for r in at if k in r])
        per_t.append(row)
    out["per_t"] = per_t
    return out


def reward_range(wd: Workdir, cfg: AgentConfig) -> dict[str, dict[str, float]]:
    """HAFED's mean CE on the low-res state (all ``z``) and the full state (all ``v``), and its
    AUC on both, per split: the range the CE reward moves in."""
    out = {}
    for split in ("train", "val", "test"):
        env = make_env(wd, split, 0.1, cfg)
        ce_z, ce_v, pz, pv, labels = [], [], [], [], []
        for sid in env.slide_ids:
            env.reset(options={"slide_id": sid})
            slide = env.slide
            assert slide is not None
            qz, qv = classify(env, slide.z), classify(env, slide.v)
            ce_z.append(-math.log(max(qz[slide.label], 1e-12)))
            ce_v.append(-math.log(max(qv[slide.label], 1e-12)))
            pz.append(float(qz[-1]))
            pv.append(float(qv[-1]))
            labels.append(int(slide.label))
        out[split] = {
            "slides": len(labels),
            "ce_lowres": float(np.mean(ce_z)),
            "ce_full": float(np.mean(ce_v)),
            "auc_lowres": auc(pz, labels),
            "auc_full": auc(pv, labels),
        }
    return out


def privileged_auc(env: SashaWSIEnv) -> float:
    """Test AUC (TSU state) of ``privileged_topk`` zooms (the top patches of HAFED's attention
    on the slide's full high-res state, ``experiments/f02_factors.py``): what the budget allows
    with zooms chosen knowing what they will read; no agent can reach it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from f02_factors import privileged_topk_policy  # an experiments script, not the library

    eps = run_episodes(env, privileged_topk_policy(), env.slide_ids)
    return auc([float(e["probabilities"][-1]) for e in eps], [int(e["label"]) for e in eps])


# --------------------------------------------------------------------------- (d)
def selection_summary(agent_dir: Path, budgets: dict[str, int]) -> dict[str, Any] | None:
    """The agent's validation curve, kept checkpoint and training return (None: no agent).

    ``budgets`` maps slide id to its episode length ⌈f·N⌉, to turn an episode's return
    (the sum of −CE over its steps under ``reward: ce``) into a mean CE per step.
    """
    meta_path = agent_dir / "agent.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    out: dict[str, Any] = {"timesteps": meta.get("timesteps"), "kept": meta.get("selected_on_val")}
    curve_path = agent_dir / "val_curve.csv"
    if curve_path.is_file():
        curve = [{k: float(x) for k, x in r.items()} for r in csv.DictReader(curve_path.open())]
        aucs = [r["auc"] for r in curve]
        total = max(r["timestep"] for r in curve)
        second = [r["auc"] for r in curve if r["timestep"] > total / 2]
        out |= {
            "val_points": len(curve),
            "val_best_auc_ties": int(sum(a >= max(aucs) - 1e-6 for a in aucs)),
            "val_auc_second_half": _nanmean(second),
            "val_auc_last": aucs[-1],
            "curve": curve,
        }
        if out["kept"]:
            out["kept_at_share"] = out["kept"]["timestep"] / total
    ep_path = agent_dir / "episodes.csv"
    if ep_path.is_file():
        rows = list(csv.DictReader(ep_path.open()))
        ce = [
            -float(r["episode_return"]) / budgets[r["slide_id"]]
            for r in rows
            if r["slide_id"] in budgets
        ]
        out["train_ce_per_step_by_fifth"] = [_nanmean(list(c)) for c in np.array_split(ce, 5)]
        out["train_episodes"] = len(rows)
    prog_path = agent_dir / "progress.csv"
    if prog_path.is_file():
        rows = [
            r
            for r in csv.DictReader(prog_path.open())
            if r.get("train/entropy_loss") and r.get("time/total_timesteps")
        ]
        if rows:
            ent = [-float(r["train/entropy_loss"]) for r in rows]
            ev = [float(r["train/explained_variance"]) for r in rows]
            out["entropy_by_fifth"] = [_nanmean(list(c)) for c in np.array_split(ent, 5)]
            out["explained_variance_by_fifth"] = [_nanmean(list(c)) for c in np.array_split(ev, 5)]
            if out["kept"]:
                steps = np.array([float(r["time/total_timesteps"]) for r in rows])
                i = int(np.argmin(np.abs(steps - out["kept"]["timestep"])))
                out["entropy_at_kept"] = ent[i]
    return out


def reward_signal(env: SashaWSIEnv, seeds: int = 3) -> dict[str, float]:
    """How much of an episode's return the zooms decide, on the env's slides: the spread of
    uniform-random episodes' returns *within* a slide (what the agent's choices move), against
    the spread of their mean *across* slides (what the critic has to explain away), and the
    mean return gain of greedy attention over random."""
    ids = env.slide_ids
    rand = np.array(
        [
            [e["return"] for e in run_episodes(env, random_policy(100 + s), ids)]
            for s in range(seeds)
        ]
    )
    greedy = np.array([e["return"] for e in run_episodes(env, greedy_attention_policy(), ids)])
    within = float(rand.std(0).mean())
    across = float(rand.mean(0).std())
    return {
        "slides": len(ids),
        "random_sd_within_slide": within,
        "random_sd_across_slides": across,
        "within_over_across": within / across if across else math.nan,
        "greedy_minus_random": float((greedy - rand.mean(0)).mean()),
    }


# --------------------------------------------------------------------------- driver
def diagnose(
    workdir: Path, fracs: Sequence[float], methods: Sequence[str], with_reward: bool = True
) -> dict[str, Any]:
    """Every measurement above for one workdir (read only)."""
    wd = Workdir(workdir)
    cfg = agents_config(wd)
    records = read_manifest(wd.manifest).records
    test_ids = [r.slide_id for r in records if r.split == "test"]
    store = FeatureStore(wd.store)
    tumour = tumour_patches(wd, store, test_ids)
    out: dict[str, Any] = {"workdir": str(workdir), "budgets": {}}
    if with_reward:
        out["reward_range"] = reward_range(wd, cfg)
    for f in fracs:
        env = make_env(wd, "test", f, cfg)
        fb: dict[str, Any] = {"methods": {}}
        for m in methods:
            path = wd.root / "episodes" / f"{m}-{f:g}.json"
            if not path.is_file():
                continue
            eps = [replay(env, e, tumour.get(e["slide_id"])) for e in json.loads(path.read_text())]
            fb["methods"][m] = summarise_method(eps)
        if with_reward:
            fb["privileged_topk_auc"] = privileged_auc(env)
        train_env = make_env(wd, "train", f, cfg)
        if with_reward:
            fb["reward_signal"] = reward_signal(train_env)
        budgets = {}
        for sid in train_env.slide_ids:
            train_env.reset(options={"slide_id": sid})
            budgets[sid] = train_env.budget
        fb["selection"] = selection_summary(wd.agent_dir(agent_name(f, cfg.algo)), budgets)
        out["budgets"][f"{f:g}"] = fb
    return out


def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def markdown(results: list[dict], steps: Sequence[int]) -> str:
    """The tables of (a)-(d) for every workdir."""
    lines = [
        "### (a) zooms on tumour, (c) state ceiling (test split)",
        "",
        "| workdir | f | method | hit share | tumour slides hit | AUC tsu | AUC oracle "
        "| AUC off | AUC full | replay check |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = Path(r["workdir"]).name
        for f, fb in r["budgets"].items():
            for m, s in fb["methods"].items():
                lines.append(
                    f"| {name} | {f} | {m} | {_f(s['hit_share'], 2)} | {_f(s['slides_hit'], 2)} "
                    + " | ".join(_f(s[f"auc_{st}"]) for st in STATES).join(["| ", " "])
                    + f"| {s['check']:.1e} |"
                )
    lines += [
        "",
        "### (a), (b) per step t: tumour hit share at step t / TSU rows' cos to v "
        "(low-res z's cos to v), over every workdir",
        "",
        "| f | method | " + " | ".join(f"t={t}" for t in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    fracs = sorted({f for r in results for f in r["budgets"]}, key=float)
    for f in fracs:
        ms = list(
            dict.fromkeys(m for r in results for m in r["budgets"].get(f, {}).get("methods", {}))
        )
        for m in ms:
            cells = []
            for t in steps:
                rows = [
                    row
                    for r in results
                    for row in r["budgets"]
                    .get(f, {})
                    .get("methods", {})
                    .get(m, {})
                    .get("per_t", [])
                    if row["t"] == t
                ]
                if not rows:
                    cells.append("–")
                    continue
                hit = _nanmean([x["hit_share"] for x in rows])
                ct = _nanmean([x["cos_tsu"] for x in rows])
                cz = _nanmean([x["cos_z"] for x in rows])
                cells.append(f"{_f(hit, 2)} / {_f(ct, 2)} ({_f(cz, 2)})")
            lines.append(f"| {f} | {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### (d) validation selection and training return; reward range",
        "",
        "| workdir | f | kept step / total | kept val AUC, CE | ties at best val AUC "
        "| val AUC 2nd half | val AUC last | train CE/step by fifth | policy entropy by fifth (at kept) "
        "| CE low-res→full (train) | return sd within / across slides | privileged AUC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = Path(r["workdir"]).name
        rr = r.get("reward_range", {})

        def ce(split: str, rr: dict = rr) -> str:
            x = rr.get(split)
            return f"{x['ce_lowres']:.3f}→{x['ce_full']:.3f}" if x else "–"

        for f, fb in r["budgets"].items():
            s = fb.get("selection")
            if not s:
                continue
            kept = s.get("kept") or {}
            fifth = ", ".join(_f(x) for x in s.get("train_ce_per_step_by_fifth", []))
            ent = ", ".join(_f(x, 2) for x in s.get("entropy_by_fifth", []))
            ent += f" ({_f(s.get('entropy_at_kept'), 2)})"
            sig = fb.get("reward_signal")
            spread = (
                f"{sig['random_sd_within_slide']:.2f} / {sig['random_sd_across_slides']:.2f}"
                if sig
                else "–"
            )
            lines.append(
                f"| {name} | {f} | {kept.get('timestep', '–')} / {s.get('timesteps')} "
                f"| {_f(kept.get('auc'), 2)}, {_f(kept.get('ce'))} "
                f"| {s.get('val_best_auc_ties', '–')}/{s.get('val_points', '–')} "
                f"| {_f(s.get('val_auc_second_half'))} | {_f(s.get('val_auc_last'))} "
                f"| {fifth} | {ent} | {ce('train')} | {spread} "
                f"| {_f(fb.get('privileged_topk_auc'))} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (python -m pydoc experiments/diagnose_budgets.py).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("workdirs", nargs="+", type=Path, help="finished pipeline workdirs (read only)")
    ap.add_argument("--fracs", nargs="+", type=float, default=[0.1, 0.2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8, 12, 16])
    ap.add_argument("--no-reward-range", action="store_true", help="skip the CE-range pass")
    ap.add_argument("--out", type=Path, help="write every measurement here (JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small networks: threads only add contention
    results = []
    for w in args.workdirs:
        results.append(diagnose(w, args.fracs, args.methods, not args.no_reward_range))
        print(f"[diagnose] {w} done", file=sys.stderr)
    print(markdown(results, args.steps))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
