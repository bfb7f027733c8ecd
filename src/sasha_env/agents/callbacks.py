"""SB3 callbacks of the agents stage: the learning curve, and validation-selected weights.

- :class:`EpisodeLog` writes one row of ``episodes.csv`` per finished episode (and logs to
  W&B, and shows a progress bar);
- :class:`ValSelection` follows SASHA's official training, which keeps the epoch with the
  lowest ``(2 − AUC − F1) + CE`` on the validation slides (:func:`~.selection.selection_score`),
  not the last policy: PPO's returns are noisy, and the policy at the end of a budget is often
  not its best. Every ``every`` rollouts it runs one argmax episode per validation slide,
  writes a row of ``val_curve.csv``, and remembers the weights with the lowest criterion; when
  training ends those weights are put back into the model, so the saved and exported agent is
  the selected one. It works with any SB3 algorithm the agents stage trains. A learned-stop
  agent (an env with ``stop_action``) is selected on the criterion plus its env's ``zoom_cost``
  times the mean number of zooms, the per-zoom price it is trained to weigh (otherwise the
  checkpoint that reads most would tend to win).

  With ``keep="average"`` it keeps, instead of the one best check, the mean of the weights of
  every policy validated from ``start`` on (the last included): stochastic weight averaging
  over the second part of training (Izmailov et al., UAI 2018; for RL, Nikishin et al., 2018).
  Where the val split is too small to rank checkpoints (the criterion saturates at AUC 1 and
  is then decided by CE differences of hundredths), the mean keeps what the late policies
  share and averages out their swings. The averaged policy is validated once more and that
  row is the one recorded as kept. Not the official rule: the ``paper`` protocol keeps the best.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from tqdm.auto import tqdm

from ..atomic import PartialCSV
from ..envs.wsi import SashaWSIEnv
from .config import KEEP_RULES
from .episodes import agent_policy, run_episodes
from .logs import STEP_METRIC
from .selection import selection_score

__all__ = ["VAL_CURVE", "EpisodeLog", "FlushLog", "ValSelection"]

#: What :class:`ValSelection` records in SB3's logger at each validation (``val/<key>``).
VAL_KEYS = ("auc", "f1", "accuracy", "ce", "score")

VAL_CURVE = "val_curve.csv"


class EpisodeLog(BaseCallback):
    """SB3 callback: one CSV row per finished episode (the learning curve), W&B if given.

    Args:
        path: the CSV (written under a temporary name, renamed when training ends), or
            ``None`` for no file.
        wandb_run: a W&B run to log ``episode/return`` and ``episode/correct`` to, one row per
            finished episode (several envs may finish on one step: each is its own row).
        progress: show a progress bar of ``total`` steps named ``name``.
    """

    def __init__(
        self,
        path: Path | None,
        wandb_run: Any = None,
        progress: bool = True,
        total: int = 0,
        name: str = "agent",
    ):
        super().__init__()
        self.path, self.wandb_run, self.progress, self.total = path, wandb_run, progress, total
        self.name = name

    def _on_training_start(self) -> None:
        self.csv = None
        if self.path is not None:
            header = ["timestep", "episode_return", "correct", "slide_id", "wall_s"]
            self.csv = PartialCSV(self.path, header)
        self.returns = np.zeros(self.training_env.num_envs)
        self.t0 = time.perf_counter()
        self.bar = None
        if self.progress:
            self.bar = tqdm(total=self.total, desc=self.name, unit="step")

    def _on_step(self) -> bool:
        self.returns += self.locals["rewards"]
        for i, done in enumerate(self.locals["dones"]):
            if not done:
                continue
            info = self.locals["infos"][i]
            ret, correct = float(self.returns[i]), int(bool(info.get("correct")))
            wall = round(time.perf_counter() - self.t0, 2)
            if self.csv is not None:
                self.csv.write([self.num_timesteps, ret, correct, info.get("slide_id"), wall])
            if self.wandb_run is not None:  # one row per episode: no ``step=`` (see .logs)
                self.wandb_run.log(
                    {
                        "episode/return": ret,
                        "episode/correct": correct,
                        STEP_METRIC: self.num_timesteps,
                    }
                )
            self.returns[i] = 0.0
        if self.bar is not None:
            self.bar.update(self.training_env.num_envs)
        return True

    def _on_training_end(self) -> None:
        if self.csv is not None:
            self.csv.close()
        if self.bar is not None:
            self.bar.close()


class ValSelection(BaseCallback):
    """SB3 callback: validate every ``every`` rollouts, keep the best weights, restore them at the end.

    Args:
        env: an environment over the validation split (same ``max_patches`` as training).
        every: rollouts between validations (``>= 1``); the last policy is validated too.
        out_dir: where ``val_curve.csv`` goes (``timestep, auc, f1, accuracy, ce, score``, and
            ``mean_frac`` for a learned-stop agent); ``None`` keeps the rows in :attr:`rows`
            only.
        slide_ids: the slides of ``env`` it validates on (default: all of them); a sweep
            selects checkpoints on one half of val and scores trials on the other.
        start: the timestep from which a validated policy can be kept (earlier ones are
            scored and written, not kept); the last policy, validated when training ends,
            always competes. 0: any.
        keep: ``"best"`` (the official rule) keeps the eligible policy with the lowest
            criterion; ``"average"`` keeps the element-wise mean of the floating-point weights
            of every eligible validated policy (the last included), validated once more when
            training ends. :attr:`best` is then that row, with ``rule: "average"``,
            ``checkpoints`` (how many were averaged) and ``first_timestep``.

    Each validation is also recorded in SB3's logger as ``val/auc``, ``val/f1``,
    ``val/accuracy``, ``val/ce`` and ``val/score`` (so in ``progress.csv`` and W&B).

    With the stop action (``env.stop_action``) the score adds ``env.zoom_cost`` times the mean
    zooms per slide, and the row ``mean_frac`` (mean fraction read; also ``val/mean_frac``).
    """

    def __init__(
        self,
        env: SashaWSIEnv,
        every: int,
        out_dir: Path | None,
        slide_ids: Sequence[str] | None = None,
        start: int = 0,
        keep: str = "best",
    ) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"validate every >= 1 rollouts, got {every}")
        if keep not in KEEP_RULES:
            raise ValueError(f"keep {keep!r}: choose one of {', '.join(KEEP_RULES)}")
        self.env, self.every, self.start, self.keep = env, int(every), int(start), keep
        self.slide_ids = list(env.slide_ids if slide_ids is None else slide_ids)
        self.path = None if out_dir is None else Path(out_dir) / VAL_CURVE
        base_env = getattr(env, "unwrapped", env)
        stop = getattr(base_env, "stop_action", False)
        self.zoom_cost = float(getattr(base_env, "zoom_cost", 0.0)) if stop else None
        base = ["timestep", "auc", "f1", "accuracy", "ce", "score"]
        self.columns = base if self.zoom_cost is None else [*base, "mean_frac"]
        self.rows: list[dict] = []
        self.rollouts = 0
        self.best: dict | None = None
        self._best_state: dict | None = None
        self._last_updates = -1  # the policy's update count at the last validation
        self._sum: dict | None = None  # keep="average": running sum of the eligible weights
        self._averaged: list[int] = []  # ... and the timesteps that went into it

    def _on_training_start(self) -> None:
        self.csv = None
        if self.path is not None:
            self.csv = PartialCSV(self.path, self.columns)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        if self.rollouts % self.every == 0:
            self._validate()

    def _validate(self, last: bool = False) -> None:
        # A rollout ends before its update, so a validation there scores the policy of the
        # previous update; at the end of training the last update's policy is new and is
        # scored too. Skip only when the weights have not changed since the last check.
        updates = int(getattr(self.model, "_n_updates", self.num_timesteps))
        if updates == self._last_updates:
            if last and self.rows and self.best is None and self._sum is None:
                self._keep(self.rows[-1])  # the last policy, scored already
            return
        self._last_updates = updates
        row = {"timestep": self.num_timesteps, **self._score()}
        self.rows.append(row)
        logger = getattr(self.model, "logger", None)  # SB3's (absent on stand-in models)
        if logger is not None:
            for key in VAL_KEYS + (("mean_frac",) if "mean_frac" in row else ()):
                logger.record(f"val/{key}", row[key])
        if self.csv is not None:
            self.csv.write([row[k] for k in self.columns])
        eligible = last or self.num_timesteps >= self.start
        if eligible and (
            self.keep == "average" or self.best is None or row["score"] < self.best["score"]
        ):
            self._keep(row)

    def _score(self) -> dict[str, float]:
        """One argmax episode per validation slide with the model's current weights."""
        episodes = run_episodes(self.env, agent_policy(self.model), self.slide_ids)
        probs = np.stack([e["probabilities"] for e in episodes])
        labels = np.array([e["label"] for e in episodes])
        row = selection_score(probs, labels)
        if self.zoom_cost is not None:  # learned stopping: what reading cost, as in training
            row["mean_frac"] = float(np.mean([e["frac_read"] for e in episodes]))
            row["score"] += self.zoom_cost * float(np.mean([len(e["zoomed"]) for e in episodes]))
        return row

    def _keep(self, row: dict) -> None:
        """The model's current weights (validated as ``row``) are eligible: keep them."""
        if self.keep == "average":
            self._add_to_average(row["timestep"])
            return
        self.best = row
        self._best_state = copy.deepcopy(self.model.policy.state_dict())

    def _add_to_average(self, timestep: int) -> None:
        # each call follows an update (``_validate`` skips a check with unchanged weights), so
        # no policy is added twice
        state = self.model.policy.state_dict()
        if self._sum is None:
            self._sum = {
                k: v.detach().double().clone() if v.is_floating_point() else v.detach().clone()
                for k, v in state.items()
            }
        else:
            for k, v in state.items():
                if v.is_floating_point():
                    self._sum[k] += v.detach().double()
                else:  # integer buffers (counters): the latest
                    self._sum[k] = v.detach().clone()
        self._averaged.append(int(timestep))

    def _on_training_end(self) -> None:
        self._validate(last=True)  # the last policy competes too
        if self.csv is not None:
            self.csv.close()
        if self.keep == "average" and self._sum is not None:
            n = len(self._averaged)
            own = self.model.policy.state_dict()
            mean = {
                k: (v / n).to(own[k].dtype) if own[k].is_floating_point() else v
                for k, v in self._sum.items()
            }
            self.model.policy.load_state_dict(mean)
            self.best = {
                "timestep": self.num_timesteps,
                **self._score(),
                "rule": "average",
                "checkpoints": n,
                "first_timestep": self._averaged[0],
            }
        elif self._best_state is not None:
            self.model.policy.load_state_dict(self._best_state)


class FlushLog(BaseCallback):
    """SB3 callback: write what SB3's logger still holds when training ends.

    On-policy algorithms dump their log *before* each update, so the last update's ``train/*``
    keys (and the last validation's ``val/*``) would never reach ``progress.csv``; a budget of
    one rollout would log no ``train/*`` at all. Put it after the callbacks that record.
    """

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        if self.logger.name_to_value:
            self.logger.dump(self.num_timesteps)
