"""Denormal floats flushed to zero while a model trains on the CPU.

Adam's first moment of a weight whose gradient is rarely non-zero (a first-layer weight of an
input feature that is zero on nearly every patch, common in ReLU/SiLU CNN features) decays by
``beta1`` at every step after each gradient until it is *denormal* (below
``torch.finfo(float32).tiny``, about 1.2e-38), and stays there for some hundred steps more
before it reaches zero. x86 CPUs compute with denormal operands about a hundred times slower
than with normal ones, so a long fit slows down as they pile up: the official TSU at
d = 1,280 (13 million parameters, 43 training steps per epoch) had about 11 % of its first
layer's moments denormal after 300 epochs, and a training step took 2.2x as long as with them
flushed to zero (``experiments/bench_optimizer.py``, the "denormal moments" rows).

Flushing them (x86 FTZ/DAZ; ``torch.set_flush_denormal``) changes no Adam update that matters:
a moment below 1.2e-38 moves a weight by at most ``lr * 1.2e-38 / eps``, far below the weight's
last bit. It can change a network's bits elsewhere (a denormal pre-activation flushed to zero
stops a ReLU's gradient), so it is a setting of the run, applied the same way every time.

The setting belongs to the thread that sets it: torch's intra-op worker threads keep the one
they started with (a worker started inside a flushing block flushes from then on, outside it
too). With more than one torch thread, part of every parallel op would
flush and part not, and the bits would depend on how the work was split; so
:func:`~sasha_models.lit.train_model` flushes only a fit that runs on one thread
(:class:`~sasha_models.fit_callbacks.FlushDenormals`; e.g. the demo and tiny presets'
``train.cpu_threads: 1``). Agent training does not flush: its policy's moments are 0.3 %
denormal on the demo, too few to matter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["denormals_flushed", "flush_denormals"]

_DENORMAL = 1e-39  # below float32's smallest normal number (about 1.18e-38)


def denormals_flushed() -> bool:
    """Whether this thread's CPU arithmetic flushes denormal float32 values to zero."""
    x = torch.tensor([_DENORMAL], dtype=torch.float32)
    return bool((x * 2.0).item() == 0.0)


@contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Flush denormal floats to zero on this thread inside the block (``enabled=False``: leave
    the setting alone); the setting before the block is restored after it. On a CPU without
    the feature, nothing changes."""
    if not enabled:
        yield
        return
    before = denormals_flushed()
    try:
        torch.set_flush_denormal(True)  # False: the CPU cannot; then nothing changed
        yield
    finally:
        torch.set_flush_denormal(before)
