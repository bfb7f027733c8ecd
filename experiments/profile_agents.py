"""Where the agents stage's training time goes: env step, observation copies, policy, update.

    python experiments/profile_agents.py [--workdir DEMO_WORKDIR] [--sizes 8192:384]
        [--envs 8] [--rollouts 3] [--frac 0.1] [--vec-env dummy]

Trains the pipeline's agent (``train_agent``: MaskablePPO with the SASHA policy, the demo
preset's PPO settings, ``--envs`` environments × 64 steps per rollout, batch 64, 4 epochs, one
torch thread) for ``--rollouts`` rollouts on each workdir: ``--workdir`` (a finished demo
workdir, N ≈ 800, d = 320) and, per ``--sizes N:d``, a synthetic workdir of 8 training slides of
about N clustered random features (``bench_env.synthetic_workdir``). Each run is a fresh
process. Wall-clock timers wrap, for the duration of training only (set-up excluded):

- **env step**: ``SashaWSIEnv.step`` without its observation (the zoom, the TSU update, the
  incremental re-scoring and the reward), and ``reset``;
- **observation (env)**: ``SashaWSIEnv._obs``, the env's observation arrays;
- **observation (vec env)**: the vector env's copies into its own buffers (SB3's
  ``DummyVecEnv._save_obs`` and ``_obs_from_buf``);
- **policy forward**: the policy's action choice during collection (``policy.forward``,
  the row cache included), and the masks (``get_action_masks``);
- **rollout buffer**: ``rollout_buffer.add`` (the row pool's de-duplication included) and the
  returns/advantages;
- **update**: ``algorithm.train()``, the PPO epochs;
- **other**: the rest of ``learn`` (SB3's loop, ``obs_as_tensor``, callbacks, Monitor).

Printed: a Markdown table with seconds and shares per phase, and steps per second. Timers add
a few microseconds per call; the shares, not the absolute times, are the result on a shared
machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

PHASES = (
    "env step",
    "observation (env)",
    "observation (vec env)",
    "policy forward",
    "rollout buffer",
    "update",
    "other",
)
N_STEPS = 64


class Timers:
    """Exclusive wall time per phase: a timed call nested in another is charged to itself only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[list[Any]] = []  # [phase, start, time of timed calls nested in it]
        self.on = False

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        fn: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            frame = [phase, time.perf_counter(), 0.0]
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                spent = time.perf_counter() - frame[1]
                self.seconds[phase] += spent - frame[2]
                if self.stack:
                    self.stack[-1][2] += spent

        setattr(owner, name, timed)


def run_one(workdir: Path, envs: int, rollouts: int, frac: float, vec_env: str) -> dict:
    """In this process: train with the timers on; return seconds per phase."""
    import sb3_contrib.common.maskable.utils as mask_utils
    import torch
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    import sasha_env.agents.buffers as buffers
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.train import train_agent
    from sasha_env.envs.wsi import SashaWSIEnv
    from sasha_models.policy import SashaActorCriticPolicy

    torch.set_num_threads(1)
    t = Timers()
    t.wrap(SashaWSIEnv, "step", "env step")
    t.wrap(SashaWSIEnv, "reset", "env step")
    t.wrap(SashaWSIEnv, "_obs", "observation (env)")
    t.wrap(DummyVecEnv, "_save_obs", "observation (vec env)")
    t.wrap(DummyVecEnv, "_obs_from_buf", "observation (vec env)")
    t.wrap(SashaActorCriticPolicy, "forward", "policy forward")
    t.wrap(mask_utils, "get_action_masks", "policy forward")
    for cls in (buffers.RowPoolMaskableRolloutBuffer,):
        t.wrap(cls, "add", "rollout buffer")
        t.wrap(cls, "compute_returns_and_advantage", "rollout buffer")
    t.wrap(MaskablePPO, "train", "update")
    # sb3-contrib imports get_action_masks by name into its module
    import sb3_contrib.ppo_mask.ppo_mask as ppo_mask_module

    ppo_mask_module.get_action_masks = mask_utils.get_action_masks

    class Clock(BaseCallback):
        def _on_training_start(self) -> None:
            t.on, self.t0 = True, time.perf_counter()

        def _on_step(self) -> bool:
            return True

        def _on_training_end(self) -> None:
            t.on, self.seconds = False, time.perf_counter() - self.t0
            self.steps = int(self.model.num_timesteps)

    cfg = AgentConfig(
        fracs=(frac,), total_timesteps=rollouts * envs * N_STEPS, n_steps=N_STEPS,
        n_envs=envs, batch_size=64, n_epochs=4, vec_env=vec_env,
    )  # fmt: skip
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="profile_agents_") as out:
        train_agent(
            workdir, frac=frac, cfg=cfg, out_dir=Path(out), progress=False, callbacks=[clock]
        )
    timed = sum(t.seconds.values())
    phases = {p: t.seconds.get(p, 0.0) for p in PHASES if p != "other"}
    phases["other"] = max(0.0, clock.seconds - timed)
    return {"seconds": clock.seconds, "steps": clock.steps, "phases": phases}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", type=Path, help="a finished demo workdir (N ≈ 800)")
    p.add_argument("--sizes", nargs="*", default=["8192:384"], help="synthetic N:d workdirs")
    p.add_argument("--envs", type=int, default=8)
    p.add_argument("--rollouts", type=int, default=3)
    p.add_argument("--frac", type=float, default=0.1)
    p.add_argument("--vec-env", default="dummy", help="agents.vec_env")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        r = run_one(args.child, args.envs, args.rollouts, args.frac, args.vec_env)
        print(json.dumps(r))
        return
    with tempfile.TemporaryDirectory(prefix="profile_agents_wd_") as tmp:
        targets: list[tuple[str, Path]] = []
        if args.workdir:
            targets.append((f"demo workdir ({args.workdir.name})", args.workdir))
        for size in args.sizes:
            n, d = (int(x) for x in size.split(":"))
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_env import synthetic_workdir  # next to this script

            wd = Path(tmp) / f"n{n}-d{d}"
            synthetic_workdir(wd, 8, (int(n * 0.9), n), d)
            targets.append((f"synthetic N ≈ {n}, d = {d}", wd))
        header = " | ".join(PHASES)
        print(f"| workdir | steps/s | {header} |")
        print("|---|---|" + "---|" * len(PHASES))
        for name, wd in targets:
            cmd = [
                sys.executable, __file__, "--child", str(wd), "--envs", str(args.envs),
                "--rollouts", str(args.rollouts), "--frac", str(args.frac),
                "--vec-env", args.vec_env,
            ]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            cells = " | ".join(
                f"{r['phases'][ph]:.1f} s ({100 * r['phases'][ph] / r['seconds']:.0f} %)"
                for ph in PHASES
            )
            print(f"| {name} | {r['steps'] / r['seconds']:.1f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
