"""One optimiser per network, each with its own gradient clipping, inside SB3's PPO update.

SASHA's official training (``step6_rl_training.py`` at 6385fe6) steps the actor and the
critic with two AdamW optimisers and clips each network's gradient norm to 0.5 on its own;
SB3 has one optimiser per policy and clips the norm of all the gradients jointly. Two pieces
reproduce the official update without rewriting SB3's ``train()``:

- :class:`PerNetworkOptimizer`, the policy's ``optimizer``: it holds one optimiser per
  network and, on ``step()``, clips each network's gradients to ``max_grad_norm`` and steps
  its optimiser;
- :class:`PerNetworkClipMixin`, for a PPO algorithm class: during ``train()`` it hands the
  algorithm's ``max_grad_norm`` to the optimiser and makes SB3's joint clip a no-op (a norm
  limit of ``inf`` scales the gradients by exactly 1).

Actor and critic share no parameters and their losses are summed, so one backward pass gives
each network the gradient of its own loss, as the official two backward passes do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["PerNetworkClipMixin", "PerNetworkOptimizer"]


class PerNetworkOptimizer:
    """One optimiser per network; ``step()`` clips each network's gradient norm, then steps it.

    Quacks like a ``torch.optim.Optimizer`` as far as SB3 uses one: ``param_groups`` (SB3's
    learning-rate schedule writes ``lr`` into them), ``zero_grad``, ``step``, ``state_dict``
    and ``load_state_dict`` (SB3's save and load).

    Args:
        networks: name → that network's parameters (disjoint sets), e.g. ``{"actor": ...,
            "critic": ...}``.
        optimizer_class: e.g. ``torch.optim.AdamW``; one instance per network.
        max_grad_norm: each network's gradient-norm limit; ``None`` clips nothing.
            :class:`PerNetworkClipMixin` sets it from the algorithm before every update.
        **kwargs: passed to every optimiser (``lr``, ``weight_decay``...).
    """

    def __init__(
        self,
        networks: Mapping[str, Iterable[nn.Parameter]],
        optimizer_class: Callable[..., torch.optim.Optimizer],
        max_grad_norm: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.params = {name: list(ps) for name, ps in networks.items()}
        seen: set[int] = set()
        for name, ps in self.params.items():
            if not ps or seen & {id(p) for p in ps}:
                raise ValueError(f"network {name!r}: no parameters, or some shared with another")
            seen |= {id(p) for p in ps}
        self.optimizers = {n: optimizer_class(ps, **kwargs) for n, ps in self.params.items()}
        self.max_grad_norm = max_grad_norm

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every optimiser's parameter groups (the same dicts: writing ``lr`` sets it)."""
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """Clip each network's gradient norm to ``max_grad_norm``, then step its optimiser."""
        for name, opt in self.optimizers.items():
            if self.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.params[name], self.max_grad_norm)
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load :meth:`state_dict`'s output (``strict`` is accepted for SB3 and unused)."""
        missing = set(self.optimizers) - set(state)
        if missing:
            raise ValueError(f"optimiser state has no entry for {sorted(missing)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


class PerNetworkClipMixin:
    """For an SB3 PPO class: with a :class:`PerNetworkOptimizer`, clip per network, not jointly.

    Put it before the algorithm class in the bases (``class X(PerNetworkClipMixin,
    MaskablePPO)``). With any other optimiser the update is SB3's own.
    """

    policy: Any
    max_grad_norm: float

    def train(self) -> None:
        optimizer = self.policy.optimizer
        if not isinstance(optimizer, PerNetworkOptimizer):
            return super().train()  # type: ignore[misc]
        limit = self.max_grad_norm
        optimizer.max_grad_norm = limit
        self.max_grad_norm = math.inf  # SB3's joint clip then scales by exactly 1
        try:
            super().train()  # type: ignore[misc]
        finally:
            self.max_grad_norm = limit
