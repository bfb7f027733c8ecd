"""The SASHA agent's network: a masked, permutation-equivariant actor-critic (no SB3 classes).

The agent sees the slide state ``S`` (N patches × d features, plus per-patch ``visited``,
``valid`` and ``coords``) and picks the next patch to zoom into. Two architectures
(:data:`ARCHS`), both scoring every row on its own, so the logits are permutation-equivariant
and the same weights work for any number of patches:

- ``"official"`` — SASHA's official networks (``rl_algorithms/ppo.py`` at 6385fe6:
  ``Actor``/``Critic``): the **actor** is gated attention directly on the state rows, one
  logit per patch; the **critic** pools the raw state rows with its own gated attention
  (softmax over the rows) and a linear layer gives the value. The input is the state only;
  ``visited`` only masks the actor's logits. PyTorch's default initialisation.
- ``"sasha"`` (ours, the default) — every row ``[features, visited, coords]`` goes through a
  small MLP (Linear, LayerNorm, GELU) before the actor's and the critic's gated attention;
  the critic pools the MLP's hidden rows; the actor's last layer starts with gain 0.01
  (a near-uniform first policy).

Actor and critic share no parameters (the official code trains them with two optimisers;
:class:`~sasha_models.optim.PerNetworkOptimizer` does the same). Padding rows (``valid`` 0) are
left out of the critic's softmax and the actor's distribution, so on an unpadded slide the
``"official"`` outputs equal the official code's.

Masking. The legal actions are ``valid & ~visited`` (:func:`legal_action_mask`); illegal
logits are masked when acting. In PPO's update the policies mask them too by default; the
official update does not (its ``Agent.evaluate`` ignores the visited list), which the SB3
policies reproduce with ``masked_update=False`` (:mod:`sasha_models.policy`).

Learned stopping. With ``stop_action=True`` the actor also gives one logit for "stop" (the
env's ``stop_action``, index N), from the whole slide: the actor's rows (its row MLP's hidden
rows, or the state rows under ``"official"``) pooled by a gated attention of their own
(softmax over the real rows), followed by the fraction of real patches zoomed so far, through
a linear layer (small gain, like the patch logits: a near-uniform first policy over the legal
patches and stop). The stop logit is invariant to the order of the rows. It is part of the
actor (its parameters start with ``actor_``); actor and critic still share nothing.

Time-aware critic. With ``time_aware_critic=True`` the value head also reads the fraction of
the real patches zoomed so far, ``[pooled rows, read]`` (the stop logit's input, on the
critic's side). An agent trained at one budget f stops at ⌈f·N⌉ zooms, so ``read`` tells the
critic how many of the episode's rewards are still to come: with γ = 1 and a reward at every
zoom the return to go is mostly that count, and a critic pooling the rows by a softmax sees
it only blurred (the partial observability of the time left, Pardo et al., "Time Limits in
Reinforcement Learning", ICML 2018). Off by default; the actor is the same either way.

Row pooling. The network also reads row-pooled batches (:data:`~sasha_models.spaces.ROW_INDEX`,
from the agents' rollout buffers): the per-row layers then run once per distinct row of the
batch (:meth:`SashaActorCritic.forward_pooled`), which is most of PPO's update at real N.

Shapes: B = batch, N = max_patches, d = feature size, H = ``d_hidden``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from sb3_contrib.common.maskable.distributions import MaskableCategoricalDistribution
from torch import Tensor, nn

from .attention import GatedAttention, masked_softmax
from .projection import ObsProjection
from .spaces import ROW_INDEX, legal_actions, row_bits

__all__ = [
    "ARCHS",
    "RowCache",
    "SashaActorCritic",
    "legal_action_mask",
    "masked_distribution",
    "masked_log_prob",
]


#: Architectures of :class:`SashaActorCritic` (see the module docstring).
ARCHS = ("sasha", "official")

# ----------------------------------------------------------------------------- masks


def legal_action_mask(obs: Mapping[str, Tensor], stop: bool = False) -> Tensor:
    """Legal actions derived from the observation: ``valid & ~visited`` (and stop, always).

    Args:
        obs: ``visited`` and ``valid``, ``(B, N)``, any dtype holding 0/1.
        stop: append the stop action's column (always True).

    Returns:
        bool ``(B, N)``, or ``(B, N + 1)`` with ``stop``.
    """
    return legal_actions(obs["valid"], obs["visited"], stop=stop)


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


class RowCache:
    """A row-wise function's outputs, kept between calls: only the rows that changed are recomputed.

    A row-wise function computes each output row from its own input rows only (the per-row
    layers of :class:`SashaActorCritic`, or its actor alone). The first input is
    ``(*R, d)``: its leading dims ``R`` index the rows (``(B, N)`` for a batch of observations,
    ``(n,)`` for one slide), and every other input and output starts with the same dims
    ``R``. Which rows changed since the last call is either told by the caller (an
    environment's ``changed_rows``) or found by comparing the inputs bitwise with the last
    call's (:func:`~sasha_models.spaces.row_bits`; a row counts as unchanged only when it is
    identical).

    The kept outputs hold for one ``key`` (whatever else they depend on, such as the weights'
    versions) and one layout of the inputs (shapes, dtypes, devices); the first call, and one
    with another key or layout, computes every row. A cache is stateful: do not share one
    between threads.
    """

    def __init__(self) -> None:
        self._key: Hashable = None
        self._inputs: list[Tensor] | None = None  # kept only when rows are found by comparison
        self._outputs: list[Tensor] | None = None

    def clear(self) -> None:
        """Forget the kept rows: the next call computes every row."""
        self._inputs = self._outputs = None

    def __call__(
        self,
        fn: Callable[..., Sequence[Tensor]],
        inputs: Sequence[Tensor],
        key: Hashable = None,
        rows: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """``fn(*inputs)``, computing only the rows that changed when the last call's can serve.

        Args:
            fn: the row-wise function; returns a sequence of tensors ``(*R, ...)``.
            inputs: ``(*R, d)`` first, then tensors ``(*R, ...)``.
            key: what the outputs depend on besides ``inputs``; another key than the last
                call's recomputes every row.
            rows: the rows that changed since the last call (bool ``R`` or indices), when the
                caller knows them; ``None``: found by comparing ``inputs`` with the last call's,
                which are then kept (cloned) for the next comparison.

        Returns:
            The outputs of ``fn(*inputs)`` (up to float rounding), as tensors the caller owns.
        """
        layout = [(t.shape, t.dtype, t.device) for t in inputs]
        if (
            self._outputs is None
            or self._key != (key, layout)
            or (rows is None and self._inputs is None)
        ):
            outputs = tuple(fn(*inputs))
            self._key = (key, layout)
            self._inputs = [t.clone() for t in inputs] if rows is None else None
            self._outputs = [o.clone() for o in outputs]
            return outputs
        if rows is None:
            rows = self._changed(inputs)
        if bool(rows.any()) if rows.dtype == torch.bool else rows.numel() > 0:
            fresh = fn(*(t[rows] for t in inputs))
            for kept, value in zip(self._outputs, fresh, strict=True):
                kept[rows] = value
            if self._inputs is not None:
                for kept, value in zip(self._inputs, inputs, strict=True):
                    kept[rows] = value[rows]
        return tuple(o.clone() for o in self._outputs)

    def _changed(self, inputs: Sequence[Tensor]) -> Tensor:
        """bool ``R``: the rows whose inputs differ bitwise from the kept ones."""
        assert self._inputs is not None
        first = inputs[0]
        changed = torch.zeros(first.shape[:-1], dtype=torch.bool, device=first.device)
        for new, old in zip(inputs, self._inputs, strict=True):
            diff = row_bits(new) != row_bits(old)  # bitwise: served only if identical
            changed |= diff.flatten(changed.ndim).any(-1) if diff.ndim > changed.ndim else diff
        return changed


class SashaActorCritic(nn.Module):
    """Actor-critic over a set of patches; independent of the number of patches N.

    With ``arch="sasha"`` each row's input is ``[features (d), visited (1), coords (2, if
    use_coords)]``; with ``arch="official"`` it is ``features`` alone (see the module
    docstring).

    Args:
        d_features: feature size d.
        d_hidden: width H of the row MLPs and of the gated attention (official: 128).
        dropout: dropout in the row MLPs and attention (official: 0).
        use_coords: append the patch's grid position to its row (``"sasha"`` only).
        project_from: the state's feature size D when observations carry a projection of it
            (:class:`~sasha_models.projection.ObsProjection`, ``d_features = k``): the
            projection is kept in the network's buffers (so an exported agent carries it),
            and rows given with D features are projected first.
        arch: ``"sasha"`` (ours) or ``"official"`` (:data:`ARCHS`).
        stop_action: one more logit, for the stop action (learned stopping; see the module
            docstring).
        time_aware_critic: the value head also reads the fraction of real patches zoomed
            (see the module docstring).

    Acting (``eval()`` mode under ``torch.no_grad``, as SB3 collects rollouts and predicts),
    the network keeps the last call's inputs and per-row outputs (a :class:`RowCache`) and
    recomputes only the rows whose inputs differ bitwise: consecutive observations of an env
    differ in a few rows (``env.changed_rows``). The outputs are those of a full pass up to
    float rounding. The cache is dropped by ``train()`` (SB3 calls it before every update) and
    whenever a weight's identity, storage or version counter or the batch's shape changes; it
    is not used under ``torch.inference_mode``. It makes an ``eval()`` network stateful: do not
    share one between threads.

    Shapes:
        ``forward(features (B, N, d), visited (B, N), valid (B, N), coords (B, N, 2) | None)
        -> logits (B, N), value (B, 1)``; with ``stop_action`` the logits are ``(B, N + 1)``,
        the last one stop's.
    """

    obs_mean: Tensor  # buffers, with project_from: (D,) and (D, d_features)
    obs_basis: Tensor

    def __init__(
        self,
        d_features: int,
        d_hidden: int = 128,
        dropout: float = 0.0,
        use_coords: bool = True,
        project_from: int | None = None,
        arch: str = "sasha",
        stop_action: bool = False,
        time_aware_critic: bool = False,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch {arch!r}: choose one of {', '.join(ARCHS)}")
        if arch == "official" and use_coords:
            raise ValueError("arch 'official' reads the state rows only: use_coords must be False")
        self.d_features, self.d_hidden, self.use_coords = d_features, d_hidden, use_coords
        self.arch = arch
        self.project_from = project_from
        self.time_aware_critic = bool(time_aware_critic)
        d_time = 1 if self.time_aware_critic else 0
        if project_from is not None:
            self.register_buffer("obs_mean", torch.zeros(project_from))
            self.register_buffer("obs_basis", torch.zeros(project_from, d_features))
        if arch == "official":  # rl_algorithms/ppo.py: Actor, Critic (PyTorch's default init)
            self.actor_attn = GatedAttention(d_features, d_hidden, 1, dropout)
            self.critic_attn = GatedAttention(d_features, d_hidden, 1, dropout)
            self.value_head = nn.Linear(d_features + d_time, 1)
        else:
            d_in = d_features + 1 + (2 if use_coords else 0)
            self.actor_mlp = self._row_mlp(d_in, d_hidden, dropout)
            self.actor_attn = GatedAttention(d_hidden, d_hidden, 1, dropout)
            self.critic_mlp = self._row_mlp(d_in, d_hidden, dropout)
            self.critic_attn = GatedAttention(d_hidden, d_hidden, 1, dropout)
            self.value_head = nn.Linear(d_hidden + d_time, 1)
            # Near-uniform initial policy (SB3 uses gain 0.01 on its action head likewise).
            nn.init.orthogonal_(self.actor_attn.w.weight, gain=0.01)
            nn.init.zeros_(self.actor_attn.w.bias)
        self.stop_action = bool(stop_action)
        if self.stop_action:  # created last: the other weights draw the same numbers as before
            d_rows = d_features if arch == "official" else d_hidden
            self.actor_stop_attn = GatedAttention(d_rows, d_hidden, 1, dropout)
            self.actor_stop = nn.Linear(d_rows + 1, 1)
            nn.init.orthogonal_(self.actor_stop.weight, gain=0.01)
            nn.init.zeros_(self.actor_stop.bias)
        self._row_cache = RowCache()

    def actor_parameters(self) -> list[nn.Parameter]:
        """The actor's parameters (its row MLP and gated attention)."""
        return [p for n, p in self.named_parameters() if n.startswith("actor_")]

    def critic_parameters(self) -> list[nn.Parameter]:
        """The critic's parameters (its row MLP, gated attention and value head)."""
        return [p for n, p in self.named_parameters() if not n.startswith("actor_")]

    @staticmethod
    def _row_mlp(d_in: int, d_hidden: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(), nn.Dropout(dropout)
        )

    def train(self, mode: bool = True) -> SashaActorCritic:
        if mode:
            self._row_cache.clear()  # weights are about to change
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

    def _project(self, features: Tensor) -> Tensor:
        """Rows of ``d_features`` columns: full-size state rows are projected first."""
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
        return features

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
        features = self._project(features)
        d = features.shape[-1]
        firsts = [cast(nn.Linear, m[0]) for m in mlps]
        w = torch.cat([f.weight for f in firsts])  # (H·m, d + 1 [+ 2])
        b = torch.cat([f.bias for f in firsts])
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
        ``O(N·d·H)``; ``sasha predict`` keeps :meth:`actor_outputs`, these logits and, with
        ``stop_action``, what the stop logit pools.
        """
        return self.actor_attn(self._actor_rows(features, visited, coords)).squeeze(-1)

    def actor_outputs(
        self, features: Tensor, visited: Tensor, coords: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """The actor's row-wise outputs: each row's logit ``(..., n)`` and, with
        ``stop_action``, each actor row ``(..., n, H_a)`` and its stop-pooling score
        ``(..., n)``, which :meth:`stop_logit` pools.

        Row by row like :meth:`actor_logits`, so an agent acting on one slide can keep them
        and recompute only the rows a zoom changed (how ``sasha predict`` runs a learned-stop
        agent).
        """
        rows = self._actor_rows(features, visited, coords)
        logits = self.actor_attn(rows).squeeze(-1)
        if not self.stop_action:
            return (logits,)
        return logits, rows, self.actor_stop_attn(rows).squeeze(-1)

    def stop_logit(self, rows: Tensor, scores: Tensor, visited: Tensor, valid: Tensor) -> Tensor:
        """The stop logit ``(B, 1)`` from :meth:`actor_outputs`' actor rows ``(B, N, H_a)`` and
        stop-pooling scores ``(B, N)``, with ``visited`` and ``valid`` ``(B, N)``: the last
        logit of :meth:`forward` on the same state.

        Raises:
            ValueError: the network has no stop action.
        """
        if not self.stop_action:
            raise ValueError("this network has no stop action (stop_action=False)")
        return self._stop_logit(self._pool(scores, valid, rows), visited, valid)

    def _actor_rows(self, features: Tensor, visited: Tensor, coords: Tensor | None) -> Tensor:
        """What the actor's attention scores, row by row: the projected state rows
        (``"official"``) or the actor MLP's hidden rows, ``(..., n, H_a)``."""
        if self.arch == "official":
            return self._project(features)
        a = self._first_layer(features, visited, coords, self.actor_mlp)
        return self._rest(self.actor_mlp, a)

    def _row_outputs(
        self, features: Tensor, visited: Tensor, coords: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """Per-row actor logit ``(..., n)``, critic row ``(..., n, H)`` and critic score; with
        ``stop_action`` also the actor row ``(..., n, H_a)`` and its stop-pooling score.

        The critic row is what its attention pools: the MLP's hidden row (``"sasha"``) or the
        state row itself (``"official"``, ``H = d``); the actor row likewise for the actor.
        """
        if self.arch == "official":
            x = self._project(features)
            out: tuple[Tensor, ...] = (
                self.actor_attn(x).squeeze(-1),
                x,
                self.critic_attn(x).squeeze(-1),
            )
            rows = x
        else:
            both = self._first_layer(features, visited, coords, self.actor_mlp, self.critic_mlp)
            a, c = both.split(self.d_hidden, dim=-1)
            rows = self._rest(self.actor_mlp, a)
            h = self._rest(self.critic_mlp, c)
            out = (self.actor_attn(rows).squeeze(-1), h, self.critic_attn(h).squeeze(-1))
        if self.stop_action:
            out += (rows, self.actor_stop_attn(rows).squeeze(-1))
        return out

    @staticmethod
    def _pool(
        scores: Tensor, valid: Tensor, rows: Tensor, row_index: Tensor | None = None
    ) -> Tensor:
        """Attention pooling of ``rows`` by ``scores`` (softmax over the real rows), ``(B, H)``.

        Args:
            scores, valid: ``(B, N)``, or ``(U,)`` with ``row_index``.
            rows: ``(B, N, H)``, or the U distinct rows ``(U, H)`` with ``row_index``.
            row_index: ``(B, N)`` long, each slot's row among the U (a row-pooled batch).
        """
        if row_index is None:
            weights = masked_softmax(scores, valid > 0.5)  # (B, N)
            return torch.einsum("bn,bnh->bh", weights, rows)
        weights = masked_softmax(scores[row_index], valid[row_index] > 0.5)  # (B, N)
        # Σ_n w[b, n] rows[row_index[b, n]] as (B, U) @ (U, H): slots sharing a row add up
        per_row = weights.new_zeros(row_index.shape[0], rows.shape[0])
        return per_row.scatter_add(1, row_index, weights) @ rows

    @staticmethod
    def _read_fraction(visited: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
        """The fraction of real patches zoomed, ``(B, 1)``, from ``visited`` and ``valid``
        ``(B, N)``."""
        real = (valid > 0.5).to(dtype)
        zoomed = ((visited > 0.5).to(dtype) * real).sum(-1)
        return (zoomed / real.sum(-1).clamp(min=1.0))[:, None]

    def _stop_logit(self, pooled: Tensor, visited: Tensor, valid: Tensor) -> Tensor:
        """The stop logit ``(B, 1)`` from the pooled actor rows ``(B, H_a)`` and the fraction
        of real patches zoomed (``visited``, ``valid`` ``(B, N)``)."""
        read = self._read_fraction(visited, valid, pooled.dtype)
        return self.actor_stop(torch.cat([pooled, read], dim=-1))

    def _value(self, pooled: Tensor, visited: Tensor, valid: Tensor) -> Tensor:
        """The value ``(B, 1)`` from the pooled critic rows ``(B, H)``, and with
        ``time_aware_critic`` the fraction of real patches zoomed (``visited``, ``valid``
        ``(B, N)``)."""
        if not self.time_aware_critic:
            return self.value_head(pooled)
        read = self._read_fraction(visited, valid, pooled.dtype)
        return self.value_head(torch.cat([pooled, read], dim=-1))

    def _cached_row_outputs(
        self, features: Tensor, visited: Tensor, coords: Tensor | None
    ) -> tuple[Tensor, ...]:
        """:meth:`_row_outputs`, recomputed only for the rows that differ from the last call's."""
        weights = list(itertools.chain(self.parameters(), self.buffers()))
        if any(t.is_inference() for t in weights):  # made under inference_mode: no versions
            return self._row_outputs(features, visited, coords)
        version = tuple((id(t), t.data_ptr(), t._version) for t in weights)
        inputs = [features, visited] + ([] if coords is None else [coords])
        return self._row_cache(self._row_outputs, inputs, key=version)

    def forward(
        self, features: Tensor, visited: Tensor, valid: Tensor, coords: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if self.training or torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            outputs = self._row_outputs(features, visited, coords)
        else:  # acting: most rows are the last call's
            outputs = self._cached_row_outputs(features, visited, coords)
        logits, h, scores = outputs[:3]
        value = self._value(self._pool(scores, valid, h), visited, valid)  # (B, 1)
        if self.stop_action:
            rows, stop_scores = outputs[3:]
            pooled = self._pool(stop_scores, valid, rows)
            logits = torch.cat([logits, self._stop_logit(pooled, visited, valid)], dim=-1)
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
            ``logits (B, N)`` (``(B, N + 1)`` with ``stop_action``), ``value (B, 1)``: those of
            :meth:`forward` on the unpooled batch (up to float rounding).
        """
        outputs = self._row_outputs(features, visited, coords)
        logits, h, scores = outputs[:3]
        pooled = self._pool(scores, valid, h, row_index)
        value = self._value(pooled, visited[row_index], valid[row_index])
        logits = logits[row_index]
        if self.stop_action:
            rows, stop_scores = outputs[3:]
            pooled = self._pool(stop_scores, valid, rows, row_index)
            stop = self._stop_logit(pooled, visited[row_index], valid[row_index])
            logits = torch.cat([logits, stop], dim=-1)
        return logits, value

    def forward_obs(self, obs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """:meth:`forward` on an observation dict (batched tensors, or row-pooled ones with
        :data:`~sasha_models.spaces.ROW_INDEX`)."""
        if ROW_INDEX in obs:
            return self.forward_pooled(
                obs["features"], obs["visited"], obs["valid"], obs.get("coords"), obs[ROW_INDEX]
            )
        return self(obs["features"], obs["visited"], obs["valid"], obs.get("coords"))
