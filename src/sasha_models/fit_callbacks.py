"""Lightning callbacks of the model fits (:func:`~sasha_models.lit.train_model`).

- :class:`TieBreakCheckpoint` — which epoch is kept: the best ``monitor`` value, ties going to
  the lower ``val/loss`` (or to the first epoch, the official rule).
- :class:`ResumePoint` — a killed fit's way back: the whole training state and the random
  states at an epoch's end, every so often, resumed to the bits of an unkilled fit.
- :class:`FlushDenormals` — denormal floats flushed to zero in a fit on one torch thread.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from torch import Tensor

from .denormals import flush_denormals

__all__ = ["RESUME_CHECKPOINT", "FlushDenormals", "ResumePoint", "TieBreakCheckpoint"]


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
    top-K), taken after the epoch's validation, and the run's ``key``. Under DDP every rank's
    states are gathered for rank 0 to write, and each rank gets its own back. A fit resumed
    from it (:func:`~sasha_models.lit.train_model` with the same ``resume_key``) computes the
    same bits as one never killed, on the same machine and settings (the same world size).
    Everything in the file reads back with ``torch.load(weights_only=True)``.

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
        self._rank, self._world = 0, 1  # this process's global rank, and how many (set up)
        self._device = torch.device("cpu")  # this process's device (set up)
        self._states: dict[str, Tensor] | None = None  # every rank's, while a point is saved
        self.resumed_epoch: int | None = None  # the first epoch a resumed fit ran

    @property
    def state_key(self) -> str:
        return "ResumePoint"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._rank, self._world = int(trainer.global_rank), int(trainer.world_size)
        self._device = trainer.strategy.root_device
        if trainer.is_global_zero:
            self.partial.unlink(missing_ok=True)  # a point a kill cut short while writing
            if self.discard:
                self.path.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        states = self._states if self._states is not None else _one_rank(_rng_tensors(None))
        return {"key": self.key, "format": RESUME_FORMAT, **states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # put back at once: Lightning makes the next epoch's data iterator (which draws the
        # data order) after restoring the callbacks and before ``on_train_epoch_start``
        states = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}
        ranks = int(states["torch"].shape[0])
        if ranks != self._world:
            warnings.warn(
                f"{self.path} was written by {ranks} processes and is resumed by {self._world}: "
                "the fit resumes, but its random draws are not those of an unkilled run",
                stacklevel=2,
            )
        row = self._rank if self._rank < ranks else 0
        _set_rng({k: v[row] for k, v in states.items()}, self._device)
        self._restored = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored:
            self.resumed_epoch, self._restored = int(trainer.current_epoch), False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.should_stop:  # stopped early (every rank agrees): the fit is about to end
            return
        due = time.monotonic() - self._last >= self.every_s
        if not trainer.strategy.broadcast(due) or trainer.current_epoch + 1 >= (
            trainer.max_epochs or 0
        ):
            return  # not due, or the last epoch: the fit is about to end
        # every rank's random states, gathered for rank 0 to write (each gets its own back)
        states = _rng_tensors(self._device)
        if trainer.world_size > 1:  # on the device the collectives run on (NCCL: the GPU)
            gather = trainer.strategy.all_gather
            self._states = {k: gather(v.to(self._device)).cpu() for k, v in states.items()}
        else:
            self._states = _one_rank(states)
        tmp = self.partial
        try:
            trainer.save_checkpoint(tmp)
        finally:
            self._states = None
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
        """The ``key`` a resume checkpoint was written for, or ``None`` if unreadable (cut
        short, not ours, or of another format)."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            state = ckpt["callbacks"]["ResumePoint"]
            return str(state["key"]) if state.get("format") == RESUME_FORMAT else None
        except Exception:  # a file cut short by a kill, or not ours: start afresh
            return None


#: the layout of :class:`ResumePoint`'s random states (a point of another layout is not read)
RESUME_FORMAT = 2


def _rng_tensors(device: torch.device | None) -> dict[str, Tensor]:
    """This process's random states as int64 / float64 CPU tensors of fixed sizes (what the
    ranks gather): torch's, ``device``'s when it is a GPU, NumPy's and Python's generators."""
    _, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state(legacy=True))
    version, internal, gauss = random.getstate()
    out = {
        "torch": torch.get_rng_state().to(torch.int64),
        "numpy": torch.tensor([*keys.astype(np.int64), pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
    }
    if device is not None and device.type == "cuda":  # the same on every rank of a fit
        out["cuda"] = torch.cuda.get_rng_state(device).to(torch.int64)
    return out


def _set_rng(states: dict[str, Tensor], device: torch.device) -> None:
    """Put back the random states of :func:`_rng_tensors` (the GPU's on ``device``)."""
    torch.set_rng_state(states["torch"].to(torch.uint8))
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"].to(torch.uint8), device)
    n = states["numpy"]
    keys = n[:-2].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(n[-2]), int(n[-1]), float(states["numpy_gauss"][0])))
    version, *internal = states["python"].tolist()
    gauss = float(states["python_gauss"][0])
    random.setstate((version, tuple(internal), None if math.isnan(gauss) else gauss))


def _one_rank(states: dict[str, Tensor]) -> dict[str, Tensor]:
    """One process's states with the ranks' dimension, ``(1, ...)``."""
    return {k: v[None] for k, v in states.items()}


class FlushDenormals(Callback):
    """Denormal floats flushed to zero during a fit that runs on one torch thread
    (:mod:`sasha_models.denormals`: a long fit on the CPU steps about twice as fast).

    Decided when the fit is set up, so on the thread count the fit runs with (Lightning's DDP
    launcher may set a rank's threads inside ``fit``): with more than one thread, torch's
    worker threads would not flush and the bits would depend on how the work was split, so the
    setting is left alone. The setting before the fit is restored when it ends or fails.
    """

    def __init__(self) -> None:
        self._flushing: ExitStack | None = None  # open while this fit flushes

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._flushing is None and torch.get_num_threads() == 1:
            self._flushing = ExitStack()
            self._flushing.enter_context(flush_denormals())

    def _restore(self) -> None:
        if self._flushing is not None:
            self._flushing.close()  # flush_denormals restores the setting before the fit
            self._flushing = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
