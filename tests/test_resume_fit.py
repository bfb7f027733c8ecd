"""A fit killed between epochs resumes from its resume point to the bits of an unkilled fit.

``train_model(..., resume_key=K)`` leaves ``checkpoints/resume.ckpt`` at epoch ends; the kill
is an exception raised in the first training step of an epoch (after the last resume point,
before the next), and the second call, with the same key, must export the weights, the kept
epoch and the selection scores of a fit that was never stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sasha_models.data import BagDataModule, TSUPairDataModule
from sasha_models.fit_callbacks import RESUME_CHECKPOINT, ResumePoint
from sasha_models.hafed import HAFEDConfig
from sasha_models.lit import HAFEDModule, TSUModule, load_checkpoint, train_model
from sasha_models.toy import planted_bags, tsu_problem
from sasha_models.tsu import TSUConfig

D = 16


class Killed(Exception):
    """Stands for the SIGKILL of a pipeline run."""


def killed_at(module, epoch: int):
    """``module``, whose first training step of ``epoch`` raises :class:`Killed`."""
    step = module.training_step

    def training_step(batch, batch_idx):
        if module.current_epoch == epoch:
            raise Killed(f"epoch {epoch}")
        return step(batch, batch_idx)

    module.training_step = training_step
    return module


def hafed_fit() -> tuple[Callable, Callable]:
    source, _ = planted_bags(n_slides=24, d=D, k=4, n_patches=(10, 20), seed=3)
    cfg = HAFEDConfig(d_in=D, d_hidden=16, lr=5e-3, max_epochs=6, dropout=0.1)
    return (lambda: HAFEDModule(cfg, seed=0)), (lambda: BagDataModule(source, "highres"))


def tsu_fit() -> tuple[Callable, Callable]:
    source = tsu_problem(n_slides=12, d=D, n_patches=20, seed=1)
    cfg = TSUConfig(d=D, lr=3e-3, max_epochs=6, validation="official")
    # fresh training pairs and fresh validation anchors every pass: both from torch's RNG
    return (lambda: TSUModule(cfg, seed=0)), (
        lambda: TSUPairDataModule(source, tau=cfg.tau, eval_anchors=1, eval_resample=True)
    )


def fit(out: Path, make: tuple[Callable, Callable], kill: int | None = None, **kw) -> Path:
    module, data = make[0](), make[1]()
    if kill is not None:
        module = killed_at(module, kill)
    return train_model(module, data, out, seed=7, progress=False, cpu_threads=1, **kw)


@pytest.mark.parametrize("make", [hafed_fit, tsu_fit], ids=["hafed", "tsu"])
def test_a_fit_killed_between_epochs_resumes_to_the_same_bits(make, tmp_path):
    """Killed in every epoch after the first: whatever the last point holds (the kept best
    epoch being the one just judged, or an earlier one), the resumed fit exports what an
    unkilled one does."""
    problem = make()
    whole = load_checkpoint(fit(tmp_path / "whole", problem))
    assert whole["meta"]["resumed_at_epoch"] is None
    for kill in range(1, 6):
        out = tmp_path / f"killed-{kill}"
        with pytest.raises(Killed):
            fit(out, problem, kill=kill, resume_key="k1", resume_every_s=0)
        resume = out / RESUME_CHECKPOINT
        assert ResumePoint.key_of(resume) == "k1"
        assert torch.load(resume, weights_only=True)["epoch"] == kill - 1  # the last finished
        again = load_checkpoint(fit(out, problem, resume_key="k1", resume_every_s=0))
        assert again["meta"]["resumed_at_epoch"] == kill
        for name, tensor in whole["state_dict"].items():
            assert torch.equal(again["state_dict"][name], tensor), (kill, name)
        for key in ("best_epoch", "best_score", "best_tie_value", "epochs_trained"):
            assert again["meta"][key] == whole["meta"][key], (kill, key)
        assert not resume.exists()  # finished: nothing left to resume


def test_a_resume_point_of_another_run_is_not_resumed_from(tmp_path):
    problem = hafed_fit()
    whole = load_checkpoint(fit(tmp_path / "whole", problem))

    def same(blob) -> bool:
        return all(torch.equal(blob["state_dict"][k], v) for k, v in whole["state_dict"].items())

    out = tmp_path / "fit"
    resume = out / RESUME_CHECKPOINT
    with pytest.raises(Killed):
        fit(out, problem, kill=2, resume_key="old config", resume_every_s=0)
    again = load_checkpoint(fit(out, problem, resume_key="new config", resume_every_s=0))
    assert again["meta"]["resumed_at_epoch"] is None and same(again)  # started afresh
    # a forced re-run (restart) discards a point of its own key
    with pytest.raises(Killed):
        fit(out, problem, kill=3, resume_key="k", resume_every_s=0)
    forced = load_checkpoint(fit(out, problem, resume_key="k", restart=True))
    assert forced["meta"]["resumed_at_epoch"] is None and same(forced)
    # a point cut short, and a partial one, go when the next fit starts, not when it ends
    resume.write_bytes(b"cut short by a kill")
    partial = resume.parent / f".{resume.name}.tmp"
    partial.write_bytes(b"a point the kill stopped while it was written")
    assert ResumePoint.key_of(resume) is None
    with pytest.raises(Killed):
        fit(out, problem, kill=2, resume_key="k", resume_every_s=3600)
    assert not partial.exists() and not resume.exists()


def test_resume_points_are_spaced_by_time_and_absent_without_a_key(tmp_path):
    problem = hafed_fit()
    with pytest.raises(Killed):  # the first point is due an hour in: none yet
        fit(tmp_path / "hourly", problem, kill=4, resume_key="k", resume_every_s=3600)
    assert not (tmp_path / "hourly" / RESUME_CHECKPOINT).exists()
    with pytest.raises(Killed):
        fit(tmp_path / "plain", problem, kill=4)
    assert not (tmp_path / "plain" / RESUME_CHECKPOINT).exists()
