"""Bag sources, datasets, collation, the data module, and metrics."""

import math

import numpy as np
import pytest
import torch

from sasha_models.data import (
    BagDataModule,
    BagDataset,
    BagSource,
    InMemoryBags,
    TSUPairDataModule,
    pad_collate,
)
from sasha_models.metrics import classification_metrics


@pytest.fixture
def source():
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(6)]
    sizes = dict(zip(ids, [3, 5, 4, 6, 2, 7], strict=True))
    return InMemoryBags(
        labels={s: i % 2 for i, s in enumerate(ids)},
        lowres={s: rng.normal(size=(n, 8)).astype(np.float32) for s, n in sizes.items()},
        highres={s: rng.normal(size=(n, 4, 8)).astype(np.float32) for s, n in sizes.items()},
        splits=dict(zip(ids, ["train", "train", "train", "val", "test", "test"], strict=True)),
        class_names=["neg", "pos"],
    )


def test_in_memory_bags(source):
    assert isinstance(source, BagSource)
    assert source.slide_ids("train") == ["s0", "s1", "s2"] and len(source.slide_ids()) == 6
    assert source.feature_dim == 8 and source.label("s3") == 1
    with pytest.raises(KeyError, match="distilled"):
        source.features("s0", "distilled")
    source.add_features("distilled", {"s0": np.zeros((3, 8), np.float32)})
    assert source.features("s0", "distilled").shape == (3, 8)


def test_bag_dataset_and_collate(source):
    ds = BagDataset(source, "train", "highres")
    x, y = ds[1]
    assert x.shape == (5, 4, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert BagDataset(source, "train", "highres", flatten_highres=True)[1][0].shape == (20, 8)
    xb, mask, yb = pad_collate([ds[0], ds[1]])
    assert xb.shape == (2, 5, 4, 8) and mask.tolist()[0] == [True] * 3 + [False] * 2
    assert torch.equal(xb[0, 3:], torch.zeros(2, 4, 8)) and yb.tolist() == [0, 1]
    with pytest.raises(ValueError):
        BagDataset(source, "train", "rgb")


def test_datamodule_loaders(source):
    dm = BagDataModule(source, "lowres", batch_size=2)
    x, mask, y = next(iter(dm.val_dataloader()))
    assert x.shape == (1, 6, 8) and mask.all() and y.tolist() == [1]
    assert sum(len(b[2]) for b in dm.train_dataloader()) == 3
    assert len(dm.test_dataloader()) == 1 and dm.has_split("val")
    source.add_features("distilled", {s: source.features(s, "lowres") for s in source.slide_ids()})
    pairs = TSUPairDataModule(source, tau=-1.0, n_anchors=1, batch_size=2)
    v_a, z_a, z_j, v_j = next(iter(pairs.train_dataloader()))
    assert v_a.shape[1] == 8 and len(v_a) == len(z_j) > 0


def test_metrics_binary():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    m = classification_metrics(probs, torch.tensor([0, 1, 0, 1]))
    assert m["accuracy"] == 0.5 and m["auc"] == 0.75
    assert m["f1"] == pytest.approx(0.5) and 0 <= m["ece"] <= 1
    perfect = classification_metrics(np.eye(2)[[0, 1, 1]], np.array([0, 1, 1]))
    assert perfect == {"accuracy": 1.0, "auc": 1.0, "f1": 1.0, "ece": 0.0}
    assert math.isnan(classification_metrics(probs[:2], torch.tensor([1, 1]))["auc"])


def test_metrics_multiclass():
    probs = torch.softmax(torch.randn(30, 3), -1)
    labels = torch.arange(30) % 3
    m = classification_metrics(probs, labels)
    assert set(m) == {"accuracy", "auc", "f1", "ece"} and all(0 <= v <= 1 for v in m.values())
    assert classification_metrics(torch.eye(3)[labels], labels)["auc"] == 1.0


def test_bags_carry_their_low_res_rows_for_partial_states(source):
    """``with_lowres`` adds each slide's (N, d) low-res rows, padded like the bag; the data
    module adds them to the train split only (validation scores full high-res bags)."""
    ds = BagDataset(source, "train", "highres", with_lowres=True)
    x, y, z = ds[1]
    assert x.shape == (5, 4, 8) and torch.equal(
        z, torch.from_numpy(source.features("s1", "lowres"))
    )
    xb, mask, yb, zb = pad_collate([ds[0], ds[1]])
    assert zb.shape == (2, 5, 8) and torch.equal(zb[0, :3], ds[0][2])
    assert (
        torch.equal(zb[0, 3:], torch.zeros(2, 8)) and mask[0].tolist() == [True] * 3 + [False] * 2
    )
    dm = BagDataModule(source, "highres", train_lowres=True)
    assert all(len(b) == 4 for b in dm.train_dataloader())
    assert all(len(b) == 3 for b in dm.val_dataloader())
