"""MIL baselines on bags of instance features, and the registry the benchmark uses.

Every model takes a single bag ``(n, d)`` or a padded batch ``(B, n, d)`` with a bool mask
``(B, n)`` (True = real instance) and returns slide logits ``(C,)`` / ``(B, C)``.

Widths follow the official SASHA benchmark (``D_inner: 128`` in ``config/camelyon_config.yml``
used by ``step8_wsi_classification_maxmil_abmil_clam_transmil.py``):

- :class:`ABMIL` — Ilse et al. 2018, gated attention pooling (``Linear+ReLU -> gated attention
  -> linear``).
- :class:`MeanMIL` / :class:`MaxMIL` — an instance-level MLP (``Linear, ReLU, Dropout(0.25),
  Linear``) whose instance logits are mean- / max-pooled.
- :class:`TransMIL` — Shao et al. 2021: projection, CLS token, two pre-norm self-attention
  layers with a PPEG depthwise-convolution positional encoding between them on the
  square-padded sequence. Attention is exact (fused ``scaled_dot_product_attention``) on bags
  of up to ``exact_max`` tokens and Nyström-approximated above (Xiong et al. 2021, as TransMIL
  itself uses): m landmarks, memory O(n·m) instead of O(n²) — a CAMELYON16 bag of 8,000
  patches × 16 sub-patches would need ~64 GB per exact attention map.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .attention import GatedAttention, masked_softmax
from .hafed import AttentionMILClassifier

__all__ = [
    "ABMIL",
    "BASELINES",
    "MIL_MODELS",
    "MaxMIL",
    "MeanMIL",
    "TransMIL",
    "build_baseline",
]


class ABMIL(nn.Module):
    """Gated attention-based MIL (Ilse et al., 2018).

    Shapes: ``forward(x: (..., n, d_in), mask: (..., n) | None) -> logits (..., C)``.
    """

    def __init__(
        self,
        d_in: int,
        n_classes: int,
        d_model: int = 128,
        d_hidden: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_in, self.n_classes = d_in, n_classes
        self.proj = nn.Sequential(nn.Linear(d_in, d_model), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(d_model, d_hidden, 1, dropout)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.proj(x)
        logits = self.attention(h).squeeze(-1)  # (..., n)
        attn = masked_softmax(logits, mask, dim=-1)
        return self.head((attn.unsqueeze(-2) @ h).squeeze(-2))


class _InstanceMLP(nn.Module):
    """Instance classifier shared by Mean/MaxMIL: per-instance logits ``(..., n, C)``."""

    def __init__(self, d_in: int, n_classes: int, d_model: int = 128, dropout: float = 0.25):
        super().__init__()
        self.d_in, self.n_classes = d_in, n_classes
        self.head = nn.Sequential(
            nn.Linear(d_in, d_model), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_model, n_classes)
        )
        for layer in self.head:
            if isinstance(layer, nn.Linear):  # official mean_max.py initialisation
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)


class MeanMIL(_InstanceMLP):
    """Mean of instance logits. ``forward(x: (..., n, d), mask) -> (..., C)``."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        logits = self.head(x)
        if mask is None:
            return logits.mean(-2)
        w = mask.to(logits.dtype).unsqueeze(-1)
        return (logits * w).sum(-2) / w.sum(-2).clamp_min(1.0)


class MaxMIL(_InstanceMLP):
    """Per-class max of instance logits. ``forward(x: (..., n, d), mask) -> (..., C)``."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        logits = self.head(x)
        if mask is not None:
            logits = logits.masked_fill(~mask.to(torch.bool).unsqueeze(-1), -1e9)
        return logits.amax(-2)


class _PPEG(nn.Module):
    """Pyramid position encoding generator: identity + depthwise 7×7, 5×5 and 3×3 convs."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, tokens: Tensor, side: int) -> Tensor:
        """``tokens (B, side², D) -> (B, side², D)``."""
        b, n, dim = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, dim, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return grid.flatten(2).transpose(1, 2)


def nystrom_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, landmarks: int) -> Tensor:
    """Nyström approximation of ``softmax(q kᵀ / √d) v`` with ``landmarks`` segment means.

    Args:
        q, k, v: ``(B, H, n, dh)``; valid: ``(B, n)`` bool, False on padding (never attended).
        landmarks: m; the sequence is cut into m contiguous segments whose means (over valid
            tokens) are the landmarks. With m ≥ n every landmark is one token and the result
            is exact attention.

    Returns:
        ``(B, H, n, dh)``. Memory ``O(n·m)``: no ``n × n`` matrix is formed.
    """
    b, h, n, dh = q.shape
    m = min(landmarks, n)
    seg = -(-n // m)  # tokens per segment
    pad = seg * m - n
    scale = dh**-0.5
    w = valid.to(q.dtype)[:, None, :, None]  # (B, 1, n, 1)
    q, k = q * scale * w, k * w

    def means(x: Tensor) -> Tensor:
        x = nn.functional.pad(x, (0, 0, 0, pad)).reshape(b, h, m, seg, dh).sum(3)
        count = nn.functional.pad(w, (0, 0, 0, pad)).reshape(b, 1, m, seg, 1).sum(3)
        return x / count.clamp(min=1)

    q_l, k_l = means(q), means(k)  # (B, H, m, dh)
    empty = nn.functional.pad(w, (0, 0, 0, pad)).reshape(b, 1, m, seg).sum(3) == 0  # (B, 1, m)
    neg = torch.finfo(q.dtype).min
    k1 = torch.softmax((q @ k_l.transpose(-1, -2)).masked_fill(empty[:, :, None, :], neg), -1)
    k2 = torch.softmax((q_l @ k_l.transpose(-1, -2)).masked_fill(empty[:, :, None, :], neg), -1)
    key_pad = ~valid[:, None, None, :]
    k3 = torch.softmax((q_l @ k.transpose(-1, -2)).masked_fill(key_pad, neg), -1)
    # an SVD pseudo-inverse of the small m × m kernel: exact, where the Nyströmformer's
    # 6 Newton–Schulz iterations can be far off on ill-conditioned kernels
    return k1 @ (torch.linalg.pinv(k2) @ (k3 @ v))


class _TransLayer(nn.Module):
    """Pre-norm residual multi-head self-attention (TransMIL's ``TransLayer``).

    Exact attention uses ``scaled_dot_product_attention`` (fused kernels, no materialised N×N
    dropout mask) on sequences of up to ``exact_max`` tokens; longer ones use
    :func:`nystrom_attention` with ``landmarks`` landmarks.
    """

    def __init__(
        self, dim: int, n_heads: int, dropout: float, exact_max: int = 4096, landmarks: int = 256
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"d_model={dim} must be divisible by n_heads={n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.exact_max, self.landmarks = exact_max, landmarks
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        """``x (B, n, D)``, ``pad (B, n)`` True on padding → ``(B, n, D)``."""
        b, n, dim = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).reshape(b, n, 3, self.n_heads, dim // self.n_heads).unbind(2)
        )
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, n, dh)
        if int((~pad).sum(-1).max()) > self.exact_max:  # real tokens, not the batch padding
            h = nystrom_attention(q, k, v, ~pad, self.landmarks)
        else:
            attn_mask = None if not pad.any() else (~pad)[:, None, None, :]
            h = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        h = self.out(h.transpose(1, 2).reshape(b, n, dim))
        # Dropout on the layer's output, not on the n×n attention map (that would force the
        # slow unfused attention path and an n² random mask per step).
        return x + nn.functional.dropout(h, self.dropout, self.training)


class TransMIL(nn.Module):
    """TransMIL-style transformer MIL (Shao et al., 2021).

    Attention is exact on bags of up to ``exact_max`` tokens and Nyström-approximated with
    ``landmarks`` landmarks above (TransMIL's own choice for large bags).

    Shapes: ``forward(x: (n, d_in) | (B, n, d_in), mask: (B, n) | None) -> (C,) | (B, C)``.
    """

    def __init__(
        self,
        d_in: int,
        n_classes: int,
        d_model: int = 128,
        n_heads: int = 8,
        dropout: float = 0.1,
        exact_max: int = 4096,
        landmarks: int = 256,
    ) -> None:
        super().__init__()
        self.d_in, self.n_classes = d_in, n_classes
        self.proj = nn.Sequential(nn.Linear(d_in, d_model), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.layer1 = _TransLayer(d_model, n_heads, dropout, exact_max, landmarks)
        self.ppeg = _PPEG(d_model)
        self.layer2 = _TransLayer(d_model, n_heads, dropout, exact_max, landmarks)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        single = x.ndim == 2
        if single:
            x = x.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        b, n, _ = x.shape
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
        valid = valid.to(torch.bool)
        side = max(1, math.ceil(math.sqrt(n)))
        extra = side * side - n
        h = self.proj(x) * valid.unsqueeze(-1)
        h = nn.functional.pad(h, (0, 0, 0, extra))
        valid = nn.functional.pad(valid, (0, extra), value=False)
        valid_cls = torch.cat([valid.new_ones(b, 1), valid], dim=1)
        h = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)
        h = self.layer1(h, ~valid_cls)
        feat = self.ppeg(h[:, 1:] * valid.unsqueeze(-1), side)
        h = torch.cat([h[:, :1], feat], dim=1)
        h = self.layer2(h, ~valid_cls)
        logits = self.head(self.norm(h[:, 0]))
        return logits.squeeze(0) if single else logits


#: Every MIL model :func:`build_baseline` can build. ``attention_mil`` is HAFED's level 2
#: (:class:`~sasha_models.hafed.AttentionMILClassifier`), the ``lowres_only`` classifier.
MIL_MODELS: dict[str, Callable[..., nn.Module]] = {
    "abmil": ABMIL,
    "meanmil": MeanMIL,
    "maxmil": MaxMIL,
    "transmil": TransMIL,
    "attention_mil": AttentionMILClassifier,
}

#: The benchmark's MIL baselines (run on full high-resolution features).
BASELINES: tuple[str, ...] = ("abmil", "meanmil", "maxmil", "transmil")


def build_baseline(name: str, d_in: int, n_classes: int, **kw) -> nn.Module:
    """Build a MIL model by name (one of :data:`MIL_MODELS`) for ``d_in``-dim instances."""
    try:
        cls = MIL_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown MIL model {name!r}; choose from {sorted(MIL_MODELS)}") from None
    return cls(d_in, n_classes, **kw)
