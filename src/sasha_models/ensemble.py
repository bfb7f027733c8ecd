"""Several trained SASHA agents of one budget acting as one (``agents.ensemble``).

On a small cohort which tumours an agent misses changes with its training seed (the demo's
14 test slides: one missed tumour is 0.04–0.1 AUC). K agents trained with K seeds, acting
together, average that out: at each step every member scores the same observation and the
ensemble zooms the legal patch of **highest summed logit**. Each member's masked
log-probability is its logit minus a constant over the legal patches, so this is the argmax of
the mean log-probability, the product of the members' distributions (a geometric-mean
ensemble); sampling (``deterministic=False``) draws from that product.

A member's logit of a row depends on that row only (:meth:`SashaActorCritic.actor_outputs`),
so the sum does too: :class:`ActorEnsemble` keeps the single network's row-by-row contract and
``sasha predict`` re-scores only the rows a zoom changed, as for one agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical

from .actor_critic import SashaActorCritic, legal_action_mask
from .policy import SashaActorCriticPolicy, SashaPPOPolicy, combine_masks

__all__ = ["ActorEnsemble", "PolicyEnsemble"]


class ActorEnsemble(nn.Module):
    """The members' actors summed row by row: :meth:`actor_outputs` as one network's.

    Args:
        nets: the members' :class:`~sasha_models.actor_critic.SashaActorCritic` networks, with
            the same inputs (``use_coords``, feature size, projection) and no stop action.

    Raises:
        ValueError: no members, a member with the stop action, or members that read
            different inputs.
    """

    stop_action = False

    def __init__(self, nets: Sequence[SashaActorCritic]) -> None:
        super().__init__()
        if not nets:
            raise ValueError("an ensemble needs at least one member")
        first = nets[0]
        for i, net in enumerate(nets):
            if net.stop_action:
                raise ValueError(f"member {i + 1} has the stop action: an ensemble acts without it")
            if (net.use_coords, net.d_features, net.project_from) != (
                first.use_coords,
                first.d_features,
                first.project_from,
            ):
                raise ValueError(
                    f"member {i + 1} reads other inputs than member 1 (use_coords, feature "
                    "size or projection differ): train the members with the same settings"
                )
            if not _same_projection(net, first):
                raise ValueError(
                    f"member {i + 1}'s observation projection differs from member 1's "
                    "(agents.obs_dim fitted on other data): train them on one workdir"
                )
        self.members = nn.ModuleList(nets)

    @property
    def use_coords(self) -> bool:
        return bool(self.members[0].use_coords)

    @property
    def projection(self) -> Any:
        """The observation projection the members read through (one, checked), or None."""
        return self.members[0].projection

    def actor_outputs(
        self, features: Tensor, visited: Tensor, coords: Tensor | None = None
    ) -> tuple[Tensor]:
        """The summed actor logit of each row, ``(..., n, d)`` → ``((..., n),)``; members are
        added in order, so the sum is the same on any subset of rows."""
        nets = cast(list[SashaActorCritic], list(self.members))
        total = nets[0].actor_outputs(features, visited, coords)[0]
        for net in nets[1:]:
            total = total + net.actor_outputs(features, visited, coords)[0]
        return (total,)


def _same_projection(a: SashaActorCritic, b: SashaActorCritic) -> bool:
    if a.project_from is None:
        return True
    return bool(torch.equal(a.obs_mean, b.obs_mean) and torch.equal(a.obs_basis, b.obs_basis))


class PolicyEnsemble:
    """K exported SASHA policies of one budget acting as one agent.

    Acts like an SB3 policy where the package acts (``predict(obs, action_masks=...,
    deterministic=...)``, ``observation_space``, ``action_space``, ``net``), so evaluation,
    calibration, the environment and ``sasha predict`` take it where they take one agent.

    Args:
        policies: the members (:class:`~sasha_models.policy.SashaActorCriticPolicy` or
            :class:`~sasha_models.policy.SashaPPOPolicy`), with the same observation and action
            spaces.

    Raises:
        ValueError: no members, a member that is not a SASHA policy, members of other spaces
            or inputs, or a member with the stop action.
    """

    def __init__(self, policies: Sequence[Any]) -> None:
        if not policies:
            raise ValueError("an ensemble needs at least one member")
        for i, p in enumerate(policies):
            if not isinstance(p, SashaActorCriticPolicy | SashaPPOPolicy):
                raise ValueError(
                    f"member {i + 1} is a {type(p).__name__}: an ensemble needs SASHA policies"
                )
        first = policies[0]
        for i, p in enumerate(policies):
            if (p.observation_space, p.action_space) != (
                first.observation_space,
                first.action_space,
            ):
                raise ValueError(f"member {i + 1} has other spaces than member 1")
            if not p.mask_actions:
                raise ValueError(f"member {i + 1} is unmasked: an ensemble acts on legal patches")
        self.members: list[Any] = list(policies)
        self.net = ActorEnsemble([p.net for p in policies])
        self.observation_space = policies[0].observation_space
        self.action_space = policies[0].action_space
        self.set_training_mode(False)

    def __len__(self) -> int:
        return len(self.members)

    def set_training_mode(self, mode: bool) -> None:
        for p in self.members:
            p.set_training_mode(mode)

    def action_logits(
        self, observation: dict[str, np.ndarray], action_masks: np.ndarray | None = None
    ) -> Tensor:
        """Summed member logits ``(B, N)`` with illegal actions at ``-inf``: ``valid & ~visited``
        from the observation, and ``action_masks`` when given."""
        first = self.members[0]  # the members share their spaces, so one conversion serves all
        with torch.no_grad():
            x = first._features(first.obs_to_tensor(observation)[0])
            total = first.net.forward_obs(x)[0]
            for p in self.members[1:]:
                total = total + p.net.forward_obs(x)[0]
            legal = combine_masks(legal_action_mask(x), action_masks)
            return total.masked_fill(~legal, -torch.inf)

    def predict(
        self,
        observation: dict[str, np.ndarray],
        state: Any = None,
        episode_start: Any = None,
        deterministic: bool = False,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, None]:
        """Actions for an observation (one, or a batch), as SB3's ``policy.predict``: the argmax
        of the summed logits, or with ``deterministic=False`` a draw from their softmax."""
        logits = self.action_logits(observation, action_masks)
        actions = logits.argmax(dim=-1) if deterministic else Categorical(logits=logits).sample()
        vectorized = np.asarray(observation["features"]).ndim == 3
        out = actions.cpu().numpy()
        return (out if vectorized else out.reshape(())), None
