"""Lightning modules, the training entry point and the checkpoint format.

- :class:`HAFEDModule`, :class:`MILModule`, :class:`TSUModule` — LightningModules: AdamW with a
  per-step half-cycle cosine schedule to 0 (as the official ``adjust_learning_rate``).
  Classifiers log ``val/auc``, ``val/f1``, ``val/acc``, ``val/ece``, ``val/loss`` and
  ``val/score = auc + f1`` (the official checkpoint-selection rule); the TSU logs ``val/loss``
  (MSE) and ``val/identity_loss`` (MSE of predicting ``z_j`` itself).
- :class:`~sasha_models.fit_callbacks.TieBreakCheckpoint` — the best checkpoint by
  ``val/score``, ties going to the lower ``val/loss`` (``select_ties="loss"``, the default) or
  to the first epoch (``"first"``, the official rule); kept in
  :mod:`~sasha_models.fit_callbacks` with :class:`~sasha_models.fit_callbacks.ResumePoint`.
- :func:`train_model` — seeded fit with CSV (and optional offline W&B) logging, best-checkpoint
  selection, single process or DDP; exports ``model.pt``. With a ``resume_key`` a killed fit
  resumes from its last resume point (:class:`~sasha_models.fit_callbacks.ResumePoint`) to
  the bits of an unkilled one.
- ``model.pt`` is a plain dict ``{'state_dict', 'config', 'kind', 'meta'}`` of tensors and
  Python scalars/containers, read back with ``torch.load(weights_only=True)`` by
  :func:`load_model` — no pickled objects.
"""

from __future__ import annotations

import abc
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import Tensor, nn

from .baselines import build_baseline
from .checkpoint import (  # noqa: F401  (re-exported)
    _expected_dim,
    build_model,
    check_feature_dim,
    export_dict,
    load_checkpoint,
    load_model,
    save_export,
)
from .data import BagDataset, BagSource
from .fit_callbacks import RESUME_CHECKPOINT, FlushDenormals, ResumePoint, TieBreakCheckpoint
from .hafed import HAFED, HAFEDConfig, acmil_loss, hafed_loss
from .metrics import classification_metrics
from .tsu import TSU, TSUConfig

__all__ = [
    "HAFEDModule",
    "MILModule",
    "TSUModule",
    "SELECT_TIES",
    "TieBreakCheckpoint",
    "build_model",
    "check_feature_dim",
    "load_checkpoint",
    "load_model",
    "predict_probs",
    "slide_logits",
    "train_model",
]

#: Official baseline learning rate (``step8_wsi_classification_maxmil_abmil_clam_transmil.py``
#: ``--lr`` default 0.0001); weight decay and epochs from ``config/camelyon_config.yml``.
BASELINE_LR, BASELINE_WD, BASELINE_EPOCHS = 1e-4, 1e-5, 50


# ----------------------------------------------------------------------------- helpers
def slide_logits(
    model: nn.Module, x: Tensor, mask: Tensor | None = None, kind: str = "highres"
) -> Tensor:
    """Slide logits of any classifier of the zoo, in its current train/eval mode.

    Args:
        model: :class:`~sasha_models.hafed.HAFED` or a MIL model from
            :data:`~sasha_models.baselines.MIL_MODELS`.
        x: one bag ``(N, ...)`` or a padded batch ``(B, N, ...)``.
        mask: ``(B, N)`` bool padding mask, or ``None``.
        kind: for HAFED, ``'highres'`` means ``x`` holds sub-patch features ``(…, N, k, d)``
            (distil, then classify); anything else means ``x`` is a state ``(…, N, d)``.

    Returns:
        ``(C,)`` or ``(B, C)`` logits.
    """
    if isinstance(model, HAFED):
        if kind == "highres":
            return model(x, mask)["slide_logits"]
        return model.classify(x, mask)
    out = model(x, mask)
    return out["slide_logits"] if isinstance(out, dict) else out


def fused_adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel when every parameter is a floating-point tensor on the
    CPU or a CUDA device, the per-tensor loop otherwise.

    The same update to float rounding, one kernel over all tensors instead of about a dozen
    small ops per tensor: on one CPU thread a training step of the TSU at the official width on
    the demo's d = 1,280 features (13 million parameters) takes about half the time
    (``experiments/bench_optimizer.py``).
    """
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


class _SashaModule(L.LightningModule, abc.ABC):
    """Shared optimiser/schedule and export logic."""

    monitor: str = "val/score"
    monitor_mode: str = "max"

    def __init__(self, lr: float, weight_decay: float, max_epochs: int) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.max_epochs = (
            float(lr),
            float(weight_decay),
            int(max_epochs),
        )
        self.model: nn.Module

    kind: str
    """Checkpoint kind: ``'hafed'``, ``'tsu'`` or ``'mil:<name>'`` (set by each subclass)."""

    @abc.abstractmethod
    def model_config(self) -> dict[str, Any]:
        """Plain-dict configuration that rebuilds the wrapped model."""

    def _set_model(self, cfg: Any, seed: int | None, model_cls: type[nn.Module]) -> None:
        """Build ``model_cls(cfg)`` with seeded initial weights; record the hyper-parameters."""
        self.cfg, self.seed = cfg, seed
        self.model = _seeded(seed, lambda: model_cls(cfg))
        self.save_hyperparameters(
            {"cfg": cfg.to_dict(), "lr": self.lr, "weight_decay": self.weight_decay}
        )

    def export(self) -> dict[str, Any]:
        """The export of the wrapped model (:func:`~sasha_models.checkpoint.export_dict`, no meta)."""
        return export_dict(self.model, self.kind, self.model_config())

    def configure_optimizers(self) -> Any:
        opt = fused_adamw(
            [p for p in self.parameters() if p.requires_grad], self.lr, self.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _gather_cat(self, t: Tensor) -> Tensor:
        """Concatenate ``t`` (first axis) across DDP ranks; sizes may differ."""
        if self.trainer.world_size <= 1:
            return t
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = cast(Tensor, self.all_gather(n)).reshape(-1).tolist()
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: t.shape[0]] = t
        gathered = cast(Tensor, self.all_gather(padded))  # (world, max, ...)
        return torch.cat([gathered[r, :s] for r, s in enumerate(sizes)])


class _ClassifierModule(_SashaModule):
    """Trains on ``(x, mask, y)`` batches; validation computes the slide metrics."""

    def __init__(self, lr: float, weight_decay: float, max_epochs: int) -> None:
        super().__init__(lr, weight_decay, max_epochs)
        self._val_probs: list[Tensor] = []
        self._val_labels: list[Tensor] = []

    @abc.abstractmethod
    def training_loss(
        self, x: Tensor, mask: Tensor, y: Tensor, *extra: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total loss, named parts)`` of a batch (``extra``: what the data module adds)."""

    @abc.abstractmethod
    def slide_logits(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Slide logits ``(B, C)`` of a batch."""

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, mask, y, *extra = batch  # extra: low-res rows for HAFED's partial states
        loss, parts = self.training_loss(x, mask, y, *extra)
        self.log("train/loss", loss, batch_size=len(y), prog_bar=True)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, mask, y = batch
        self._val_probs.append(torch.softmax(self.slide_logits(x, mask).float(), -1).detach())
        self._val_labels.append(y.detach())

    def on_validation_epoch_end(self) -> None:
        if not self._val_probs:
            return
        probs = self._gather_cat(torch.cat(self._val_probs))
        labels = self._gather_cat(torch.cat(self._val_labels))
        self._val_probs.clear()
        self._val_labels.clear()
        m = classification_metrics(probs, labels)
        nll = F.nll_loss(probs.clamp_min(1e-12).log(), labels.long()).item()
        auc = m["auc"] if math.isfinite(m["auc"]) else 0.5  # single-class val: chance
        # Every rank holds the same gathered values; sync_dist just averages equal numbers.
        for name, value in {
            "val/auc": m["auc"],
            "val/f1": m["f1"],
            "val/acc": m["accuracy"],
            "val/ece": m["ece"],
            "val/loss": nll,
            "val/score": auc + m["f1"],
        }.items():
            self.log(name, value, prog_bar=name == "val/score", sync_dist=True)


class HAFEDModule(_ClassifierModule):
    """Trains :class:`~sasha_models.hafed.HAFED` on high-resolution features ``(N, k, d)``.

    Args:
        cfg: :class:`HAFEDConfig` (or its dict); ``None`` = paper defaults.
        lr, weight_decay, max_epochs: ``None`` takes the value from ``cfg``.
        seed: seed of the initial weights; ``None`` draws them from torch's global RNG.
    """

    def __init__(
        self,
        cfg: HAFEDConfig | Mapping[str, Any] | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        max_epochs: int | None = None,
        seed: int | None = None,
    ) -> None:
        cfg = _as_config(HAFEDConfig, cfg)
        super().__init__(*_optimiser_settings(cfg, lr, weight_decay, max_epochs))
        self._set_model(cfg, seed, HAFED)

    kind = "hafed"

    def model_config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def training_loss(self, x, mask, y, *extra):
        lowres = extra[0] if extra else None  # partial states (cfg.partial_states) need it
        return hafed_loss(self.model(x, mask, lowres=lowres), y, self.cfg)

    def slide_logits(self, x, mask=None):
        return self.model(x, mask)["slide_logits"]


class MILModule(_ClassifierModule):
    """Trains a MIL model of :data:`~sasha_models.baselines.MIL_MODELS` on bags ``(N, d)``.

    ``attention_mil`` (HAFED's level 2 — the ``lowres_only`` classifier) is trained with the
    ACMIL loss and HAFED's optimiser defaults; the baselines with cross-entropy and the
    official baseline defaults (lr 1e-4, weight decay 1e-5, 50 epochs).

    Args:
        model_name: key of ``MIL_MODELS``.
        d_in, n_classes: instance feature size and number of classes.
        lr, weight_decay, max_epochs: ``None`` = defaults above.
        seed: seed of the initial weights; ``None`` draws them from torch's global RNG.
        **model_kw: passed to the model's constructor (stored in the checkpoint's config).
    """

    def __init__(
        self,
        model_name: str,
        d_in: int,
        n_classes: int,
        lr: float | None = None,
        weight_decay: float | None = None,
        max_epochs: int | None = None,
        seed: int | None = None,
        **model_kw: Any,
    ) -> None:
        attention = model_name == "attention_mil"
        defaults = HAFEDConfig() if attention else None
        super().__init__(
            lr if lr is not None else (defaults.lr if defaults else BASELINE_LR),
            weight_decay
            if weight_decay is not None
            else (defaults.weight_decay if defaults else BASELINE_WD),
            max_epochs
            if max_epochs is not None
            else (defaults.max_epochs if defaults else BASELINE_EPOCHS),
        )
        self.model_name = model_name
        self._config = {"d_in": int(d_in), "n_classes": int(n_classes), **model_kw}
        self.seed = seed
        self.model = _seeded(seed, lambda: build_baseline(model_name, d_in, n_classes, **model_kw))
        self.save_hyperparameters({"model_name": model_name, "config": self._config, "lr": self.lr})

    @property
    def kind(self) -> str:  # type: ignore[override]
        return f"mil:{self.model_name}"

    def model_config(self) -> dict[str, Any]:
        return dict(self._config)

    def training_loss(self, x, mask, y):
        out = self.model(x, mask)
        if isinstance(out, dict):
            return acmil_loss(out, y)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return loss, {}

    def slide_logits(self, x, mask=None):
        return slide_logits(self.model, x, mask)


class TSUModule(_SashaModule):
    """Trains the :class:`~sasha_models.tsu.TSU` on ``(v_a, z_a, z_j, v_j)`` pair batches.

    Args:
        cfg: :class:`TSUConfig` (or its dict); ``None`` = paper defaults.
        lr, weight_decay, max_epochs: ``None`` takes the value from ``cfg``.
        seed: seed of the initial weights; ``None`` draws them from torch's global RNG.
    """

    monitor = "val/loss"
    monitor_mode = "min"
    kind = "tsu"

    def __init__(
        self,
        cfg: TSUConfig | Mapping[str, Any] | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        max_epochs: int | None = None,
        seed: int | None = None,
    ) -> None:
        cfg = _as_config(TSUConfig, cfg)
        super().__init__(*_optimiser_settings(cfg, lr, weight_decay, max_epochs))
        self._set_model(cfg, seed, TSU)
        self._val_sums = torch.zeros(3, dtype=torch.float64)  # sse, identity sse, count

    def model_config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        v_a, z_a, z_j, v_j = batch
        if v_j.shape[0] == 0:  # no similar patch: a zero loss that still touches every weight
            loss = cast(Tensor, sum(p.sum() for p in self.parameters()) * 0.0)
        else:
            loss = F.mse_loss(self.model(v_a, z_a, z_j), v_j)
        self.log("train/loss", loss, batch_size=max(1, v_j.shape[0]), prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        """Accumulate ``(error, identity error, weight)``: squared errors and element count
        (``validation="fixed"``: the loss pools every pair), or one batch's MSE and 1
        (``"official"``: the mean over slides of each slide's MSE, one slide per batch as in
        ``step5_tsu_training.py``)."""
        v_a, z_a, z_j, v_j = batch
        if v_j.shape[0] == 0:
            return
        sq = (self.model(v_a, z_a, z_j) - v_j).pow(2).double()
        ident = (z_j - v_j).pow(2).double()
        if self.cfg.validation == "official":
            row = torch.stack([sq.mean(), ident.mean(), sq.new_tensor(1.0)])
        else:
            row = torch.stack([sq.sum(), ident.sum(), sq.new_tensor(float(v_j.numel()))])
        self._val_sums += row

    def on_validation_epoch_end(self) -> None:
        sums = self._val_sums
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums.clone(), reduce_op="sum")
        count = sums[2].item()
        loss = sums[0].item() / count if count else float("nan")
        identity = sums[1].item() / count if count else float("nan")
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/identity_loss", identity, sync_dist=True)


def _seeded(seed: int | None, build: Any) -> nn.Module:
    """``build()`` with its random initialisation drawn from ``seed`` (global RNG untouched)."""
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _optimiser_settings(
    cfg: Any, lr: float | None, weight_decay: float | None, max_epochs: int | None
) -> tuple[float, float, int]:
    """``(lr, weight_decay, max_epochs)``: the arguments given, else the config's."""
    return (
        cfg.lr if lr is None else lr,
        cfg.weight_decay if weight_decay is None else weight_decay,
        cfg.max_epochs if max_epochs is None else max_epochs,
    )


def _as_config(cls: type, cfg: Any) -> Any:
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    return cls(**dict(cfg))


# ------------------------------------------------------------------------ training
#: ``select_ties`` of :func:`train_model`: which of several epochs with the same best
#: ``val/score`` is kept: the one with the lowest ``val/loss``, or the first (official).
SELECT_TIES = ("loss", "first")


def train_model(
    module: _SashaModule,
    datamodule: L.LightningDataModule,
    out_dir: str | os.PathLike,
    max_epochs: int | None = None,
    seed: int = 0,
    devices: int | str = 1,
    strategy: str = "auto",
    accelerator: str = "cpu",
    wandb: dict[str, Any] | None = None,
    monitor: str | None = None,
    mode: str | None = None,
    select_ties: str = "loss",
    patience: int | None = None,
    progress: bool = True,
    cpu_threads: int | None = None,
    resume_key: str | None = None,
    resume_every_s: float = 120.0,
    restart: bool = False,
    **trainer_kw: Any,
) -> Path:
    """Fit ``module`` and export its best weights to ``out_dir/model.pt``.

    Args:
        module: :class:`HAFEDModule`, :class:`MILModule` or :class:`TSUModule`.
        datamodule: a :class:`~sasha_models.data.BagDataModule` /
            :class:`~sasha_models.data.TSUPairDataModule` (or any datamodule with the same
            batches). Without validation slides the last epoch is exported.
        out_dir: CSV logs (``logs/``), checkpoints (``checkpoints/``), W&B files (``wandb/``)
            and ``model.pt`` go here.
        max_epochs: ``None`` = ``module.max_epochs`` (the paper's value).
        seed: passed to ``seed_everything`` (workers too): data order, masking, dropout.
            The initial weights were drawn when the module was built — give the module a
            ``seed`` too for a bit-reproducible run.
        devices, strategy, accelerator: Lightning's; ``devices=2, strategy='ddp'`` on CPU uses
            gloo. Lightning re-launches the calling script for DDP, so call this under
            ``if __name__ == "__main__":``.
        wandb: ``None`` = no W&B. Otherwise ``WandbLogger`` keyword arguments; ``mode``
            defaults to ``'offline'`` (no network), ``project`` to ``'sasha'``, ``name`` to the
            folder name.
        monitor, mode: checkpoint selection; ``None`` = the module's (``val/score``/max for
            classifiers, ``val/loss``/min for the TSU).
        select_ties: of the epochs with the best ``monitor`` value, keep the one with the lowest
            ``val/loss`` (``"loss"``) or the first (``"first"``, the official rule); see
            :class:`TieBreakCheckpoint`. Ignored when ``monitor`` is ``val/loss`` itself.
        patience: stop early after this many validated epochs in a row without a strict
            improvement of ``monitor`` (Lightning's ``EarlyStopping`` on the value the kept
            checkpoint is chosen by); the learning-rate schedule still spans ``max_epochs``.
            ``None``: train every epoch. Without validation slides it is ignored.
        progress: show the progress bar and model summary.
        cpu_threads: torch intra-op threads during the fit (restored afterwards); ``1`` is
            much faster for small bags on a busy CPU. ``None`` leaves the setting alone.
            A fit on one thread flushes denormal floats to zero on the CPU (restored
            afterwards; :class:`~sasha_models.fit_callbacks.FlushDenormals`).
        resume_key: what this fit is (a pipeline stage passes its cache key). With it, the fit
            leaves a resume point every ``resume_every_s`` seconds (at an epoch's end,
            :class:`~sasha_models.fit_callbacks.ResumePoint`,
            ``out_dir/checkpoints/resume.ckpt``) and a fit killed before
            its end resumes from the last one of the same key, to the same bits; the file is
            removed when the fit ends. ``None``: every fit starts afresh.
        resume_every_s: seconds between resume points (0: every epoch).
        restart: start afresh even where a resume point of this key exists (a forced
            re-run: ``sasha pipeline --force``, ``sasha train``); it is removed.
        **trainer_kw: extra ``lightning.Trainer`` arguments.

    Returns:
        Path of ``model.pt`` (written by global rank 0 only; every rank returns after it exists).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, workers=True, verbose=False)
    max_epochs = int(module.max_epochs if max_epochs is None else max_epochs)
    monitor = monitor or module.monitor
    mode = mode or module.monitor_mode
    if select_ties not in SELECT_TIES:
        raise ValueError(f"select_ties must be one of {SELECT_TIES}, got {select_ties!r}")
    tie_break = "val/loss" if select_ties == "loss" and monitor != "val/loss" else None
    has_val = getattr(datamodule, "has_split", lambda s: True)("val")

    loggers: list[Any] = [CSVLogger(save_dir=str(out_dir), name="logs")]
    if wandb is not None:
        kw = dict(wandb)
        kw.setdefault("mode", "offline")
        kw.setdefault("project", "sasha")
        kw.setdefault("name", out_dir.name)
        (out_dir / "wandb").mkdir(exist_ok=True)
        loggers.append(WandbLogger(save_dir=str(out_dir), **kw))
    ckpt = TieBreakCheckpoint(
        tie_break=tie_break if has_val else None,
        dirpath=out_dir / "checkpoints",
        filename="best",
        monitor=monitor if has_val else None,
        mode=mode,
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
        save_weights_only=True,  # model.pt is exported from it; optimizer state would triple the I/O
    )
    callbacks: list[Callback] = [ckpt, FlushDenormals()]
    if patience is not None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1 epochs (or None), got {patience}")
        if has_val:
            callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=int(patience)))
    resume_from = None
    if resume_key is not None:  # checkpoint callbacks run in this order: the kept best first
        resume_path = out_dir / RESUME_CHECKPOINT
        usable = (
            not restart and resume_path.is_file() and ResumePoint.key_of(resume_path) == resume_key
        )
        resume_from = resume_path if usable else None
        resume = ResumePoint(resume_path, resume_key, resume_every_s, discard=not usable)
        callbacks.append(resume)
    trainer_args: dict[str, Any] = {
        "max_epochs": max_epochs,
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "logger": loggers,
        "callbacks": callbacks,
        "deterministic": "warn",
        "enable_progress_bar": progress,
        "enable_model_summary": progress,
        "log_every_n_steps": _log_interval(datamodule, devices),
        "num_sanity_val_steps": 0,
        "limit_val_batches": 1.0 if has_val else 0,
        "default_root_dir": str(out_dir),
    }
    trainer_args.update(trainer_kw)
    det_state = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    threads = torch.get_num_threads()
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    t0 = time.time()
    try:
        trainer = L.Trainer(**trainer_args)
        with warnings.catch_warnings():  # ours: a re-run or a resumed fit finds its checkpoints
            warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    finally:
        torch.use_deterministic_algorithms(det_state[0], warn_only=det_state[1])
        torch.set_num_threads(threads)

    path = out_dir / "model.pt"
    if trainer.is_global_zero:
        best = ckpt.best_model_path
        best_epoch = None
        if best and Path(best).exists():
            kept = torch.load(best, map_location="cpu", weights_only=True)
            module.load_state_dict(kept["state_dict"])
            best_epoch = kept.get("epoch")
        blob = module.export()
        score = ckpt.best_model_score
        blob["meta"] = {
            "monitor": monitor if has_val else None,
            "mode": mode,
            "select_ties": select_ties if tie_break else "first",
            "best_score": None if score is None else float(score),
            "best_tie_value": ckpt.best_tie_value,
            "best_checkpoint": str(best) if best else None,
            "best_epoch": best_epoch,
            "seed": int(seed),
            "init_seed": getattr(module, "seed", None),
            "max_epochs": max_epochs,
            "patience": patience if has_val else None,
            "epochs_trained": int(trainer.current_epoch),
            "resumed_at_epoch": resume.resumed_epoch if resume_key is not None else None,
            "train_seconds": round(time.time() - t0, 3),
            "world_size": int(trainer.world_size),
            "class_names": _class_names(datamodule),
            "feature_kind": getattr(datamodule, "kind", None),
            "flatten_highres": getattr(datamodule, "flatten_highres", None),
            "feature_dim": _expected_dim(module),
            "torch_version": str(torch.__version__),
            "lightning_version": str(L.__version__),
        }
        save_export(path, blob)  # written whole, then renamed
        if resume_key is not None:  # finished: nothing to resume
            (out_dir / RESUME_CHECKPOINT).unlink(missing_ok=True)
        if wandb is not None:
            import wandb as wandb_lib  # lazy: W&B, only when a run logs to it

            wandb_lib.finish()
    trainer.strategy.barrier()
    return path


def _log_interval(datamodule: Any, devices: Any) -> int:
    """Log every 50 steps, or once per epoch when an epoch has fewer training batches."""
    try:
        n = len(datamodule.source.slide_ids("train"))
        per_device = math.ceil(n / max(1, int(datamodule.batch_size)) / max(1, int(devices)))
    except (AttributeError, TypeError, ValueError):
        return 50
    return max(1, min(50, per_device))


def _class_names(datamodule: Any) -> list[str] | None:
    names = getattr(getattr(datamodule, "source", None), "class_names", None)
    return [str(n) for n in names] if names is not None else None


# ------------------------------------------------------------------------ loading
@torch.no_grad()
def predict_probs(
    model: nn.Module, source: BagSource, split: str | None, kind: str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class probabilities of every slide of a split.

    HAFED with ``kind='highres'`` distils then classifies; with another kind it classifies the
    features as a state. Other MIL models given ``'highres'`` features see all ``N·k``
    sub-patches as one bag.

    Returns:
        ``(slide_ids, probs (n, C) float32, labels (n,) int64)``.
    """
    if isinstance(model, _SashaModule):
        model = model.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    flatten = kind == "highres" and not isinstance(model, HAFED)
    ds = BagDataset(source, split, kind, flatten_highres=flatten)
    probs, labels = [], []
    for i in range(len(ds)):
        x, y = ds[i]
        logits = slide_logits(model, x.to(device), None, kind)
        probs.append(torch.softmax(logits.float(), -1).cpu())
        labels.append(int(y))
    model.train(was_training)
    n_classes = len(getattr(source, "class_names", [])) or 2
    p = torch.stack(probs).numpy() if probs else np.zeros((0, n_classes), np.float32)
    return list(ds.slide_ids), p.astype(np.float32), np.asarray(labels, dtype=np.int64)
