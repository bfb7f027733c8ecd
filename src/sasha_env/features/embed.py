"""Embedding pixels with a frozen backbone (no Lightning: ``sasha predict`` uses it too)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbones import Backbone

__all__ = ["embed_patches"]


def embed_patches(backbone: Backbone, patches: torch.Tensor, input_px: int) -> torch.Tensor:
    """Backbone features of uint8 RGB patches.

    Args:
        patches: ``(B, H, W, 3)`` or ``(B, 3, H, W)`` uint8.
        input_px: side the patches are resized to (bilinear, antialiased) when it differs.

    Returns:
        ``(B, dim)`` float32.
    """
    if patches.shape[-1] == 3 and patches.shape[1] != 3:
        patches = patches.permute(0, 3, 1, 2)
    patches = patches.to(backbone.mean.device)
    if patches.shape[-1] != input_px or patches.shape[-2] != input_px:
        x = F.interpolate(
            patches.float(), size=(input_px, input_px), mode="bilinear", antialias=True
        )
        patches = x.round_().clamp_(0, 255).to(torch.uint8)
    return backbone(patches.contiguous())
