"""Memory figures of a process from Linux's /proc, shared by the benchmark scripts."""

from __future__ import annotations

import ctypes
from pathlib import Path


def proc_kib(key: str, pid: int | str = "self", file: str = "status") -> int:
    """A kiB field of ``/proc/PID/FILE`` (``VmRSS``, ``VmHWM`` in status; ``Pss`` in
    smaps_rollup); 0 when the process is gone or the field is absent."""
    try:
        text = Path(f"/proc/{pid}/{file}").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    """Hand freed heap back to the OS (so that memory freed earlier does not hide what comes
    next), then reset this process's VmHWM to its current RSS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
