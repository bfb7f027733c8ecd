"""Idle OpenMP threads sleep in the CLI and in the workers of its process pools."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sasha_env.processes import worker_pool

#: A fresh process: whether importing the CLI loads torch (it must not: OpenMP reads the
#: policy when torch loads it), then the policy after the CLI ran on a missing input (an error
#: after its process settings are made).
CLI = (
    "import os, sys; from sasha_env.cli import main; loaded = 'torch' in sys.modules; "
    "main(['pipeline', '--manifest', 'missing.csv', '--workdir', 'missing', '--quiet']); "
    "print(os.environ.get('OMP_WAIT_POLICY'), loaded)"
)


def _cli(env: dict[str, str], cwd) -> list[str]:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SASHA_PASSIVE_THREADS")
    }
    out = subprocess.run(
        [sys.executable, "-c", CLI], env={**clean, **env}, capture_output=True, text=True,
        check=True, cwd=cwd,
    )  # fmt: skip
    return out.stdout.split()


@pytest.mark.parametrize(
    ("env", "policy"),
    [
        ({}, "PASSIVE"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
        ({"SASHA_PASSIVE_THREADS": "0"}, "None"),
    ],
)
def test_the_cli_lets_idle_threads_sleep_unless_told_otherwise(env, policy, tmp_path):
    got, torch_loaded_by_import = _cli(env, tmp_path)
    assert got == policy
    assert torch_loaded_by_import == "False"  # so main() sets it before torch (and OpenMP) load


def _policy() -> str | None:
    return os.environ.get("OMP_WAIT_POLICY")


def test_pool_workers_start_with_idle_threads_sleeping(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("SASHA_PASSIVE_THREADS", raising=False)
    with worker_pool(1) as pool:
        assert pool.submit(_policy).result() == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice is kept
    with worker_pool(1) as pool:
        assert pool.submit(_policy).result() == "ACTIVE"
