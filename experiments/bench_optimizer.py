"""The Lightning modules' AdamW, fused against the per-tensor loop, side by side.

    python experiments/bench_optimizer.py [--steps 30] [--pairs 24]

One training step (forward, backward, optimiser) of the TSU at the official width
(``3d -> 2d -> d``, ``TSUConfig(d_hidden=None)``) for d = 384 (the paper's ViT-S features) and
d = 1,280 (the demo's EfficientNet features), on ``--pairs`` random pairs (the official step:
one anchor per slide and its similar patches), one torch thread. Each optimiser runs in
alternating blocks on the same network and inputs, so both see the same machine load; printed:
milliseconds per step and the ratio, and the largest difference between the two runs' weights
after the same steps (float rounding only: the update is the same).

Then the fused step of the same network with and without denormals flushed to zero
(:mod:`sasha_models.denormals`, what a fit on one thread does): ``--dead`` of the input
features zero on every patch (so their first-layer weights get no gradient) and those weights'
first Adam moments denormal, as after a few hundred epochs of the official TSU (11 % of the first layer's
moments were denormal at epoch 300 of the f = 0.2 TSU on the demo's features). Printed: both
step times, their ratio, and whether the two runs' weights are bit-identical.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from sasha_models.denormals import flush_denormals
from sasha_models.lit import fused_adamw
from sasha_models.tsu import TSU, TSUConfig


def step_time(model: TSU, opt: torch.optim.Optimizer, batch: tuple, steps: int) -> float:
    """Seconds per step of ``steps`` MSE training steps on ``batch``."""
    v_a, z_a, z_j, v_j = batch
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(v_a, z_a, z_j), v_j).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=30, help="steps per block (default 30)")
    p.add_argument("--blocks", type=int, default=3, help="alternating blocks (default 3)")
    p.add_argument("--pairs", type=int, default=24, help="pairs per step (default 24)")
    p.add_argument(
        "--dead", type=float, default=0.11, help="share of always-zero input features (0.11)"
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    print(
        "| d | parameters | per-tensor AdamW ms/step | fused ms/step | speed-up | max weight diff |"
    )
    print("|---|---|---|---|---|---|")
    for d in (384, 1280):
        torch.manual_seed(0)
        base = TSU(TSUConfig(d=d))
        batch = tuple(torch.randn(args.pairs, d) for _ in range(4))
        models = {"loop": base, "fused": copy.deepcopy(base)}
        opts = {
            "loop": torch.optim.AdamW(models["loop"].parameters(), lr=4e-5, weight_decay=4e-4),
            "fused": fused_adamw(list(models["fused"].parameters()), 4e-5, 4e-4),
        }
        times: dict[str, list[float]] = {"loop": [], "fused": []}
        for _ in range(args.blocks):
            for name in ("loop", "fused"):
                times[name].append(step_time(models[name], opts[name], batch, args.steps))
        loop, fused = (min(times[k]) * 1e3 for k in ("loop", "fused"))
        diff = max(
            float((a - b).detach().abs().max())
            for a, b in zip(models["loop"].parameters(), models["fused"].parameters(), strict=True)
        )
        n = sum(q.numel() for q in base.parameters())
        print(
            f"| {d} | {n / 1e6:.1f} M | {loop:.1f} | {fused:.1f} | {loop / fused:.2f}x | {diff:.1e} |"
        )
    denormal_rows(args)


def denormal_rows(args: argparse.Namespace, d: int = 1280) -> None:
    """The fused step with denormal first moments, flushed against not (see the docstring)."""
    torch.manual_seed(0)
    base = TSU(TSUConfig(d=d))
    dead = torch.rand(d) < args.dead  # feature dims zero on every patch
    batch = [torch.randn(args.pairs, d).masked_fill(dead, 0.0) for _ in range(4)]
    models = {"as is": base, "flushed": copy.deepcopy(base)}
    opts = {k: fused_adamw(list(m.parameters()), 4e-5, 4e-4) for k, m in models.items()}
    first = base.net[0].weight
    for name, model in models.items():  # one step makes the state; then plant the denormals
        step_time(model, opts[name], tuple(batch), 1)
        moment = opts[name].state[model.net[0].weight]["exp_avg"]
        moment[:, dead.repeat(first.shape[1] // d)] = 1e-39
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.blocks):
        for name in models:
            with flush_denormals(enabled=name == "flushed"):
                times[name].append(step_time(models[name], opts[name], tuple(batch), args.steps))
    slow, fast = (min(times[k]) * 1e3 for k in models)
    same = all(
        torch.equal(a, b)
        for a, b in zip(models["as is"].parameters(), models["flushed"].parameters(), strict=True)
    )
    share = float(dead.float().mean())
    print()
    print("| d | dead inputs | denormal moments ms/step | flushed ms/step | speed-up | weights |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {d} | {share:.0%} | {slow:.1f} | {fast:.1f} | {slow / fast:.2f}x "
        f"| {'bit-identical' if same else 'differ'} |"
    )


if __name__ == "__main__":
    main()
