"""Which process of a multi-process (DDP) run this is: work that must happen once runs on rank 0.

Lightning's DDP re-launches the whole command once per extra process, so every process runs
the pipeline's code; these helpers let the processes agree on who writes and when to wait.
"""

from __future__ import annotations

import os

__all__ = ["barrier", "end_process_group", "is_rank_zero"]


def is_rank_zero() -> bool:
    """True in the one process that writes shared outputs (global rank 0 of node 0).

    Reads the variables the launchers set (torchrun and Lightning: ``RANK``, ``LOCAL_RANK``,
    ``NODE_RANK``); a plain single-process run is rank zero.
    """
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    return rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _process_group() -> bool:
    """Whether a torch.distributed process group with more than one process is up (Lightning
    starts one with its first DDP trainer and keeps it until the process exits)."""
    import torch.distributed as dist  # lazy: torch; the CLI loads this module without it

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait until every process of the run gets here (nothing to wait for in a single process)."""
    if _process_group():
        import torch.distributed as dist  # lazy: as above

        dist.barrier()


def end_process_group() -> None:
    """Close the process group a DDP run (``--devices 2 --strategy ddp``) opened, before the
    interpreter exits: left to the exit's destructors, gloo's threads abort the process now
    and then ("terminate called without an active exception", exit status -6). Nothing to do
    in a run that never imported ``torch.distributed``."""
    import sys

    dist = sys.modules.get("torch.distributed")  # only if this run imported it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
