"""How agents are trained: the ``agents`` config section, step budgets and folder names.

Pure configuration: nothing here imports stable-baselines3, sb3-contrib or torch, so the
pipeline's config checks and stage plans read it without loading the training code
(:mod:`~sasha_env.agents.train`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import dataclass_from_dict

__all__ = [
    "ALGORITHMS",
    "LR_SCHEDULES",
    "POLICY_ARCHS",
    "PROTOCOLS",
    "STOP_MODES",
    "VEC_ENVS",
    "AgentConfig",
    "agent_name",
    "member_name",
    "member_seed",
    "steps_for",
]

#: ``agents.algo``: sb3-contrib's MaskablePPO (the default, SASHA's), SB3's PPO, A2C and DQN,
#: and ``ppo_unmasked``: SB3's PPO with the SASHA network choosing among *all* indices, so that
#: illegal zooms are learnt only from the env's penalty (the benchmark's no-mask arm).
ALGORITHMS = ("maskable_ppo", "ppo", "a2c", "dqn", "ppo_unmasked")
#: ``agents.protocol`` (see :attr:`AgentConfig.protocol`).
PROTOCOLS = ("sb3", "paper")

#: What training ends with, given validation (``agents.keep``): the best validated policy
#: (the official rule) or the mean of the weights validated from ``val_start`` on.
KEEP_RULES = ("best", "average")

#: ``agents.warm_start``: RL from random weights, or after imitating ``greedy_attention``
#: (:mod:`~sasha_env.agents.warm_start`, which holds the code; kept here free of SB3).
WARM_STARTS = ("none", "greedy_attention")
#: ``agents.policy_arch``: ours or the official actor and critic (:mod:`sasha_models.actor_critic`).
POLICY_ARCHS = ("sasha", "official")
#: ``agents.lr_schedule``.
LR_SCHEDULES = ("constant", "cosine")
#: ``agents.stop`` (see :attr:`AgentConfig.stop`).
STOP_MODES = ("none", "learned")
#: Suffix of a learned-stop agent's folder name (:func:`agent_name`).
STOP_SUFFIX = "-stop"
#: ``agents.vec_env``: our batched vector env (the default), or SB3's vector envs of single envs.
VEC_ENVS = ("sasha", "dummy", "subproc")

#: Each protocol's own values of the options left at ``None`` (:meth:`AgentConfig.resolved`):
#: ``paper`` is the official agent at 6385fe6, ``sb3`` ours.
PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "sb3": {
        "policy_arch": "sasha",
        "masked_update": True,
        "two_optimizers": False,
        "lr_schedule": "constant",
    },
    "paper": {
        "policy_arch": "official",
        "masked_update": False,
        "two_optimizers": True,
        "lr_schedule": "constant",
    },
}


@dataclass
class AgentConfig:
    """How agents are trained (config section ``agents``)."""

    fracs: tuple[float, ...] = (0.1, 0.2)
    """Zoom budgets f: one agent per f, episodes of ⌈f·N⌉ zooms."""
    curve_fracs: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    """Budgets at which the same-harness baselines (``random``, ``attention_topk``,
    ``greedy_attention``, ``lowres_attention_topk``) are also evaluated, for the curve of AUC
    against reading budget (SASHA is evaluated at ``fracs``)."""
    algo: str = "maskable_ppo"
    protocol: str = "sb3"
    """``sb3``: ``n_envs`` envs drawing random slides for ``total_timesteps`` steps, with the
    optimiser settings below. ``paper``: SASHA's official protocol
    (:mod:`~sasha_env.agents.protocol`, ``maskable_ppo`` only): every update on whole episodes
    of one slide, each training slide ``episodes_per_slide`` times per epoch, ``epochs``
    epochs, and the official optimiser for f (:meth:`sasha_models.ppo_config.PPOConfig.paper`);
    ``total_timesteps``, ``n_envs``, ``n_steps``, ``batch_size``, ``n_epochs``, ``gamma``,
    ``gae_lambda``, ``clip_range`` and ``ent_coef`` are then not used (``extra`` still
    overrides any SB3 argument). The options left at ``None`` below take the protocol's own
    values (:data:`PROTOCOL_DEFAULTS`): under ``paper`` the official agent (its actor and
    critic, an unmasked update, two optimisers, a constant rate), under ``sb3`` ours."""
    epochs: int = 15
    """``protocol: paper``: passes over the training slides (official ``train_epoch: 15``,
    ``config/camelyon_rl_config.yml:2`` at 6385fe6; 25 before its commit b6ef98e)."""
    episodes_per_slide: int = 2
    """``protocol: paper``: episodes of one slide per update (official: 2)."""
    total_timesteps: int = 20_000
    equal_episodes: bool = False
    """``protocol: sb3``: ``total_timesteps`` is the budget of the smallest f in ``fracs`` and
    scales with f, so that every budget trains on about the same number of episodes (a fixed
    step budget gives f = 0.2 half the episodes of f = 0.1)."""
    n_envs: int = 4
    vec_env: str = "sasha"
    """How the ``n_envs`` training envs run (``protocol: sb3``): ``sasha`` (the default):
    :class:`~sasha_env.envs.vector.SashaVecEnv`, all envs stepped as one vectorised operation
    (the same slides and episodes as ``dummy``, to float rounding; options it does not batch
    fall back to ``dummy`` with a warning); ``dummy``: SB3's ``DummyVecEnv`` of single envs
    (one process); ``subproc``: SB3's ``SubprocVecEnv`` (a process per env)."""
    reward: str = "ce"
    correct_bonus: float = 0.0
    stop: str = "none"
    """``none``: every agent reads its whole budget (the threshold rule of the calibrate stage
    stops it afterwards, ``sasha_adaptive``). ``learned``: for each f, also train an agent
    whose environment has the always-legal stop action and charges ``zoom_cost`` per zoom
    (``SashaWSIEnv(stop_action=True)``), capped at ⌈f·N⌉ zooms, in ``agents/<name>-stop/``
    beside the fixed-budget agent (which stays as it is); evaluation reports it as
    ``sasha_learned_stop``. ``protocol: sb3`` only."""
    zoom_cost: float = 0.01
    """Reward subtracted per zoom in the learned-stop agent's environment, in nats of the CE
    reward (``>= 0``). A zoom pays when it lowers the slide's CE by more than this
    (``reward: delta``; by more than this over the steps left under ``ce``, whose stop holds
    the state to the cap). The default, 0.01: on the two-class cohorts a slide's CE falls from
    about ln 2 ≈ 0.69 at the low-res state to ~0.1 over the budget, so reading a whole cap of
    15 zooms (f = 0.1 on the demo's ~150-patch slides) costs 0.15 nats, a fraction of what
    reading gains, while a zoom that lowers the CE by less than 0.01 nats is not worth
    taking. Scale it with N: on CAMELYON16-sized slides (~1,000 zooms at f = 0.1) the
    same cost adds up to 10 nats."""
    learning_rate: float | None = None
    """``None``: the protocol's own — 3e-4 (``sb3``), 1e-5 (``paper``, as official). A number
    replaces it (the cosine's peak with ``lr_schedule: cosine``)."""
    lr_schedule: str | None = None
    """``constant`` (both protocols' own; the official rate is constant) or ``cosine`` (ours:
    a half-cycle cosine decay to 0 over training)."""
    n_steps: int = 64
    """Steps per env per rollout (PPO/A2C)."""
    batch_size: int = 64
    n_epochs: int = 4
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    d_hidden: int = 128
    policy_arch: str | None = None
    """The SASHA policy's network (``maskable_ppo``/``ppo``/``a2c``): ``sasha`` (ours: a row MLP
    with LayerNorm and GELU on ``[features, visited, coords]`` before the gated attention, the
    critic pooling its hidden rows, a small-gain last actor layer) or ``official`` (the official
    actor and critic: gated attention on the state rows alone; the visited list only masks the
    logits). ``None``: the protocol's own (``sb3``: ``sasha``; ``paper``: ``official``)."""
    masked_update: bool | None = None
    """PPO's update evaluates log-probabilities and entropy with visited patches masked, as when
    acting (ours). ``false``: the official update, which masks nothing (only our padding); its
    ratio then compares an unmasked new log-probability with the masked one of acting.
    ``None``: the protocol's own (``sb3``: true; ``paper``: false)."""
    two_optimizers: bool | None = None
    """Train actor and critic with one optimiser each, the gradient norm clipped per network
    (official, ``protocol: paper`` only); ``false``: one optimiser, one joint clip (ours).
    ``None``: the protocol's own (``sb3``: false; ``paper``: true)."""
    time_aware_critic: bool = False
    """The SASHA policy's value head also reads the fraction of the slide's patches zoomed so
    far (:class:`~sasha_models.actor_critic.SashaActorCritic`): at one budget f it tells the
    critic how many zooms, and so how many rewards, are left (``gamma: 1`` sums a reward per
    zoom). ``false`` (ours and the official): the critic sees the pooled rows only. Not with
    ``dqn``, which has no critic."""
    use_coords: bool | None = None
    """Feed each patch's grid position to the SASHA policy (``policy_arch: sasha`` only: the
    official actor and critic see the state rows alone); see the ablations in the docs'
    evaluation page. ``None``: true with ``sasha``, false with ``official``."""
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
    val_start: float = 0.0
    """With ``val_every``: the share of training (in ``[0, 1)``) before which validated
    policies are scored and written to ``val_curve.csv`` but not kept; the last policy always
    competes. 0 (the official code's rule): any validated policy can be kept. On a small val
    split (the demo's 14–15 slides) the val criterion saturates or swings early, and a policy
    validated before it has left the uniform distribution can win (docs' agents page, "Why
    SASHA trails HAFED on the demo study": 0.5 lifted one of two demo seeds, changed nothing
    on the other)."""
    keep: str = "best"
    """With ``val_every``: which weights training ends with. ``best`` (the official rule): the
    validated policy with the lowest criterion; ``average``: the mean of the weights of every
    policy validated from ``val_start`` on, the last included (stochastic weight averaging;
    :class:`~sasha_env.agents.callbacks.ValSelection`). Both rules see the same training
    trajectory: only what is kept at the end differs."""
    warm_start: str = "none"
    """``greedy_attention``: before RL, fit the actor to the ``greedy_attention`` heuristic's
    zooms (one episode per training slide) and the critic to their returns
    (:mod:`~sasha_env.agents.warm_start`); ``none``: RL from random weights (the official
    start). SASHA policies (``maskable_ppo``, ``ppo``, ``ppo_unmasked``, ``a2c``) only."""
    warm_start_epochs: int = 30
    """Passes over the demonstrations with ``warm_start`` (mini-batches of ``batch_size``)."""
    warm_start_lr: float = 1e-3
    """Adam's learning rate for ``warm_start`` (an optimizer of its own: the RL algorithm's
    starts untouched)."""
    ensemble: int = 1
    """Agents per budget: K > 1 trains K agents of the same settings with K seeds (the run's,
    then ``seed + 1000·k`` for member k = 1 … K−1, in ``agents/<name>-m<k+1>/``) and they act
    as one: each zoom is the legal patch of highest summed logit over the members
    (:class:`~sasha_models.ensemble.PolicyEnsemble`). It averages out the seed-to-seed spread of
    one training run at K times its cost. Masked SASHA policies only (not ``dqn`` or
    ``ppo_unmasked``), without ``obs_dim``; a learned-stop agent (``stop: learned``) stays one."""
    extra: dict = field(default_factory=dict)
    """Further keyword arguments for the SB3 algorithm."""

    @classmethod
    def from_dict(cls, d: dict | None) -> AgentConfig:
        cfg = dataclass_from_dict(cls, d, "agents")
        if cfg.algo not in ALGORITHMS:
            raise ValueError(f"agents.algo {cfg.algo!r}: choose one of {', '.join(ALGORITHMS)}")
        if cfg.vec_env not in VEC_ENVS:
            raise ValueError(f"agents.vec_env {cfg.vec_env!r}: choose one of {', '.join(VEC_ENVS)}")
        if cfg.warm_start not in WARM_STARTS:
            raise ValueError(
                f"agents.warm_start {cfg.warm_start!r}: choose one of {', '.join(WARM_STARTS)}"
            )
        if cfg.warm_start != "none" and cfg.algo == "dqn":
            raise ValueError(
                "agents.warm_start needs a SASHA actor-critic policy, not dqn's Q-network"
            )
        if cfg.keep not in KEEP_RULES:
            raise ValueError(f"agents.keep {cfg.keep!r}: choose one of {', '.join(KEEP_RULES)}")
        if cfg.ensemble < 1:
            raise ValueError(f"agents.ensemble {cfg.ensemble}: at least 1 agent per budget")
        if cfg.ensemble > 1 and cfg.algo in ("dqn", "ppo_unmasked"):
            raise ValueError(
                f"agents.ensemble needs a masked SASHA actor-critic policy, not {cfg.algo}'s: "
                "its members act together on the legal patches"
            )
        if cfg.ensemble > 1 and cfg.obs_dim is not None:
            raise ValueError(
                "agents.ensemble with agents.obs_dim is not supported: each member would fit "
                "its own projection; leave obs_dim unset for an ensemble"
            )
        if cfg.protocol not in PROTOCOLS:
            raise ValueError(
                f"agents.protocol {cfg.protocol!r}: choose one of {', '.join(PROTOCOLS)}"
            )
        if cfg.time_aware_critic and cfg.algo == "dqn":
            raise ValueError(
                "agents.time_aware_critic: dqn has no critic; use maskable_ppo, ppo or a2c"
            )
        if cfg.obs_dim is not None and cfg.algo == "dqn":
            raise ValueError(
                "agents.obs_dim needs a SASHA policy (maskable_ppo, ppo, a2c, ppo_unmasked), which keeps the "
                "projection; dqn's policy cannot"
            )
        if cfg.protocol == "paper" and cfg.algo != "maskable_ppo":
            raise ValueError(
                f"agents.protocol 'paper' trains maskable_ppo only, not {cfg.algo!r}; use "
                "protocol 'sb3' for the algorithm benchmark"
            )
        cfg.resolved()  # checks the options' values
        return cfg

    def resolved(self) -> AgentConfig:
        """This config with every option left at ``None`` set to the protocol's own value.

        Raises:
            ValueError: an option's value is unknown, or options that do not go together.
        """
        own = PROTOCOL_DEFAULTS[self.protocol]
        cfg = replace(self, **{k: v for k, v in own.items() if getattr(self, k) is None})
        if cfg.use_coords is None:
            cfg = replace(cfg, use_coords=cfg.policy_arch == "sasha")
        if cfg.policy_arch not in POLICY_ARCHS:
            raise ValueError(
                f"agents.policy_arch {cfg.policy_arch!r}: choose one of {', '.join(POLICY_ARCHS)}"
            )
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"agents.lr_schedule {cfg.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}"
            )
        if cfg.policy_arch == "official" and cfg.use_coords:
            raise ValueError(
                "agents.use_coords: the official policy reads the state rows only; set "
                "policy_arch: sasha to feed it coordinates"
            )
        if cfg.two_optimizers and cfg.protocol != "paper":
            raise ValueError(
                "agents.two_optimizers needs protocol 'paper' (its PPO clips per network); "
                "protocol 'sb3' trains one optimiser"
            )
        if cfg.stop not in STOP_MODES:
            raise ValueError(f"agents.stop {cfg.stop!r}: choose one of {', '.join(STOP_MODES)}")
        cost = cfg.zoom_cost
        if (
            isinstance(cost, bool)
            or not isinstance(cost, (int, float))
            or not (math.isfinite(cost) and cost >= 0)
        ):
            raise ValueError(f"agents.zoom_cost must be a number >= 0, got {cost!r}")
        if cfg.stop == "learned" and cfg.protocol == "paper":
            raise ValueError(
                "agents.stop 'learned' needs protocol 'sb3': the paper protocol sizes every "
                "rollout to whole episodes of ⌈f·N⌉ steps, and a learned stop ends them earlier"
            )
        return cfg


def steps_for(cfg: AgentConfig, frac: float) -> int:
    """Environment steps of an ``sb3``-protocol agent at budget ``frac`` (see ``equal_episodes``)."""
    if not cfg.equal_episodes:
        return cfg.total_timesteps
    return int(round(cfg.total_timesteps * frac / min(cfg.fracs)))


def agent_name(frac: float, algo: str = "maskable_ppo", learned_stop: bool = False) -> str:
    """Folder name of an agent: ``sasha-0.1`` for the default algorithm, else ``ppo-0.1``...;
    a learned-stop agent (``agents.stop: learned``) adds ``-stop``: ``sasha-0.1-stop``."""
    prefix = "sasha" if algo == "maskable_ppo" else algo
    return f"{prefix}-{frac:g}" + (STOP_SUFFIX if learned_stop else "")


def member_name(frac: float, algo: str, member: int) -> str:
    """Folder name of member ``member`` (0-based) of an ensemble (``agents.ensemble``): the
    first is the agent itself (``sasha-0.1``), the others ``sasha-0.1-m2``, ``sasha-0.1-m3``..."""
    return agent_name(frac, algo) + (f"-m{member + 1}" if member else "")


def member_seed(seed: int, member: int) -> int:
    """The training seed of member ``member`` (0-based) of an ensemble: the run's seed for the
    first, ``seed + 1000·member`` for the others (distinct from every study seed below 1,000)."""
    return seed + 1000 * member
