"""Process-wide thread settings of the ``sasha`` command: idle OpenMP threads sleep.

torch's CPU kernels run on an OpenMP thread team (GNU libgomp in the PyPI wheels). Between
two parallel regions libgomp's idle threads spin for a while before they sleep, which costs
nothing when the process has the cores to itself. When several processes share the cores —
``sasha study --jobs``, ``sasha pipeline --jobs``, sweeps and benchmarks with ``--jobs`` —
each one's spinning threads take the cores the others need: on the project's 2-core machine
the evaluate stage of two study seeds run side by side (two threads each) took 253 s, against
34 s with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once) and 24 s for one seed
alone; the ``results.json`` files were identical byte for byte (docs/benchmarks.md,
``experiments/bench_idle_threads.py``). The policy changes when a thread waits, not what it
computes.

OpenMP reads the variable when its runtime loads (with torch), so :func:`let_idle_threads_sleep`
sets it in the environment before torch is imported, where processes share the cores:
``sasha study --jobs J`` (J > 1) first thing (its helper processes inherit it), and each
worker of the process pools of :mod:`sasha_env.processes` (the pipeline's, sweeps',
benchmarks' and synthesis's ``--jobs`` workers) as it starts, before its tasks load torch;
the pool's own process keeps its environment. A single process keeps OpenMP's policy (alone,
sleeping threads were 0–12 % slower: one evaluate stage took 25.1–29.0 s against
24.3–25.9 s), except ``sasha predict``, which reads tiles and steps environments on one thread
between two backbone forwards (spinning threads took the cores those need, 10–35x slower on a
shared CPU). A policy the user set is kept; ``SASHA_PASSIVE_THREADS=0`` leaves OpenMP's
everywhere.
"""

from __future__ import annotations

import os
import sys

__all__ = ["ENV_SWITCH", "let_idle_threads_sleep"]

#: Set to ``0`` to leave OpenMP's own wait policy.
ENV_SWITCH = "SASHA_PASSIVE_THREADS"
#: The standard OpenMP variable set.
OMP_WAIT_POLICY = "OMP_WAIT_POLICY"


def let_idle_threads_sleep() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in the environment, unless it is set already or
    ``SASHA_PASSIVE_THREADS=0``.

    It applies to this process only if torch has not been imported yet (the OpenMP runtime
    reads it once, when it loads), and to every process started after the call.

    Returns:
        Whether this process's own torch threads will sleep when idle: ``False`` when the
        variable was left alone, or torch was already loaded.
    """
    if os.environ.get(ENV_SWITCH) == "0" or OMP_WAIT_POLICY in os.environ:
        return False
    os.environ[OMP_WAIT_POLICY] = "PASSIVE"
    return "torch" not in sys.modules
