"""Masked attention: the one implementation every model in the zoo uses.

HAFED (both levels), the attention-MIL classifier, ABMIL and the RL policy all reduce a set of
instances with gated attention (Ilse et al., 2018) and a softmax that must ignore padding and
dropped instances. Those three pieces live here and nowhere else:

- :func:`masked_softmax` — softmax over valid entries only; masked entries get exactly 0,
  an all-masked row gives all zeros (never NaN).
- :class:`GatedAttention` — ``w^T (tanh(V h) * sigmoid(U h))`` with one output per branch.
- :func:`random_topk_mask` — ACMIL's stochastic top-K instance masking (Zhang et al., 2024),
  used only while training.

Shape convention: the instance axis is the *last* axis for softmax and masking, so attention
maps are ``(..., n_branches, n)``; :class:`GatedAttention` returns ``(..., n, n_branches)``
(one row per instance) and callers transpose.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GatedAttention", "masked_softmax", "random_topk_mask"]


def masked_softmax(logits: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """Softmax of ``logits`` along ``dim`` over the entries where ``mask`` is True.

    Args:
        logits: any shape.
        mask: bool, broadcastable to ``logits``; True = valid. ``None`` = all valid.
        dim: the axis to normalise over.

    Returns:
        Probabilities with the shape of ``logits``. Masked entries are exactly 0; a slice whose
        entries are all masked is all zeros (not NaN), and gradients stay finite.
    """
    if mask is None:
        return torch.softmax(logits, dim=dim)
    mask = mask.to(torch.bool)
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    # Masked entries underflow to 0 inside the softmax; the product makes them exactly 0 and
    # zeroes the uniform distribution an all-masked slice would otherwise get.
    return torch.softmax(filled, dim=dim) * mask


class GatedAttention(nn.Module):
    """Gated attention scores (Ilse et al., 2018): ``w^T (tanh(V h) * sigmoid(U h))``.

    Each instance is scored independently, so scores of one instance never depend on others.

    Args:
        d_in: instance feature size d.
        d_hidden: size of the gating layers (paper/official code: 128).
        n_branches: number of attention maps M (one column of ``w`` each).
        dropout: dropout on the gated hidden units.

    Shapes:
        ``forward(h: (..., n, d_in)) -> logits (..., n, n_branches)``
    """

    def __init__(self, d_in: int, d_hidden: int, n_branches: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.d_in, self.d_hidden, self.n_branches = d_in, d_hidden, n_branches
        self.V = nn.Linear(d_in, d_hidden)
        self.U = nn.Linear(d_in, d_hidden)
        self.dropout = nn.Dropout(dropout)
        self.w = nn.Linear(d_hidden, n_branches)

    def forward(self, h: Tensor) -> Tensor:
        gated = torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))
        return self.w(self.dropout(gated))


def random_topk_mask(
    logits: Tensor,
    mask: Tensor | None,
    top_k: int,
    drop_frac: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ACMIL's stochastic top-K instance masking (training only).

    For every slice along the last axis, take the ``min(top_k, n_valid)`` valid instances with
    the highest logits and drop ``floor(that * drop_frac)`` of them chosen uniformly at random.
    At least one valid instance is always kept.

    Args:
        logits: attention logits ``(..., n)``; only their ranking is used (no gradient).
        mask: bool ``(..., n)`` or broadcastable, True = valid; ``None`` = all valid.
        top_k: K, how many of the most attended instances are candidates for dropping.
        drop_frac: fraction of the K candidates to drop (official SASHA: ``mask_drop``).
        generator: optional torch RNG for reproducibility.

    Returns:
        A new bool mask of shape ``logits.shape``: the input mask with the dropped instances
        set to False.
    """
    n = logits.shape[-1]
    valid = (
        torch.ones_like(logits, dtype=torch.bool)
        if mask is None
        else mask.to(torch.bool).expand_as(logits)
    )
    k = min(int(top_k), n)
    if k <= 0 or drop_frac <= 0:
        return valid.clone()
    scores = logits.detach().masked_fill(~valid, float("-inf"))
    _, idx = torch.topk(scores, k, dim=-1)  # (..., k)
    cand = valid.gather(-1, idx)  # top-k entries that are valid
    n_cand = cand.sum(-1, keepdim=True)
    n_valid = valid.sum(-1, keepdim=True)
    n_drop = torch.minimum((n_cand * drop_frac).floor().long(), (n_valid - 1).clamp_min(0))
    rng_device = generator.device if generator is not None else logits.device
    noise = torch.rand(idx.shape, generator=generator, device=rng_device).to(logits.device)
    noise = noise.masked_fill(~cand, 2.0)  # invalid candidates rank last
    rank = noise.argsort(-1).argsort(-1)
    drop = (rank < n_drop) & cand
    dropped = torch.zeros_like(valid).scatter(-1, idx, drop)
    return valid & ~dropped
