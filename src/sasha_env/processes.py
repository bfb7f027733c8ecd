"""Ending a run on a signal, and worker processes that end with it.

A batch scheduler ends a job with SIGTERM (``scancel``, a time limit, ``kill``). The ``sasha``
command turns it into :class:`Terminated` (:func:`raise_on_sigterm`), so that a run stops
where it is, keeps what it finished (every output is written whole, and a fit leaves resume
points) and exits with a status that says so. Processes a run starts for itself end with it:

- :func:`worker_pool` (the pipeline's, a sweep's, a benchmark's and synthesis's ``--jobs``
  workers): a stopped run (:func:`stop_reason`) terminates its workers instead of waiting for
  their work; each worker dies at once on SIGTERM, inside a Lightning fit too;
- :func:`end_with_parent` (those workers, and a study's ``--jobs`` helper processes): on
  Linux the kernel sends SIGTERM when the run's process dies, SIGKILL included.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from types import FrameType
from typing import Any

from .memory import libc
from .threads import let_idle_threads_sleep

__all__ = [
    "Terminated",
    "end_with_parent",
    "raise_on_sigterm",
    "stop_reason",
    "terminate_workers",
    "worker_pool",
]

_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


class Terminated(BaseException):
    """SIGTERM arrived. A ``BaseException``, like ``KeyboardInterrupt``, so that code catching
    ``Exception`` does not swallow it."""


def stop_reason(exc: BaseException) -> str | None:
    """``"terminated"`` (SIGTERM), ``"interrupted"`` (Ctrl-C: a ``KeyboardInterrupt``, or the
    ``SystemExit`` Lightning ends an interrupted fit with), or ``None``: not a stop."""
    if isinstance(exc, Terminated):
        return "terminated"
    if isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt)
    ):
        return "interrupted"
    return None


#: the process that installed :func:`_raise_terminated`, and whether it has raised already
_handler_state: dict[str, Any] = {"pid": None, "raised": False}


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _handler_state["pid"]:  # a forked child (a DataLoader worker): as default
        _die_now(signum, frame)
    if _handler_state["raised"]:  # a second SIGTERM while the first unwinds: let cleanup run
        return
    _handler_state["raised"] = True
    raise Terminated(f"signal {signum}")


@contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """Inside the block, the first SIGTERM raises :class:`Terminated` in the main thread
    (Lightning, while it fits, calls this handler after its own, so a fit stops at once; a
    second SIGTERM while the run unwinds is ignored). The previous handler is put back after.
    Elsewhere than in the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _handler_state.update(pid=os.getpid(), raised=False)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:  # None: a handler not set from Python; the default is the closest to it
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


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


def _die_now(signum: int, frame: FrameType | None) -> None:
    """End this process as the signal's default action does."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _worker_started(
    parent: int, initializer: Callable[..., object] | None, initargs: tuple[Any, ...]
) -> None:
    """A :func:`worker_pool` worker's set-up: it ends with ``parent`` and dies at once on
    SIGTERM (Lightning chains its own handler to this one; a task raising in a worker would
    only fail the task), then the pool's own ``initializer``."""
    let_idle_threads_sleep()  # before the worker's tasks load torch: workers share the cores
    end_with_parent(parent)
    signal.signal(signal.SIGTERM, _die_now)
    if initializer is not None:
        initializer(*initargs)


def terminate_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM to each of ``pool``'s worker processes (the executor has no public way before
    Python 3.14's ``terminate_workers``)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.terminate()


@contextmanager
def worker_pool(
    workers: int,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
    cancel_on_error: bool = False,
) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes that end with this one.

    Leaving the block normally waits for the work submitted; leaving it by a stop
    (:func:`stop_reason`: Ctrl-C, SIGTERM) terminates the workers and drops the work queued;
    by an error, waits for the work running and, with ``cancel_on_error``, drops the work
    queued (else it runs too, as a plain executor's ``with`` block does).

    Args:
        workers: processes.
        initializer, initargs: run in each worker after its own set-up.
        cancel_on_error: drop queued work when the block ends by an error.

    The workers share the cores with each other, so their idle OpenMP threads sleep
    (:func:`~sasha_env.threads.let_idle_threads_sleep`, in each worker before it loads
    torch; this process's environment is left as it is).
    """
    pool = ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("spawn"),
        initializer=_worker_started,
        initargs=(os.getpid(), initializer, tuple(initargs)),
    )
    try:
        yield pool
    except BaseException as exc:
        stopped = stop_reason(exc) is not None
        if stopped:
            terminate_workers(pool)
        pool.shutdown(wait=True, cancel_futures=stopped or cancel_on_error)
        raise
    pool.shutdown(wait=True)
