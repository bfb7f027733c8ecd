"""The CLI's malloc settings: set on Linux with glibc, left alone when switched off."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = "from sasha_env.memory import keep_freed_memory; print(keep_freed_memory())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize(("switch", "expected"), [(None, "True"), ("0", "False")])
def test_keep_freed_memory_sets_glibc_thresholds_unless_switched_off(switch, expected, monkeypatch):
    if switch is None:
        monkeypatch.delenv("SASHA_KEEP_FREED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("SASHA_KEEP_FREED_MEMORY", switch)
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


@pytest.mark.parametrize(("verb", "kept"), [("pipeline", True), ("predict", False)])
def test_every_verb_but_predict_keeps_freed_memory(verb, kept, tmp_path, monkeypatch):
    """``sasha predict`` keeps glibc's defaults (its peak memory is one of its targets); every
    other verb keeps freed memory. Both calls below stop at a missing input, after the choice."""
    import sasha_env.cli as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    missing = str(tmp_path / "missing")
    argv = {
        "pipeline": ["pipeline", "--manifest", missing + ".csv", "--workdir", missing, "--quiet"],
        "predict": ["predict", "--workdir", missing, missing + ".svs"],
    }[verb]
    assert cli.main(argv) != 0  # the input is missing: an error, not a crash
    assert bool(calls) is kept


def test_libc_is_loaded_once():
    from sasha_env.memory import libc

    assert libc() is libc()
    if sys.platform.startswith("linux"):
        assert libc() is not None and hasattr(libc(), "prctl")
