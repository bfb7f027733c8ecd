"""The paper's agent-training protocol on top of sb3-contrib's ``MaskablePPO``.

SASHA's official training (``step6_rl_training.py`` at 6385fe6) differs from a stock PPO run
mostly in how the experience is collected:

- **slide-ordered rollouts**: each update sees whole episodes of *one* slide, two back to back
  (``num_envs: 2``), and every training slide comes once per epoch in a shuffled order;
- **an epoch budget** (``train_epoch``): episodes per slide do not depend on the zoom budget f,
  whereas a fixed number of environment steps gives f = 0.2 half the episodes of f = 0.1;
- **the official optimiser settings** per f (:meth:`sasha_models.ppo_config.PPOConfig.paper`):
  AdamW, a constant lr 1e-5, weight decay 1e-4, entropy bonus 0.001, γ = 1, four full-batch
  epochs per rollout; one AdamW for the actor and one for the critic, each network's gradient
  norm clipped to 0.5 on its own (:mod:`sasha_models.optim`; ``agents.two_optimizers``);
- **the official update** is unmasked: the new log-probabilities and the entropy are those of
  the distribution over every patch, visited ones included (``agents.masked_update: false``,
  the paper protocol's own; the policy does it, :mod:`sasha_models.policy`).

SB3 expresses all of it with two small pieces, so agents trained this way are ordinary
``MaskablePPO`` models (callbacks, ``save``, the export, every policy helper work unchanged):

- :class:`SlideSchedule`, a Gymnasium wrapper that picks the next slide at every reset from a
  seeded per-epoch permutation, each slide repeated ``episodes_per_slide`` times, and knows
  how many steps are left in the current slide's block;
- :class:`SlideOrderedPPO`, a ``MaskablePPO`` whose rollout is sized, before it starts, to the
  rest of the current block (``episodes_per_slide · ⌈f·N⌉`` steps) and whose update is one
  full batch of it, clipped per network when its policy has two optimisers
  (:class:`~sasha_models.optim.PerNetworkClipMixin`). SB3's loop, GAE and logging are
  untouched.

Episode lengths are known in advance (an episode on a slide of N patches has exactly
``⌈f·N⌉`` steps), which is what lets the rollout be sized before it is collected.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from sb3_contrib import MaskablePPO

from sasha_models.optim import PerNetworkClipMixin

from ..envs.wsi import SashaWSIEnv, episode_budget

__all__ = ["SlideSchedule", "SlideOrderedPPO"]


class SlideSchedule(gym.Wrapper):
    """Visit every slide of the env's split once per epoch, ``episodes_per_slide`` episodes each.

    The order is a fresh permutation of ``env.slide_ids`` per epoch, drawn from
    ``numpy.random.default_rng(seed)``; a reset with ``options`` naming a slide (or giving its
    arrays) passes through and does not advance the schedule.

    Args:
        env: a :class:`~sasha_env.envs.wsi.SashaWSIEnv` over the training split.
        episodes_per_slide: episodes of the same slide per block (official: 2).
        seed: seed of the slide order.
    """

    def __init__(self, env: SashaWSIEnv, episodes_per_slide: int = 2, seed: int = 0) -> None:
        super().__init__(env)
        if episodes_per_slide < 1:
            raise ValueError(f"episodes_per_slide must be >= 1, got {episodes_per_slide}")
        self.episodes_per_slide = int(episodes_per_slide)
        self._rng = np.random.default_rng(seed)
        self._order: list[str] = []
        self._pos = 0  # next block in self._order
        self._block: str | None = None  # slide of the current block
        self._episode = 0  # episodes of the current block started so far
        self._steps = 0  # steps of the current episode taken so far
        self.epoch = 0  # epochs started so far

    @property
    def slide_ids(self) -> list[str]:
        return self.env.unwrapped.slide_ids

    def _budget(self, slide_id: str) -> int:
        base: SashaWSIEnv = self.env.unwrapped
        return episode_budget(base.frac, base.store.n_patches(slide_id))

    def steps_per_epoch(self) -> int:
        """Environment steps in one epoch: ``episodes_per_slide · Σ ⌈f·N_s⌉`` over the split."""
        return self.episodes_per_slide * sum(self._budget(s) for s in self.slide_ids)

    def steps_to_block_end(self) -> int:
        """Steps left until the current slide's block ends (the size of the next rollout).

        Before the first reset, the first block's size.
        """
        if self._block is None:
            self._advance_order()
            return self.episodes_per_slide * self._budget(self._order[self._pos])
        budget = self._budget(self._block)
        return (budget - self._steps) + (self.episodes_per_slide - self._episode) * budget

    def _advance_order(self) -> None:
        if self._pos >= len(self._order):
            self._order = [self.slide_ids[i] for i in self._rng.permutation(len(self.slide_ids))]
            self._pos = 0
            self.epoch += 1

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict, dict]:
        if options and ("slide_id" in options or "slide_data" in options):
            return self.env.reset(seed=seed, options=options)
        if self._block is None or self._episode >= self.episodes_per_slide:
            self._advance_order()
            self._block = self._order[self._pos]
            self._pos += 1
            self._episode = 0
        self._episode += 1
        self._steps = 0
        return self.env.reset(seed=seed, options={"slide_id": self._block})

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        self._steps += 1
        return self.env.step(action)

    def action_masks(self) -> np.ndarray:
        return self.env.unwrapped.action_masks()


class SlideOrderedPPO(PerNetworkClipMixin, MaskablePPO):
    """``MaskablePPO`` whose every rollout is the rest of one slide's block, updated as one batch.

    Needs one environment (``n_envs == 1``) wrapped in :class:`SlideSchedule`. Before each
    rollout the buffer is resized to ``steps_to_block_end()`` and the mini-batch size set to
    the whole rollout, so each update sees exactly the episodes of one slide, as in the
    official code. With a policy built with ``two_optimizers=True`` the gradient norm is
    clipped per network (:class:`~sasha_models.optim.PerNetworkClipMixin`). Everything else is
    ``MaskablePPO``.
    """

    def _setup_model(self) -> None:
        if self.n_envs != 1:
            raise ValueError(f"slide-ordered rollouts need one environment, got {self.n_envs}")
        super()._setup_model()
        self._normalize = self.normalize_advantage

    def collect_rollouts(
        self,
        env: Any,
        callback: Any,
        rollout_buffer: Any,
        n_rollout_steps: int,
        use_masking: bool = True,
    ) -> bool:
        steps = int(env.env_method("steps_to_block_end")[0])
        rollout_buffer.buffer_size = steps
        self.n_steps = self.batch_size = steps
        # one step (one episode of one zoom) has no advantage spread to normalise by
        self.normalize_advantage = self._normalize and steps > 1
        return super().collect_rollouts(env, callback, rollout_buffer, steps, use_masking)
