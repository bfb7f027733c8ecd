"""The feature store seen as a labelled bag source (``sasha_models.data.BagSource``)."""

from __future__ import annotations

import numpy as np

from ..lru import ByteLRU
from ..slides.manifest import Manifest
from .store import FeatureStore, StoreError

__all__ = ["StoreBags"]


class StoreBags:
    """Slides of a manifest that are in a store, with labels and splits from the manifest.

    Args:
        store: the feature store.
        manifest: the cohort, with a split for every slide (``Manifest.with_split``).
        cache_mb: arrays read from zarr are kept in memory up to this many MiB (LRU), since
            training reads every slide once per epoch.

    Slides of the manifest missing from the store (failed extraction) are left out.
    """

    def __init__(self, store: FeatureStore, manifest: Manifest, cache_mb: float = 2048):
        self.store = store
        self.class_names = list(manifest.class_names)
        present = set(store.slide_ids())
        self._records = {r.slide_id: r for r in manifest.records if r.slide_id in present}
        if not self._records:
            raise StoreError(
                f"{store.path}: none of the {len(manifest.records)} slides of {manifest.path} "
                "is in the store; run 'sasha extract' first"
            )
        self._cache: ByteLRU[np.ndarray] = ByteLRU(cache_mb, lambda a: a.nbytes)

    def slide_ids(self, split: str | None = None) -> list[str]:
        return [s for s, r in self._records.items() if split is None or r.split == split]

    def label(self, slide_id: str) -> int:
        return self.class_names.index(self._records[slide_id].label)

    def features(self, slide_id: str, kind: str) -> np.ndarray:
        """``(N, d)`` (``lowres``, ``distilled``) or ``(N, k, d)`` (``highres``) float32."""
        return self._cache.get((slide_id, kind), lambda: self.store.read(slide_id, kind))

    def forget(self, kind: str) -> None:
        """Drop cached arrays of one kind (after they were rewritten in the store)."""
        self._cache.forget(lambda key: key[1] != kind)

    @property
    def feature_dim(self) -> int:
        return self.store.feature_dim
