"""The SASHA actor-critic as stable-baselines3 / sb3-contrib policies.

The network itself is :class:`~sasha_models.actor_critic.SashaActorCritic` (``arch``: ours or
the official one); this module is the glue that lets SB3 build, train and act with it. When
acting, the mask is always derived from the observation itself (``valid & ~visited``) and,
when sb3-contrib hands over ``action_masks`` (the env's ``action_masks()``, stored in its
rollout buffer), intersected with those. In PPO's update (``evaluate_actions``) the same mask
applies by default (``masked_update=True``); ``masked_update=False`` is the official update,
which masks nothing but the padding: log-probabilities and entropy of the distribution over
every real patch, visited ones included (``Agent.evaluate`` in ``rl_algorithms/ppo.py`` at
6385fe6). ``two_optimizers=True`` trains the actor and the critic with one optimiser each
(:class:`~sasha_models.optim.PerNetworkOptimizer`), as the official code does. So:

- :class:`SashaActorCriticPolicy` — for ``sb3_contrib.MaskablePPO``;
- :class:`SashaPPOPolicy` — the same network and glue for plain ``stable_baselines3.PPO``;
  it never samples an illegal action either.

With one more action than patch slots (``Discrete(P + 1)``: the env's ``stop_action``,
learned stopping) the network adds its stop logit (``SashaActorCritic(stop_action=True)``) and
every mask gets a last column, always True: stop is legal whatever was zoomed. The policies'
arguments do not change; the action space says which it is.

The policies also read row-pooled batches (:data:`~sasha_models.spaces.ROW_INDEX`, from the
agents' rollout buffers) and hand them to
:meth:`~sasha_models.actor_critic.SashaActorCritic.forward_pooled`. The PPO hyper-parameters
are in :mod:`sasha_models.ppo_config`.

Shapes: B = batch, N = max_patches, d = feature size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib.common.maskable.distributions import MaskableCategoricalDistribution
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor

from .actor_critic import SashaActorCritic, legal_action_mask, masked_distribution
from .optim import PerNetworkOptimizer
from .spaces import OBS_KEYS, ROW_INDEX, with_stop

__all__ = [
    "DictPassthroughExtractor",
    "SashaActorCriticPolicy",
    "SashaPPOPolicy",
    "combine_masks",
]

MaskLike = Tensor | np.ndarray


def combine_masks(legal: Tensor, action_masks: MaskLike | None) -> Tensor:
    """The patches a policy may zoom: ``legal & action_masks`` (the latter, ``(B, A)`` or
    ``(B * A,)`` as SB3 hands it over, reshaped to ``legal``'s ``(B, A)``), or ``legal``."""
    if action_masks is None:
        return legal
    given = torch.as_tensor(action_masks, device=legal.device).reshape(legal.shape)
    return legal & given.to(torch.bool)


class DictPassthroughExtractor(BaseFeaturesExtractor):
    """SB3 features extractor that hands the (preprocessed) observation dict on unchanged.

    The network itself reads the dict; ``features_dim`` is a placeholder SB3 requires.
    """

    def __init__(self, observation_space: spaces.Dict) -> None:
        super().__init__(observation_space, features_dim=1)

    def forward(self, observations: dict[str, Tensor]) -> dict[str, Tensor]:
        return observations


def _check_obs_space(space: spaces.Space, use_coords: bool) -> int:
    """Validate the observation space; return the feature size d."""
    keys = OBS_KEYS if use_coords else OBS_KEYS[:3]
    if not isinstance(space, spaces.Dict) or any(k not in space.spaces for k in keys):
        raise ValueError(f"SASHA policies need a Dict observation with keys {keys}, got {space}")
    feats = space["features"]
    if not isinstance(feats, spaces.Box) or len(feats.shape) != 2:
        raise ValueError(f"'features' must be a Box of shape (max_patches, d), got {feats}")
    return int(feats.shape[1])


# ----------------------------------------------------------------------------- policies


class _SashaPolicyMixin:
    """Glue shared by both SB3 policies: builds :class:`SashaActorCritic`, applies masks.

    Must come before the SB3 policy class in the bases. ``net_arch``, ``activation_fn`` and
    ``ortho_init`` of the SB3 base class are accepted but unused.
    """

    net: SashaActorCritic
    optimizer: torch.optim.Optimizer

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Any,
        d_hidden: int = 128,
        dropout: float = 0.0,
        use_coords: bool = True,
        project_from: int | None = None,
        mask_actions: bool = True,
        arch: str = "sasha",
        masked_update: bool = True,
        two_optimizers: bool = False,
        time_aware_critic: bool = False,
        **kwargs: Any,
    ) -> None:
        self._d_features = _check_obs_space(observation_space, use_coords)
        self.project_from = project_from
        self.mask_actions = bool(mask_actions)
        self.arch, self.masked_update, self.two_optimizers = arch, masked_update, two_optimizers
        self.time_aware_critic = bool(time_aware_critic)
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"SASHA policies need a Discrete action space, got {action_space}")
        n_slots = int(observation_space["features"].shape[0])  # type: ignore[index]
        if int(action_space.n) not in (n_slots, n_slots + 1):
            raise ValueError(
                f"SASHA policies need Discrete({n_slots}) (one action per patch slot) or "
                f"Discrete({n_slots + 1}) (and stop), got {action_space}"
            )
        self.stop_action = int(action_space.n) == n_slots + 1
        self.d_hidden, self.dropout, self.use_coords = d_hidden, dropout, use_coords
        kwargs.setdefault("features_extractor_class", DictPassthroughExtractor)
        kwargs.setdefault("ortho_init", False)
        kwargs.setdefault("normalize_images", False)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)  # type: ignore[call-arg]

    def _build(self, lr_schedule: Any) -> None:
        self.net = SashaActorCritic(
            self._d_features,
            self.d_hidden,
            self.dropout,
            self.use_coords,
            self.project_from,
            self.arch,
            stop_action=self.stop_action,
            time_aware_critic=self.time_aware_critic,
        )
        if self.two_optimizers:
            optimizer: Any = PerNetworkOptimizer(  # used by SB3 as an Optimizer, quacks like one
                {"actor": self.net.actor_parameters(), "critic": self.net.critic_parameters()},
                self.optimizer_class,  # type: ignore[attr-defined]
                lr=lr_schedule(1),
                **self.optimizer_kwargs,  # type: ignore[attr-defined]
            )
            self.optimizer = optimizer
            return
        self.optimizer = self.optimizer_class(  # type: ignore[attr-defined]
            self.parameters(),  # type: ignore[attr-defined]
            lr=lr_schedule(1),
            **self.optimizer_kwargs,  # type: ignore[attr-defined]
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()  # type: ignore[misc]
        data.update(
            d_hidden=self.d_hidden,
            dropout=self.dropout,
            use_coords=self.use_coords,
            project_from=self.project_from,
            mask_actions=self.mask_actions,
            arch=self.arch,
            masked_update=self.masked_update,
            two_optimizers=self.two_optimizers,
            time_aware_critic=self.time_aware_critic,
        )
        return data

    def _net_outputs(
        self, obs: Any, action_masks: MaskLike | None, update: bool = False
    ) -> tuple[MaskableCategoricalDistribution, Tensor]:
        """Masked action distribution and values ``(B, 1)`` for a batched observation.

        In the update (``update=True``) with ``masked_update=False`` only padding is masked.
        """
        x = self._features(obs)
        logits, values = self.net.forward_obs(x)
        if not self.mask_actions:  # every index, padding and visited patches included
            return masked_distribution(logits, torch.ones_like(logits, dtype=torch.bool)), values
        if update and not self.masked_update:
            real = x["valid"] > 0.5  # the official update: every real patch, visited or not
            real = real[x[ROW_INDEX]] if ROW_INDEX in x else real
            real = with_stop(real) if self.stop_action else real
            return masked_distribution(logits, real), values
        legal = legal_action_mask(x)
        if ROW_INDEX in x:
            legal = legal[x[ROW_INDEX]]
        legal = with_stop(legal) if self.stop_action else legal
        return masked_distribution(logits, combine_masks(legal, action_masks)), values

    def _features(self, obs: Any) -> dict[str, Tensor]:
        """SB3's preprocessing, or for a row-pooled batch the rows as float and the index."""
        if ROW_INDEX not in obs:
            return self.extract_features(obs)  # type: ignore[attr-defined]
        return {k: v if k == ROW_INDEX else v.float() for k, v in obs.items()}

    def forward(
        self, obs: Any, deterministic: bool = False, action_masks: MaskLike | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Act: ``actions (B,)``, ``values (B, 1)``, ``log_prob (B,)``."""
        dist, values = self._net_outputs(obs, action_masks)
        actions = dist.get_actions(deterministic=deterministic)
        return actions, values, dist.log_prob(actions)

    def evaluate_actions(
        self, obs: Any, actions: Tensor, action_masks: MaskLike | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """PPO's update: ``values (B, 1)``, ``log_prob (B,)``, ``entropy (B,)``.

        With ``masked_update`` (the default) the mask is ``valid & ~visited`` from ``obs``,
        intersected with ``action_masks`` when given (MaskablePPO passes the rollout buffer's
        masks here); without it, ``valid`` alone (the official update; ``action_masks`` are
        ignored).
        """
        dist, values = self._net_outputs(obs, action_masks, update=True)
        return values, dist.log_prob(actions.long().reshape(-1)), dist.entropy()

    def get_distribution(
        self, obs: Any, action_masks: MaskLike | None = None
    ) -> MaskableCategoricalDistribution:
        """The masked action distribution (used by ``predict``)."""
        return self._net_outputs(obs, action_masks)[0]

    def predict_values(self, obs: Any) -> Tensor:
        """Values ``(B, 1)``."""
        return self.net.forward_obs(self._features(obs))[1]


class SashaActorCriticPolicy(_SashaPolicyMixin, MaskableActorCriticPolicy):
    """SASHA's actor-critic for ``sb3_contrib.MaskablePPO``.

    ``MaskablePPO(SashaActorCriticPolicy, env, policy_kwargs={"d_hidden": 128})``;
    ``model.predict(obs, action_masks=env.action_masks(), deterministic=True)``.

    Args:
        observation_space: ``Dict`` with ``features (N, d)``, ``visited (N,)``, ``valid (N,)``
            and ``coords (N, 2)``.
        action_space: ``Discrete(N)``, or ``Discrete(N + 1)`` with the stop action (the
            network then has its stop logit).
        lr_schedule: SB3 learning-rate schedule.
        d_hidden: network width (official: 128).
        dropout: dropout (official: 0).
        use_coords: feed each patch's grid position to the network (``arch="sasha"``).
        project_from: the state's feature size when the observations are projected
            (``agents.obs_dim``; see :class:`SashaActorCritic`).
        mask_actions: restrict actions to ``valid & ~visited`` (and the given
            ``action_masks``); ``False`` lets the policy pick any index, as an unmasked agent
            does, and the env's illegal-action penalty is all it learns from (the
            ``ppo_unmasked`` arm of the benchmark).
        arch: ``"sasha"`` (ours) or ``"official"`` (see :mod:`sasha_models.actor_critic`).
        masked_update: mask visited patches in PPO's update too (ours); ``False``: the
            official update, which masks only padding.
        two_optimizers: one ``optimizer_class`` instance for the actor and one for the critic
            (:class:`~sasha_models.optim.PerNetworkOptimizer`; clipped per network by an
            algorithm with :class:`~sasha_models.optim.PerNetworkClipMixin`).
        **kwargs: passed to :class:`MaskableActorCriticPolicy` (e.g. ``optimizer_class``).
    """


class SashaPPOPolicy(_SashaPolicyMixin, ActorCriticPolicy):
    """The same network for plain ``stable_baselines3.PPO``.

    PPO passes no masks, so the legal set ``valid & ~visited`` comes from the observation,
    both when acting and in ``evaluate_actions``. Arguments as :class:`SashaActorCriticPolicy`.
    """
