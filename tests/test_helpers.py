"""The package-root helpers every wing shares: the byte-bounded LRU, atomic writes, rank zero."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from sasha_env.atomic import replace_atomically, write_json
from sasha_env.distributed import is_rank_zero
from sasha_env.lru import ByteLRU
from sasha_env.slides.manifest import stratified_split

MB = 1 << 20


def test_lru_evicts_least_recent_by_bytes():
    loads: list[str] = []

    def load(key: str, mb: float):
        return lambda: loads.append(key) or np.zeros(int(mb * MB), np.uint8)

    cache: ByteLRU[np.ndarray] = ByteLRU(3, lambda a: a.nbytes)
    cache.get("a", load("a", 1))
    cache.get("b", load("b", 1))
    cache.get("a", load("a", 1))  # hit: a is now the most recent
    cache.get("c", load("c", 1.5))  # 3.5 MiB > 3: evicts b, the least recent
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.bytes == int(2.5 * MB) and loads == ["a", "b", "c"]
    big = cache.get("big", load("big", 4))  # larger than the limit: returned, not kept
    assert big.nbytes == 4 * MB and "big" not in cache and "a" in cache
    cache.forget(lambda key: key != "a")
    assert "a" not in cache and cache.bytes == int(1.5 * MB)


def test_lru_keep_last_holds_the_current_item_even_when_too_big():
    cache: ByteLRU[np.ndarray] = ByteLRU(1, lambda a: a.nbytes, keep_last=True)
    cache.get("small", lambda: np.zeros(MB // 2, np.uint8))
    cache.get("huge", lambda: np.zeros(2 * MB, np.uint8))
    assert "huge" in cache and "small" not in cache and len(cache) == 1


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_json(path, {"auc": 0.9})

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(path, fail)
    assert json.loads(path.read_text()) == {"auc": 0.9}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left


@pytest.mark.parametrize(
    ("env", "zero"),
    [
        ({}, True),
        ({"LOCAL_RANK": "1"}, False),
        ({"RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
        ({"RANK": "3", "LOCAL_RANK": "0"}, False),  # torchrun: local rank 0 of another node
        ({"RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
    ],
)
def test_rank_zero_from_launcher_variables(monkeypatch, env, zero):
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert is_rank_zero() is zero


def test_stratified_split_gives_every_split_its_share_of_every_class():
    labels = ["LUAD"] * 23 + ["LUSC"] * 17 + ["normal"] * 9
    shares = (0.6, 0.2, 0.2)
    splits = stratified_split(labels, shares, rng=7)
    assert splits == stratified_split(labels, shares, rng=7)  # seeded
    assert splits != stratified_split(labels, shares, rng=8)
    counts = Counter(zip(labels, splits, strict=True))
    for cls, n in Counter(labels).items():
        for split, share in zip(("train", "val", "test"), shares, strict=True):
            assert abs(counts[cls, split] - n * share) <= 1, (cls, split, counts)
    assert Counter(splits) == {"train": 29, "val": 10, "test": 10}


@pytest.mark.parametrize("seed", range(20))
def test_stratified_split_puts_a_rare_class_in_every_split(seed):
    labels = ["common"] * 20 + ["rare"] * 3
    splits = stratified_split(labels, (0.6, 0.2, 0.2), rng=seed)
    assert {s for lab, s in zip(labels, splits, strict=True) if lab == "rare"} == {
        "train",
        "val",
        "test",
    }
    assert Counter(splits) == {"train": 14, "val": 5, "test": 4}  # sizes untouched by the swap
