"""Nothing half-written: the store's replace path survives a kill, nodes sharing a store keep
out of each other's staging, and every file the package writes goes through a temporary name."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from sasha_env.features import store as store_module
from sasha_env.features.records import SlideInfo, StoreInfo
from sasha_env.features.store import FeatureStore, StoreError

SRC = Path(__file__).resolve().parents[1] / "src" / "sasha_env"


def _store(tmp_path) -> FeatureStore:
    store = FeatureStore.create(tmp_path / "s.zarr", StoreInfo(backbone="x", backbone_dim=4))
    store.write_slide("a", {"lowres": np.ones((3, 4), np.float32)}, SlideInfo(n_patches=3))
    store.write_array("a", "distilled", np.ones((3, 4), np.float32))
    return store


class Killed(BaseException):
    """Stands for the process dying (like KeyboardInterrupt, not caught by ``except Exception``)."""


def _die_after_first_rename(monkeypatch):
    """The store's rename works once, then the writer 'dies' before the second one."""
    real, calls = os.replace, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise Killed("killed between the two renames")
        return real(src, dst)

    monkeypatch.setattr(store_module, "_rename", rename)
    return calls


def _pretend_dead(monkeypatch):
    monkeypatch.setattr(store_module, "_pid_alive", lambda pid: False)


def test_a_kill_while_replacing_a_slide_never_loses_it(tmp_path, monkeypatch):
    store = _store(tmp_path)
    calls = _die_after_first_rename(monkeypatch)
    with pytest.raises(Killed):
        store.write_slide("a", {"lowres": np.zeros((5, 4), np.float32)}, SlideInfo(n_patches=5))
    assert "a" not in store and len(calls) == 2  # the old group is set aside, the new not in yet
    monkeypatch.undo()
    _pretend_dead(monkeypatch)
    FeatureStore(store.path, mode="a").clean_staging()
    assert store.read("a", "lowres").shape == (3, 4)  # the old group is back, whole
    assert store.has_array("a", "distilled")
    assert list((store.path / "_staging").iterdir()) == []


def test_a_kill_while_replacing_an_array_never_loses_it(tmp_path, monkeypatch):
    store = _store(tmp_path)
    _die_after_first_rename(monkeypatch)
    with pytest.raises(Killed):
        store.write_array("a", "distilled", np.zeros((3, 4), np.float32))
    assert not store.has_array("a", "distilled")
    monkeypatch.undo()
    _pretend_dead(monkeypatch)
    store.clean_staging()
    np.testing.assert_array_equal(store.read("a", "distilled"), np.ones((3, 4)))


def test_cleaning_leaves_live_writers_and_other_hosts_alone(tmp_path, monkeypatch):
    store = _store(tmp_path)
    staging = store.path / "_staging"
    mine_live = staging / f"b~new~{store_module._HOST}~{os.getpid()}~aaaa"
    mine_dead = staging / f"c~new~{store_module._HOST}~999999999~bbbb"
    other_host = staging / "d~new~another-node~1~cccc"
    for entry in (mine_live, mine_dead, other_host):
        entry.mkdir(parents=True)
    store.clean_staging()
    assert mine_live.exists() and other_host.exists() and not mine_dead.exists()


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".", "x" * 200])
def test_the_store_refuses_unsafe_slide_ids(tmp_path, bad):
    store = _store(tmp_path)
    with pytest.raises(StoreError, match="not a safe slide id"):
        store.write_slide(bad, {"lowres": np.ones((1, 4), np.float32)}, SlideInfo())
    with pytest.raises(StoreError, match="not a safe slide id"):
        store.read(bad, "lowres")
    assert bad not in store
    assert not (tmp_path / "evil").exists()


WRITES = re.compile(
    r"(\.write_text\(|\.write_bytes\(|\.open\(\s*\"w|savefig\(|torch\.save\(|\.save\()"
)


def test_every_file_write_goes_through_a_temporary_name():
    """Writers in sasha_env write to ``tmp`` (from atomic.replace_atomically) or a ``partial``
    file renamed later; a direct write to a final path would show up here."""
    offenders = []
    for path in SRC.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not WRITES.search(line) or line.lstrip().startswith(("#", '"', "'")):
                continue
            if re.search(r"\btmp\b|\bpartial\b", line):
                continue
            offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not offenders, "direct writes:\n" + "\n".join(offenders)
