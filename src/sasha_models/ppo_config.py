"""The paper protocol's PPO hyper-parameters as SB3 keyword arguments.

:class:`PPOConfig` holds the PPO hyper-parameters of ``agents.protocol: paper`` and turns them
into keyword arguments of ``PPO`` / ``MaskablePPO``; :class:`CosineLR` is an optional
learning-rate schedule (ours; the official rate is constant). Where a value differs from the official code at commit 6385fe6
(coglabiisc/SASHA), the attribute says so; the docs' fidelity table lists every such value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["PAPER_PER_FRAC", "CosineLR", "PPOConfig"]


@dataclass(frozen=True)
class CosineLR:
    """Half-cycle cosine decay from ``lr`` to ``min_lr`` over training (an SB3 schedule).

    SB3 calls it with ``progress_remaining`` going from 1 to 0. The official RL training at
    6385fe6 does not decay: its calls to ``adjust_learning_rate`` are commented out
    (``step6_rl_training.py``), so its learning rate is a constant 1e-5.
    """

    lr: float
    min_lr: float = 0.0

    def __call__(self, progress_remaining: float) -> float:
        done = 1.0 - progress_remaining
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * done))


PAPER_PER_FRAC: dict[float, tuple[float, float]] = {0.1: (0.2, 0.94), 0.2: (0.1, 0.95)}
"""Zoom budget f → (PPO clip range, GAE λ). f = 0.1: ``clip: 0.2``, ``lam: 0.94``, the values
set in ``config/camelyon_rl_config.yml`` at 6385fe6 ("for sasha 0.1"). f = 0.2: the official
config sets nothing for it; 0.1 / 0.95 are the values commented out there (and those of the
code before commit b6ef98e) — our choice, not an official f = 0.2 setting."""


@dataclass
class PPOConfig:
    """PPO hyper-parameters of the paper protocol, as SB3 keyword arguments.

    Sources, at commit 6385fe6 of coglabiisc/SASHA: ``config/camelyon_rl_config.yml`` (the
    f = 0.1 run; ``config/tcga_rl_config.yml`` still holds the older values) and
    ``step6_rl_training.py`` (rollout and update loop).

    Attributes:
        learning_rate: ``lr: 0.00001``, as official, constant.
        cosine: ours, off by default: a cosine decay to 0 over training. The official RL
            training keeps 1e-5 constant (its ``adjust_learning_rate`` calls are commented
            out, ``step6_rl_training.py:316-317``).
        n_steps: steps per rollout per env. ``None`` = the official rollout: ``num_envs: 2``
            episodes of the same slide per update (``rollout_episodes``), which needs the
            episode length; without it SB3's default 2048 is used.
        rollout_episodes: ``num_envs: 2``.
        batch_size: ``None`` = the whole rollout as one mini-batch, as the official update
            (one gradient step per epoch on all collected steps).
        n_epochs: ``num_epochs_on_single_roll_out: 4``.
        gamma: ``gamma: 1.0``.
        gae_lambda: default 0.95 (our choice for f = 0.2, which the official config leaves
            unset); :meth:`paper` sets it per f.
        clip_range: default 0.1 (our choice for f = 0.2, likewise); :meth:`paper` sets it
            per f.
        ent_coef: ``entropy_coef: 0.001``, a bonus as in SB3: the official loss subtracts
            ``0.001 · entropy`` from the actor loss (at 6385fe6; the sign was flipped to a
            bonus in commit b6ef98e).
        vf_coef: 1.0 — the official critic has its own optimiser and an unweighted MSE loss
            on the GAE returns.
        max_grad_norm: ``max_grad_norm: 0.5``, clipped per network when the policy has two
            optimisers (``two_optimizers``, as official: actor and critic); with one
            optimiser (ours) the clip is joint.
        weight_decay: ``wd: 0.0001`` with AdamW (``step6_rl_training.py``).
        normalize_advantage: the official code normalises advantages over each rollout.
    """

    learning_rate: float = 1e-5
    cosine: bool = False
    n_steps: int | None = None
    rollout_episodes: int = 2
    batch_size: int | None = None
    n_epochs: int = 4
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_range: float = 0.1
    ent_coef: float = 0.001
    vf_coef: float = 1.0
    max_grad_norm: float = 0.5
    weight_decay: float = 1e-4
    normalize_advantage: bool = True

    @classmethod
    def paper(cls, frac: float) -> PPOConfig:
        """The official settings for zoom budget ``frac``.

        Clip and GAE λ per budget from :data:`PAPER_PER_FRAC`: clip 0.2 / λ 0.94 at f = 0.1
        (the official config at 6385fe6) and clip 0.1 / λ 0.95 at f = 0.2 (our choice: the
        official config sets nothing for f = 0.2). Other budgets take the settings of the
        nearer of the two.
        """
        clip, lam = min(PAPER_PER_FRAC.items(), key=lambda kv: abs(kv[0] - frac))[1]
        return cls(clip_range=clip, gae_lambda=lam)

    def to_sb3_kwargs(
        self,
        episode_len: int | None = None,
        n_envs: int = 1,
        policy_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments for ``PPO``/``MaskablePPO`` (everything but policy and env).

        Args:
            episode_len: zooms per episode (⌈f·N⌉), used when ``n_steps`` is None.
            n_envs: number of parallel envs (the rollout is split between them).
            policy_kwargs: extra policy kwargs (e.g. ``d_hidden``), merged over the
                AdamW optimiser settings.
        """
        if self.n_steps is not None:
            n_steps = self.n_steps
        elif episode_len is not None:
            n_steps = max(2, math.ceil(self.rollout_episodes * episode_len / n_envs))
        else:
            n_steps = 2048
        batch_size = self.batch_size or n_steps * n_envs
        lr = CosineLR(self.learning_rate) if self.cosine else self.learning_rate
        pk: dict[str, Any] = {
            "optimizer_class": torch.optim.AdamW,
            "optimizer_kwargs": {"weight_decay": self.weight_decay},
        }
        pk.update(policy_kwargs or {})
        return {
            "learning_rate": lr,
            "n_steps": n_steps,
            "batch_size": batch_size,
            "n_epochs": self.n_epochs,
            "gamma": self.gamma,
            "gae_lambda": self.gae_lambda,
            "clip_range": self.clip_range,
            "ent_coef": self.ent_coef,
            "vf_coef": self.vf_coef,
            "max_grad_norm": self.max_grad_norm,
            "normalize_advantage": self.normalize_advantage,
            "policy_kwargs": pk,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for logging)."""
        return asdict(self)
