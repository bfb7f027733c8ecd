"""Agent training throughput and memory at real N and d: MaskablePPO with the SASHA policy.

    python experiments/bench_agent_speed.py [--sizes 100:1280 800:1280 8192:384] [--rollouts 2]

For each ``N:d``, a workdir of 8 training slides of about N clustered random features
(``bench_env.synthetic_workdir``; random-init HAFED and TSU) and the agents stage's training
(``train_agent`` with the demo preset's PPO settings: 4 envs × 64 steps per rollout, batch
64, 4 epochs, f = 0.1, one torch thread unless the mode says otherwise) for ``--rollouts``
rollouts, in each of these modes:

- ``SB3 buffer``: SB3's own rollout buffer and the policy reading the state
  (``agents.row_pool: false``; the policy still acts with its row cache): the baseline;
- ``SB3 buffer, 2 threads``: the same with ``agents.cpu_threads: 2``;
- ``SB3 buffer, obs_dim 128``: the policy reads a 128-column PCA projection of the state;
- ``row pool``: the default, row-pooled rollout buffer (``sasha_env.agents.buffers``): each
  distinct patch row stored once, the policy's per-row layers run once per distinct row of a
  mini-batch;
- ``row pool, 2 threads`` and ``row pool, obs_dim 128``: the default with either;
- ``row pool, paper protocol``: SASHA's official protocol (``agents.protocol: paper``), where
  each rollout is two whole episodes of one slide (``2⌈f·N⌉`` observations, one update with
  the official optimiser); ``--rollouts`` such slides.

Every run is a fresh process (so its peak RSS, ``VmHWM``, is its own); modes alternate within
each size. Printed: environment steps per second of training (collection and updates, from
the first step to the end of ``learn``; the set-up before it is not counted), the speed-up
over ``SB3 buffer``, the peak memory, and the arithmetic: one observation is ``P·(4k + 10)``
bytes for k feature columns; SB3's rollout buffer holds ``n_steps × n_envs`` of them (the
paper protocol's, ``2⌈f·N⌉``), the row pool
the distinct rows of the last rollout (printed as run) and ``P`` row indices per step.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stable_baselines3.common.callbacks import BaseCallback

MODES = {
    "SB3 buffer": {"row_pool": False},
    "SB3 buffer, 2 threads": {"row_pool": False, "cpu_threads": 2},
    "SB3 buffer, obs_dim 128": {"row_pool": False, "obs_dim": 128},
    "row pool": {},
    "row pool, 2 threads": {"cpu_threads": 2},
    "row pool, obs_dim 128": {"obs_dim": 128},
    "row pool, paper protocol": {"protocol": "paper", "epochs": 1},
}
BASELINE = "SB3 buffer"
LARGE_N = 2048
LARGE_MODES = [BASELINE, "row pool", "row pool, obs_dim 128", "row pool, paper protocol"]
N_SLIDES, N_ENVS, N_STEPS = 8, 4, 64


class Clock(BaseCallback):
    """Wall time from the first environment step of training to its end (set-up excluded),
    and the last rollout's buffer; with ``rollouts``, training stops once that many rollouts
    have been collected and used (at the next rollout's first step)."""

    def __init__(self, rollouts: int | None = None) -> None:
        super().__init__()
        self.rollouts, self.done = rollouts, 0

    def _on_training_start(self) -> None:
        self.t0 = time.perf_counter()

    def _on_rollout_end(self) -> None:  # the buffer is full, the update comes next
        self.done += 1
        buffer = self.model.rollout_buffer
        self.steps = int(self.num_timesteps)
        self.pool_rows = getattr(buffer, "pool_rows", None)
        self.buffer_steps = int(buffer.buffer_size * buffer.n_envs)

    def _on_step(self) -> bool:
        return self.rollouts is None or self.done < self.rollouts

    def _on_training_end(self) -> None:
        self.seconds = time.perf_counter() - self.t0


def run_one(root: Path, n: int, d: int, mode: str, rollouts: int) -> dict:
    """In this process: build (or reuse) the workdir for N, d and train; return measurements."""
    from bench_env import synthetic_workdir  # next to this script
    from procfs import proc_kib
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.train import train_agent

    wd = root / f"n{n}-d{d}"
    if not (wd / "manifest.csv").is_file():
        synthetic_workdir(wd, N_SLIDES, (int(n * 0.9), n), d)
    cfg = AgentConfig(
        fracs=(0.1,), total_timesteps=rollouts * N_ENVS * N_STEPS, n_steps=N_STEPS,
        n_envs=N_ENVS, batch_size=64, n_epochs=4, **MODES[mode],
    )  # fmt: skip
    paper = MODES[mode].get("protocol") == "paper"
    clock = Clock(rollouts if paper else None)  # paper: a rollout is one slide's two episodes
    model = train_agent(
        wd, frac=0.1, cfg=cfg, out_dir=root / "agents" / mode, progress=False, callbacks=[clock]
    )
    k = int(model.observation_space["features"].shape[1])
    return {
        "pool_rows": clock.pool_rows,
        "buffer_steps": clock.buffer_steps,
        "steps": clock.steps,
        "seconds": clock.seconds,
        "peak_gib": proc_kib("VmHWM") / 2**20,
        "P": int(model.observation_space["features"].shape[0]),
        "k": k,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", nargs="+", default=["100:1280", "800:1280", "8192:384"])
    p.add_argument("--rollouts", type=int, default=2, help="rollouts of 4 x 64 steps per run")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument(
        "--modes-large", nargs="+", default=LARGE_MODES, choices=list(MODES),
        help=f"modes at N > {LARGE_N} (SB3's buffer there runs at ~1 step/s)",
    )  # fmt: skip
    p.add_argument("--child", nargs=4, metavar=("ROOT", "N", "D", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        root, n, d, mode = args.child
        print(json.dumps(run_one(Path(root), int(n), int(d), mode, args.rollouts)))
        return
    print(
        f"| N | d | mode | steps/s | vs {BASELINE} | peak GiB | observation MB | "
        "rollout buffer GiB (as run) | paper-protocol SB3 buffer GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench_agent_speed_") as tmp:
        for size in args.sizes:
            n, d = (int(x) for x in size.split(":"))
            base = None
            for mode in args.modes if n <= LARGE_N else args.modes_large:
                cmd = [sys.executable, __file__, "--rollouts", str(args.rollouts), "--child", tmp, str(n), str(d), mode]  # fmt: skip
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                rate = r["steps"] / r["seconds"]
                base = rate if mode == BASELINE else base
                obs = r["P"] * (4 * r["k"] + 10)
                steps = r["buffer_steps"]  # the last rollout's
                if r["pool_rows"] is None:  # SB3's buffer: every observation in full
                    buffer = steps * obs
                else:  # the distinct rows and P int64 row indices per step
                    buffer = r["pool_rows"] * (4 * r["k"] + 10) + steps * r["P"] * 8
                paper = 2 * math.ceil(0.1 * r["P"]) * obs
                print(
                    f"| {n} | {d} | {mode} | {rate:.1f} | "
                    f"{'' if base is None else f'{rate / base:.2f}x'} | {r['peak_gib']:.2f} | "
                    f"{obs / 1e6:.2f} | {buffer / 2**30:.3f} | {paper / 2**30:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
