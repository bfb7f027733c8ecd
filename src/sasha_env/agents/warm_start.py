"""Warm start: the agent imitates a zoom heuristic before RL (``agents.warm_start``).

With ``agents.warm_start: greedy_attention`` the agents stage first runs the
``greedy_attention`` heuristic (zoom the legal patch HAFED's attention weights most on the
current TSU-updated state: SASHA's dynamics without a learned policy) for one episode on every
training slide, then fits the agent's actor to those zooms by maximum likelihood and its critic
to those episodes' returns (behaviour cloning; as a start for RL: kickstarting, Schmitt et al.,
2018). PPO then starts from a policy that already zooms roughly as the heuristic does, and
learns where to depart from it. Validation selection and everything after are unchanged.

Why: on the demo study's seed 1 the heuristic reaches test AUC 0.98 / 1.00 at f = 0.1 / 0.2
where the agent trained from scratch stays at 0.92 / 0.82: HAFED's outputs there are bunched,
the CE reward tells zooms apart poorly, and 20,000–40,000 steps leave the policy close to
uniform (docs' agents page). Not the official training, which starts from random weights.

Cost: one episode per training slide (no backbone: the env reads the store's features), and
``warm_start_epochs`` passes over the demonstrations, each ``(P, d)`` observation kept in
memory (the demo's 43 slides at f = 0.2: about 700 observations, 0.4 GB at d = 1,280).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..envs.wsi import SashaWSIEnv
from .config import WARM_STARTS
from .episodes import Policy, greedy_attention_policy

__all__ = ["Demonstrations", "clone_policy", "collect_demonstrations", "heuristic"]


@dataclass
class Demonstrations:
    """Steps of a heuristic's episodes, in order; T steps over all slides.

    Attributes:
        obs: the observation before each step, per key ``(T, ...)`` (the env's arrays).
        actions: the heuristic's action ``(T,)`` int64.
        masks: the legal actions at each step ``(T, A)`` bool.
        returns: the discounted return from each step to the end of its episode ``(T,)``.
    """

    obs: dict[str, np.ndarray]
    actions: np.ndarray
    masks: np.ndarray
    returns: np.ndarray

    def __len__(self) -> int:
        return len(self.actions)


def heuristic(name: str) -> Policy:
    """The zoom policy ``agents.warm_start`` names."""
    if name == "greedy_attention":
        return greedy_attention_policy()
    raise ValueError(f"agents.warm_start {name!r}: choose one of {', '.join(WARM_STARTS)}")


def collect_demonstrations(
    env: SashaWSIEnv, policy: Policy, slide_ids: list[str], gamma: float = 1.0
) -> Demonstrations:
    """One episode of ``policy`` per slide of ``env``; every step's observation and action.

    Args:
        env: a ``SashaWSIEnv`` (the agent's training split, its budget and observation).
        policy: ``policy(env, obs) -> action`` (:mod:`~sasha_env.agents.episodes`).
        slide_ids: the slides, one episode each.
        gamma: discount of the returns (the agent's ``gamma``).
    """
    obs_steps: list[dict[str, np.ndarray]] = []
    actions, masks, returns = [], [], []
    for sid in slide_ids:
        obs, _ = env.reset(options={"slide_id": sid})
        rewards: list[float] = []
        done = False
        while not done:
            action = policy(env, obs)
            obs_steps.append({k: np.array(v, copy=True) for k, v in obs.items()})
            masks.append(env.action_masks().copy())
            actions.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(float(reward))
            done = terminated or truncated
        to_go, running = np.zeros(len(rewards)), 0.0
        for t in range(len(rewards) - 1, -1, -1):
            running = rewards[t] + gamma * running
            to_go[t] = running
        returns.extend(to_go.tolist())
    if not obs_steps:
        raise ValueError("no demonstrations: the env has no slides to run")
    return Demonstrations(
        obs={k: np.stack([o[k] for o in obs_steps]) for k in obs_steps[0]},
        actions=np.asarray(actions, np.int64),
        masks=np.stack(masks).astype(bool),
        returns=np.asarray(returns, np.float32),
    )


def clone_policy(
    policy: torch.nn.Module,
    demos: Demonstrations,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    vf_coef: float = 0.5,
    learning_rate: float = 1e-3,
) -> list[dict[str, float]]:
    """Fit an SB3 actor-critic to demonstrations: actor by the demonstrated actions'
    negative log-likelihood under the legal mask, critic by squared error to the returns.

    Args:
        policy: an SB3 policy with ``evaluate_actions(obs, actions, action_masks)`` (the
            SASHA policies). It is fitted with an Adam of its own, so the RL algorithm's
            optimizer starts untouched.
        demos: from :func:`collect_demonstrations`.
        epochs: passes over the demonstrations (``>= 1``).
        batch_size: steps per gradient step.
        seed: seed of the shuffling.
        vf_coef: weight of the critic's loss.
        learning_rate: Adam's learning rate.

    Returns:
        Per epoch: ``nll`` (mean negative log-likelihood of the demonstrated actions) and
        ``value_mse``, measured during the epoch; the last epoch also ``agreement``: the share
        of steps whose argmax action, after fitting, is the demonstrated one.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(
            f"warm start needs epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}"
        )
    device = next(policy.parameters()).device
    rng = np.random.default_rng(seed)

    def batch(idx: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor, np.ndarray]:
        obs = {k: torch.as_tensor(v[idx], device=device) for k, v in demos.obs.items()}
        return obs, torch.as_tensor(demos.actions[idx], device=device), demos.masks[idx]

    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    history = []
    policy.set_training_mode(True)  # type: ignore[operator]
    try:
        for _ in range(epochs):
            order = rng.permutation(len(demos))
            nll = mse = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                obs, actions, masks = batch(idx)
                returns = torch.as_tensor(demos.returns[idx], device=device)
                values, log_prob, _ = policy.evaluate_actions(  # type: ignore[operator]
                    obs, actions, action_masks=masks
                )
                value_loss = torch.nn.functional.mse_loss(values.reshape(-1), returns)
                loss = -log_prob.mean() + vf_coef * value_loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                nll += float(-log_prob.detach().sum())
                mse += float(value_loss.detach()) * len(idx)
            history.append({"nll": nll / len(order), "value_mse": mse / len(order)})
    finally:
        policy.set_training_mode(False)  # type: ignore[operator]
    agree = 0
    with torch.no_grad():
        for start in range(0, len(demos), batch_size):
            obs, actions, masks = batch(np.arange(start, min(start + batch_size, len(demos))))
            dist = policy.get_distribution(obs, action_masks=masks)  # type: ignore[operator]
            agree += int((dist.get_actions(deterministic=True) == actions).sum())
    history[-1]["agreement"] = agree / len(demos)
    return history
