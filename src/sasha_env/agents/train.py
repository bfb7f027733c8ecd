"""Training SB3 agents on ``Sasha-WSI-v0``, one per zoom budget f.

The default agent is sb3-contrib's ``MaskablePPO`` with the SASHA actor-critic
(:class:`sasha_models.policy.SashaActorCriticPolicy`); ``ppo``, ``a2c`` and ``dqn`` (SB3,
``MultiInputPolicy``-style) are there for the algorithm benchmark. How to train is
:class:`~sasha_env.agents.config.AgentConfig`; the environments come from
:mod:`~sasha_env.agents.envs` and the callbacks from :mod:`~sasha_env.agents.callbacks`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from sb3_contrib import MaskablePPO
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback

from sasha_models.policy import SashaActorCriticPolicy, SashaPPOPolicy
from sasha_models.ppo_config import CosineLR, PPOConfig
from sasha_models.projection import ObsProjection

from ..atomic import replace_atomically, write_json
from ..envs.wsi import SashaWSIEnv
from ..workdir import Workdir
from .buffers import RowPoolMaskableRolloutBuffer, RowPoolRolloutBuffer
from .callbacks import EpisodeLog, FlushLog, ValSelection
from .config import AgentConfig, agent_name, steps_for
from .envs import EnvSource, env_projection, make_env, training_env, workdir_projection
from .export import POLICY_WEIGHTS, export_policy
from .logs import define_step_metric, sb3_logger
from .protocol import SlideOrderedPPO

__all__ = ["train_agent"]


def dqn_learning_starts(total_timesteps: int) -> int:
    """DQN's default ``learning_starts``: 500 steps, but at most a tenth of the budget, so that a
    short run still updates (SB3's 100 and the Zoo's 500 both exceed a few-hundred-step run)."""
    return max(1, min(500, total_timesteps // 10))


def _algorithm(
    cfg: AgentConfig,
    env,
    seed: int,
    device: str | torch.device,
    frac: float,
    projection: ObsProjection | None = None,
    total_timesteps: int | None = None,
):
    cfg = cfg.resolved()
    policy_kwargs: dict[str, Any] = {"d_hidden": cfg.d_hidden}
    if cfg.algo == "ppo_unmasked":
        policy_kwargs["mask_actions"] = False
    if not cfg.use_coords:
        policy_kwargs["use_coords"] = False
    # our network, masked update and one optimiser are the policy's defaults: named only when
    # they differ, so that an agent trained before these options existed is described as before
    if cfg.policy_arch != "sasha":
        policy_kwargs["arch"] = cfg.policy_arch
    if not cfg.masked_update:
        policy_kwargs["masked_update"] = False
    if cfg.two_optimizers:
        policy_kwargs["two_optimizers"] = True
    if cfg.time_aware_critic:
        policy_kwargs["time_aware_critic"] = True
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
        ppo = dataclasses.replace(PPOConfig.paper(frac), cosine=cfg.lr_schedule == "cosine")
        if cfg.learning_rate is not None:
            ppo = dataclasses.replace(ppo, learning_rate=cfg.learning_rate)
        kwargs = ppo.to_sb3_kwargs(
            episode_len=1, policy_kwargs=policy_kwargs
        )  # n_steps is re-sized to each slide's block before every rollout
        kwargs |= {"seed": seed, "device": device, "verbose": 0, **buffer, **cfg.extra}
        return SlideOrderedPPO(SashaActorCriticPolicy, env, **kwargs)
    lr = 3e-4 if cfg.learning_rate is None else cfg.learning_rate
    common = {
        "learning_rate": CosineLR(lr) if cfg.lr_schedule == "cosine" else lr,
        "gamma": cfg.gamma,
        "seed": seed,
        "device": device,
        "verbose": 0,
    }
    if cfg.algo in ("maskable_ppo", "ppo", "ppo_unmasked"):
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
    starts = dqn_learning_starts(total_timesteps or cfg.total_timesteps)
    kwargs = {
        **common,
        "buffer_size": 20_000,
        "learning_starts": starts,
        "batch_size": cfg.batch_size,
    }
    kwargs = {**kwargs, **cfg.extra}
    total = total_timesteps or cfg.total_timesteps
    if kwargs["learning_starts"] >= total:
        raise ValueError(
            f"dqn's learning_starts ({kwargs['learning_starts']}) is not below the budget of "
            f"{total} steps, so it would never update: lower agents.extra.learning_starts"
        )
    return DQN("MultiInputPolicy", env, **kwargs)


def _stop_cost(vec_env: Any) -> float | None:
    """The zoom cost of a vector env of ours with the stop action, else ``None``."""
    slots = int(vec_env.observation_space["features"].shape[0])
    if int(vec_env.action_space.n) != slots + 1:
        return None
    try:
        return float(vec_env.get_attr("zoom_cost")[0])
    except AttributeError:  # someone else's env with a stop action
        return None


def _warm_start(
    model: BaseAlgorithm,
    wd: Workdir | None,
    frac: float,
    cfg: AgentConfig,
    projection: ObsProjection | None,
    seed: int,
    learned_stop: bool,
) -> dict:
    """``agents.warm_start``: fit the model's policy to the heuristic's zooms on the training
    slides (:mod:`.warm_start`); returns what ``agent.json`` records of it."""
    from .warm_start import clone_policy, collect_demonstrations, heuristic

    if wd is None:
        raise ValueError("agents.warm_start needs a workdir (its train split is demonstrated)")
    if learned_stop:
        raise ValueError("agents.warm_start is for fixed-budget agents, not a learned stop")
    t0 = time.perf_counter()
    env = make_env(wd, "train", frac, cfg, obs_projection=projection)
    try:
        demos = collect_demonstrations(
            env, heuristic(cfg.warm_start), list(env.slide_ids), cfg.gamma
        )
    finally:
        env.close()
    history = clone_policy(
        model.policy,
        demos,
        cfg.warm_start_epochs,
        cfg.batch_size,
        seed,
        learning_rate=cfg.warm_start_lr,
    )
    return {
        "heuristic": cfg.warm_start,
        "steps": len(demos),
        "epochs": cfg.warm_start_epochs,
        "first_epoch": history[0],
        "last_epoch": history[-1],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def train_agent(
    env: EnvSource,
    frac: float | None = None,
    cfg: AgentConfig | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    wandb: dict | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    callbacks: Sequence[BaseCallback] = (),
    eval_env: SashaWSIEnv | None = None,
    *,
    wandb_run: Any = None,
    run_config: Mapping[str, Any] | None = None,
    val_slides: Sequence[str] | None = None,
    learned_stop: bool = False,
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
        wandb: ``wandb.init`` keyword arguments (offline by default), or ``None``: a W&B run
            per agent, finished when training ends.
        progress: show a progress bar.
        device: torch device of the policy and, for a workdir's ``SashaVecEnv``
            (``agents.vec_env: sasha``), of the environments' states and models; single
            environments (``DummyVecEnv``, the paper protocol) step on the CPU.
        callbacks: further SB3 callbacks, called after ours.
        eval_env: an env over validation slides for ``cfg.val_every`` (default: the workdir's
            val split, with the same ``max_patches``).
        wandb_run: an open W&B run to log into instead (a sweep trial's); left open.
        run_config: more entries for the W&B run config (the stage passes the whole resolved
            pipeline config); the run config always holds ``agents`` (every field of ``cfg``),
            ``frac``, ``seed`` and ``algo``.
        val_slides: the slides of ``eval_env`` that validation selects on (default: all).
        learned_stop: train a learned-stop agent (``agents.stop: learned``): the workdir's
            environments get the always-legal stop action and ``cfg.zoom_cost`` per zoom,
            ``frac`` is the cap, and a workdir's default folder is ``agents/<algo>-<f>-stop/``.
            Given environments are used as they are (build them with ``stop_action=True``).

    Logs: SB3's logger writes ``out_dir/progress.csv`` (``rollout/ep_rew_mean``,
    ``rollout/ep_len_mean``, ``time/fps``, the algorithm's ``train/*`` keys, ``val/auc``,
    ``val/f1``, ``val/score``... at each validation) and, with W&B, the same keys to the run
    (x-axis ``global_step``, see :mod:`~sasha_env.agents.logs`), plus one row per finished
    episode (``episode/return``, ``episode/correct``).

    Writes ``out_dir/policy.pt`` + ``policy.json`` (the weights-only export that evaluation and
    ``predict`` read, see :mod:`~sasha_env.agents.export`), ``out_dir/agent.zip`` (SB3 format,
    for resuming training with SB3's own ``MaskablePPO.load``: it unpickles, so trusted input
    only), ``out_dir/episodes.csv`` (the learning curve), ``out_dir/val_curve.csv`` (with
    validation) and ``out_dir/agent.json`` (config, seconds, the kept validation point).
    """
    cfg = (cfg or AgentConfig()).resolved()
    projection = None
    if cfg.obs_dim is not None and isinstance(env, (Workdir, str, os.PathLike)):
        projection = workdir_projection(
            env if isinstance(env, Workdir) else Workdir(env), cfg.obs_dim
        )
    vec_env, frac, wd, schedule = training_env(
        env, frac, cfg, seed, projection, learned_stop, device
    )
    projection = projection or env_projection(vec_env)
    stop_cost = _stop_cost(vec_env)
    if out_dir is None and wd is not None:
        out_dir = wd.agent_dir(agent_name(frac, cfg.algo, learned_stop))
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    total = cfg.epochs * schedule.steps_per_epoch() if schedule else steps_for(cfg, frac)
    config = {
        **dict(run_config or {}),
        "agents": asdict(cfg),
        "frac": frac,
        "seed": seed,
        "algo": cfg.algo,
        **({"learned_stop": True} if learned_stop else {}),
    }
    own_run = wandb_run is None and wandb is not None
    if own_run:
        import wandb as wandb_lib  # lazy: W&B, only when a run logs to it

        kw = {"mode": "offline", "project": "sasha", **(wandb or {})}
        wandb_run = wandb_lib.init(
            name=out.name if out else agent_name(frac, cfg.algo, learned_stop),
            dir=None if out is None else str(out),
            config=config,
            reinit=True,
            **kw,
        )
    elif wandb_run is not None:
        wandb_run.config.update(config, allow_val_change=True)
    if wandb_run is not None:
        define_step_metric(wandb_run)
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    t0 = time.perf_counter()
    selection = None
    logger = None
    warm: dict | None = None
    try:
        model = _algorithm(cfg, vec_env, seed, device, frac, projection, total)
        if projection is not None:  # the exported policy carries it (evaluation, predict)
            model.policy.net.set_projection(projection)
        if cfg.warm_start != "none":
            warm = _warm_start(model, wd, frac, cfg, projection, seed, learned_stop)
        logger = sb3_logger(
            out,
            wandb_run,
            verbose=bool(cfg.extra.get("verbose")),
            tensorboard=cfg.extra.get("tensorboard_log"),
        )
        model.set_logger(logger)
        name = out.name if out else agent_name(frac, cfg.algo, learned_stop)
        episodes = None if out is None else out / "episodes.csv"
        chain: list[BaseCallback] = [EpisodeLog(episodes, wandb_run, progress, total, name)]
        if cfg.val_every:
            if eval_env is None:
                if wd is None:
                    raise ValueError("agents.val_every needs validation slides: pass eval_env")
                eval_env = make_env(
                    wd, "val", frac, cfg, obs_projection=projection, learned_stop=learned_stop
                )
            # under the paper protocol a rollout is one slide's block: validate per epoch
            every = cfg.val_every * (len(schedule.slide_ids) if schedule else 1)
            start = int(cfg.val_start * total)
            selection = ValSelection(eval_env, every, out, val_slides, start, keep=cfg.keep)
            chain.append(selection)
        # SB3's A2C dumps its log every 100 rollouts by default: every rollout here, as PPO
        log_interval = 4 if cfg.algo == "dqn" else 1  # DQN: every 4 episodes (SB3's default)
        model.learn(
            total_timesteps=total,
            callback=[*chain, FlushLog(), *callbacks],
            log_interval=log_interval,
        )
    finally:
        torch.set_num_threads(threads)
        if wd is not None:  # environments we built; the caller's stay open (SB3's idiom)
            vec_env.close()
        if logger is not None:
            logger.close()
        if own_run:
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
    if stop_cost is not None:
        meta["learned_stop"] = {"zoom_cost": stop_cost}
    if selection is not None:
        meta["selected_on_val"] = selection.best
    if warm is not None:
        meta["warm_start"] = warm
    write_json(out / "agent.json", meta)
    return model
