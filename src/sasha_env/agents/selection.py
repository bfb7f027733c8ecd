"""Validation-selected agents: score the argmax policy on the val split while it trains, keep the best.

SASHA's official training keeps the epoch with the lowest ``(2 − AUC − F1) + CE`` on the
validation slides, not the last policy: PPO's returns are noisy, and the policy at the end of a
budget is often not its best. :class:`ValSelection` does the same for any SB3 algorithm the
agents stage trains: every ``every`` rollouts it runs one argmax episode per validation slide,
writes a row of ``val_curve.csv``, and remembers the weights with the lowest criterion; when
training ends those weights are put back into the model, so the saved and exported agent is the
selected one.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from ..atomic import PartialCSV
from ..envs.wsi import SashaWSIEnv
from .episodes import agent_policy, run_episodes

__all__ = ["VAL_CURVE", "ValSelection", "selection_score"]

VAL_CURVE = "val_curve.csv"


def selection_score(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The official selection criterion on validation slides, lower is better.

    Args:
        probs: ``(n, C)`` final-state class probabilities; labels: ``(n,)`` class indices.

    Returns:
        ``{'auc', 'f1', 'accuracy', 'ce', 'score'}`` with ``score = (2 − AUC − F1) + CE``
        (an undefined AUC, one class only, counts as 0.5).
    """
    from sasha_models.metrics import classification_metrics

    m = classification_metrics(probs, labels)
    p = np.clip(np.asarray(probs, np.float64)[np.arange(len(labels)), labels], 1e-12, 1.0)
    ce = float(-np.log(p).mean())
    auc = 0.5 if math.isnan(m["auc"]) else m["auc"]
    return {
        "auc": m["auc"],
        "f1": m["f1"],
        "accuracy": m["accuracy"],
        "ce": ce,
        "score": (2 - auc - m["f1"]) + ce,
    }


class ValSelection(BaseCallback):
    """SB3 callback: validate every ``every`` rollouts, keep the best weights, restore them at the end.

    Args:
        env: an environment over the validation split (same ``max_patches`` as training).
        every: rollouts between validations (``>= 1``); the last policy is validated too.
        out_dir: where ``val_curve.csv`` goes (``timestep, auc, f1, accuracy, ce, score``);
            ``None`` keeps the rows in :attr:`rows` only.
    """

    def __init__(self, env: SashaWSIEnv, every: int, out_dir: Path | None) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"validate every >= 1 rollouts, got {every}")
        self.env, self.every = env, int(every)
        self.path = None if out_dir is None else Path(out_dir) / VAL_CURVE
        self.rows: list[dict] = []
        self.rollouts = 0
        self.best: dict | None = None
        self._best_state: dict | None = None
        self._last_updates = -1  # the policy's update count at the last validation

    def _on_training_start(self) -> None:
        self.csv = None
        if self.path is not None:
            self.csv = PartialCSV(self.path, ["timestep", "auc", "f1", "accuracy", "ce", "score"])

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        if self.rollouts % self.every == 0:
            self._validate()

    def _validate(self) -> None:
        # A rollout ends before its update, so a validation there scores the policy of the
        # previous update; at the end of training the last update's policy is new and is
        # scored too. Skip only when the weights have not changed since the last check.
        updates = int(getattr(self.model, "_n_updates", self.num_timesteps))
        if updates == self._last_updates:
            return
        self._last_updates = updates
        episodes = run_episodes(self.env, agent_policy(self.model), self.env.slide_ids)
        probs = np.stack([e["probabilities"] for e in episodes])
        labels = np.array([e["label"] for e in episodes])
        row = {"timestep": self.num_timesteps, **selection_score(probs, labels)}
        self.rows.append(row)
        if self.csv is not None:
            self.csv.write([row[k] for k in ("timestep", "auc", "f1", "accuracy", "ce", "score")])
        if self.best is None or row["score"] < self.best["score"]:
            self.best = row
            self._best_state = copy.deepcopy(self.model.policy.state_dict())

    def _on_training_end(self) -> None:
        self._validate()  # the last policy competes too
        if self.csv is not None:
            self.csv.close()
        if self._best_state is not None:
            self.model.policy.load_state_dict(self._best_state)
