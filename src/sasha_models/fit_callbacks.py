"""Lightning callbacks of the model fits (:func:`~sasha_models.lit.train_model`).

- :class:`TieBreakCheckpoint` — which epoch is kept: the best ``monitor`` value, ties going to
  the lower ``val/loss`` (or to the first epoch, the official rule).
- :class:`ResumePoint` — a killed fit's way back: the whole training state and the random
  states at an epoch's end, every so often, resumed to the bits of an unkilled fit.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from torch import Tensor

__all__ = ["RESUME_CHECKPOINT", "ResumePoint", "TieBreakCheckpoint"]


class TieBreakCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (``save_top_k=1``) whose ties go to a second metric.

    The official rule keeps an epoch only if its val AUC + F1 is strictly above the best so far,
    so of the epochs that share the best score the *first* is kept. A small validation split
    saturates early: on the demo's 15 val slides HAFED reaches AUC = F1 = 1 at epoch 3 of 30,
    with val CE 0.59 (0.07 by epoch 20), so the kept model is nearly untrained — its
    probabilities on partial states sit within 0.1 of 0.5, and the agents' CE reward barely
    moves with what they zoom. Here a later epoch with the same score replaces the kept one
    when its ``tie_break`` metric is lower (``val/loss``: the better-fitted of equally ranked
    models). Where no two epochs tie — a validation split that does not saturate — it keeps
    what the official rule keeps.

    Args:
        tie_break: the metric (lower is better) that decides between equal ``monitor`` values;
            ``None`` keeps the first, as ``ModelCheckpoint``.
        **kwargs: ``ModelCheckpoint``'s; ``save_top_k`` must be 1 when ``tie_break`` is set.
    """

    def __init__(self, tie_break: str | None = "val/loss", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if tie_break is not None and self.save_top_k != 1:
            raise ValueError(f"tie_break needs save_top_k=1, got {self.save_top_k}")
        self.tie_break = tie_break
        self.best_tie_value: float | None = None

    def check_monitor_top_k(self, trainer: L.Trainer, current: Tensor | None = None) -> bool:
        """Whether ``current`` replaces the kept checkpoint: a better score, or an equal score
        with a lower ``tie_break`` value."""
        if current is None:
            return False
        tie = trainer.callback_metrics.get(self.tie_break) if self.tie_break else None
        keep = super().check_monitor_top_k(trainer, current)
        if not keep and tie is not None and self.best_k_models:
            best = self.best_k_models[self.kth_best_model_path]
            lower = self.best_tie_value is None or float(tie) < self.best_tie_value
            keep = trainer.strategy.reduce_boolean_decision(float(current) == float(best) and lower)
        if keep and tie is not None:
            self.best_tie_value = float(tie)
        return keep

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_tie_value": self.best_tie_value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_tie_value = state_dict.get("best_tie_value")


#: where :class:`ResumePoint` keeps a fit's last resume point, below ``out_dir``
RESUME_CHECKPOINT = Path("checkpoints") / "resume.ckpt"


class ResumePoint(Checkpoint):
    """A killed fit's way back: the whole training state at the end of an epoch, at most every
    ``every_s`` seconds, to ``path`` (written whole, then renamed).

    Lightning's checkpoint holds the weights, the optimiser and schedule, the loops and the
    callbacks (the kept best checkpoint, as :class:`TieBreakCheckpoint` left it after judging
    the epoch: a checkpoint callback itself, this one runs after it); this callback adds the
    random states the next epochs draw from (torch's, its CUDA generators', NumPy's and
    Python's global generators: the data order, the TSU's fresh pairs, dropout, HAFED's random
    top-K), taken after the epoch's validation, and the run's ``key``. A fit resumed from it
    (:func:`~sasha_models.lit.train_model` with the same ``resume_key``) computes the same
    bits as one never killed, on the same machine and settings, in one process (CPU or one
    GPU). Under DDP only rank 0's random states are kept and every rank gets them back: the
    fit resumes at the right epoch with the right weights and optimiser, but its later draws
    are not those of an unkilled run. Everything in the file reads back with
    ``torch.load(weights_only=True)``.

    Args:
        path: the resume checkpoint (``out_dir/checkpoints/resume.ckpt``).
        key: what the run is (the stage's cache key); a checkpoint of another key is not
            resumed from.
        every_s: seconds between resume points (0: every epoch); the first is due
            ``every_s`` after the fit starts.
        discard: remove the point found at ``path`` when the fit starts (one of another
            key, cut short, or not wanted: a forced re-run), on global rank 0.
    """

    def __init__(self, path: Path, key: str, every_s: float, discard: bool = False) -> None:
        self.path, self.key, self.every_s = Path(path), str(key), float(every_s)
        self.discard = discard
        self._last = time.monotonic()
        self._restored = False  # random states put back from a resume point
        self.resumed_epoch: int | None = None  # the first epoch a resumed fit ran

    @property
    def state_key(self) -> str:
        return "ResumePoint"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.partial.unlink(missing_ok=True)  # a point a kill cut short while writing
            if self.discard:
                self.path.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        name, keys, *rest = cast(tuple, np.random.get_state(legacy=True))
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return {
            "key": self.key,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if cuda else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), *rest],
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # put back at once: Lightning makes the next epoch's data iterator (which draws the
        # data order) after restoring the callbacks and before ``on_train_epoch_start``
        torch.set_rng_state(state_dict["torch"])
        cuda = state_dict.get("cuda") or []
        if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        name, keys, *rest = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        self._restored = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored:
            self.resumed_epoch, self._restored = int(trainer.current_epoch), False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = time.monotonic() - self._last >= self.every_s
        if not trainer.strategy.broadcast(due) or trainer.current_epoch + 1 >= (
            trainer.max_epochs or 0
        ):
            return  # not due, or the last epoch: the fit is about to end
        tmp = self.partial
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier()
        self._last = time.monotonic()

    @property
    def partial(self) -> Path:
        """Where a resume point is written before it is renamed into place (a kill while
        writing leaves it behind; the next fit's :meth:`setup` removes it)."""
        return self.path.with_name(f".{self.path.name}.tmp")

    @staticmethod
    def key_of(path: Path) -> str | None:
        """The ``key`` a resume checkpoint was written for, or ``None`` if unreadable."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            return str(ckpt["callbacks"]["ResumePoint"]["key"])
        except Exception:  # a file cut short by a kill, or not ours: start afresh
            return None
