"""Zoom policies (a trained agent, random, HAFED's attention) and running them over slides.

Policies all have the signature ``policy(env, obs) -> action`` and see only what an agent may
see: the observation state, the legal-action mask, and (for ``attention_topk``) the frozen
HAFED classifier's attention on the current state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..envs.wsi import SashaWSIEnv

__all__ = [
    "Policy",
    "agent_policy",
    "random_policy",
    "attention_topk_policy",
    "run_episodes",
]

Policy = Callable[[SashaWSIEnv, dict], int]


def agent_policy(agent: Any, deterministic: bool = True) -> Policy:
    """A trained agent's action (argmax by default) under the env's legal-action mask.

    Args:
        agent: an exported policy (:func:`~sasha_env.agents.envs.load_agent`'s ``policy``) or an SB3
            model; maskable policies get ``env.action_masks()``, the others mask from the
            observation themselves (SASHA policies) or learn to avoid illegal actions (DQN).
    """
    # lazy: sb3-contrib loads only for a trained agent, not for run_episodes or the baselines
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

    maskable = isinstance(getattr(agent, "policy", agent), MaskableActorCriticPolicy)

    def act(env: SashaWSIEnv, obs: dict) -> int:
        if maskable:
            action, _ = agent.predict(
                obs, action_masks=env.action_masks(), deterministic=deterministic
            )
        else:
            action, _ = agent.predict(obs, deterministic=deterministic)
        return int(action)

    return act


def random_policy(seed: int) -> Policy:
    """A uniformly random legal patch."""
    rng = np.random.default_rng(seed)

    def act(env: SashaWSIEnv, obs: dict) -> int:
        return int(rng.choice(np.flatnonzero(env.action_masks())))

    return act


def attention_topk_policy() -> Policy:
    """Zoom the legal patch that HAFED's level-2 attention weights most on the current state.

    Attention is softmaxed per branch over the slide's patches and averaged over branches.
    """

    def act(env: SashaWSIEnv, obs: dict) -> int:
        attention = env.attention()  # (N,)
        legal = env.action_masks()[: len(attention)]
        attention = np.where(legal, attention, -np.inf)
        return int(np.argmax(attention))

    return act


def run_episodes(env: SashaWSIEnv, policy: Policy, slide_ids: list[str]) -> list[dict]:
    """One episode per slide; returns each episode's final ``info`` plus its return."""
    out = []
    for sid in slide_ids:
        obs, _ = env.reset(options={"slide_id": sid})
        total, done = 0.0, False
        info: dict = {}
        while not done:
            obs, reward, terminated, truncated, info = env.step(policy(env, obs))
            total += float(reward)
            done = terminated or truncated
        out.append({**info, "return": total})
    return out
