"""Environments for agents, and trained agents with the environment they act in.

:func:`make_env` is the one place an agent's environment is built from a workdir (training,
validation, calibration and evaluation all go through it); :func:`training_env` wraps a
training source (a workdir, Gymnasium environments or an SB3 ``VecEnv``) for
:func:`~sasha_env.agents.train.train_agent`; :func:`workdir_projection` fits the observation
projection of ``agents.obs_dim``. :func:`load_agent` is the one way a trained agent comes back
(calibration, evaluation, ``sasha predict``): its weights-only export
(:mod:`~sasha_env.agents.export`), its zoom budget and the projection its environments apply.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from sasha_models.projection import ObsProjection, fit_obs_projection

from ..envs.vector import SashaVecEnv, UnsupportedOption
from ..envs.wsi import SashaWSIEnv
from ..features.store import FeatureStore
from ..slides.manifest import read_manifest
from ..workdir import Workdir
from .config import AgentConfig, agent_name, member_name
from .export import load_policy
from .protocol import SlideSchedule

__all__ = [
    "Agent",
    "EnvSource",
    "agent_projection",
    "env_options",
    "env_projection",
    "has_agent",
    "load_agent",
    "make_env",
    "training_env",
    "workdir_projection",
]


def env_options(cfg: AgentConfig, learned_stop: bool = False, **kw: Any) -> dict[str, Any]:
    """The :class:`~sasha_env.envs.wsi.SashaWSIEnv` arguments of an agent's environment: the
    config's ``reward`` and ``correct_bonus``, ``max_patches="cohort"`` (the cohort's largest
    slide, so that one agent serves every split) unless ``kw`` names it, with
    ``learned_stop`` the stop action and ``cfg.zoom_cost`` per zoom, and ``kw``."""
    if learned_stop:
        kw = {"stop_action": True, "zoom_cost": cfg.zoom_cost, **kw}
    return {
        "reward": cfg.reward,
        "correct_bonus": cfg.correct_bonus,
        "max_patches": kw.pop("max_patches", "cohort"),
        **kw,
    }


def make_env(
    wd: Workdir,
    split: str | None,
    frac: float,
    cfg: AgentConfig,
    *,
    learned_stop: bool = False,
    **kw: Any,
) -> SashaWSIEnv:
    """An agent's environment over one split of a workdir, at zoom budget ``frac``.

    Args:
        wd: the pipeline workdir (its store, manifest, HAFED and TSU).
        split: ``train``, ``val`` or ``test`` (``None``: every slide).
        frac: zoom budget f: episodes of ⌈f·N⌉ zooms (the cap, with ``learned_stop``).
        cfg: the agents' config (its ``reward`` and ``correct_bonus``; with ``learned_stop``
            its ``zoom_cost``).
        learned_stop: the environment of a learned-stop agent (``agents.stop: learned``): with
            the stop action and ``cfg.zoom_cost`` per zoom.
        kw: further :class:`~sasha_env.envs.wsi.SashaWSIEnv` arguments (``obs_projection``,
            ``copy_obs``...); ``max_patches`` defaults to the cohort's largest slide, so that one
            agent serves every split.
    """
    return SashaWSIEnv(wd.root, split=split, frac=frac, **env_options(cfg, learned_stop, **kw))


def workdir_projection(
    wd: Workdir, k: int, max_rows: int = 100_000, seed: int = 0
) -> ObsProjection:
    """The PCA projection of ``agents.obs_dim``: fitted on the rows a state holds (low-res z
    and distilled v) of the workdir's training slides, at most ``max_rows`` of them."""
    store = FeatureStore(wd.store)
    ids = [r.slide_id for r in read_manifest(wd.manifest).records if r.split == "train"]
    ids = [s for s in ids if s in store]
    if k >= store.feature_dim:
        raise ValueError(
            f"agents.obs_dim = {k} must be smaller than the feature size {store.feature_dim}"
        )
    rng = np.random.default_rng(seed)
    per_array = max(1, max_rows // (2 * max(len(ids), 1)))  # sampled per slide: O(max_rows·d)
    parts = []
    for sid in ids:
        for name in ("lowres", "distilled"):
            rows = store.read(sid, name)
            if len(rows) > per_array:
                rows = rows[np.sort(rng.choice(len(rows), per_array, replace=False))]
            parts.append(rows)
    return fit_obs_projection(np.concatenate(parts), k)


def env_projection(env: Any) -> ObsProjection | None:
    """The observation projection of a (vector) environment of ours, if it has one."""
    if isinstance(env, VecEnv):
        try:
            return env.get_attr("obs_projection")[0]
        except AttributeError:
            return None
    return getattr(getattr(env, "unwrapped", env), "obs_projection", None)


EnvSource = Workdir | str | os.PathLike | gym.Env | Sequence[gym.Env] | VecEnv
"""What :func:`~sasha_env.agents.train.train_agent` trains on: a pipeline workdir (its train
split), one or more Gymnasium environments, or an SB3 ``VecEnv``."""


def training_env(
    source: EnvSource,
    frac: float | None,
    cfg: AgentConfig,
    seed: int,
    projection: ObsProjection | None = None,
    learned_stop: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[VecEnv, float, Workdir | None, SlideSchedule | None]:
    """``(vec_env, frac, workdir or None, slide schedule or None)`` for
    :func:`~sasha_env.agents.train.train_agent`;
    only a workdir's environments are built here (and closed after training), with the stop
    action when ``learned_stop`` (:func:`make_env`).

    A workdir's ``agents.n_envs`` training envs are a
    :class:`~sasha_env.envs.vector.SashaVecEnv` (``agents.vec_env: sasha``, the default; its
    env e seeded with ``seed + e``, as the single envs were; its states and models on
    ``device``) or SB3's ``DummyVecEnv`` /
    ``SubprocVecEnv`` of single envs (``dummy``, ``subproc``, and the fallback when an option
    is not batched). Single environments are wrapped in SB3's ``Monitor`` (episode returns and
    lengths in ``info["episode"]``, so SB3 logs ``rollout/ep_rew_mean``; ``SashaVecEnv`` adds
    the same); a ``VecEnv`` is used as given.
    """
    if isinstance(source, (Workdir, str, os.PathLike)):
        wd = source if isinstance(source, Workdir) else Workdir(source)
        if frac is None:
            raise ValueError("train_agent on a workdir needs frac, the zoom budget")
        env_kw = {"copy_obs": False, "obs_projection": projection, "learned_stop": learned_stop}
        if cfg.protocol == "paper":
            _fixed_length(learned_stop)
            train_env = make_env(wd, "train", frac, cfg, **env_kw)
            schedule = SlideSchedule(train_env, cfg.episodes_per_slide, seed)
            return DummyVecEnv([lambda: Monitor(schedule)]), frac, wd, schedule

        if cfg.vec_env == "sasha":
            try:  # copy_obs=False: SB3 copies what it keeps within the next step
                vec = SashaVecEnv(
                    cfg.n_envs,
                    wd.root,
                    split="train",
                    frac=frac,
                    copy_obs=False,
                    device=device,
                    **env_options(cfg, learned_stop, obs_projection=projection),
                )
            except UnsupportedOption as err:
                warnings.warn(f"{err}; training on SB3's DummyVecEnv instead", stacklevel=2)
            else:
                vec.seed(seed)  # env i draws the slides of a single env reset with seed + i
                return vec, frac, wd, None

        def factory(rank: int) -> Callable[[], gym.Env]:
            def make() -> gym.Env:
                env = make_env(wd, "train", frac, cfg, **env_kw)  # copy_obs=False: VecEnv copies
                env.reset(seed=seed + rank)
                return Monitor(env)

            return make

        vec_cls = SubprocVecEnv if cfg.vec_env == "subproc" else DummyVecEnv
        return vec_cls([factory(i) for i in range(cfg.n_envs)]), frac, wd, None
    if isinstance(source, VecEnv):
        if cfg.protocol == "paper":
            raise ValueError(
                "protocol 'paper' schedules the slides of one environment: pass the env itself "
                "(train_agent(env, ...)), not a VecEnv"
            )
        return source, _env_frac(source.get_attr("frac")[0], frac), None, None
    if learned_stop:
        raise ValueError(
            "learned_stop builds a workdir's environments with the stop action; given "
            "environments are used as they are: build them with stop_action=True instead"
        )
    envs = (
        [source]
        if isinstance(source, gym.Env)
        else list(source)
        if isinstance(source, Sequence)
        else []
    )
    if not envs or not all(isinstance(e, gym.Env) for e in envs):
        raise TypeError(
            "train_agent trains on a workdir, a Gymnasium env, a list of envs or an SB3 VecEnv; "
            f"got {type(source).__name__}"
        )
    frac = _env_frac(getattr(envs[0].unwrapped, "frac", frac), frac)
    if cfg.protocol == "paper":
        if len(envs) != 1:
            raise ValueError(f"protocol 'paper' trains on one environment, got {len(envs)}")
        _fixed_length(bool(getattr(envs[0].unwrapped, "stop_action", False)))
        schedule = SlideSchedule(envs[0], cfg.episodes_per_slide, seed)
        return DummyVecEnv([lambda: Monitor(schedule)]), frac, None, schedule
    return DummyVecEnv([lambda e=e: Monitor(e) for e in envs]), frac, None, None


def _fixed_length(stop_action: bool) -> None:
    """The paper protocol sizes rollouts to whole ⌈f·N⌉-step episodes: no stop action."""
    if stop_action:
        raise ValueError(
            "protocol 'paper' sizes every rollout to whole episodes of ⌈f·N⌉ steps; an "
            "environment with the stop action (learned stopping) ends them earlier: use "
            "protocol 'sb3'"
        )


def _env_frac(env_frac: float | None, frac: float | None) -> float:
    """The zoom budget of user environments; a ``frac`` argument must agree with it."""
    if env_frac is None:
        if frac is None:
            raise ValueError("the environment has no frac attribute: pass frac")
        return float(frac)
    if frac is not None and abs(float(frac) - float(env_frac)) > 1e-12:
        raise ValueError(f"frac={frac} but the environment zooms with frac={env_frac}")
    return float(env_frac)


def agent_projection(agent: Any) -> ObsProjection | None:
    """The observation projection a trained agent reads through (``agents.obs_dim``), if any:
    build the env it acts in with ``obs_projection=`` this."""
    net = getattr(getattr(agent, "policy", agent), "net", None)
    return getattr(net, "projection", None)


@dataclass(frozen=True)
class Agent:
    """A trained agent read back from its weights-only export (:func:`load_agent`)."""

    policy: Any
    """The SB3 policy (SASHA's actor-critic, or DQN's), in eval mode, or the members of an
    ensemble (:class:`~sasha_models.ensemble.PolicyEnsemble`); act with
    :func:`~sasha_env.agents.episodes.agent_policy`."""
    frac: float
    """Its zoom budget f: episodes of ⌈f·N⌉ zooms."""
    algo: str
    """The algorithm that trained it (``maskable_ppo``, ``ppo``, ``a2c``, ``dqn``)."""
    path: Path
    """Its folder, ``WORKDIR/agents/<algo>-<f>/``."""
    projection: ObsProjection | None
    """The observation projection it reads through (``agents.obs_dim``), or ``None``: its
    environments must apply it (:meth:`make_env` does)."""
    learned_stop: bool = False
    """It has the stop action (``agents.stop: learned``): ``frac`` is its cap, and its
    environments must have the stop action too (:meth:`make_env` gives it)."""

    def make_env(self, wd: Workdir, split: str | None, cfg: AgentConfig, **kw: Any) -> SashaWSIEnv:
        """The environment this agent acts in over ``split``: :func:`make_env` at its budget f,
        observing through its projection, with the stop action if it has one."""
        kw.setdefault("learned_stop", self.learned_stop)
        return make_env(wd, split, self.frac, cfg, obs_projection=self.projection, **kw)


def has_agent(
    wd: Workdir, frac: float, algo: str = "maskable_ppo", learned_stop: bool = False
) -> bool:
    """Whether ``wd`` holds a trained agent of ``algo`` at budget ``frac`` (its folder); with
    ``learned_stop``, the learned-stop agent of that cap."""
    return wd.agent_dir(agent_name(frac, algo, learned_stop)).is_dir()


def load_agent(
    wd: Workdir,
    frac: float,
    algo: str = "maskable_ppo",
    device: str = "cpu",
    learned_stop: bool = False,
    ensemble: int = 1,
) -> Agent:
    """The trained agent of ``wd`` at budget ``frac``, from ``agents/<algo>-<f>/`` (with
    ``learned_stop``: the learned-stop agent capped at f, ``agents/<algo>-<f>-stop/``); with
    ``ensemble`` K > 1, that agent and its K − 1 fellow members (``agents/<algo>-<f>-m2/``...)
    acting as one (:class:`~sasha_models.ensemble.PolicyEnsemble`; ``agents.ensemble``).

    Only the weights-only export is read (:func:`~sasha_env.agents.export.load_policy`):
    nothing is unpickled.

    Args:
        wd: the pipeline workdir.
        frac: zoom budget f (the cap of a learned-stop agent).
        algo: the algorithm it was trained with (``agents.algo``).
        device: torch device of the policy.
        learned_stop: load the learned-stop agent (``agents.stop: learned``).
        ensemble: members acting as one (``agents.ensemble``; a learned-stop agent is one).

    Raises:
        FileNotFoundError: no such agent or member (run the agents stage), or a folder without
            an export.
        ValueError: an export that does not describe a known policy, or weights that do not fit,
            or an agent whose stop action is not the one asked for, or members that cannot act
            together.
    """
    path = wd.require(wd.agent_dir(agent_name(frac, algo, learned_stop)), "agents")
    policy = load_policy(path, device)
    if ensemble > 1 and not learned_stop:
        from sasha_models.ensemble import PolicyEnsemble  # lazy: as load_policy's SB3

        members = [
            load_policy(wd.require(wd.agent_dir(member_name(frac, algo, k)), "agents"), device)
            for k in range(1, ensemble)
        ]
        policy = PolicyEnsemble([policy, *members])
    has_stop = int(policy.action_space.n) == int(policy.observation_space["features"].shape[0]) + 1
    if has_stop != learned_stop:
        raise ValueError(
            f"{path} holds an agent {'with' if has_stop else 'without'} the stop action, "
            f"but one {'with' if learned_stop else 'without'} it was asked for"
        )
    return Agent(policy, frac, algo, path, agent_projection(policy), learned_stop)
