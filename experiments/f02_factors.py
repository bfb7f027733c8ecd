"""Why is the f = 0.2 agent weaker than f = 0.1? Measurements on a finished pipeline workdir.

Issue 22, item 3. Two measurements, one factor at a time, each on a workdir the pipeline
already trained (its store, HAFED, TSU and agents are read, never written):

``drift`` — how the state evolves over an episode. For every slide of the chosen splits and
for each zoom policy (the trained agents at f = 0.1 and 0.2, uniform random, greedy attention,
and ``privileged_topk``: the top patches of HAFED's attention on the full high-res state, a
reference no agent can reach)
it runs one episode of ``⌈0.2·N⌉`` zooms in the environment (the env's dynamics do not depend
on f: only the episode length does, checked below) and records at every step t:

* the rows the TSU updated at step t against their true high-res vectors ``v_j`` (HAFED's
  level-1 distillation of the slide's high-res sub-patches, what a zoom would give): mean
  cosine and relative L2 ``‖S_j − v_j‖ / ‖v_j‖``, beside the same for the low-res rows
  ``z_j`` they replaced (what the TSU started from);
* HAFED's probability of the positive class and its CE on three states built from the same
  zooms: ``tsu`` (the environment's state), ``oracle`` (every TSU-updated row replaced by its
  true ``v_j``: a perfect TSU) and ``off`` (no TSU: only the zoomed rows replaced);
* whether the zoomed patch overlaps tumour (when the manifest has masks).

Outputs in ``--out``: ``drift_steps.csv`` (one row per policy, slide and step),
``drift_summary.csv`` and ``drift_summary.md`` (per policy and read fraction
c = 0.025 … 0.2, at step ``⌈c·N⌉`` of each slide: AUC and mean CE of the three states over
slides, mean cosine / relative L2 of the rows updated since the previous checkpoint, tumour hit
rate of those zooms), and ``drift_check.json`` (the f-independence check, and HAFED's AUC and
CE on the full high-res state of the same slides).

``train`` — retrain one agent with one change to the workdir's ``agents`` config (a named
factor, below) and evaluate it on the test split; ``--factor base`` evaluates the workdir's
own agent without training. ``--seed`` defaults to the workdir's ``seed`` (the one its own
agents were trained with); ``base`` is filed under its agent's seed and refuses another.
Writes ``--out/<factor>/seed-<s>/sasha-<f>/`` (the agent, as
``train_agent`` writes it) and ``eval.json`` there (test AUC, accuracy, F1, number of slides,
the selected validation point, training seconds). ``table`` collects the ``eval.json`` files
under one or more folders into a Markdown table, paired by (workdir, f, seed) with ``base``.

``nested`` — read at f = 0.2 as a continuation of the f = 0.1 reading, no training. On each
workdir's test split it runs, besides the two agents at their own budgets, three ⌈0.2·N⌉-zoom
readings that begin with the f = 0.1 agent's ⌈0.1·N⌉ zooms (so they read everything
SASHA-0.1 reads) and go on with the f = 0.2 agent (``0.1-then-0.2``), the f = 0.1 agent itself
(``0.1-run-on``) or ``greedy_attention`` (``0.1-then-greedy``). Writes ``nested.json`` (per
workdir and reading: test AUC, tumours found, area read, each slide's probability) and
``nested.md`` (AUC per workdir, mean ± sd, and each reading's paired difference from
SASHA-0.2 and SASHA-0.1 over the workdirs with a 95 % t-interval). ``--zooms-from`` an
earlier ``nested.json`` repeats its zooms on other workdirs of the same slides and splits
(matched by folder name): the same reading scored by another HAFED and TSU.

Factors (changes to the ``agents`` section; see :class:`sasha_env.agents.AgentConfig`):

* ``base``: none (the workdir's agent, not retrained);
* ``retrain``: none, retrained with ``--seed`` (the spread of training itself);
* ``half-episodes``: ``equal_episodes: false``: every f gets ``total_timesteps`` steps, so
  f = 0.2 sees half the episodes of f = 0.1;
* ``double-episodes``: twice ``total_timesteps`` (with ``equal_episodes``, f = 0.2 gets
  4× the f = 0.1 base steps: twice its episodes);
* ``paper-clip-lambda``: PPO clip and GAE λ of :data:`sasha_models.ppo_config.PAPER_PER_FRAC`
  for f (0.2 / 0.94 at f = 0.1, 0.1 / 0.95 at f = 0.2);
* ``delta-reward``: ``reward: delta`` (the CE change per step; its sum does not grow with the
  episode length as ``−Σ CE_t`` does);
* ``gamma-0.9``: discount γ = 0.9 instead of 1 (a horizon of about ten zooms): the return of a
  zoom weighs the next few steps' rewards, so finding tumour soon counts more than the tail
  of a long f = 0.2 episode does;
* ``time-aware-critic``: ``time_aware_critic: true``: the value head also reads the share of
  the slide zoomed so far, so the critic knows how many of the episode's per-zoom rewards
  are still to come (twice as many at the start of an f = 0.2 episode as at f = 0.1);
* ``cosine-lr``: ``lr_schedule: cosine``: the learning rate decays from the protocol's own to
  0 over training instead of staying constant, so the late policies that validation chooses
  among stop moving (with a constant rate the demo's f = 0.2 val AUC still swings by 0.1–0.2
  between neighbouring checks in the second half of training);
* ``start-from-f0.1``: the same config, but PPO starts from the workdir's trained f = 0.1
  agent's weights (``agents/<algo>-0.1/policy.pt``) instead of random ones (fresh optimiser):
  on the demo the f = 0.1 agent is the better searcher (``drift``), so this asks whether the
  f = 0.2 agent's weakness is where its training starts.

``train``'s ``eval.json`` also counts the test slides with tumour on which a zoom read tumour
(``tumour_found`` of ``tumour_slides``, from the manifest's masks), and the mean share of
their tumour area the zooms read (``tumour_area_read``; ``table`` shows it per seed).

Examples (a copy of a demo workdir in ``W``)::

    python experiments/f02_factors.py drift --workdir W --out W/f02/drift
    python experiments/f02_factors.py train --workdir W --out W/f02/agents --frac 0.2 \\
        --factor half-episodes --seed 0
    python experiments/f02_factors.py table W/f02/agents
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from sasha_env.agents import config as agent_config
from sasha_env.agents.envs import load_agent, make_env
from sasha_env.agents.episodes import agent_policy, greedy_attention_policy, random_policy
from sasha_env.config import read_config_file
from sasha_env.envs.wsi import SashaWSIEnv, episode_budget, mean_attention
from sasha_env.features.store import FeatureStore
from sasha_env.pipeline.evaluate import tumour_fractions, tumour_patches
from sasha_env.slides.manifest import read_manifest
from sasha_env.slides.tumour import area_read, found_rate
from sasha_env.workdir import Workdir
from sasha_models.metrics import classification_metrics
from sasha_models.ppo_config import PAPER_PER_FRAC
from sasha_models.stats import t_interval

CHECKPOINTS = (0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2)
"""Read fractions c at which ``drift`` summarises: step ``⌈c·N⌉`` of each slide."""
STATES = ("tsu", "oracle", "off")
#: The factor whose training starts from the workdir's trained f = 0.1 agent.
START_FROM_F01 = "start-from-f0.1"

FACTORS = (
    "base",
    "retrain",
    "half-episodes",
    "double-episodes",
    "paper-clip-lambda",
    "delta-reward",
    "gamma-0.9",
    "time-aware-critic",
    "cosine-lr",
    START_FROM_F01,
)


# --------------------------------------------------------------------------- shared helpers
def workdir_settings(wd: Workdir) -> dict[str, Any]:
    """The workdir's resolved settings (its ``config.yaml``; ``{}`` without one)."""
    return read_config_file(wd.config) if wd.config.is_file() else {}


def agents_config(wd: Workdir) -> agent_config.AgentConfig:
    """The workdir's ``agents`` section (defaults without a ``config.yaml``)."""
    return agent_config.AgentConfig.from_dict(workdir_settings(wd).get("agents"))


def workdir_seed(wd: Workdir) -> int:
    """The workdir's ``seed`` (its ``config.yaml``; 0 without one), which its own agents were
    trained with."""
    return int(workdir_settings(wd).get("seed", 0))


def split_ids(wd: Workdir, splits: list[str]) -> list[tuple[str, str]]:
    """``(slide_id, split)`` of the manifest's slides in ``splits``, in manifest order."""
    return [(r.slide_id, r.split) for r in read_manifest(wd.manifest).records if r.split in splits]


def factor_config(cfg: agent_config.AgentConfig, factor: str, frac: float):
    """``cfg`` with one factor changed (module docstring)."""
    if factor in ("base", "retrain", START_FROM_F01):  # the last changes the start, not cfg
        return cfg
    if factor == "half-episodes":
        return replace(cfg, equal_episodes=False)
    if factor == "double-episodes":
        return replace(cfg, total_timesteps=2 * cfg.total_timesteps)
    if factor == "paper-clip-lambda":
        clip, lam = min(PAPER_PER_FRAC.items(), key=lambda kv: abs(kv[0] - frac))[1]
        return replace(cfg, clip_range=clip, gae_lambda=lam)
    if factor == "delta-reward":
        return replace(cfg, reward="delta")
    if factor == "gamma-0.9":
        if cfg.protocol == "paper":  # PPOConfig.paper(f) sets γ itself: nothing would change
            raise ValueError("gamma-0.9 changes agents.gamma, which protocol 'paper' ignores")
        return replace(cfg, gamma=0.9)
    if factor == "time-aware-critic":
        return replace(cfg, time_aware_critic=True)
    if factor == "cosine-lr":
        return replace(cfg, lr_schedule="cosine")
    raise ValueError(f"unknown factor {factor!r}; choose one of {', '.join(FACTORS)}")


def auc_of(p_pos: list[float], labels: list[int]) -> float:
    """AUROC of the positive-class probabilities (binary labels 0/1)."""
    probs = np.stack([1.0 - np.asarray(p_pos), np.asarray(p_pos)], axis=1)
    return classification_metrics(probs, np.asarray(labels))["auc"]


# --------------------------------------------------------------------------- drift
class StateProbe:
    """HAFED's positive-class probability and CE on the ``tsu``, ``oracle`` and ``off`` states."""

    def __init__(self, env: SashaWSIEnv) -> None:
        self.env = env
        self.clf = getattr(env.hafed, "level2", env.hafed)

    def __call__(self, zoomed: list[int], updated: np.ndarray) -> dict[str, tuple[float, float]]:
        """``{state: (p_positive, ce)}``; ``updated`` (N,) bool marks rows ever TSU-updated."""
        slide = self.env.slide
        assert slide is not None
        z, v = slide.z, slide.v
        tsu = torch.from_numpy(self.env.state())
        oracle = tsu.clone()
        upd = torch.from_numpy(updated)
        oracle[upd] = v[upd]
        off = z.clone()
        if zoomed:
            off[zoomed] = v[zoomed]
        out = {}
        with torch.inference_mode():
            for name, S in (("tsu", tsu), ("oracle", oracle), ("off", off)):
                logp = torch.log_softmax(self.clf.classify(S.float()).float().reshape(-1), -1)
                out[name] = (float(logp[-1].exp()), float(-logp[slide.label]))
        return out


def row_distance(rows: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean cosine and mean relative L2 ``‖x − v‖ / ‖v‖`` of ``rows`` against ``truth`` (r, d)."""
    eps = 1e-8
    dot = (rows * truth).sum(1)
    cos = dot / (np.linalg.norm(rows, axis=1) * np.linalg.norm(truth, axis=1) + eps)
    rel = np.linalg.norm(rows - truth, axis=1) / (np.linalg.norm(truth, axis=1) + eps)
    return float(cos.mean()), float(rel.mean())


def drift_episode(
    env: SashaWSIEnv,
    probe: StateProbe,
    policy,
    slide_id: str,
    tumour: np.ndarray | None,
) -> list[dict[str, Any]]:
    """One episode of ``env.budget`` zooms; one record per step (t = 0 is the reset state)."""
    obs, _ = env.reset(options={"slide_id": slide_id})
    slide = env.slide
    assert slide is not None
    z, v = slide.z.numpy(), slide.v.numpy()
    updated = np.zeros(slide.n, bool)
    records = []

    def record(t: int, action: int, new_rows: np.ndarray) -> None:
        rec: dict[str, Any] = {
            "label": slide.label,
            "n_patches": slide.n,
            "t": t,
            "action": action,
            "n_updated_step": len(new_rows),
        }
        if len(new_rows):
            S = env.state()
            rec["cos_tsu"], rec["rel_tsu"] = row_distance(S[new_rows], v[new_rows])
            rec["cos_z"], rec["rel_z"] = row_distance(z[new_rows], v[new_rows])
        for name, (p, ce) in probe(env.zoomed, updated & ~_zoomed_mask(env, slide.n)).items():
            rec[f"p_{name}"], rec[f"ce_{name}"] = p, ce
        rec["tumour_hit"] = None if tumour is None or action < 0 else int(bool(tumour[action]))
        records.append(rec)

    record(0, -1, np.zeros(0, np.int64))
    for t in range(1, env.budget + 1):
        action = int(policy(env, obs))
        obs, _, terminated, _, _ = env.step(action)
        rows = env.changed_rows
        new_rows = rows[1:] if len(rows) else rows
        updated[new_rows] = True
        record(t, action, new_rows)
        if terminated:
            break
    return records


def _zoomed_mask(env: SashaWSIEnv, n: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[env.zoomed] = True
    return mask


def privileged_topk_policy():
    """An upper reference no agent can reach: zoom the patches HAFED's level-2 attention weights
    most on the slide's *full high-res* state (every row its true ``v``), computed once per
    slide. Uses what a zoom has not yet read, so it bounds what patch choice alone can give."""
    cache: dict[str, Any] = {"slide": None, "score": None}

    def act(env: SashaWSIEnv, obs: dict) -> int:
        slide = env.slide
        assert slide is not None
        if cache["slide"] is not slide:
            cache["slide"], cache["score"] = slide, mean_attention(env.hafed, slide.v.float())
        legal = env.action_masks()[: slide.n]
        return int(np.argmax(np.where(legal, cache["score"], -np.inf)))

    return act


def full_state_reference(env: SashaWSIEnv, slides: list[tuple[str, str]]) -> dict[str, float]:
    """HAFED on every slide's full high-res state (all rows ``v``): AUC and mean CE."""
    clf = getattr(env.hafed, "level2", env.hafed)
    p, ce, labels = [], [], []
    for sid, _ in slides:
        env.reset(options={"slide_id": sid})
        slide = env.slide
        assert slide is not None
        with torch.inference_mode():
            logp = torch.log_softmax(clf.classify(slide.v.float()).float().reshape(-1), -1)
        p.append(float(logp[-1].exp()))
        ce.append(float(-logp[slide.label]))
        labels.append(slide.label)
    return {"auc": auc_of(p, labels), "ce": float(np.mean(ce)), "slides": len(slides)}


def check_f_independence(wd: Workdir, cfg, slide_ids: list[str], seed: int = 0) -> dict:
    """The state after ``⌈0.1·N⌉`` random zooms is the same in an f = 0.1 and an f = 0.2 env."""
    env1 = make_env(wd, "test", 0.1, cfg, max_patches="cohort")
    env2 = make_env(wd, "test", 0.2, cfg, max_patches="cohort")
    worst = 0.0
    for sid in slide_ids:
        env1.reset(options={"slide_id": sid})
        env2.reset(options={"slide_id": sid})
        rng = np.random.default_rng(seed)
        for _ in range(env1.budget):
            a = int(rng.choice(np.flatnonzero(env1.action_masks())))
            env1.step(a)
            env2.step(a)
        worst = max(worst, float(np.abs(env1.state() - env2.state()).max()))
        worst = max(worst, float(np.abs(env1.probabilities - env2.probabilities).max()))
    return {"slides": len(slide_ids), "max_abs_diff": worst, "identical": worst == 0.0}


def run_drift(args: argparse.Namespace) -> int:
    wd = Workdir(args.workdir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = agents_config(wd)
    torch.set_num_threads(1)
    slides = split_ids(wd, args.splits)
    if not slides:
        raise SystemExit(f"no slide of splits {args.splits} in {wd.manifest}")
    store = FeatureStore(wd.store)
    tumour = tumour_patches(wd, store, [s for s, _ in slides])
    env = SashaWSIEnv(wd.root, split=None, frac=0.2, reward=cfg.reward, max_patches="cohort")
    probe = StateProbe(env)
    policies: list[tuple[str, Any]] = []
    for f in args.agent_fracs:
        agent = load_agent(wd, f, cfg.algo)
        if agent.projection is not None:
            raise SystemExit("agents with obs_dim (a projection) are not supported here")
        policies.append((f"sasha-{f:g}", agent_policy(agent.policy)))
    policies.append(("greedy_attention", greedy_attention_policy()))
    policies.append(("privileged_topk", privileged_topk_policy()))
    for s in range(args.random_seeds):
        policies.append((f"random-s{s}", random_policy(1000 + s)))
    rows = []
    t0 = time.perf_counter()
    for name, policy in policies:
        for sid, split in slides:
            for rec in drift_episode(env, probe, policy, sid, tumour.get(sid)):
                rows.append({"policy": name, "slide_id": sid, "split": split, **rec})
        print(
            f"[drift] {name}: {len(slides)} slides ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
    fields = sorted(
        {k for r in rows for k in r}, key=lambda k: (k not in _FIRST, _FIRST.get(k, 0), k)
    )
    with open(out / "drift_steps.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    check = check_f_independence(wd, cfg, [s for s, sp in slides if sp == "test"])
    check["hafed_full_state"] = full_state_reference(env, slides)
    (out / "drift_check.json").write_text(json.dumps(check, indent=1))
    summary = summarise_drift(rows)
    with open(out / "drift_summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    md = drift_markdown(summary, len(slides), args.splits)
    (out / "drift_summary.md").write_text(md)
    print(md)
    print(f"f-independence check and HAFED on the full state: {check}")
    return 0


_FIRST = {k: i for i, k in enumerate(["policy", "slide_id", "split", "label", "n_patches", "t"])}


def _group_random(name: str) -> str:
    return "random" if name.startswith("random-s") else name


def summarise_drift(rows: list[dict]) -> list[dict]:
    """Per policy (random seeds pooled for distances, AUC averaged over seeds) and checkpoint."""
    by_ep: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_ep.setdefault((r["policy"], r["slide_id"]), []).append(r)
    out = []
    policies = list(dict.fromkeys(_group_random(p) for p, _ in by_ep))
    for pol in policies:
        runs = sorted({p for p, _ in by_ep if _group_random(p) == pol})
        prev = 0.0
        for c in (0.0, *CHECKPOINTS):
            aucs = {s: [] for s in STATES}
            ces = {s: [] for s in STATES}
            cos_t, rel_t, cos_z, rel_z, hits, n_upd = [], [], [], [], [], []
            for run in runs:
                p = {s: [] for s in STATES}
                labels = []
                for (pp, _sid), ep in by_ep.items():
                    if pp != run:
                        continue
                    n = ep[0]["n_patches"]
                    t = 0 if c == 0 else episode_budget(c, n)
                    t_prev = 0 if prev == 0 else episode_budget(prev, n)
                    rec = ep[min(t, len(ep) - 1)]
                    labels.append(ep[0]["label"])
                    for s in STATES:
                        p[s].append(rec[f"p_{s}"])
                        ces[s].append(rec[f"ce_{s}"])
                    window = [e for e in ep if t_prev < e["t"] <= t]
                    for e in window:
                        n_upd.append(e["n_updated_step"])
                        if e["n_updated_step"]:
                            cos_t.append(e["cos_tsu"])
                            rel_t.append(e["rel_tsu"])
                            cos_z.append(e["cos_z"])
                            rel_z.append(e["rel_z"])
                        if e["tumour_hit"] not in (None, "") and e["label"] == 1:
                            hits.append(int(e["tumour_hit"]))
                for s in STATES:
                    aucs[s].append(auc_of(p[s], labels))
            row: dict[str, Any] = {"policy": pol, "read_frac": c, "runs": len(runs)}
            for s in STATES:
                row[f"auc_{s}"] = float(np.mean(aucs[s]))
                row[f"ce_{s}"] = float(np.mean(ces[s]))
            row["updated_per_zoom"] = _nanmean(n_upd)
            row["cos_tsu"], row["cos_z"] = _nanmean(cos_t), _nanmean(cos_z)
            row["rel_tsu"], row["rel_z"] = _nanmean(rel_t), _nanmean(rel_z)
            row["tumour_hit_pos"] = _nanmean(hits)
            out.append(row)
            prev = c
    return out


def _nanmean(x: list) -> float:
    return float(np.mean(x)) if len(x) else math.nan


def drift_markdown(summary: list[dict], n_slides: int, splits: list[str]) -> str:
    lines = [
        f"Over {n_slides} slides ({'+'.join(splits)}); at step ⌈c·N⌉ of each slide. "
        "Distances: rows the TSU updated in the zooms since the previous c, against their true "
        "v (cos / relative L2), beside their low-res z. Hit: share of those zooms on tumour "
        "(positive slides).",
        "",
        "| policy | c | AUC tsu | AUC oracle | AUC off | CE tsu | CE oracle | CE off "
        "| upd/zoom | cos TSU→v | cos z→v | relL2 TSU | relL2 z | hit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        cells = [r["policy"], f"{r['read_frac']:g}"]
        cells += [_f(r[f"auc_{s}"]) for s in STATES] + [_f(r[f"ce_{s}"]) for s in STATES]
        cells += [
            _f(r["updated_per_zoom"], 2),
            _f(r["cos_tsu"]),
            _f(r["cos_z"]),
            _f(r["rel_tsu"]),
            _f(r["rel_z"]),
            _f(r["tumour_hit_pos"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _f(x: Any, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


# --------------------------------------------------------------------------- train / evaluate
class StartFrom(BaseCallback):
    """Load an exported agent's weights (``policy.pt``) into the policy before the first rollout.

    The policies must have the same architecture and ``max_patches`` (two budgets of one
    workdir do); the optimiser starts fresh.
    """

    def __init__(self, agent_dir: Path) -> None:
        super().__init__()
        self.weights = Path(agent_dir) / "policy.pt"

    def _on_training_start(self) -> None:
        state = torch.load(self.weights, map_location=self.model.device, weights_only=True)
        self.model.policy.load_state_dict(state)

    def _on_step(self) -> bool:
        return True


def evaluate_agent(wd: Workdir, agent_dir: Path, frac: float, cfg) -> dict:
    """Test-split AUC/accuracy/F1 of the agent exported in ``agent_dir`` (argmax actions), and
    how many test slides with a tumour mask had a zoom on tumour."""
    from sasha_env.agents.export import load_policy  # lazy: SB3 policies load only here

    return evaluate_policy(wd, agent_policy(load_policy(agent_dir)), frac, cfg)


def evaluate_policy(wd: Workdir, policy, frac: float, cfg) -> dict:
    """:func:`evaluate_agent` for any zoom policy ``policy(env, obs) -> action``; also each
    test slide's zooms, in order (``zoomed``)."""
    from sasha_env.agents.episodes import run_episodes  # lazy: as above

    env = make_env(wd, "test", frac, cfg)
    ids = [s for s, _ in split_ids(wd, ["test"])]
    eps = run_episodes(env, policy, ids)
    probs = np.stack([e["probabilities"] for e in eps])
    labels = np.array([e["label"] for e in eps])
    m = classification_metrics(probs, labels)
    zoomed = {e["slide_id"]: [int(a) for a in e["zoomed"]] for e in eps}
    found, n_pos, area = tumour_read(wd, [e["slide_id"] for e in eps if e["label"] == 1], zoomed)
    return {
        **m,
        "n_slides": len(ids),
        "tumour_found": found,
        "tumour_slides": n_pos,
        "tumour_area_read": area,
        "p_positive": probs[:, -1].tolist(),
        "labels": labels.tolist(),
        "slide_ids": ids,
        "zoomed": zoomed,
    }


def tumour_read(
    wd: Workdir, positives: list[str], zoomed: dict[str, list[int]]
) -> tuple[int, int, float | None]:
    """``(found, slides, area read)`` over the tumour slides ``positives`` that have a mask:
    how many had a zoom on tumour, how many there are, and the mean share of their tumour
    area the zooms read (``None`` without any)."""
    fractions = tumour_fractions(wd, FeatureStore(wd.store), positives)
    pos = [s for s in positives if s in fractions]
    zooms = [np.array(zoomed[s]) for s in pos]
    found, _ = found_rate(zooms, [fractions[s] > 0 for s in pos])
    area, _ = area_read(zooms, [fractions[s] for s in pos])
    return (round(found * len(pos)) if pos else 0), len(pos), None if math.isnan(area) else area


def run_train(args: argparse.Namespace) -> int:
    wd = Workdir(args.workdir)
    base = agents_config(wd)
    cfg = factor_config(base, args.factor, args.frac)
    seed = workdir_seed(wd) if args.seed is None else args.seed
    meta: dict[str, Any] = {}
    if args.factor == "base":
        agent_dir = wd.agent_dir(agent_config.agent_name(args.frac, base.algo))
        meta = json.loads((agent_dir / "agent.json").read_text())
        trained = meta.get("seed", seed)
        if args.seed is not None and args.seed != trained:
            raise SystemExit(
                f"--factor base evaluates {agent_dir}, trained with seed {trained}: "
                f"drop --seed or pass --seed {trained}"
            )
        seed = trained
    dest = Path(args.out) / args.factor / f"seed-{seed}" / f"sasha-{args.frac:g}"
    dest.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "workdir": str(wd.root),
        "factor": args.factor,
        "frac": args.frac,
        "seed": seed,
    }
    if args.factor == "base":
        info |= {
            "train_seconds": meta.get("train_seconds"),
            "timesteps": meta.get("timesteps"),
            "selected_on_val": meta.get("selected_on_val"),
        }
    else:
        from sasha_env.agents.train import train_agent  # lazy: SB3 training

        callbacks = []
        if args.factor == START_FROM_F01:
            start = wd.agent_dir(agent_config.agent_name(0.1, base.algo))
            callbacks.append(StartFrom(start))
            info["start_from"] = str(start)
        t0 = time.perf_counter()
        model = train_agent(
            wd, args.frac, cfg, seed=seed, out_dir=dest, progress=False, callbacks=callbacks
        )
        meta = json.loads((dest / "agent.json").read_text())
        info |= {
            "train_seconds": round(time.perf_counter() - t0, 1),
            "timesteps": int(model.num_timesteps),
            "selected_on_val": meta.get("selected_on_val"),
        }
        agent_dir = dest
    info["config"] = {
        k: getattr(cfg, k)
        for k in (
            "total_timesteps",
            "equal_episodes",
            "clip_range",
            "gae_lambda",
            "gamma",
            "reward",
        )
    }
    info["test"] = evaluate_agent(wd, agent_dir, args.frac, base)
    (dest / "eval.json").write_text(json.dumps(info, indent=1))
    t = info["test"]
    print(
        f"{args.factor} f={args.frac:g} seed={seed}: test AUC {t['auc']:.3f} "
        f"acc {t['accuracy']:.3f} ({t['n_slides']} slides; tumour found on "
        f"{t['tumour_found']} of {t['tumour_slides']}), {info['train_seconds']} s"
    )
    return 0


def run_table(args: argparse.Namespace) -> int:
    """One row per (workdir, f, factor): each training seed's test AUC and accuracy, and the
    AUC difference from the workdir's own agent (``base``) at that f."""
    evals = [json.loads(p.read_text()) for d in args.folders for p in Path(d).rglob("eval.json")]
    if not evals:
        raise SystemExit(f"no eval.json under {args.folders}")
    base = {(e["workdir"], e["frac"]): e["test"]["auc"] for e in evals if e["factor"] == "base"}
    groups: dict[tuple[str, float, str], list[dict]] = {}
    for e in evals:
        groups.setdefault((e["workdir"], e["frac"], e["factor"]), []).append(e)
    lines = [
        "| workdir | f | factor | test slides | seeds | AUC per seed | accuracy per seed "
        "| ΔAUC vs base | tumour area read per seed | steps | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {f: i for i, f in enumerate(FACTORS)}
    for (wd, frac, factor), es in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 99))
    ):
        es = sorted(es, key=lambda e: e["seed"] or 0)
        aucs = [e["test"]["auc"] for e in es]
        accs = [e["test"]["accuracy"] for e in es]
        b = base.get((wd, frac))
        diff = "–" if factor == "base" or b is None else _ms([a - b for a in aucs], signed=True)
        lines.append(
            f"| {Path(wd).name} | {frac:g} | {factor} | {es[0]['test']['n_slides']} "
            f"| {', '.join(str(e['seed']) for e in es)} "
            f"| {', '.join(f'{a:.3f}' for a in aucs)} "
            f"| {', '.join(f'{a:.3f}' for a in accs)} | {diff} "
            f"| {', '.join(_area(e) for e in es)} "
            f"| {int(np.mean([e['timesteps'] for e in es]))} "
            f"| {np.mean([e['train_seconds'] or 0 for e in es]):.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    return 0


def _area(e: dict) -> str:
    """An ``eval.json``'s tumour area read, computed from its zooms when it predates the key."""
    t = e["test"]
    if "tumour_area_read" not in t:
        if "zoomed" not in t or not Path(e["workdir"]).is_dir():
            return "–"  # an eval.json from before the zooms were kept, or its workdir is gone
        pos = [s for s, y in zip(t["slide_ids"], t["labels"], strict=True) if y == 1]
        t["tumour_area_read"] = tumour_read(Workdir(e["workdir"]), pos, t["zoomed"])[2]
    return "–" if t["tumour_area_read"] is None else f"{t['tumour_area_read']:.2f}"


def _ms(x: list[float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if len(x) == 1:
        return fmt.format(x[0])
    return f"{fmt.format(np.mean(x))} ± {np.std(x, ddof=1):.3f}"


# --------------------------------------------------------------------------- nested readings
#: The readings of ``nested``, in table order: name -> its budget f (built in
#: :func:`nested_readings`).
NESTED = {
    "sasha-0.1": 0.1,
    "sasha-0.2": 0.2,
    "0.1-then-0.2": 0.2,
    "0.1-run-on": 0.2,
    "0.1-then-greedy": 0.2,
}


def continue_after(first, then, frac: float):
    """A zoom policy that acts as ``first`` for the episode's first ``⌈frac·N⌉`` zooms and as
    ``then`` afterwards (N: the slide's patches), so a longer episode reads everything the
    ``frac`` reading of ``first`` does, in the same order, before it goes on."""

    def act(env: SashaWSIEnv, obs: dict) -> int:
        head = episode_budget(frac, env.slide.n)
        return first(env, obs) if len(env.zoomed) < head else then(env, obs)

    return act


def replay(zooms: dict[str, list[int]]):
    """A zoom policy that repeats recorded zooms: slide id -> patches in order."""

    def act(env: SashaWSIEnv, obs: dict) -> int:
        return zooms[env.slide.slide_id][len(env.zoomed)]

    return act


def nested_readings(wd: Workdir, cfg, zooms: dict[str, dict] | None = None) -> dict[str, dict]:
    """Test-split :func:`evaluate_policy` of each reading in :data:`NESTED` on one workdir;
    with ``zooms`` (reading -> a ``nested.json`` entry of the same slides) each reading
    repeats those zooms instead, on this workdir's HAFED and TSU."""
    from sasha_env.agents.export import load_policy  # lazy: as in evaluate_agent

    if zooms is not None:
        return {
            name: evaluate_policy(wd, replay(zooms[name]["zoomed"]), f, cfg)
            for name, f in NESTED.items()
        }
    agent = {
        f: agent_policy(load_policy(wd.agent_dir(agent_config.agent_name(f, cfg.algo))))
        for f in (0.1, 0.2)
    }
    policies = {
        "sasha-0.1": agent[0.1],
        "sasha-0.2": agent[0.2],
        "0.1-then-0.2": continue_after(agent[0.1], agent[0.2], 0.1),
        "0.1-run-on": agent[0.1],
        "0.1-then-greedy": continue_after(agent[0.1], greedy_attention_policy(), 0.1),
    }
    return {name: evaluate_policy(wd, policies[name], f, cfg) for name, f in NESTED.items()}


def run_nested(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict]] = {}
    recorded = None
    if args.zooms_from:
        recorded = {
            Path(w).name: r for w, r in json.loads(Path(args.zooms_from).read_text()).items()
        }
    for w in args.workdirs:
        wd = Workdir(w)
        if recorded is not None and wd.root.name not in recorded:
            raise SystemExit(f"{args.zooms_from} has no workdir named {wd.root.name!r}")
        zooms = None if recorded is None else recorded[wd.root.name]
        results[str(wd.root)] = nested_readings(wd, agents_config(wd), zooms)
        r = results[str(wd.root)]
        print(f"{wd.root.name}: " + ", ".join(f"{k} {r[k]['auc']:.3f}" for k in NESTED))
    (out / "nested.json").write_text(json.dumps(results, indent=1))
    text = nested_table(results)
    (out / "nested.md").write_text(text)
    print(text)
    return 0


def nested_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: test AUC per workdir and reading, mean ± sd, and paired differences from
    SASHA-0.2 and SASHA-0.1 over the workdirs (mean [95 % t-interval])."""
    names = [Path(w).name for w in results]
    lines = [
        "| reading | f | " + " | ".join(names) + " | mean ± sd | tumours found "
        "| − SASHA-0.2 | − SASHA-0.1 |",
        "|---|---|" + "---|" * len(names) + "---|---|---|---|",
    ]
    auc = {k: [r[k]["auc"] for r in results.values()] for k in NESTED}
    for k in NESTED:
        found = sum(r[k]["tumour_found"] for r in results.values())
        slides = sum(r[k]["tumour_slides"] for r in results.values())
        diffs = []
        for ref in ("sasha-0.2", "sasha-0.1"):
            d = [a - b for a, b in zip(auc[k], auc[ref], strict=True)]
            ci = t_interval(d, bounds=(-1.0, 1.0))
            diffs.append(
                "–"
                if k == ref
                else f"{np.mean(d):+.3f}" + ("" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]")
            )
        lines.append(
            f"| {k} | {NESTED[k]:g} | "
            + " | ".join(f"{a:.3f}" for a in auc[k])
            + f" | {_ms(auc[k])} "
            f"| {found} of {slides} | {diffs[0]} | {diffs[1]} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (python -m pydoc experiments/f02_factors.py) for outputs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drift", help="state drift and HAFED's view of it over an episode")
    d.add_argument("--workdir", required=True, help="a finished pipeline workdir (read only)")
    d.add_argument("--out", required=True, help="folder for drift_*.csv/.md/.json")
    d.add_argument("--splits", nargs="+", default=["val", "test"])
    d.add_argument(
        "--agent-fracs",
        nargs="+",
        type=float,
        default=[0.1, 0.2],
        help="the workdir's trained agents to run (each for ⌈0.2·N⌉ zooms)",
    )
    d.add_argument("--random-seeds", type=int, default=3)
    t = sub.add_parser("train", help="retrain one agent with one factor changed; evaluate on test")
    t.add_argument("--workdir", required=True, help="a finished pipeline workdir (read only)")
    t.add_argument("--out", required=True, help="folder for <factor>/seed-<s>/sasha-<f>/")
    t.add_argument("--frac", type=float, required=True)
    t.add_argument("--factor", choices=FACTORS, required=True)
    t.add_argument(
        "--seed",
        type=int,
        default=None,
        help="training seed (default: the workdir's seed; base: the seed its agent was "
        "trained with, and another --seed is an error)",
    )
    n = sub.add_parser(
        "nested", help="f = 0.2 read as a continuation of the f = 0.1 reading (no training)"
    )
    n.add_argument("--workdirs", nargs="+", required=True, help="finished workdirs (read only)")
    n.add_argument("--out", required=True, help="folder for nested.json and nested.md")
    n.add_argument(
        "--zooms-from",
        help="an earlier nested.json: repeat its readings' zooms (matched by workdir folder "
        "name) on these workdirs' HAFED and TSU instead of running the agents",
    )
    tb = sub.add_parser("table", help="Markdown table of the eval.json files under FOLDERS")
    tb.add_argument("folders", nargs="+")
    tb.add_argument("--md", help="also write the table here")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()  # run_drift measures on one thread; an in-process caller
    try:  # (the tests) keeps its own count
        return {"drift": run_drift, "train": run_train, "nested": run_nested, "table": run_table}[
            args.cmd
        ](args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
