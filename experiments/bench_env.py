"""Sasha-WSI-v0: step rate with and without incremental evaluation, and PPO's memory.

    python experiments/bench_env.py [--sizes 512 2048 8192] [--d 384] [--steps 200]
                                    [--threads 1] [--skip-speed] [--skip-memory]

1. **Step rate.** For each N, a slide of N random clustered features (d = 384; clusters of
   ~32 patches with |cos| ≈ 0.98 inside, so the TSU updates whole clusters) and random-init
   HAFED (paper config: 5 branches, hidden 128) and TSU (τ = 0.95), written to a temporary
   store. Three environments on the same data take the same random legal actions for at
   least one whole episode (f = 0.1), in alternating blocks so all see the same machine
   state: ``incremental=True`` with the default observations (read-only snapshots refreshed
   row by row, ``sasha_env.envs.obs_pool``), the same with
   ``copy_obs=False`` (views of the env's buffers, as the agents stage and ``sasha predict``
   use it: SB3's vector envs copy anyway), and ``incremental=False`` (all N rows re-scored
   every step). Prints steps per CPU-second of each, the ratios, and the rows changed per
   step (zoomed + TSU-updated); then a profile of the largest N's step (``--profile-top``
   functions by own time). One torch thread by default (``--threads``).
2. **Memory.** In a fresh process: a demo-sized cohort (16 slides, N ≈ 150, d = 1280, like
   the embedded demo's efficientnet-lite0 features) written as a workdir with random-init
   HAFED and TSU checkpoints; SB3 PPO (``MultiInputPolicy``, ``n_steps=128``, batch 64)
   learns for 2 rollouts on 4 ``SubprocVecEnv`` workers (one torch thread each). Prints the
   peak resident set size (``VmHWM``) of the main process and of every descendant
   (forkserver and workers), their sum (target < 4 GiB), and the summed ``Pss`` at the end
   (shared pages counted once). One observation is ``max_patches·(4d + 10)`` bytes; the
   rollout buffer holds ``n_steps × n_envs`` of them.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from procfs import proc_kib  # experiments/procfs.py, next to this script
from sasha_env.envs.wsi import SashaWSIEnv, observation_nbytes
from sasha_env.features.records import SlideInfo, StoreInfo
from sasha_env.features.store import FeatureStore
from sasha_models.hafed import HAFED, HAFEDConfig
from sasha_models.tsu import TSU, TSUConfig


# ------------------------------------------------------------------ synthetic data
def clustered_features(n: int, d: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``z, v (n, d)`` float32: clusters of ~32 rows, |cos| ≈ 0.98 within, ≈ 0 across."""
    n_clusters = max(1, n // 32)
    centres = rng.normal(size=(n_clusters, d))
    z = centres[rng.integers(0, n_clusters, n)] + 0.15 * rng.normal(size=(n, d))
    v = z + 0.3 * rng.normal(size=(n, d))
    return z.astype(np.float32), v.astype(np.float32)


def write_store(path: Path, d: int, slides: dict[str, tuple[np.ndarray, np.ndarray, str]]) -> None:
    """A feature store with ``slides[id] = (z, v, label)``; the lattice is 64 columns wide."""
    store = FeatureStore.create(
        path,
        StoreInfo(backbone="bench", backbone_dim=d, patch_px=32, zoom=4, hi_downsample=1.0),
    )
    for sid, (z, v, label) in slides.items():
        n = len(z)
        cells = np.stack([np.arange(n) // 64, np.arange(n) % 64], 1).astype(np.int64)
        info = SlideInfo(
            label=label,
            path=f"/nonexistent/{sid}.tiff",
            dimensions=(64 * 128, int(cells[-1, 0] + 1) * 128),
            n_patches=n,
            shape=(int(cells[-1, 0]) + 1, 64),
            patch_px=32,
            lo_downsample=4.0,
        )
        arrays = {"lowres": z, "coords": cells[:, ::-1] * 128, "cells": cells}
        store.write_slide(sid, arrays, info)
        store.write_array(sid, "distilled", v)


def synthetic_workdir(
    wd: Path, n_slides: int, n_range: tuple[int, int], d: int, seed: int = 1
) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """A workdir the agents can train on: ``n_slides`` training slides of N in ``n_range``
    clustered random features (low-res and distilled), random-init HAFED and TSU exports."""
    from sasha_models.lit import HAFEDModule, TSUModule

    rng = np.random.default_rng(seed)
    slides = {}
    for i in range(n_slides):
        z, v = clustered_features(int(rng.integers(n_range[0], n_range[1] + 1)), d, rng)
        slides[f"s{i:02d}"] = (z, v, str(i % 2))
    write_store(wd / "features.zarr", d, slides)
    write_manifest(wd / "manifest.csv", [(s, lab, "train") for s, (_, _, lab) in slides.items()])
    for name, module in (
        ("hafed", HAFEDModule({"d_in": d}, seed=0)),
        ("tsu", TSUModule({"d": d, "tau": 0.95}, seed=0)),
    ):
        (wd / "models" / name).mkdir(parents=True, exist_ok=True)
        torch.save({**module.export(), "meta": {}}, wd / "models" / name / "model.pt")
    return slides


def write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "path", "label", "split"])
        for sid, label, split in rows:
            w.writerow([sid, f"/nonexistent/{sid}.tiff", label, split])


# ------------------------------------------------------------------ 1. step rate
class Runner:
    """Random legal steps on an env, continuing its episode from one call to the next."""

    def __init__(self, env: SashaWSIEnv, seed: int) -> None:
        self.env, self.rng = env, np.random.default_rng(seed)
        env.reset(seed=seed)

    def run(self, n_steps: int) -> float:
        """CPU seconds spent in ``step`` over ``n_steps`` steps (resets not counted).

        Process CPU time, not wall time: on a shared machine wall time mostly measures the
        neighbours' load. With one torch thread the two agree on an idle machine.
        """
        spent = 0.0
        for _ in range(n_steps):
            action = int(self.rng.choice(np.flatnonzero(self.env.action_masks())))
            t0 = time.process_time()
            _, _, terminated, _, _ = self.env.step(action)
            spent += time.process_time() - t0
            if terminated:
                self.env.reset()
        return spent


def bench_speed(sizes: list[int], d: int, steps: int, root: Path, profile_top: int = 12) -> None:
    torch.manual_seed(0)
    hafed = HAFED(HAFEDConfig(d_in=d)).eval()
    tsu = TSU(TSUConfig(d=d, tau=0.95)).eval()
    rng = np.random.default_rng(0)
    slides = {f"n{n}": (*clustered_features(n, d, rng), "1") for n in sizes}
    write_store(root / "speed.zarr", d, slides)
    print(f"step rate, d = {d}, HAFED 5 branches x hidden 128, TSU tau 0.95, frac 0.1")
    print(
        "| N | incremental, snapshots (steps/s) | incremental, views | full re-score | views / snapshots | views / full | rows changed per step |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        manifest = root / f"manifest_n{n}.csv"
        write_manifest(manifest, [(f"n{n}", "1", "train"), ("other0", "0", "test")])
        kw = dict(store=root / "speed.zarr", manifest=manifest, hafed=hafed, tsu=tsu, frac=0.1)
        envs = {
            "copies": SashaWSIEnv(**kw),
            "views": SashaWSIEnv(**kw, copy_obs=False),
            "full": SashaWSIEnv(**kw, incremental=False),
        }
        for env in envs.values():  # warm-up: load the slide, touch the buffers
            Runner(env, 0).run(3)
        runners = {flag: Runner(env, 1) for flag, env in envs.items()}  # same actions
        total = max(steps, envs["copies"].budget)  # at least one whole episode
        blocks = 8
        block = -(-total // blocks)
        spent = dict.fromkeys(envs, 0.0)
        for _ in range(blocks):  # alternate blocks: both see the same machine state
            for flag, runner in runners.items():
                spent[flag] += runner.run(block)
        rate = {name: blocks * block / seconds for name, seconds in spent.items()}
        env = envs["copies"]
        env.reset(seed=0)
        for _ in range(env.budget):
            env.step(int(np.flatnonzero(env.action_masks())[0]))
        changed = (env.budget + int(env._updated.sum())) / env.budget  # zoomed + TSU rows
        print(
            f"| {n} | {rate['copies']:.0f} | {rate['views']:.0f} | {rate['full']:.0f} | "
            f"{rate['views'] / rate['copies']:.2f}x | {rate['views'] / rate['full']:.1f}x | "
            f"{changed:.1f} |"
        )
    if profile_top:
        profile_step(envs["views"], max(steps, envs["views"].budget), profile_top)


def profile_step(env: SashaWSIEnv, n_steps: int, top: int) -> None:
    """Where one step's time goes: cProfile over ``n_steps`` random legal steps."""
    import cProfile
    import io
    import pstats

    runner = Runner(env, 2)
    profile = cProfile.Profile()
    profile.enable()
    runner.run(n_steps)
    profile.disable()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out).sort_stats("tottime")
    stats.print_stats(top)
    n = env.slide.n if env.slide is not None else "?"
    print(f"\nprofile of {n_steps} steps at N = {n} (copy_obs=False), by own time:")
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    print("\n".join(lines[start : start + top + 1]))


# ------------------------------------------------------------------ 2. memory
def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _make_env(workdir: str, rank: int):
    def thunk():
        torch.set_num_threads(1)  # 4 workers on a small CPU: one thread each
        import gymnasium as gym

        import sasha_env  # noqa: F401 - registers Sasha-WSI-v0 in the worker

        return gym.make("Sasha-WSI-v0", workdir=workdir, split="train", frac=0.1)

    return thunk


def bench_memory(root: Path, n_slides: int = 16, d: int = 1280, n_envs: int = 4) -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import SubprocVecEnv

    wd = root / "demo_like"
    slides = synthetic_workdir(wd, n_slides, (130, 170), d)

    max_n = max(len(z) for z, _, _ in slides.values())
    obs_b = observation_nbytes(max_n, d)
    n_steps = 128
    print(
        f"\nmemory: PPO MultiInputPolicy, {n_envs} SubprocVecEnv workers, {n_slides} slides, "
        f"N <= {max_n}, d = {d}; observation {obs_b / 1e6:.2f} MB, "
        f"rollout buffer {n_steps * n_envs * obs_b / 2**20:.0f} MiB"
    )
    vec = SubprocVecEnv([_make_env(str(wd), i) for i in range(n_envs)])
    t0 = time.perf_counter()
    model = PPO("MultiInputPolicy", vec, n_steps=n_steps, batch_size=64, n_epochs=2, seed=0)
    model.learn(total_timesteps=2 * n_steps * n_envs)
    seconds = time.perf_counter() - t0
    me = os.getpid()
    pids = [me, *_descendants(me)]
    peaks = {pid: proc_kib("VmHWM", pid) for pid in pids}
    pss = sum(proc_kib("Pss", pid, "smaps_rollup") for pid in pids)
    vec.close()
    total = sum(peaks.values())
    print(f"  main process   {peaks[me] / 2**20:6.2f} GiB")
    others = sorted((p for p in peaks if p != me), key=lambda p: -peaks[p])
    for pid in others:
        print(f"  child {pid:<8} {peaks[pid] / 2**20:6.2f} GiB")
    verdict = "below" if total < 4 * 2**20 else "ABOVE"
    print(
        f"  sum of peaks   {total / 2**20:6.2f} GiB ({verdict} the 4 GiB target); "
        f"{2 * n_steps * n_envs} steps in {seconds:.1f} s"
    )
    print(
        f"  sum of Pss now {pss / 2**20:6.2f} GiB (shared library pages counted once; "
        "RSS counts torch's in every process)"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--steps", type=int, default=200, help="timed steps per mode and N")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for the step-rate part (0: leave torch's default). One "
        "thread is the fair setting for per-step work on a small or shared CPU, where a second "
        "thread waiting on a busy core slows small ops down by 10-30x",
    )
    p.add_argument("--profile-top", type=int, default=12, help="profile lines (0: no profile)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_env_") as tmp:
        if not args.skip_speed:
            default_threads = torch.get_num_threads()
            if args.threads > 0:
                torch.set_num_threads(args.threads)
            print(
                f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs"
            )
            bench_speed(args.sizes, args.d, args.steps, Path(tmp), args.profile_top)
            torch.set_num_threads(default_threads)
        if not args.skip_memory and args.skip_speed:
            bench_memory(Path(tmp))
        elif not args.skip_memory:  # a fresh process, so its peak RSS is PPO's alone
            subprocess.run([sys.executable, __file__, "--skip-speed"], check=True)


if __name__ == "__main__":
    main()
