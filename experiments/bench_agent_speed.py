"""Agent training throughput and memory at real N and d: MaskablePPO with the SASHA policy.

    python experiments/bench_agent_speed.py [--sizes 100:1280 800:1280 8192:384] [--rollouts 2]
    python experiments/bench_agent_speed.py --vec [--sizes 800:1280 8192:384] [--rollouts 1]
    python experiments/bench_agent_speed.py --vec --device cuda [--n-envs 8 64]

``--vec`` (what ``make bench-agents`` runs first): the agents stage's training on 8 envs, its
vector env the only difference: SB3's ``DummyVecEnv`` of 8 single envs (``agents.vec_env:
dummy``, the default before ``SashaVecEnv``) against ``SashaVecEnv`` with 8 envs (``sasha``,
the default now), same algorithm, settings and seed, side by side (alternating fresh
processes) at N ≈ 800 (d = 1,280) and N = 8,192 (d = 384). Printed per run: environment steps
per second of training (collection and updates) and of collection alone (the rollouts: env
steps, policy forward passes, buffer), each per wall-clock second and per CPU-second of the
process (one torch thread: on a machine shared with other jobs the CPU time is the steadier
measure), the ratios of both rates to ``DummyVecEnv``'s run just before, the seconds per
update, and the peak memory (with ``--device cuda`` also the GPU's peak allocation); then both
vector envs stepped alone (64 steps of random legal
actions, the same for both, steps per CPU-second) and their ratio. One rollout is 8 × 64 steps; ``--repeats`` alternates the pair
again. The default run is 1 rollout per run: a few minutes on a quiet 2-core machine, most of
it PPO's update at N = 8,192 (about 2 min per run there, the same for both).

``--device cuda``: the policy on the GPU in both runs, and ``SashaVecEnv``'s states, TSU and
HAFED there too (``train_agent(device=...)``); ``DummyVecEnv``'s single envs step on the CPU as
they must. ``--n-envs`` runs the pair at each of several environment counts (default 8).

Without ``--vec``:

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
from collections.abc import Sequence
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
#: ``--vec``: the agents stage's default training on 8 envs, with either vector env.
VEC_MODES = {
    "DummyVecEnv": {"vec_env": "dummy", "n_envs": 8},
    "SashaVecEnv": {"vec_env": "sasha", "n_envs": 8},
}
VEC_BASELINE = "DummyVecEnv"
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
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.collect_seconds = self.collect_cpu = 0.0

    def _on_rollout_start(self) -> None:
        self.rollout_t0, self.rollout_cpu0 = time.perf_counter(), time.process_time()

    def _on_rollout_end(self) -> None:  # the buffer is full, the update comes next
        self.collect_seconds += time.perf_counter() - self.rollout_t0
        self.collect_cpu += time.process_time() - self.rollout_cpu0
        self.done += 1
        buffer = self.model.rollout_buffer
        self.steps = int(self.num_timesteps)
        self.pool_rows = getattr(buffer, "pool_rows", None)
        self.buffer_steps = int(buffer.buffer_size * buffer.n_envs)

    def _on_step(self) -> bool:
        return self.rollouts is None or self.done < self.rollouts

    def _on_training_end(self) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.cpu0


def workdir_for(root: Path, n: int, d: int) -> Path:
    """The synthetic workdir for N, d under ``root`` (built on first use)."""
    from bench_env import synthetic_workdir  # next to this script

    wd = root / f"n{n}-d{d}"
    if not (wd / "manifest.csv").is_file():
        synthetic_workdir(wd, N_SLIDES, (int(n * 0.9), n), d)
    return wd


def run_env_only(
    root: Path, n: int, d: int, mode: str, steps: int = N_STEPS, device: str = "cpu",
    n_envs: int | None = None,
) -> dict:  # fmt: skip
    """In this process: the agents stage's training env of ``mode`` (:data:`VEC_MODES`)
    stepped alone, ``steps`` steps of random legal actions (the same for both modes) after a
    reset; returns its CPU seconds in ``step``."""
    import numpy as np
    import torch

    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.envs import training_env

    torch.set_num_threads(1)  # as the agents stage trains (agents.cpu_threads)
    cfg = AgentConfig(fracs=(0.1,), **{**VEC_MODES[mode], **({"n_envs": n_envs} if n_envs else {})})
    venv, _, _, _ = training_env(workdir_for(root, n, d), 0.1, cfg, seed=0, device=device)
    venv.reset()
    rng, cpu = np.random.default_rng(0), 0.0
    for _ in range(steps):
        masks = np.stack(venv.env_method("action_masks"))
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
        t0 = time.process_time()
        venv.step(actions)  # observations come back as NumPy arrays: the GPU has finished
        cpu += time.process_time() - t0
    venv.close()
    return {"steps": steps * cfg.n_envs, "cpu_seconds": cpu}


def run_one(
    root: Path, n: int, d: int, mode: str, rollouts: int, device: str = "cpu",
    n_envs: int | None = None,
) -> dict:  # fmt: skip
    """In this process: build (or reuse) the workdir for N, d and train; return measurements.
    ``n_envs`` overrides the mode's number of environments."""
    import torch

    from procfs import proc_kib
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.train import train_agent

    if mode.startswith("env only: "):
        return run_env_only(
            root, n, d, mode.removeprefix("env only: "), device=device, n_envs=n_envs
        )
    wd = workdir_for(root, n, d)
    options = {"n_envs": N_ENVS, **MODES.get(mode, VEC_MODES.get(mode, {}))}
    if n_envs:
        options["n_envs"] = n_envs
    cfg = AgentConfig(
        fracs=(0.1,), total_timesteps=rollouts * options["n_envs"] * N_STEPS, n_steps=N_STEPS,
        batch_size=64, n_epochs=4, **options,
    )  # fmt: skip
    paper = options.get("protocol") == "paper"
    clock = Clock(rollouts if paper else None)  # paper: a rollout is one slide's two episodes
    model = train_agent(
        wd, frac=0.1, cfg=cfg, out_dir=root / "agents" / mode, progress=False, callbacks=[clock],
        device=device,
    )  # fmt: skip
    k = int(model.observation_space["features"].shape[1])
    return {
        "pool_rows": clock.pool_rows,
        "buffer_steps": clock.buffer_steps,
        "steps": clock.steps,
        "seconds": clock.seconds,
        "collect_seconds": clock.collect_seconds,
        "cpu_seconds": clock.cpu_seconds,
        "collect_cpu": clock.collect_cpu,
        "rollouts": clock.done,
        "peak_gib": proc_kib("VmHWM") / 2**20,
        "gpu_peak_gib": (
            torch.cuda.max_memory_allocated() / 2**30
            if torch.device(device).type == "cuda"
            else None
        ),
        "P": int(model.observation_space["features"].shape[0]),
        "k": k,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--vec", action="store_true", help="SashaVecEnv against 8 DummyVecEnvs")
    p.add_argument(
        "--sizes",
        nargs="+",
        help="N:d (default 100:1280 800:1280 8192:384; --vec: 800:1280 8192:384)",
    )
    p.add_argument("--rollouts", type=int, help="rollouts per run (default 2; --vec: 1)")
    p.add_argument("--repeats", type=int, default=1, help="--vec: runs of each vector env per size")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument(
        "--modes-large", nargs="+", default=LARGE_MODES, choices=list(MODES),
        help=f"modes at N > {LARGE_N} (SB3's buffer there runs at ~1 step/s)",
    )  # fmt: skip
    p.add_argument(
        "--device", default="cpu",
        help="--vec: torch device of the policy and of SashaVecEnv (cpu, cuda)",
    )  # fmt: skip
    p.add_argument(
        "--n-envs", nargs="+", type=int, default=[8], help="--vec: environment counts to run"
    )
    p.add_argument("--child", nargs=4, metavar=("ROOT", "N", "D", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--child-envs", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.rollouts = args.rollouts or (1 if args.vec else 2)
    if args.child:
        root, n, d, mode = args.child
        result = run_one(
            Path(root), int(n), int(d), mode, args.rollouts, args.device, args.child_envs
        )
        print(json.dumps(result))
        return
    if args.vec:
        sizes = args.sizes or ["800:1280", "8192:384"]
        compare_vec_envs(sizes, args.rollouts, args.repeats, args.device, args.n_envs)
        return
    args.sizes = args.sizes or ["100:1280", "800:1280", "8192:384"]
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
                r = child(tmp, n, d, mode, args.rollouts)
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


def child(
    root: str, n: int, d: int, mode: str, rollouts: int, device: str = "cpu",
    n_envs: int | None = None,
) -> dict:  # fmt: skip
    """:func:`run_one` in a fresh process (its own peak memory, its own caches)."""
    cmd = [sys.executable, __file__, "--rollouts", str(rollouts), "--device", device, "--child", root, str(n), str(d), mode]  # fmt: skip
    if n_envs:
        cmd += ["--child-envs", str(n_envs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare_vec_envs(
    sizes: list[str], rollouts: int, repeats: int, device: str = "cpu", env_counts: Sequence[int] = (8,)
) -> None:  # fmt: skip
    """``--vec``: at each size and environment count, the two vector envs, alternating, one
    fresh process each, ``repeats`` times; each run's rates and their ratios to the baseline
    run just before it (per wall-clock second, the measure on a machine of one's own, and per
    CPU-second, the steadier one on a shared machine). Then the two vector envs stepped alone."""
    gpu = device != "cpu"
    print(f"Device: {device} (policy{' and SashaVecEnv' if gpu else ''})\n")
    print(
        f"| N | d | envs | vector env | training steps/s | vs {VEC_BASELINE} | per CPU-s | "
        "vs (CPU) | collection steps/s | vs | update s | peak GiB |"
        + (" GPU peak GiB |" if gpu else "")
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    alone = []
    with tempfile.TemporaryDirectory(prefix="bench_agent_speed_") as tmp:
        for size in sizes:
            n, d = (int(x) for x in size.split(":"))
            for envs in env_counts:
                for _ in range(repeats):
                    base: tuple[float, float, float] | None = None
                    for mode in VEC_MODES:
                        r = child(tmp, n, d, mode, rollouts, device, envs)
                        steps = r["steps"]
                        rate, cpu_rate = steps / r["seconds"], steps / r["cpu_seconds"]
                        collect = steps / r["collect_seconds"]
                        base = (rate, cpu_rate, collect) if mode == VEC_BASELINE else base
                        assert base is not None
                        update = (r["seconds"] - r["collect_seconds"]) / max(r["rollouts"], 1)
                        gpu_peak = f" {r['gpu_peak_gib']:.2f} |" if gpu else ""
                        print(
                            f"| {n} | {d} | {envs} | {mode} | {rate:.1f} | "
                            f"{rate / base[0]:.2f}x | {cpu_rate:.1f} | {cpu_rate / base[1]:.2f}x | "
                            f"{collect:.1f} | {collect / base[2]:.2f}x | {update:.1f} | "
                            f"{r['peak_gib']:.2f} |{gpu_peak}",
                            flush=True,
                        )
                env_rates = []
                for mode in VEC_MODES:
                    r = child(tmp, n, d, f"env only: {mode}", rollouts, device, envs)
                    env_rates.append(r["steps"] / r["cpu_seconds"])
                alone.append((n, d, envs, *env_rates))
    print(f"\nThe vector envs alone ({N_STEPS} steps, random legal actions):\n")
    names = " | ".join(VEC_MODES)
    print(f"| N | d | envs | {names} (steps/CPU-s) | ratio |")
    print("|---|---|---|---|---|---|")
    for n, d, envs, base_rate, rate in alone:
        print(f"| {n} | {d} | {envs} | {base_rate:.1f} | {rate:.1f} | {rate / base_rate:.2f}x |")


if __name__ == "__main__":
    main()
