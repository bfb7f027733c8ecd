"""Training SB3 agents on ``Sasha-WSI-v0``, one per zoom budget f, and loading them back.

The default agent is sb3-contrib's ``MaskablePPO`` with the SASHA actor-critic
(:class:`sasha_models.policy.SashaActorCriticPolicy`); ``ppo``, ``a2c`` and ``dqn`` (SB3,
``MultiInputPolicy``-style) are there for the algorithm benchmark.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecEnv

from sasha_models.projection import ObsProjection, fit_obs_projection

from ..atomic import PartialCSV, replace_atomically, write_json
from ..config import dataclass_from_dict
from ..envs.wsi import SashaWSIEnv
from ..workdir import Workdir
from .export import POLICY_WEIGHTS, export_policy
from .selection import ValSelection

__all__ = [
    "AgentConfig",
    "ALGORITHMS",
    "agent_name",
    "make_env",
    "train_agent",
]

ALGORITHMS = ("maskable_ppo", "ppo", "a2c", "dqn")
PROTOCOLS = ("sb3", "paper")


@dataclass
class AgentConfig:
    """How agents are trained (config section ``agents``)."""

    fracs: tuple[float, ...] = (0.1, 0.2)
    """Zoom budgets f: one agent per f, episodes of ⌈f·N⌉ zooms."""
    curve_fracs: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    """Budgets at which ``random`` and ``attention_topk`` are also evaluated, for the curve of
    AUC against reading budget (SASHA is evaluated at ``fracs``)."""
    algo: str = "maskable_ppo"
    protocol: str = "sb3"
    """``sb3``: ``n_envs`` envs drawing random slides for ``total_timesteps`` steps, with the
    optimiser settings below. ``paper``: SASHA's official protocol
    (:mod:`~sasha_env.agents.protocol`, ``maskable_ppo`` only): every update on whole episodes
    of one slide, each training slide ``episodes_per_slide`` times per epoch, ``epochs``
    epochs, and the official optimiser for f (:meth:`sasha_models.ppo_config.PPOConfig.paper`);
    ``total_timesteps``, ``n_envs``, ``n_steps``, ``batch_size``, ``n_epochs``, ``gamma``,
    ``gae_lambda``, ``clip_range`` and ``ent_coef`` are then not used (``extra`` still
    overrides any SB3 argument)."""
    epochs: int = 25
    """``protocol: paper``: passes over the training slides (official: 25)."""
    episodes_per_slide: int = 2
    """``protocol: paper``: episodes of one slide per update (official: 2)."""
    total_timesteps: int = 20_000
    equal_episodes: bool = False
    """``protocol: sb3``: ``total_timesteps`` is the budget of the smallest f in ``fracs`` and
    scales with f, so that every budget trains on about the same number of episodes (a fixed
    step budget gives f = 0.2 half the episodes of f = 0.1)."""
    n_envs: int = 4
    vec_env: str = "dummy"
    """``dummy`` (one process) or ``subproc`` (a process per env)."""
    reward: str = "ce"
    correct_bonus: float = 0.0
    learning_rate: float | None = None
    """``None``: the protocol's own — 3e-4 constant (``sb3``), the official 1e-5 with a cosine
    decay to 0 (``paper``). A number replaces the constant, or the cosine's peak."""
    n_steps: int = 64
    """Steps per env per rollout (PPO/A2C)."""
    batch_size: int = 64
    n_epochs: int = 4
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    d_hidden: int = 128
    use_coords: bool = True
    """Feed each patch's grid position to the SASHA policy (the official agent sees the state
    only); see the README's ablation."""
    obs_dim: int | None = None
    """The agent reads a ``obs_dim``-column PCA projection of the state, fitted on the training
    slides' low-res and distilled rows and kept in the exported policy
    (:mod:`sasha_models.projection`); ``None``: the state itself. For real N and d: the PPO
    update and the rollout buffer shrink by ``d / obs_dim``. Not with ``dqn``."""
    row_pool: bool = True
    """SASHA policies with ``maskable_ppo``/``ppo``/``a2c``: the rollout buffer keeps each
    distinct patch row once and PPO's update runs the policy's per-row layers once per distinct
    row of a mini-batch (:mod:`~sasha_env.agents.buffers`). The same update up to float
    rounding, several times faster and smaller at real N; ``false``: SB3's own buffer."""
    cpu_threads: int | None = 1
    """torch threads while training; the policy's small matrices run fastest on one."""
    random_seeds: int = 5
    """Seeds the ``random`` baseline is averaged over."""
    val_every: int = 0
    """Validate the argmax policy on the val split every this many rollouts (epochs under
    ``protocol: paper``) and keep the best
    by the official criterion ``(2 − AUC − F1) + CE`` (:mod:`~sasha_env.agents.selection`);
    0 keeps the last policy."""
    extra: dict = field(default_factory=dict)
    """Further keyword arguments for the SB3 algorithm."""

    @classmethod
    def from_dict(cls, d: dict | None) -> AgentConfig:
        cfg = dataclass_from_dict(cls, d, "agents")
        if cfg.algo not in ALGORITHMS:
            raise ValueError(f"agents.algo {cfg.algo!r}: choose one of {', '.join(ALGORITHMS)}")
        if cfg.protocol not in PROTOCOLS:
            raise ValueError(
                f"agents.protocol {cfg.protocol!r}: choose one of {', '.join(PROTOCOLS)}"
            )
        if cfg.obs_dim is not None and cfg.algo == "dqn":
            raise ValueError(
                "agents.obs_dim needs a SASHA policy (maskable_ppo, ppo, a2c), which keeps the "
                "projection; dqn's policy cannot"
            )
        if cfg.protocol == "paper" and cfg.algo != "maskable_ppo":
            raise ValueError(
                f"agents.protocol 'paper' trains maskable_ppo only, not {cfg.algo!r}; use "
                "protocol 'sb3' for the algorithm benchmark"
            )
        return cfg


def steps_for(cfg: AgentConfig, frac: float) -> int:
    """Environment steps of an ``sb3``-protocol agent at budget ``frac`` (see ``equal_episodes``)."""
    if not cfg.equal_episodes:
        return cfg.total_timesteps
    return int(round(cfg.total_timesteps * frac / min(cfg.fracs)))


def agent_name(frac: float, algo: str = "maskable_ppo") -> str:
    """Folder name of an agent: ``sasha-0.1`` for the default algorithm, else ``ppo-0.1``..."""
    prefix = "sasha" if algo == "maskable_ppo" else algo
    return f"{prefix}-{frac:g}"


def make_env(wd: Workdir, split: str, frac: float, cfg: AgentConfig, **kw: Any) -> SashaWSIEnv:
    return SashaWSIEnv(
        wd.root,
        split=split,
        frac=frac,
        reward=cfg.reward,
        correct_bonus=cfg.correct_bonus,
        max_patches=kw.pop("max_patches", "cohort"),  # one agent serves every split
        **kw,
    )


def workdir_projection(
    wd: Workdir, k: int, max_rows: int = 100_000, seed: int = 0
) -> ObsProjection:
    """The PCA projection of ``agents.obs_dim``: fitted on the rows a state holds (low-res z
    and distilled v) of the workdir's training slides, at most ``max_rows`` of them."""
    from ..features.store import FeatureStore
    from ..slides.manifest import read_manifest

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


def _env_projection(env: Any) -> ObsProjection | None:
    """The observation projection of a (vector) environment of ours, if it has one."""
    if isinstance(env, VecEnv):
        try:
            return env.get_attr("obs_projection")[0]
        except AttributeError:
            return None
    return getattr(getattr(env, "unwrapped", env), "obs_projection", None)


def _algorithm(
    cfg: AgentConfig,
    env,
    seed: int,
    device: str,
    frac: float,
    projection: ObsProjection | None = None,
):
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import A2C, DQN, PPO

    from sasha_models.policy import SashaActorCriticPolicy, SashaPPOPolicy
    from sasha_models.ppo_config import PPOConfig

    from .buffers import RowPoolMaskableRolloutBuffer, RowPoolRolloutBuffer
    from .protocol import SlideOrderedPPO

    policy_kwargs: dict[str, Any] = {"d_hidden": cfg.d_hidden}
    if not cfg.use_coords:
        policy_kwargs["use_coords"] = False
    if projection is not None:
        if cfg.algo == "dqn":
            raise ValueError("observations with obs_projection need a SASHA policy, not dqn's")
        policy_kwargs["project_from"] = projection.d_in
    buffer: dict[str, Any] = {}
    if cfg.row_pool and cfg.algo != "dqn":
        buffer["rollout_buffer_class"] = (
            RowPoolMaskableRolloutBuffer if cfg.algo == "maskable_ppo" else RowPoolRolloutBuffer
        )
    if cfg.protocol == "paper":
        ppo = PPOConfig.paper(frac)
        if cfg.learning_rate is not None:
            ppo = dataclasses.replace(ppo, learning_rate=cfg.learning_rate)
        kwargs = ppo.to_sb3_kwargs(
            episode_len=1, policy_kwargs=policy_kwargs
        )  # n_steps is re-sized to each slide's block before every rollout
        kwargs |= {"seed": seed, "device": device, "verbose": 0, **buffer, **cfg.extra}
        return SlideOrderedPPO(SashaActorCriticPolicy, env, **kwargs)
    common = {
        "learning_rate": 3e-4 if cfg.learning_rate is None else cfg.learning_rate,
        "gamma": cfg.gamma,
        "seed": seed,
        "device": device,
        "verbose": 0,
    }
    if cfg.algo in ("maskable_ppo", "ppo"):
        kwargs = {
            **common,
            "n_steps": cfg.n_steps,
            "batch_size": cfg.batch_size,
            "n_epochs": cfg.n_epochs,
            "gae_lambda": cfg.gae_lambda,
            "clip_range": cfg.clip_range,
            "ent_coef": cfg.ent_coef,
            "policy_kwargs": policy_kwargs,
            **buffer,
            **cfg.extra,
        }
        if cfg.algo == "maskable_ppo":
            return MaskablePPO(SashaActorCriticPolicy, env, **kwargs)
        return PPO(SashaPPOPolicy, env, **kwargs)
    if cfg.algo == "a2c":
        kwargs = {
            **common,
            "n_steps": cfg.n_steps,
            "gae_lambda": cfg.gae_lambda,
            "ent_coef": cfg.ent_coef,
        }
        kwargs = {**kwargs, "policy_kwargs": policy_kwargs, **buffer, **cfg.extra}
        return A2C(SashaPPOPolicy, env, **kwargs)
    # DQN has no masks: it learns from the illegal-action penalty (see the env's docstring).
    # Its replay buffer keeps two observations per transition (about 1 MB on the demo cohort):
    # 20,000 transitions can touch ~20 GB; lower it with agents.extra.buffer_size.
    kwargs = {**common, "buffer_size": 20_000, "learning_starts": 500, "batch_size": cfg.batch_size}
    return DQN("MultiInputPolicy", env, **{**kwargs, **cfg.extra})


class EpisodeLog(BaseCallback):
    """SB3 callback: one CSV row per finished episode (the learning curve), W&B if given.

    Args:
        path: the CSV (written under a temporary name, renamed when training ends), or
            ``None`` for no file.
        wandb_run: a W&B run to log ``episode/return`` and ``episode/correct`` to.
        progress: show a progress bar of ``total`` steps named ``name``.
    """

    def __init__(
        self,
        path: Path | None,
        wandb_run: Any = None,
        progress: bool = True,
        total: int = 0,
        name: str = "agent",
    ):
        super().__init__()
        self.path, self.wandb_run, self.progress, self.total = path, wandb_run, progress, total
        self.name = name

    def _on_training_start(self) -> None:
        self.csv = None
        if self.path is not None:
            header = ["timestep", "episode_return", "correct", "slide_id", "wall_s"]
            self.csv = PartialCSV(self.path, header)
        self.returns = np.zeros(self.training_env.num_envs)
        self.t0 = time.perf_counter()
        self.bar = None
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.name, unit="step")

    def _on_step(self) -> bool:
        self.returns += self.locals["rewards"]
        for i, done in enumerate(self.locals["dones"]):
            if not done:
                continue
            info = self.locals["infos"][i]
            ret, correct = float(self.returns[i]), int(bool(info.get("correct")))
            wall = round(time.perf_counter() - self.t0, 2)
            if self.csv is not None:
                self.csv.write([self.num_timesteps, ret, correct, info.get("slide_id"), wall])
            if self.wandb_run is not None:
                self.wandb_run.log(
                    {"episode/return": ret, "episode/correct": correct}, step=self.num_timesteps
                )
            self.returns[i] = 0.0
        if self.bar is not None:
            self.bar.update(self.training_env.num_envs)
        return True

    def _on_training_end(self) -> None:
        if self.csv is not None:
            self.csv.close()
        if self.bar is not None:
            self.bar.close()


EnvSource = Workdir | str | os.PathLike | gym.Env | Sequence[gym.Env] | VecEnv
"""What :func:`train_agent` trains on: a pipeline workdir (its train split), one or more
Gymnasium environments, or an SB3 ``VecEnv``."""


def _training_env(
    source: EnvSource,
    frac: float | None,
    cfg: AgentConfig,
    seed: int,
    projection: ObsProjection | None = None,
) -> tuple[VecEnv, float, Workdir | None, Any]:
    """``(vec_env, frac, workdir or None, slide schedule or None)`` for :func:`train_agent`;
    only a workdir's environments are built here (and closed after training).

    Environments are wrapped in SB3's ``Monitor`` (episode returns and lengths in
    ``info["episode"]``, so SB3 logs ``rollout/ep_rew_mean``); a ``VecEnv`` is used as given.
    """
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    from .protocol import SlideSchedule

    if isinstance(source, (Workdir, str, os.PathLike)):
        wd = source if isinstance(source, Workdir) else Workdir(source)
        if frac is None:
            raise ValueError("train_agent on a workdir needs frac, the zoom budget")
        if cfg.protocol == "paper":
            train_env = make_env(wd, "train", frac, cfg, copy_obs=False, obs_projection=projection)
            schedule = SlideSchedule(train_env, cfg.episodes_per_slide, seed)
            return DummyVecEnv([lambda: Monitor(schedule)]), frac, wd, schedule

        def factory(rank: int) -> Callable[[], gym.Env]:
            def make() -> gym.Env:
                env = make_env(  # copy_obs=False: the VecEnv copies
                    wd, "train", frac, cfg, copy_obs=False, obs_projection=projection
                )
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
        schedule = SlideSchedule(envs[0], cfg.episodes_per_slide, seed)
        return DummyVecEnv([lambda: Monitor(schedule)]), frac, None, schedule
    return DummyVecEnv([lambda e=e: Monitor(e) for e in envs]), frac, None, None


def _env_frac(env_frac: float | None, frac: float | None) -> float:
    """The zoom budget of user environments; a ``frac`` argument must agree with it."""
    if env_frac is None:
        if frac is None:
            raise ValueError("the environment has no frac attribute: pass frac")
        return float(frac)
    if frac is not None and abs(float(frac) - float(env_frac)) > 1e-12:
        raise ValueError(f"frac={frac} but the environment zooms with frac={env_frac}")
    return float(env_frac)


def _logger(cfg: AgentConfig):
    """SB3 logger: stdout when ``extra.verbose`` asks, SB3's own with ``extra.tensorboard_log``,
    else none (SB3's default makes an empty ``/tmp/SB3-<date>`` folder per run)."""
    from stable_baselines3.common.logger import HumanOutputFormat

    if cfg.extra.get("tensorboard_log"):
        return None
    if cfg.extra.get("verbose"):
        return Logger(None, [HumanOutputFormat(sys.stdout)])
    return Logger(None, [])


def train_agent(
    env: EnvSource,
    frac: float | None = None,
    cfg: AgentConfig | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    wandb: dict | None = None,
    progress: bool = True,
    device: str = "cpu",
    callbacks: Sequence[BaseCallback] = (),
    eval_env: SashaWSIEnv | None = None,
) -> BaseAlgorithm:
    """Train an agent on ``Sasha-WSI-v0`` and return it (an SB3 / sb3-contrib model).

    Args:
        env: a pipeline workdir (the agent trains on its train split), one ``SashaWSIEnv``
            (or a list of them; each wrapped in ``Monitor``), or an SB3 ``VecEnv``.
        frac: zoom budget f; ``None`` takes the env's (required with a workdir).
        cfg: how to train (:class:`AgentConfig`; default ``AgentConfig()``).
        seed: seed of the algorithm, the envs and the slide order.
        out_dir: where to write the agent (below); a workdir's default is
            ``agents/<algo>-<f>/``; with envs and no ``out_dir`` nothing is written.
        wandb: ``wandb.init`` keyword arguments (offline by default), or ``None``.
        progress: show a progress bar.
        device: torch device of the policy.
        callbacks: further SB3 callbacks, called after ours.
        eval_env: an env over validation slides for ``cfg.val_every`` (default: the workdir's
            val split, with the same ``max_patches``).

    Writes ``out_dir/policy.pt`` + ``policy.json`` (the weights-only export that evaluation and
    ``predict`` read, see :mod:`~sasha_env.agents.export`), ``out_dir/agent.zip`` (SB3 format,
    for resuming training with SB3's own ``MaskablePPO.load``: it unpickles, so trusted input
    only), ``out_dir/episodes.csv`` (the learning curve), ``out_dir/val_curve.csv`` (with
    validation) and ``out_dir/agent.json`` (config, seconds, the kept validation point).
    """
    cfg = cfg or AgentConfig()
    projection = None
    if cfg.obs_dim is not None and isinstance(env, (Workdir, str, os.PathLike)):
        projection = workdir_projection(
            env if isinstance(env, Workdir) else Workdir(env), cfg.obs_dim
        )
    vec_env, frac, wd, schedule = _training_env(env, frac, cfg, seed, projection)
    projection = projection or _env_projection(vec_env)
    if out_dir is None and wd is not None:
        out_dir = wd.agent_dir(agent_name(frac, cfg.algo))
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    total = cfg.epochs * schedule.steps_per_epoch() if schedule else steps_for(cfg, frac)
    wandb_run = None
    if wandb is not None:
        import wandb as wandb_lib

        kw = {"mode": "offline", "project": "sasha", **wandb}
        wandb_run = wandb_lib.init(
            name=out.name if out else agent_name(frac, cfg.algo),
            dir=None if out is None else str(out),
            config=asdict(cfg) | {"frac": frac},
            reinit=True,
            **kw,
        )
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    t0 = time.perf_counter()
    selection = None
    try:
        model = _algorithm(cfg, vec_env, seed, device, frac, projection)
        if projection is not None:  # the exported policy carries it (evaluation, predict)
            model.policy.net.set_projection(projection)
        logger = _logger(cfg)
        if logger is not None:
            model.set_logger(logger)
        name = out.name if out else agent_name(frac, cfg.algo)
        episodes = None if out is None else out / "episodes.csv"
        chain: list[BaseCallback] = [EpisodeLog(episodes, wandb_run, progress, total, name)]
        if cfg.val_every:
            if eval_env is None:
                if wd is None:
                    raise ValueError("agents.val_every needs validation slides: pass eval_env")
                eval_env = make_env(wd, "val", frac, cfg, obs_projection=projection)
            # under the paper protocol a rollout is one slide's block: validate per epoch
            every = cfg.val_every * (len(schedule.slide_ids) if schedule else 1)
            chain.append(selection := ValSelection(eval_env, every, out))
        model.learn(total_timesteps=total, callback=[*chain, *callbacks])
    finally:
        torch.set_num_threads(threads)
        if wd is not None:  # environments we built; the caller's stay open (SB3's idiom)
            vec_env.close()
        if wandb_run is not None:
            wandb_run.finish()
    if out is None:
        return model
    replace_atomically(out / "agent.zip", lambda tmp: model.save(tmp))  # SB3 adds a suffix
    export_policy(model, out, cfg.algo)
    meta = {
        "frac": frac,
        "seed": seed,
        "config": asdict(cfg),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "timesteps": int(model.num_timesteps),
        "max_patches": int(model.observation_space["features"].shape[0]),
        "policy": POLICY_WEIGHTS,
    }
    if selection is not None:
        meta["selected_on_val"] = selection.best
    write_json(out / "agent.json", meta)
    return model
