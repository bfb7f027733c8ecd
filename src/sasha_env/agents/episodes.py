"""Zoom policies (a trained agent, random, attention baselines) and running them over slides.

Policies all have the signature ``policy(env, obs) -> action`` and see only what an agent may
see: the observation state, the legal-action mask, and for the attention baselines an
attention MIL classifier's attention over the slide's patches:

- ``greedy_attention``: the frozen HAFED's attention on the current (TSU-updated) state,
  recomputed at every step;
- ``attention_topk``: HAFED's attention on the slide's initial low-res state, computed once
  per episode;
- ``lowres_attention_topk``: the trained low-res classifier's attention on the low-res
  features, computed once per episode.

The zooms are always taken in the env, so the prediction is HAFED's on the final state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..envs.slide_data import SlideData
from ..envs.wsi import SashaWSIEnv, mean_attention

__all__ = [
    "Policy",
    "agent_policy",
    "random_policy",
    "greedy_attention_policy",
    "attention_topk_policy",
    "lowres_attention_topk_policy",
    "run_episodes",
]

Policy = Callable[[SashaWSIEnv, dict], int]


def agent_policy(agent: Any, deterministic: bool = True) -> Policy:
    """A trained agent's action (argmax by default) under the env's legal-action mask.

    Args:
        agent: an exported policy (:func:`~sasha_env.agents.envs.load_agent`'s ``policy``, an
            ensemble's too) or an SB3 model; maskable policies and ensembles get
            ``env.action_masks()``, the others mask from the observation themselves (SASHA
            policies) or learn to avoid illegal actions (DQN).
    """
    # lazy: sb3-contrib loads only for a trained agent, not for run_episodes or the baselines
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

    from sasha_models.ensemble import PolicyEnsemble

    maskable = isinstance(
        getattr(agent, "policy", agent), MaskableActorCriticPolicy | PolicyEnsemble
    )

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


def greedy_attention_policy() -> Policy:
    """Zoom the legal patch that HAFED's level-2 attention weights most on the current state.

    Attention is softmaxed per branch over the slide's patches and averaged over branches
    (:meth:`~sasha_env.envs.wsi.SashaWSIEnv.attention`), recomputed at every step on the
    TSU-updated state: SASHA's dynamics without a learned policy.
    """

    def act(env: SashaWSIEnv, obs: dict) -> int:
        return _best_legal(env, env.attention())

    return act


def attention_topk_policy() -> Policy:
    """Zoom the patches HAFED's level-2 attention weights most on the slide's low-res state.

    The attention ``(N,)`` is computed once per episode on the initial state (the low-res rows
    ``z``) and kept fixed: the episode zooms the legal patches in decreasing order of it, the
    ``⌈f·N⌉`` top patches, whatever the TSU does to the state meanwhile.
    """
    return _fixed_order_policy(lambda env, slide: _model_attention(env.hafed, slide.z))


def lowres_attention_topk_policy(lowres: nn.Module) -> Policy:
    """Zoom the patches the low-res classifier attends to most: what a method without high-res
    access picks.

    Args:
        lowres: the ``lowres`` stage's model, an
            :class:`~sasha_models.hafed.AttentionMILClassifier` trained on low-res features
            (``models/lowres/model.pt``). Its attention on the slide's low-res rows ``z``
            (softmax per branch, averaged over branches, ``(N,)``) is computed once per episode;
            the episode zooms the legal patches in decreasing order of it.
    """
    lowres.eval()
    return _fixed_order_policy(lambda env, slide: _model_attention(lowres, slide.z))


def _fixed_order_policy(score: Callable[[SashaWSIEnv, SlideData], np.ndarray]) -> Policy:
    """Zoom the legal patch of highest ``score(env, slide)``, computed once per slide."""
    cache: dict[str, Any] = {"slide": None, "score": None}

    def act(env: SashaWSIEnv, obs: dict) -> int:
        slide = env.slide
        if slide is None:
            raise RuntimeError("call reset() before the policy")
        if cache["slide"] is not slide:  # a new episode's slide: score its low-res rows once
            cache["slide"], cache["score"] = slide, score(env, slide)
        return _best_legal(env, cache["score"])

    return act


def _model_attention(model: nn.Module, z: Tensor) -> np.ndarray:
    """An attention MIL classifier's (or HAFED's level 2) attention on rows ``z (N, d)``."""
    return mean_attention(getattr(model, "level2", model), z.float())


def _best_legal(env: SashaWSIEnv, score: np.ndarray) -> int:
    """The legal patch of highest ``score (N,)``."""
    legal = env.action_masks()[: len(score)]
    return int(np.argmax(np.where(legal, score, -np.inf)))


def run_episodes(
    env: SashaWSIEnv, policy: Policy, slide_ids: list[str], trace: bool = False
) -> list[dict]:
    """One episode per slide; returns each episode's final ``info`` plus its return.

    With ``trace``, each also has ``step_probabilities`` (``(T, C)`` float32: HAFED's
    probabilities after each of its T steps) and ``step_zoomed`` (``(T,)``: patches zoomed by
    then), what :func:`sasha_models.stopping.apply_rule` reads to stop the episode early.
    """
    out = []
    for sid in slide_ids:
        obs, _ = env.reset(options={"slide_id": sid})
        total, done = 0.0, False
        info: dict = {}
        probs: list[np.ndarray] = []
        zoomed: list[int] = []
        n_zoomed = 0
        while not done:
            obs, reward, terminated, truncated, info = env.step(policy(env, obs))
            total += float(reward)
            done = terminated or truncated
            if trace:
                probs.append(env.probabilities)
                n_zoomed += not info["illegal_action"]
                zoomed.append(n_zoomed)
        extra = {"step_probabilities": np.stack(probs), "step_zoomed": zoomed} if trace else {}
        out.append({**info, "return": total, **extra})
    return out
