"""Idle OpenMP threads sleep where processes share the cores: a study's --jobs processes and
the workers of the process pools."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sasha_env.processes import worker_pool

#: A fresh process: whether importing the CLI loads torch (it must not: OpenMP reads the
#: policy when torch loads it), then the policy after the CLI ran ``ARGV`` to an early error
#: (after its process settings are made).
CLI = (
    "import os, sys; from sasha_env.cli import main; loaded = 'torch' in sys.modules; "
    "main(ARGV); print(os.environ.get('OMP_WAIT_POLICY'), loaded)"
)
#: ``--seeds 0`` is refused before any process is started or any file written.
STUDY = ["study", "--manifest", "m.csv", "--workdir", "wd", "--seeds", "0"]


def _cli(argv: list[str], env: dict[str, str], cwd) -> list[str]:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SASHA_PASSIVE_THREADS")
    }
    out = subprocess.run(
        [sys.executable, "-c", CLI.replace("ARGV", repr(argv))], env={**clean, **env},
        capture_output=True, text=True, check=True, cwd=cwd,
    )  # fmt: skip
    return out.stdout.split()


@pytest.mark.parametrize(
    ("argv", "env", "policy"),
    [
        ([*STUDY, "--jobs", "2"], {}, "PASSIVE"),  # processes that share the cores
        ([*STUDY, "--jobs", "2"], {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),  # the user's choice
        ([*STUDY, "--jobs", "2"], {"SASHA_PASSIVE_THREADS": "0"}, "None"),  # switched off
        (STUDY, {}, "None"),  # one process: OpenMP's own policy
        (["pipeline", "--manifest", "m.csv", "--workdir", "wd", "--quiet"], {}, "None"),
    ],
)
def test_a_study_on_several_processes_lets_idle_threads_sleep(argv, env, policy, tmp_path):
    got, torch_loaded_by_import = _cli(argv, env, tmp_path)
    assert got == policy
    assert torch_loaded_by_import == "False"  # so the CLI sets it before torch (and OpenMP) load


#: In a pool worker: whether torch was loaded when the pool's own initializer ran, which is
#: after the worker's set-up made its policy (OpenMP reads it when torch loads).
_TORCH_AT_START: list[bool] = []


def _note_torch() -> None:
    _TORCH_AT_START.append("torch" in sys.modules)


def _policy() -> tuple[str | None, list[bool]]:
    return os.environ.get("OMP_WAIT_POLICY"), _TORCH_AT_START


def test_pool_workers_start_with_idle_threads_sleeping(thread_policy_unset):
    monkeypatch = thread_policy_unset
    with worker_pool(1, initializer=_note_torch) as pool:
        # set before torch loaded in the worker, so its OpenMP runtime reads it
        assert pool.submit(_policy).result() == ("PASSIVE", [False])
    assert "OMP_WAIT_POLICY" not in os.environ  # set in the worker, not in this process
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice is kept
    with worker_pool(1) as pool:
        assert pool.submit(_policy).result()[0] == "ACTIVE"
