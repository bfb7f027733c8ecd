"""Trained agents as weights-only tensors plus a JSON description: loading them never unpickles.

An SB3 ``agent.zip`` holds serialised Python objects, and loading one runs whatever code
it carries, so a workdir from someone else could run code on your machine. Every agent the
pipeline trains is therefore also exported as::

    agents/<name>/policy.pt     the policy's state_dict: tensors only (torch.load weights_only=True)
    agents/<name>/policy.json   which policy class, its keyword arguments and its spaces
                                (n_actions = max_patches, or max_patches + 1 with the stop
                                action of learned stopping)

and evaluation, ``sasha predict`` and the sweep read only these; nothing in this package loads
the zip. It stays beside them for resuming training with SB3's own loader, on trusted input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from stable_baselines3.dqn.policies import MultiInputPolicy as DQNMultiInputPolicy

from sasha_models.policy import SashaActorCriticPolicy, SashaPPOPolicy
from sasha_models.spaces import action_space, observation_space

from ..atomic import replace_atomically, write_json

__all__ = ["POLICY_WEIGHTS", "POLICY_DESCRIPTION", "export_policy", "load_policy"]

POLICY_WEIGHTS = "policy.pt"
POLICY_DESCRIPTION = "policy.json"
FORMAT_VERSION = 1


def _policy_classes() -> dict[str, type]:
    """The policy classes an export may name (nothing else can be constructed)."""
    return {
        "SashaActorCriticPolicy": SashaActorCriticPolicy,
        "SashaPPOPolicy": SashaPPOPolicy,
        "DQNMultiInputPolicy": DQNMultiInputPolicy,
    }


def _class_key(policy: Any) -> str:
    for key, cls in _policy_classes().items():
        if type(policy) is cls:
            return key
    raise TypeError(
        f"cannot export a {type(policy).__name__}: not one of {list(_policy_classes())}"
    )


def export_policy(model: Any, out_dir: str | os.PathLike, algo: str) -> Path:
    """Write ``policy.pt`` (tensors) and ``policy.json`` (class, kwargs, spaces) for an SB3 model.

    Args:
        model: a trained SB3 / sb3-contrib algorithm whose policy is one of
            :func:`_policy_classes` and whose ``policy_kwargs`` are plain JSON values.
        out_dir: the agent's folder.
        algo: the algorithm's name (``maskable_ppo``, ``ppo``, ``a2c``, ``dqn``).

    Returns:
        The path of ``policy.pt``.
    """
    out = Path(out_dir)
    obs_space = model.observation_space
    # what acting needs; the optimiser (A2C's RMSprop, say) only matters for training
    kwargs = {
        k: v
        for k, v in (model.policy_kwargs or {}).items()
        if k not in ("optimizer_class", "optimizer_kwargs")
    }
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise TypeError(
            f"policy_kwargs {kwargs!r} are not plain JSON values, so the policy cannot be "
            "described without pickling; use numbers, strings and lists"
        ) from exc
    description = {
        "format_version": FORMAT_VERSION,
        "algo": algo,
        "policy": _class_key(model.policy),
        "policy_kwargs": kwargs,
        "max_patches": int(obs_space["features"].shape[0]),
        "feature_dim": int(obs_space["features"].shape[1]),
        "n_actions": int(model.action_space.n),
    }
    state = {k: v.detach().cpu().clone() for k, v in model.policy.state_dict().items()}
    weights = out / POLICY_WEIGHTS
    replace_atomically(weights, lambda tmp: torch.save(state, tmp))
    write_json(out / POLICY_DESCRIPTION, description)
    return weights


def load_policy(agent_dir: str | os.PathLike, device: str = "cpu") -> Any:
    """Rebuild an exported policy, in eval mode, from ``policy.json`` and ``policy.pt``.

    Nothing is unpickled: the class comes from a fixed list, the spaces are rebuilt from
    their sizes (:mod:`sasha_models.spaces`), and the weights load with ``weights_only=True``.

    Raises:
        FileNotFoundError: the folder has no export (e.g. an agent trained before exports
            existed: re-run the agents stage).
        ValueError: a malformed or unknown description, or weights that do not fit it.
    """
    folder = Path(agent_dir)
    desc_path, weights = folder / POLICY_DESCRIPTION, folder / POLICY_WEIGHTS
    for path in (desc_path, weights):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: {folder} holds no weights-only agent export; re-run the "
                "agents stage (sasha pipeline --workdir DIR --force agents)"
            )
    try:
        desc = json.loads(desc_path.read_text())
        cls = _policy_classes()[desc["policy"]]
        P, d = int(desc["max_patches"]), int(desc["feature_dim"])
        kwargs = dict(desc.get("policy_kwargs") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{desc_path}: not a valid agent description ({exc!r})") from exc
    n_actions = int(desc.get("n_actions", P))
    if n_actions not in (P, P + 1):  # one action per patch slot, and stop (learned stopping)
        raise ValueError(
            f"{desc_path}: n_actions {n_actions} is neither max_patches {P} nor {P + 1} (with stop)"
        )
    space = action_space(P, stop=n_actions == P + 1)
    policy = cls(observation_space(P, d), space, lambda _: 0.0, **kwargs)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        policy.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{weights} does not fit the policy {desc_path} describes: {exc}") from exc
    policy.set_training_mode(False)
    return policy.to(device)
