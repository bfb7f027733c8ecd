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
