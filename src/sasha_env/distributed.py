"""Which process of a multi-process (DDP) run this is: work that must happen once runs on rank 0."""

from __future__ import annotations

import os

__all__ = ["is_rank_zero"]


def is_rank_zero() -> bool:
    """True in the one process that writes shared outputs (global rank 0 of node 0).

    Reads the variables the launchers set (torchrun and Lightning: ``RANK``, ``LOCAL_RANK``,
    ``NODE_RANK``); a plain single-process run is rank zero.
    """
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    return rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
