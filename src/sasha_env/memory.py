"""Process-wide memory settings of the ``sasha`` command.

glibc's ``malloc`` hands blocks above its mmap threshold back to the kernel when they are freed,
and trims the heap's free top above its trim threshold; the next allocation of the same size
then faults every page in again, zero-filled by the kernel. torch allocates and frees tensors
of 0.1–30 MB per batch (extraction's activations, an update's mini-batch), so a run spends much
of its time in the kernel: on the project's 2-core machine, extracting 12 demo slides took
9.7 s of system time beside 29 s of user time, and 1 s with the settings below. The CLI and the
pipeline's workers therefore keep freed memory in the process (:func:`keep_freed_memory`);
the numbers computed are the same, and extraction's peak memory too (a freed block is reused,
not added to). ``sasha predict`` keeps glibc's defaults: on the demo's test slides the setting
made ``--full`` faster but raised the peak memory of one-slide-at-a-time SASHA from 567–591 to
657 MiB (docs/benchmarks.md), and predict's memory is one of its targets.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

__all__ = ["keep_freed_memory", "libc"]

#: ``mallopt`` parameters (glibc's ``malloc.h``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit systems: blocks up to this size come from the heap.
MMAP_THRESHOLD = 32 << 20
#: Free memory at the heap's top kept rather than returned to the kernel.
TRIM_THRESHOLD = 256 << 20
#: Set to ``0`` to leave glibc's defaults.
ENV_SWITCH = "SASHA_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (Linux with glibc only).

    Returns:
        Whether the thresholds were set: ``False`` off Linux, without glibc, or with the
        environment variable ``SASHA_KEEP_FREED_MEMORY=0``.
    """
    if os.environ.get(ENV_SWITCH) == "0":
        return False
    c = libc()
    if c is None or not hasattr(c, "mallopt"):  # musl and others: no mallopt
        return False
    mallopt = c.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library of this process (Linux only; loaded once), or ``None``: what
    :func:`keep_freed_memory` sets ``mallopt`` through and the pipeline's workers call
    ``prctl`` through (:func:`sasha_env.processes.end_with_parent`)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
