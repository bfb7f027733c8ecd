"""Ending a run on a signal, and child processes that end with it.

A batch scheduler ends a job with SIGTERM (``scancel``, a time limit, ``kill``). The ``sasha``
command turns it into :class:`Terminated` (:func:`raise_on_sigterm`), so that a run stops
where it is, keeps what it finished (every output is written whole, and a fit leaves resume
points) and exits with a status that says so. Processes a run starts for itself (the
pipeline's ``--jobs`` workers, a study's ``--jobs`` helpers) end with it: they are terminated
when it is terminated or interrupted, and on Linux the kernel terminates them when it dies
outright (:func:`end_with_parent`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .memory import libc

__all__ = ["Terminated", "end_with_parent", "raise_on_sigterm"]

_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


class Terminated(BaseException):
    """SIGTERM arrived. A ``BaseException``, like ``KeyboardInterrupt``, so that code catching
    ``Exception`` does not swallow it."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"signal {signum}")


@contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`Terminated` in the main thread (Lightning, while
    it fits, calls this handler after its own, so a fit stops at once); the previous handler
    is put back after. Elsewhere than in the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def end_with_parent(parent: int | None = None, sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send this process ``sig`` when its parent process ends (Linux
    ``prctl(PR_SET_PDEATHSIG)``), however it ends, SIGKILL included.

    Args:
        parent: the parent's process id, if known: a parent that ended before the request
            (this process has been re-parented) gets ``sig`` sent at once.
        sig: the signal.

    Returns:
        Whether the request was made (``False`` off Linux).
    """
    c = libc()
    if c is None or not hasattr(c, "prctl"):
        return False
    c.prctl(_PR_SET_PDEATHSIG, int(sig))
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True
