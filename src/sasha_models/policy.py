"""The SASHA agent: a masked, permutation-equivariant actor-critic for stable-baselines3.

The agent sees the slide state ``S`` (N patches × d features, plus per-patch ``visited``,
``valid`` and ``coords``) and picks the next patch to zoom into. Following SASHA's
official implementation (``rl_algorithms/ppo.py``: ``Actor``/``Critic``), the network is

- **actor**: every patch row ``[features, visited, coords]`` → small MLP → gated attention
  score → one logit per patch. Rows are scored independently, so the logits are
  permutation-equivariant and the same weights work for any number of patches.
- **critic**: its own MLP and gated attention; attention pooling (softmax over *valid* rows
  only) → linear → value. Permutation-invariant. Actor and critic share no parameters, as in
  the official code (which trains them with separate optimisers).

Masking. The legal actions are ``valid & ~visited``. Illegal logits are masked both when
acting and when PPO re-evaluates log-probabilities in its update (the official code forgets
the visited mask in the update; here every path goes through :func:`masked_distribution`).
The mask is always derived from the observation itself and, when sb3-contrib hands over
``action_masks`` (the env's ``action_masks()``, stored in its rollout buffer), intersected
with those. So:

- :class:`SashaActorCriticPolicy` — for ``sb3_contrib.MaskablePPO``;
- :class:`SashaPPOPolicy` — the same network and glue for plain ``stable_baselines3.PPO``;
  it never samples or evaluates an illegal action either.

:class:`PPOConfig` holds the official PPO hyper-parameters and turns them into SB3 keyword
arguments.

Row pooling. The policies also read row-pooled batches (:data:`~sasha_models.spaces.ROW_INDEX`,
from the agents' rollout buffers): the per-row layers then run once per distinct row of the
batch (:meth:`SashaActorCritic.forward_pooled`), which is most of PPO's update at real N.

Shapes: B = batch, N = max_patches, d = feature size, H = ``d_hidden``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from sb3_contrib.common.maskable.distributions import MaskableCategoricalDistribution
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn

from .attention import GatedAttention, masked_softmax
from .projection import ObsProjection
from .spaces import OBS_KEYS, ROW_INDEX, legal_actions, row_bits

__all__ = [
    "OBS_KEYS",
    "CosineLR",
    "DictPassthroughExtractor",
    "PPOConfig",
    "SashaActorCritic",
    "SashaActorCriticPolicy",
    "SashaPPOPolicy",
    "legal_action_mask",
    "masked_distribution",
    "masked_log_prob",
]

MaskLike = Tensor | np.ndarray


# ----------------------------------------------------------------------------- masks


def legal_action_mask(obs: Mapping[str, Tensor]) -> Tensor:
    """Legal actions derived from the observation: ``valid & ~visited``.

    Args:
        obs: ``visited`` and ``valid``, ``(B, N)``, any dtype holding 0/1.

    Returns:
        bool ``(B, N)``.
    """
    return legal_actions(obs["valid"], obs["visited"])


def _combine(legal: Tensor, action_masks: MaskLike | None) -> Tensor:
    """``legal & action_masks`` (the latter reshaped to ``legal``'s shape), or ``legal``."""
    if action_masks is None:
        return legal
    given = torch.as_tensor(action_masks, device=legal.device).reshape(legal.shape)
    return legal & given.to(torch.bool)


def masked_distribution(logits: Tensor, mask: Tensor) -> MaskableCategoricalDistribution:
    """Categorical distribution over patches with illegal patches at probability 0.

    Uses sb3-contrib's :class:`MaskableCategoricalDistribution`: illegal logits are replaced by
    -1e8 (their probability underflows to exactly 0 in float32, so they are never sampled)
    and they contribute nothing to the entropy. A row with no legal action is uniform (finite
    log-probabilities, no NaN); it only occurs on observations nobody acts on.

    Args:
        logits: ``(B, N)``.
        mask: bool ``(B, N)``, True = legal.
    """
    dist = MaskableCategoricalDistribution(logits.shape[-1]).proba_distribution(logits)
    dist.apply_masking(mask)
    return dist


def masked_log_prob(logits: Tensor, mask: Tensor, actions: Tensor) -> Tensor:
    """Log-probability of ``actions`` under the masked softmax of ``logits``.

    Equals ``log_softmax(logits.masked_fill(~mask, -inf))[actions]`` for legal actions.

    Args:
        logits: ``(B, N)``.
        mask: bool ``(B, N)``, True = legal.
        actions: ``(B,)`` integer patch indices.

    Returns:
        ``(B,)``.
    """
    return masked_distribution(logits, mask).log_prob(actions.long().reshape(-1))


# ----------------------------------------------------------------------------- network


@dataclass
class _RowCache:
    """The last acting call's inputs and per-row outputs (see :class:`SashaActorCritic`)."""

    version: tuple[tuple[int, int, int], ...]  # (id, data_ptr, _version) of each weight
    layout: list[tuple[torch.Size, torch.dtype, torch.device]]
    inputs: list[Tensor]
    outputs: list[Tensor]


class SashaActorCritic(nn.Module):
    """Actor-critic over a set of patches; independent of the number of patches N.

    Each row's input is ``[features (d), visited (1), coords (2, if use_coords)]``.

    Args:
        d_features: feature size d.
        d_hidden: width H of the row MLPs and of the gated attention (official: 128).
        dropout: dropout in the row MLPs and attention (official: 0).
        use_coords: append the patch's grid position to its row.
        project_from: the state's feature size D when observations carry a projection of it
            (:class:`~sasha_models.projection.ObsProjection`, ``d_features = k``): the
            projection is kept in the network's buffers (so an exported agent carries it),
            and rows given with D features are projected first.

    Acting (``eval()`` mode under ``torch.no_grad``, as SB3 collects rollouts and predicts),
    the network keeps the last call's inputs and per-row outputs and recomputes only the rows
    whose inputs differ bitwise: consecutive observations of an env differ in a few rows
    (``env.changed_rows``). The outputs are those of a full pass up to float rounding. The
    cache is dropped by ``train()`` (SB3 calls it before every update) and whenever a weight's
    identity, storage or version counter or the batch's shape changes; it is not used under
    ``torch.inference_mode``. It makes an ``eval()`` network stateful: do not share one between
    threads.

    Shapes:
        ``forward(features (B, N, d), visited (B, N), valid (B, N), coords (B, N, 2) | None)
        -> logits (B, N), value (B, 1)``
    """

    def __init__(
        self,
        d_features: int,
        d_hidden: int = 128,
        dropout: float = 0.0,
        use_coords: bool = True,
        project_from: int | None = None,
    ) -> None:
        super().__init__()
        self.d_features, self.d_hidden, self.use_coords = d_features, d_hidden, use_coords
        self.project_from = project_from
        if project_from is not None:
            self.register_buffer("obs_mean", torch.zeros(project_from))
            self.register_buffer("obs_basis", torch.zeros(project_from, d_features))
        d_in = d_features + 1 + (2 if use_coords else 0)
        self.actor_mlp = self._row_mlp(d_in, d_hidden, dropout)
        self.actor_attn = GatedAttention(d_hidden, d_hidden, 1, dropout)
        self.critic_mlp = self._row_mlp(d_in, d_hidden, dropout)
        self.critic_attn = GatedAttention(d_hidden, d_hidden, 1, dropout)
        self.value_head = nn.Linear(d_hidden, 1)
        # Near-uniform initial policy (SB3 uses gain 0.01 on its action head for the same reason).
        nn.init.orthogonal_(self.actor_attn.w.weight, gain=0.01)
        nn.init.zeros_(self.actor_attn.w.bias)
        self._row_cache: _RowCache | None = None

    @staticmethod
    def _row_mlp(d_in: int, d_hidden: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(), nn.Dropout(dropout)
        )

    def train(self, mode: bool = True) -> SashaActorCritic:
        if mode:
            self._row_cache = None  # weights are about to change
        return super().train(mode)

    @property
    def projection(self) -> ObsProjection | None:
        """The observation projection this network reads through, if any."""
        if self.project_from is None:
            return None
        return ObsProjection(self.obs_mean.cpu().numpy(), self.obs_basis.cpu().numpy())

    def set_projection(self, projection: ObsProjection) -> None:
        if self.project_from is None or projection.basis.shape != tuple(self.obs_basis.shape):
            raise ValueError(
                f"a projection {projection.basis.shape} does not fit this network "
                f"(project_from={self.project_from}, d_features={self.d_features})"
            )
        self.obs_mean.copy_(torch.from_numpy(projection.mean))
        self.obs_basis.copy_(torch.from_numpy(projection.basis))

    def _first_layer(
        self, features: Tensor, visited: Tensor, coords: Tensor | None, *mlps: nn.Sequential
    ) -> Tensor:
        """The first linear layer of ``mlps`` (stacked) on rows ``[features, visited, coords]``.

        Computed part by part (``features @ W_f + visited · w_v + coords @ W_c + b``), so the
        ``(..., d + 3)`` rows are never built; full-size state rows are projected first. With
        both MLPs, the actor's and the critic's first layers run as one product of twice the
        width (quicker than two on a CPU), each with its own weights.

        Returns:
            ``(..., n, H · len(mlps))``.
        """
        if (
            self.project_from is not None
            and features.shape[-1] == self.project_from != self.d_features
        ):
            features = (features - self.obs_mean) @ self.obs_basis
        d = features.shape[-1]
        if d != self.d_features:
            raise ValueError(
                f"rows of {d} features, but this network reads {self.d_features}"
                + (f" (or {self.project_from}, projected)" if self.project_from else "")
            )
        w = torch.cat([m[0].weight for m in mlps])  # (H·m, d + 1 [+ 2])
        b = torch.cat([m[0].bias for m in mlps])
        out = torch.addcmul(
            F.linear(features, w[:, :d], b), visited.to(w.dtype)[..., None], w[:, d]
        )
        if self.use_coords:
            if coords is None:
                raise ValueError("use_coords=True but no coords were given")
            out = out + F.linear(coords.to(w.dtype), w[:, d + 1 :])
        return out

    @staticmethod
    def _rest(mlp: nn.Sequential, x: Tensor) -> Tensor:
        """``mlp`` after its first layer."""
        for layer in list(mlp)[1:]:
            x = layer(x)
        return x

    def actor_logits(
        self, features: Tensor, visited: Tensor, coords: Tensor | None = None
    ) -> Tensor:
        """The actor's logit of each row, ``(..., n, d)`` → ``(..., n)``.

        A row is scored on its own, so its logit changes only when its row does: an agent
        acting on one slide can keep the logits and re-score only the rows a zoom changed
        (the zoomed row and the TSU-updated ones), ``O(r·d·H)`` per zoom instead of
        ``O(N·d·H)`` (how ``sasha predict`` runs the agent).
        """
        a = self._first_layer(features, visited, coords, self.actor_mlp)
        return self.actor_attn(self._rest(self.actor_mlp, a)).squeeze(-1)

    def _row_outputs(
        self, features: Tensor, visited: Tensor, coords: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row actor logit ``(..., n)``, critic hidden ``(..., n, H)`` and critic score."""
        both = self._first_layer(features, visited, coords, self.actor_mlp, self.critic_mlp)
        a, c = both.split(self.d_hidden, dim=-1)
        logits = self.actor_attn(self._rest(self.actor_mlp, a)).squeeze(-1)  # actor_logits
        h = self._rest(self.critic_mlp, c)
        return logits, h, self.critic_attn(h).squeeze(-1)

    def _cached_row_outputs(
        self, features: Tensor, visited: Tensor, coords: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_row_outputs`, recomputed only for the rows that differ from the last call's."""
        inputs = [features, visited] + ([] if coords is None else [coords])
        layout = [(t.shape, t.dtype, t.device) for t in inputs]
        weights = list(itertools.chain(self.parameters(), self.buffers()))
        if any(t.is_inference() for t in weights):  # made under inference_mode: no versions
            return self._row_outputs(features, visited, coords)
        version = tuple((id(t), t.data_ptr(), t._version) for t in weights)
        cache = self._row_cache
        if cache is None or cache.version != version or cache.layout != layout:
            outputs = self._row_outputs(features, visited, coords)
            self._row_cache = _RowCache(
                version, layout, [t.clone() for t in inputs], [o.clone() for o in outputs]
            )
            return outputs
        changed = torch.zeros(features.shape[:-1], dtype=torch.bool, device=features.device)
        for new, old in zip(inputs, cache.inputs, strict=True):
            diff = row_bits(new) != row_bits(old)  # bitwise: served only if identical
            changed |= diff.flatten(changed.ndim).any(-1) if diff.ndim > changed.ndim else diff
        if changed.any():
            part = None if coords is None else coords[changed]
            fresh = self._row_outputs(features[changed], visited[changed], part)
            for kept, value in zip(cache.outputs, fresh, strict=True):
                kept[changed] = value
            for kept, value in zip(cache.inputs, inputs, strict=True):
                kept[changed] = value[changed]
        logits, h, scores = cache.outputs
        return logits.clone(), h.clone(), scores.clone()

    def forward(
        self, features: Tensor, visited: Tensor, valid: Tensor, coords: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if self.training or torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            logits, h, scores = self._row_outputs(features, visited, coords)
        else:  # acting: most rows are the last call's
            logits, h, scores = self._cached_row_outputs(features, visited, coords)
        weights = masked_softmax(scores, valid > 0.5)  # (B, N)
        value = self.value_head(torch.einsum("bn,bnh->bh", weights, h))  # (B, 1)
        return logits, value

    def forward_pooled(
        self,
        features: Tensor,
        visited: Tensor,
        valid: Tensor,
        coords: Tensor | None,
        row_index: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` on a row-pooled batch: the per-row layers run once per distinct row.

        Args:
            features, visited, valid, coords: the batch's U distinct rows, ``(U, d)``,
                ``(U,)``, ``(U,)``, ``(U, 2)``.
            row_index: ``(B, N)`` long, each slot's row among the U.

        Returns:
            ``logits (B, N)``, ``value (B, 1)``: those of :meth:`forward` on the unpooled batch
            (up to float rounding).
        """
        logits, h, scores = self._row_outputs(features, visited, coords)
        weights = masked_softmax(scores[row_index], valid[row_index] > 0.5)  # (B, N)
        # Σ_n w[b, n] h[row_index[b, n]] as (B, U) @ (U, H): slots sharing a row add up
        per_row = weights.new_zeros(row_index.shape[0], h.shape[0])
        pooled = per_row.scatter_add(1, row_index, weights) @ h
        return logits[row_index], self.value_head(pooled)

    def forward_obs(self, obs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """:meth:`forward` on an observation dict (batched tensors, or row-pooled ones with
        :data:`~sasha_models.spaces.ROW_INDEX`)."""
        if ROW_INDEX in obs:
            return self.forward_pooled(
                obs["features"], obs["visited"], obs["valid"], obs.get("coords"), obs[ROW_INDEX]
            )
        return self(obs["features"], obs["visited"], obs["valid"], obs.get("coords"))


class DictPassthroughExtractor(BaseFeaturesExtractor):
    """SB3 features extractor that hands the (preprocessed) observation dict on unchanged.

    The network itself reads the dict; ``features_dim`` is a placeholder SB3 requires.
    """

    def __init__(self, observation_space: spaces.Dict) -> None:
        super().__init__(observation_space, features_dim=1)

    def forward(self, observations: dict[str, Tensor]) -> dict[str, Tensor]:  # type: ignore[override]
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

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Any,
        d_hidden: int = 128,
        dropout: float = 0.0,
        use_coords: bool = True,
        project_from: int | None = None,
        **kwargs: Any,
    ) -> None:
        self._d_features = _check_obs_space(observation_space, use_coords)
        self.project_from = project_from
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"SASHA policies need a Discrete action space, got {action_space}")
        self.d_hidden, self.dropout, self.use_coords = d_hidden, dropout, use_coords
        kwargs.setdefault("features_extractor_class", DictPassthroughExtractor)
        kwargs.setdefault("ortho_init", False)
        kwargs.setdefault("normalize_images", False)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)  # type: ignore[call-arg]

    def _build(self, lr_schedule: Any) -> None:
        self.net = SashaActorCritic(
            self._d_features, self.d_hidden, self.dropout, self.use_coords, self.project_from
        )
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
        )
        return data

    def _net_outputs(
        self, obs: Any, action_masks: MaskLike | None
    ) -> tuple[MaskableCategoricalDistribution, Tensor]:
        """Masked action distribution and values ``(B, 1)`` for a batched observation."""
        x = self._features(obs)
        logits, values = self.net.forward_obs(x)
        legal = legal_action_mask(x)
        if ROW_INDEX in x:
            legal = legal[x[ROW_INDEX]]
        return masked_distribution(logits, _combine(legal, action_masks)), values

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
        """PPO's update: ``values (B, 1)``, masked ``log_prob (B,)``, masked ``entropy (B,)``.

        The mask is ``valid & ~visited`` from ``obs``, intersected with ``action_masks`` when
        given (MaskablePPO passes the rollout buffer's masks here).
        """
        dist, values = self._net_outputs(obs, action_masks)
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
        action_space: ``Discrete(N)``.
        lr_schedule: SB3 learning-rate schedule.
        d_hidden: network width (official: 128).
        dropout: dropout (official: 0).
        use_coords: feed each patch's grid position to the network.
        project_from: the state's feature size when the observations are projected
            (``agents.obs_dim``; see :class:`SashaActorCritic`).
        **kwargs: passed to :class:`MaskableActorCriticPolicy` (e.g. ``optimizer_class``).
    """


class SashaPPOPolicy(_SashaPolicyMixin, ActorCriticPolicy):
    """The same network for plain ``stable_baselines3.PPO``.

    PPO passes no masks, so the legal set ``valid & ~visited`` comes from the observation,
    both when acting and in ``evaluate_actions``. Arguments as :class:`SashaActorCriticPolicy`.
    """


# ----------------------------------------------------------------------------- PPO config


@dataclass(frozen=True)
class CosineLR:
    """Half-cycle cosine decay from ``lr`` to ``min_lr`` over training (an SB3 schedule).

    SB3 calls it with ``progress_remaining`` going from 1 to 0. The official code decays
    the same way per epoch with no warm-up (``utils/utils.py: adjust_learning_rate``).
    """

    lr: float
    min_lr: float = 0.0

    def __call__(self, progress_remaining: float) -> float:
        done = 1.0 - progress_remaining
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * done))


PAPER_PER_FRAC: dict[float, tuple[float, float]] = {0.1: (0.2, 0.94), 0.2: (0.1, 0.95)}
"""Zoom budget f → (PPO clip range, GAE λ) in the paper's runs."""


@dataclass
class PPOConfig:
    """PPO hyper-parameters of the official SASHA code, as SB3 keyword arguments.

    Sources (repository coglabiisc/SASHA): ``config/camelyon_rl_config.yml`` and
    ``config/tcga_rl_config.yml`` (identical RL sections), ``step6_rl_training.py``
    (rollout and update loop), ``utils/utils.py`` (learning-rate schedule).

    Attributes:
        learning_rate: ``lr: 0.00001`` (the optimisers are built with 0.001, but
            ``adjust_learning_rate`` overwrites it with the cosine schedule of ``lr``
            before every update, so 1e-5 is what is used).
        cosine: cosine decay to ``min_lr: 0`` with ``warmup_epoch: 0``.
        n_steps: steps per rollout per env. ``None`` = the official rollout: ``num_envs: 2``
            episodes of the same slide per update (``rollout_episodes``), which needs the
            episode length; without it SB3's default 2048 is used.
        rollout_episodes: ``num_envs: 2``.
        batch_size: ``None`` = the whole rollout as one mini-batch, as the official update
            (one gradient step per epoch on all collected steps).
        n_epochs: ``num_epochs_on_single_roll_out: 4``.
        gamma: ``gamma: 1.0``.
        gae_lambda: ``lam: 0.95`` with ``use_gae: True``.
        clip_range: ``clip: 0.1``.
        ent_coef: ``entropy_coef: 0.001``. The official code *adds* ``coef * entropy`` to
            the actor loss (an entropy penalty, likely a sign slip); SB3's ``ent_coef`` is
            the usual bonus. Use -0.001 to reproduce the official sign.
        vf_coef: 1.0 — the official critic has its own optimiser and an unweighted MSE loss.
        max_grad_norm: ``max_grad_norm: 0.5`` (clipped per network there, jointly here).
        weight_decay: ``wd: 0.0001`` with AdamW (``step6_rl_training.py``).
        normalize_advantage: the official code normalises advantages per rollout.
    """

    learning_rate: float = 1e-5
    cosine: bool = True
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

        The paper tunes clipping and GAE λ per budget: clip 0.2 / λ 0.94 at f = 0.1 and
        clip 0.1 / λ 0.95 at f = 0.2 (the released config is the f = 0.2 one). Other budgets
        take the settings of the nearer of the two.
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
