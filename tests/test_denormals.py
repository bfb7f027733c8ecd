"""Fits on one thread flush denormal floats to zero on the CPU, and restore the setting."""

import subprocess
import sys

import pytest
import torch

from sasha_models.data import TSUPairDataModule
from sasha_models.denormals import denormals_flushed, flush_denormals
from sasha_models.lit import TSUModule, fused_adamw, train_model
from sasha_models.toy import tsu_problem
from sasha_models.tsu import TSUConfig

pytestmark = pytest.mark.skipif(
    not torch.set_flush_denormal(False), reason="this CPU cannot flush denormals"
)


def test_flush_denormals_turns_flushing_on_and_restores_the_setting_before():
    assert not denormals_flushed()
    with flush_denormals():
        assert denormals_flushed()
        assert (torch.tensor([1e-39]) * 2.0).item() == 0.0
        with flush_denormals():  # nested: the outer block's setting comes back
            assert denormals_flushed()
        assert denormals_flushed()
    assert not denormals_flushed()
    assert (torch.tensor([1e-39]) * 2.0).item() > 0.0
    with flush_denormals(enabled=False):
        assert not denormals_flushed()
    torch.set_flush_denormal(True)  # a caller's own setting survives the block
    try:
        with flush_denormals():
            pass
        assert denormals_flushed()
    finally:
        torch.set_flush_denormal(False)


def test_adam_moments_of_a_weight_without_gradient_reach_zero_not_a_denormal():
    """What the setting is for: the first moment of a weight whose gradient stopped decays by
    beta1 per step; flushed, it goes straight from the smallest normal number to zero."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = fused_adamw([w], lr=1e-3, weight_decay=0.0)
    w.grad = torch.full((4,), 1e-30)
    opt.step()
    w.grad = torch.zeros(4)
    with flush_denormals():
        for _ in range(200):  # 1e-31 * 0.9**200 would be about 7e-41, a denormal
            opt.step()
    moment = opt.state[w]["exp_avg"]
    assert (moment == 0).all(), moment


class _Recording(TSUModule):
    """A TSU module noting, at each training step, whether denormals are flushed."""

    seen: list[bool]

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        self.seen.append(denormals_flushed())
        return super().training_step(batch, batch_idx)


def test_a_fit_flushes_denormals_and_restores_the_setting_after(tmp_path):
    source = tsu_problem(n_slides=6, d=8, seed=0)
    module = _Recording(TSUConfig(d=8, max_epochs=2), seed=0)
    module.seen = []
    train_model(module, TSUPairDataModule(source, tau=0.95), tmp_path, progress=False, cpu_threads=1)  # fmt: skip
    assert module.seen and all(module.seen)
    assert not denormals_flushed()


def test_a_fit_on_two_threads_leaves_the_setting_alone(tmp_path):
    """torch's worker threads do not flush: flushing the calling thread alone would make the
    bits depend on how each op's work is split between threads."""
    source = tsu_problem(n_slides=6, d=8, seed=0)
    module = _Recording(TSUConfig(d=8, max_epochs=1), seed=0)
    module.seen = []
    train_model(module, TSUPairDataModule(source, tau=0.95), tmp_path, progress=False, cpu_threads=2)  # fmt: skip
    assert module.seen and not any(module.seen)


_SPLIT = """
import torch
from sasha_models.denormals import flush_denormals
torch.set_num_threads(2)
x = torch.full((1_000_000,), 1e-39)
(x * 2.0).sum()  # a parallel op: torch's worker thread starts, not flushing
with flush_denormals():
    out = x * 2.0  # split between the calling thread (flushing) and the worker (not)
print(float((out == 0).float().mean()))
"""


def test_the_setting_is_the_calling_threads_only():
    """Why a fit on several threads does not flush: torch's worker threads keep their own
    setting, so part of a parallel op would flush and part not."""
    share = float(subprocess.run([sys.executable, "-c", _SPLIT], capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert 0.0 < share < 1.0, share
