"""The ``extract`` section's settings, apart from the extraction itself.

The config schema (:mod:`sasha_env.pipeline.schema`) reads these fields to check a config file
before anything runs; keeping them out of :mod:`sasha_env.features.extract` (torch, Lightning)
lets every command report a bad config or a missing file in a second instead of after importing
Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import dataclass_from_dict

__all__ = ["ExtractConfig"]


@dataclass
class ExtractConfig:
    """How features are computed (see the presets)."""

    backbone: str = "efficientnet-lite0"
    backbone_checkpoint: str | None = None
    input_px: int | None = None
    """Side the patches are resized to before the backbone; ``None``: the backbone's own."""
    batch_size: int = 256
    """Images per backbone forward (a patch brings 1 low-res + k high-res images)."""
    num_workers: int = 1
    mpp: float | None = None
    """Level-0 µm/px assumed for slides whose metadata has no usable mpp (``--mpp``); without
    it such a slide fails with a message naming ``--mpp``. A manifest's ``mpp`` column wins."""

    @classmethod
    def from_dict(cls, d: dict | None) -> ExtractConfig:
        return dataclass_from_dict(cls, d, "extract")
