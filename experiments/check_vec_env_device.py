"""SashaVecEnv on a GPU against SashaVecEnv on the CPU, step by step.

    python experiments/check_vec_env_device.py --device cuda [--sizes 800:1280 8192:384]
        [--envs 8] [--steps 200]

The test suite checks that ``SashaVecEnv`` equals independent ``Sasha-WSI-v0`` environments and
runs the GPU's code path (``layout="device"``) on the CPU; this script checks the real device
against the CPU: for each ``N:d``, a synthetic workdir (``bench_env.synthetic_workdir``: random
clustered features, random-init HAFED and TSU), two ``SashaVecEnv`` s of ``--envs`` envs with the
same seeds, driven by the same random legal actions for ``--steps`` steps (episodes end and
auto-reset on the way). Printed per size: the largest absolute difference of the observations'
features and of the rewards, whether the masks, the ``done`` flags and the slides drawn were
identical, and the steps per second of each. Exit status 1 when masks, dones or slides differ
or a difference passes ``--atol`` (float32 kernels differ between devices in the last bits;
what matters is that no episode takes another course).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_env import synthetic_workdir  # noqa: E402
from sasha_env.envs.vector import SashaVecEnv  # noqa: E402


def record(venv: SashaVecEnv, step: tuple) -> tuple:
    """One step's features, rewards, dones, masks and slides, copied."""
    obs, rewards, dones, _ = step
    slides = [None if s is None else s.slide_id for s in venv.batch.slides]
    return obs["features"].copy(), rewards.copy(), dones.copy(), venv.action_masks().copy(), slides


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", nargs="+", default=["800:1280", "8192:384"], help="N:d")
    p.add_argument("--envs", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--atol", type=float, default=1e-3)
    args = p.parse_args()
    torch.manual_seed(0)
    failed = False
    print(f"| N | d | envs | steps | max abs Δ features | max abs Δ reward | masks, dones, slides "
          f"| cpu steps/s | {args.device} steps/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="check_vec_env_device_") as tmp:
        for size in args.sizes:
            n, d = (int(x) for x in size.split(":"))
            wd = Path(tmp) / f"n{n}-d{d}"
            synthetic_workdir(wd, 8, (int(n * 0.9), n), d)
            venvs = [
                SashaVecEnv(args.envs, wd, frac=0.1, device=dev) for dev in ("cpu", args.device)
            ]
            for venv in venvs:
                venv.seed(0)
                venv.reset()
            # both in lockstep, on random legal actions drawn from the CPU env's masks
            rng, seconds = np.random.default_rng(0), [0.0, 0.0]
            cpu, gpu = [], []
            for _ in range(args.steps):
                masks = venvs[0].action_masks()
                a = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
                for i, out in enumerate((cpu, gpu)):
                    t0 = time.perf_counter()
                    step = venvs[i].step(a)
                    seconds[i] += time.perf_counter() - t0
                    out.append(record(venvs[i], step))
            t_cpu, t_gpu = seconds
            d_obs = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(cpu, gpu, strict=True))
            d_rew = max(float(np.abs(a[1] - b[1]).max()) for a, b in zip(cpu, gpu, strict=True))
            same = all(
                np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3]) and a[4] == b[4]
                for a, b in zip(cpu, gpu, strict=True)
            )
            failed |= not same or max(d_obs, d_rew) > args.atol
            steps = args.steps * args.envs
            print(
                f"| {n} | {d} | {args.envs} | {args.steps} | {d_obs:.2e} | {d_rew:.2e} | "
                f"{'identical' if same else 'DIFFER'} | {steps / t_cpu:.0f} | {steps / t_gpu:.0f} |",
                flush=True,
            )
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main())
