"""SB3's logger for the agents stage: ``progress.csv`` beside each agent, the same keys in W&B.

Stable-baselines3 records its training diagnostics through :class:`~stable_baselines3.common.
logger.Logger` (``rollout/ep_rew_mean``, ``rollout/ep_len_mean``, ``time/fps``, and the
algorithm's ``train/*`` keys: PPO's ``train/loss``, ``train/policy_gradient_loss``,
``train/value_loss``, ``train/entropy_loss``, ``train/approx_kl``, ``train/clip_fraction``,
``train/explained_variance``; A2C's and DQN's own). :func:`sb3_logger` builds that logger with
a CSV writer (``progress.csv``, SB3's own format), stdout when asked, TensorBoard when asked,
and :class:`WandbOutputFormat`, a writer that sends every dump to a W&B run.

W&B rows: every ``run.log`` call here carries ``global_step`` (environment steps) and no
``step=``; :func:`define_step_metric` makes ``global_step`` the x-axis of every key. W&B merges
calls that give the same ``step=`` into one row, so two episodes that end on the same
environment step would collapse into one (the bug this layout avoids).
"""

from __future__ import annotations

import os
import sys
from numbers import Number
from pathlib import Path
from typing import Any

from stable_baselines3.common.logger import (
    CSVOutputFormat,
    HumanOutputFormat,
    KVWriter,
    Logger,
    TensorBoardOutputFormat,
)

__all__ = ["PROGRESS_CSV", "STEP_METRIC", "WandbOutputFormat", "define_step_metric", "sb3_logger"]

#: SB3's CSV log beside each agent.
PROGRESS_CSV = "progress.csv"
#: The W&B key every row carries: environment steps so far.
STEP_METRIC = "global_step"


def define_step_metric(run: Any) -> None:
    """Make :data:`STEP_METRIC` the x-axis of every key of the W&B ``run``."""
    run.define_metric(STEP_METRIC)
    run.define_metric("*", step_metric=STEP_METRIC)


class WandbOutputFormat(KVWriter):
    """SB3 ``KVWriter``: each dump becomes one W&B row, ``global_step`` = SB3's ``step``.

    Keys excluded for ``"wandb"`` (SB3's ``exclude=``) and values that are not numbers
    (SB3's ``Video``, ``Figure``...) are left out.

    Args:
        run: a W&B run (``wandb.init``'s result), with :func:`define_step_metric` applied.
    """

    def __init__(self, run: Any) -> None:
        self.run = run

    def write(
        self,
        key_values: dict[str, Any],
        key_excluded: dict[str, tuple[str, ...]],
        step: int = 0,
    ) -> None:
        row = {
            key: value
            for key, value in key_values.items()
            if isinstance(value, Number) and "wandb" not in (key_excluded.get(key) or ())
        }
        if row:
            self.run.log({**row, STEP_METRIC: int(step)})

    def close(self) -> None:
        """Nothing to close: the run belongs to the caller."""


def sb3_logger(
    folder: Path | None,
    wandb_run: Any = None,
    verbose: bool = False,
    tensorboard: str | os.PathLike | None = None,
) -> Logger:
    """SB3's logger for one agent.

    Args:
        folder: where ``progress.csv`` goes (``None``: no CSV).
        wandb_run: a W&B run the same keys go to, or ``None``.
        verbose: also print SB3's table to stdout (``agents.extra.verbose``).
        tensorboard: a TensorBoard log folder (``agents.extra.tensorboard_log``), or ``None``.
    """
    formats: list[KVWriter] = []
    if folder is not None:
        formats.append(CSVOutputFormat(str(Path(folder) / PROGRESS_CSV)))
    if verbose:
        formats.append(HumanOutputFormat(sys.stdout))
    if tensorboard:
        formats.append(TensorBoardOutputFormat(str(tensorboard)))
    if wandb_run is not None:
        formats.append(WandbOutputFormat(wandb_run))
    return Logger(None if folder is None else str(folder), formats)
