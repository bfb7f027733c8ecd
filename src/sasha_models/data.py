"""The bag-dataset interface the models train on, and its torch / Lightning adapters.

The feature store (in ``sasha_env``) implements :class:`BagSource`; :class:`InMemoryBags`
implements it from dicts for tests and toy problems. Slides are bags of different sizes, so
loaders yield one slide at a time by default and :func:`pad_collate` pads larger batches.

A batch from :class:`BagDataModule` is ``(x, mask, y)``:
``x (B, N, d)`` or ``(B, N, k, d)``, ``mask (B, N)`` bool (True = real patch), ``y (B,)``.
A batch from :class:`TSUPairDataModule` is ``(v_a, z_a, z_j, v_j)``, each ``(P, d)``: the
pairs of all the batch's slides concatenated.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .tsu import sample_tsu_pairs

__all__ = [
    "FEATURE_KINDS",
    "SPLITS",
    "BagDataModule",
    "BagDataset",
    "BagSource",
    "InMemoryBags",
    "TSUPairDataModule",
    "TSUPairDataset",
    "pad_collate",
    "pairs_collate",
]

FEATURE_KINDS = ("lowres", "highres", "distilled")
SPLITS = ("train", "val", "test")


@runtime_checkable
class BagSource(Protocol):
    """A labelled collection of slides, each a bag of patch features.

    ``features(slide_id, kind)`` returns ``'lowres'`` ``(N, d)``, ``'highres'`` ``(N, k, d)``
    or ``'distilled'`` ``(N, d)`` float arrays; ``label`` an index into ``class_names``.
    """

    class_names: list[str]

    def slide_ids(self, split: str | None = None) -> list[str]: ...

    def label(self, slide_id: str) -> int: ...

    def features(self, slide_id: str, kind: str) -> np.ndarray: ...

    @property
    def feature_dim(self) -> int: ...


class InMemoryBags:
    """A :class:`BagSource` held in dicts.

    Args:
        labels: slide id -> class index.
        lowres, highres, distilled: slide id -> array (``(N, d)``, ``(N, k, d)``,
            ``(N, d)``); any may be omitted.
        splits: slide id -> ``'train' | 'val' | 'test'``; ``None`` puts every slide in train.
        class_names: defaults to ``['0', '1', ...]``.
    """

    def __init__(
        self,
        labels: Mapping[str, int],
        lowres: Mapping[str, np.ndarray] | None = None,
        highres: Mapping[str, np.ndarray] | None = None,
        distilled: Mapping[str, np.ndarray] | None = None,
        splits: Mapping[str, str] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self._labels = {k: int(v) for k, v in labels.items()}
        self._features = {
            kind: dict(arrays)
            for kind, arrays in (("lowres", lowres), ("highres", highres), ("distilled", distilled))
            if arrays is not None
        }
        self._splits = dict(splits) if splits is not None else dict.fromkeys(self._labels, "train")
        n_classes = max(self._labels.values(), default=-1) + 1
        self.class_names = (
            list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
        )

    def slide_ids(self, split: str | None = None) -> list[str]:
        return [s for s in self._labels if split is None or self._splits.get(s) == split]

    def label(self, slide_id: str) -> int:
        return self._labels[slide_id]

    def features(self, slide_id: str, kind: str) -> np.ndarray:
        if kind not in self._features:
            raise KeyError(f"no {kind!r} features; have {sorted(self._features)}")
        return self._features[kind][slide_id]

    def add_features(self, kind: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Add or replace a feature kind (e.g. distilled features computed by HAFED)."""
        self._features[kind] = dict(arrays)

    @property
    def feature_dim(self) -> int:
        for arrays in self._features.values():
            for a in arrays.values():
                return int(a.shape[-1])
        raise ValueError("InMemoryBags holds no features")


class BagDataset(Dataset):
    """One slide per item: ``(features float32 tensor, label long scalar)``.

    Args:
        source: a :class:`BagSource`.
        split: ``'train' | 'val' | 'test'`` or ``None`` for all slides.
        kind: ``'lowres' | 'highres' | 'distilled'``.
        flatten_highres: turn ``(N, k, d)`` into ``(N·k, d)`` (MIL baselines on all
            high-resolution sub-patches).
        with_lowres: items are ``(features, label, low-res rows (N, d))``, for HAFED's
            partial states (:func:`~sasha_models.hafed.partial_state`).
    """

    def __init__(
        self,
        source: BagSource,
        split: str | None,
        kind: str,
        flatten_highres: bool = False,
        with_lowres: bool = False,
    ) -> None:
        if kind not in FEATURE_KINDS:
            raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
        self.source, self.split, self.kind = source, split, kind
        self.flatten_highres, self.with_lowres = flatten_highres, with_lowres
        self.slide_ids = list(source.slide_ids(split))

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        sid = self.slide_ids[i]
        x = _float_tensor(self.source.features(sid, self.kind))
        if self.flatten_highres and x.ndim == 3:
            x = x.reshape(-1, x.shape[-1])
        y = torch.tensor(self.source.label(sid), dtype=torch.long)
        if self.with_lowres:
            return x, y, _float_tensor(self.source.features(sid, "lowres"))
        return x, y


def _float_tensor(a: np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def pad_collate(batch: Sequence[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Pad bags along their first axis: ``-> (x (B, N_max, ...), mask (B, N_max), y (B,))``,
    and ``z (B, N_max, d)`` after them when the items carry low-res rows (``with_lowres``)."""
    n_max = max(item[0].shape[0] for item in batch)

    def pad(i: int) -> Tensor:
        first = batch[0][i]
        out = torch.zeros((len(batch), n_max, *first.shape[1:]), dtype=first.dtype)
        for b, item in enumerate(batch):
            out[b, : item[i].shape[0]] = item[i]
        return out

    mask = torch.zeros(len(batch), n_max, dtype=torch.bool)
    for b, item in enumerate(batch):
        mask[b, : item[0].shape[0]] = True
    y = torch.stack([item[1] for item in batch])
    return (pad(0), mask, y, pad(2)) if len(batch[0]) > 2 else (pad(0), mask, y)


class TSUPairDataset(Dataset):
    """TSU training pairs drawn from each slide's low-res and distilled features.

    Item i = :func:`~sasha_models.tsu.sample_tsu_pairs` on slide i: ``(v_a, z_a, z_j, v_j)``,
    each ``(P, d)`` (P may be 0).

    Args:
        source: a :class:`BagSource` with ``'lowres'`` and ``'distilled'`` features.
        split: which slides.
        tau, n_anchors, include_anchor: see :func:`sample_tsu_pairs`.
        resample: True draws new anchors every time (training, and the official validation;
            uses torch's global RNG, so ``seed_everything`` makes it reproducible); False
            draws a fixed set per slide from ``seed`` (our validation).
        seed: seed for the fixed draws.
    """

    def __init__(
        self,
        source: BagSource,
        split: str | None,
        tau: float,
        n_anchors: int = 1,
        resample: bool = True,
        seed: int = 0,
        include_anchor: bool = False,
    ) -> None:
        self.source, self.split = source, split
        self.tau, self.n_anchors, self.resample, self.seed = tau, n_anchors, resample, seed
        self.include_anchor = include_anchor
        self.slide_ids = list(source.slide_ids(split))

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sid = self.slide_ids[i]
        z = torch.as_tensor(np.asarray(self.source.features(sid, "lowres")), dtype=torch.float32)
        v = torch.as_tensor(np.asarray(self.source.features(sid, "distilled")), dtype=torch.float32)
        seed = int(torch.randint(2**62, ())) if self.resample else self.seed * 1_000_003 + i
        gen = torch.Generator().manual_seed(seed)
        return sample_tsu_pairs(
            z,
            v,
            self.tau,
            generator=gen,
            n_anchors=self.n_anchors,
            include_anchor=self.include_anchor,
        )


def pairs_collate(batch: Sequence[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Concatenate the pairs of several slides: ``-> (v_a, z_a, z_j, v_j)``, each ``(P, d)``."""
    return tuple(torch.cat(parts, dim=0) for parts in zip(*batch, strict=True))


class _SplitDataModule(L.LightningDataModule, abc.ABC):
    """Train/val/test loaders over a source's splits; subclasses build the datasets."""

    collate_fn: Callable[[Any], tuple[Tensor, ...]] = staticmethod(pad_collate)

    def __init__(self, source: BagSource, batch_size: int = 1, num_workers: int = 0) -> None:
        super().__init__()
        self.source, self.batch_size, self.num_workers = source, batch_size, num_workers
        self.datasets: dict[str, Dataset] = {}

    @abc.abstractmethod
    def make_dataset(self, split: str) -> Dataset:
        """The dataset of one split."""

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.datasets:
                self.datasets[split] = self.make_dataset(split)

    def has_split(self, split: str) -> bool:
        """Whether the source has any slide in ``split``."""
        return len(self.source.slide_ids(split)) > 0

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class BagDataModule(_SplitDataModule):
    """Lightning loaders of :class:`BagDataset` per split, batches from :func:`pad_collate`.

    Args:
        source: a :class:`BagSource` with ``'train'``, ``'val'``, ``'test'`` splits.
        kind: feature kind to load.
        batch_size: slides per batch (paper: 1).
        num_workers: DataLoader workers.
        flatten_highres: see :class:`BagDataset`.
        train_lowres: the train split's items carry low-res rows too (``with_lowres``; val
            and test do not).
    """

    def __init__(
        self,
        source: BagSource,
        kind: str,
        batch_size: int = 1,
        num_workers: int = 0,
        flatten_highres: bool = False,
        train_lowres: bool = False,
    ) -> None:
        super().__init__(source, batch_size, num_workers)
        self.kind, self.flatten_highres, self.train_lowres = kind, flatten_highres, train_lowres

    def make_dataset(self, split: str) -> Dataset:
        lowres = self.train_lowres and split == "train"
        return BagDataset(self.source, split, self.kind, self.flatten_highres, lowres)


class TSUPairDataModule(_SplitDataModule):
    """Lightning loaders of :class:`TSUPairDataset`: fresh pairs in train, fixed in val/test
    (fresh there too with ``eval_resample``, the official validation).

    Args:
        source: a :class:`BagSource` with ``'lowres'`` and ``'distilled'`` features.
        tau, n_anchors, include_anchor: see :func:`~sasha_models.tsu.sample_tsu_pairs`
            (``include_anchor`` applies to every split).
        eval_anchors: anchors per slide of the val/test draws (more than one steadies
            the validation loss).
        eval_resample: draw the val/test anchors afresh at every pass (the official
            ``step5_tsu_training.py`` ``evaluate``: one random anchor per slide).
        batch_size: slides per batch (official: 1).
        num_workers: DataLoader workers.
        seed: seed of the fixed val/test draws.
    """

    collate_fn = staticmethod(pairs_collate)

    def __init__(
        self,
        source: BagSource,
        tau: float = 0.95,
        n_anchors: int = 1,
        eval_anchors: int = 8,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        include_anchor: bool = False,
        eval_resample: bool = False,
    ) -> None:
        super().__init__(source, batch_size, num_workers)
        self.tau, self.n_anchors, self.eval_anchors, self.seed = tau, n_anchors, eval_anchors, seed
        self.include_anchor, self.eval_resample = include_anchor, eval_resample

    def make_dataset(self, split: str) -> Dataset:
        train = split == "train"
        anchors = self.n_anchors if train else self.eval_anchors
        return TSUPairDataset(
            self.source,
            split,
            self.tau,
            anchors,
            resample=train or self.eval_resample,
            seed=self.seed,
            include_anchor=self.include_anchor,
        )
