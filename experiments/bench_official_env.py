"""Sasha-WSI-v0's step against the official SASHA code's environment step, side by side.

    git clone https://github.com/coglabiisc/SASHA /path/to/SASHA   # their code, not shipped here
    python experiments/bench_official_env.py --official /path/to/SASHA [--n 8192] [--d 384]

The official environment (``envs/WSI_cosine_env.py``: ``WSICosineObservationEnv``) runs with
their HAFED (``architecture/transformer.py``, built as ``step6_rl_training.py`` builds it
from ``config/camelyon_config.yml``: hidden 128, 5 branches) and their TSU
(``modules/fglobal_mlp.py``: ``FGlobal(3d → d)``), random-initialised, in eval mode, on the CPU,
with ``camelyon_rl_config.yml``'s settings (f = 0.1, τ = 0.95, CE reward). Ours runs with our
HAFED and TSU of the same sizes, three ways: the default (read-only snapshots refreshed row by
row, ``sasha_env.envs.obs_pool``), ``copy_obs=False`` (the agents stage and ``sasha
predict``), and whole fresh copies of every observation (the default before the snapshots: a
``copy_obs=False`` env whose observation is copied inside the timed step). All four get the same features
(``bench_env.clustered_features``: clusters of ~32 rows with |cos| ≈ 0.98, so the TSU updates
~10 rows per step in both) and the same legal actions, one torch thread, in alternating blocks
so that all see the same machine load; CPU time inside ``step`` only. The official code is
imported from ``--official`` unchanged (its ``prettytable`` import, used only by a print
helper, is stubbed when missing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench_env import clustered_features, write_manifest, write_store  # next to this script
from sasha_env.envs.wsi import SashaWSIEnv
from sasha_models.hafed import HAFED, HAFEDConfig
from sasha_models.tsu import TSU, TSUConfig


def official_env(root: Path, z: np.ndarray, v: np.ndarray, label: int, d: int):
    """The official environment, classifier and TSU; ``step(a)`` as their training loop calls it."""
    sys.path.insert(0, str(root))
    sys.modules.setdefault("prettytable", types.SimpleNamespace(PrettyTable=None))
    from architecture.transformer import HAFED as OfficialHAFED
    from envs.WSI_cosine_env import WSICosineObservationEnv
    from modules.fglobal_mlp import FGlobal

    conf = SimpleNamespace(
        D_feat=d, D_inner=128, n_class=2, dim_reduction=False, n_token_1=1, n_token_2=5,
        n_masked_patch_1=10, n_masked_patch_2=20, mask_drop=0.24,
    )  # fmt: skip
    clf = OfficialHAFED(
        conf, n_token_1=1, n_token_2=5, n_masked_patch_1=10, n_masked_patch_2=20, mask_drop=0.24
    ).eval()
    tsu = FGlobal(ip_dim=3 * d, op_dim=d).eval()
    rl = SimpleNamespace(
        frac_visit=0.1, cosine_threshold=0.95, only_ce_as_reward=True, device="cpu"
    )
    env = WSICosineObservationEnv(
        lr_features=torch.from_numpy(z).unsqueeze(0).clone(),
        hr_features=torch.from_numpy(v),
        label=torch.tensor([label]),
        conf=rl,
    )
    env.reset()

    def step(a: int) -> bool:
        _, _, done = env.step(
            action=torch.tensor([a]), state_update_net=tsu, classifier_net=clf, device="cpu"
        )
        return bool(done)

    return step, env.reset, int(env.max_time_steps)


def ours_env(env: SashaWSIEnv, sid: str, whole_copies: bool = False):
    env.reset(options={"slide_id": sid})

    def step(a: int) -> bool:
        obs, _, done, *_ = env.step(a)
        if whole_copies:
            obs = {key: array.copy() for key, array in obs.items()}
        return bool(done)

    return step, lambda: env.reset(options={"slide_id": sid}), env.budget


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--official", type=Path, required=True, help="a checkout of coglabiisc/SASHA")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--block", type=int, default=25, help="steps per turn")
    args = p.parse_args()
    if not (args.official / "envs" / "WSI_cosine_env.py").is_file():
        sys.exit(f"{args.official}: no envs/WSI_cosine_env.py; pass a checkout of coglabiisc/SASHA")
    torch.set_num_threads(1)
    n, d, label = args.n, args.d, 1
    z, v = clustered_features(n, d, np.random.default_rng(0))
    torch.manual_seed(0)
    runs = {"official": official_env(args.official, z, v, label, d)}
    hafed, tsu = HAFED(HAFEDConfig(d_in=d)).eval(), TSU(TSUConfig(d=d, tau=0.95)).eval()
    with tempfile.TemporaryDirectory(prefix="bench_official_") as tmp:
        root = Path(tmp)
        write_store(root / "s.zarr", d, {"s": (z, v, str(label))})
        write_manifest(root / "m.csv", [("s", str(label), "train"), ("o", "0", "test")])
        kw = dict(store=root / "s.zarr", manifest=root / "m.csv", hafed=hafed, tsu=tsu, frac=0.1)
        runs["ours, default (snapshots)"] = ours_env(SashaWSIEnv(**kw), "s")
        runs["ours, copy_obs=False"] = ours_env(SashaWSIEnv(**kw, copy_obs=False), "s")
        runs["ours, whole copies (before)"] = ours_env(
            SashaWSIEnv(**kw, copy_obs=False), "s", whole_copies=True
        )
        budget = runs["official"][2]
        assert all(r[2] == budget for r in runs.values())
        rng = np.random.default_rng(1)
        actions = rng.permutation(n)[:budget].tolist()  # one episode, legal in all four
        for _, reset, _ in runs.values():  # warm-up, then a fresh episode
            reset()
        spent = dict.fromkeys(runs, 0.0)
        for start in range(0, budget, args.block):
            for name, (step, _, _) in runs.items():
                for a in actions[start : start + args.block]:
                    t0 = time.process_time()
                    step(a)
                    spent[name] += time.process_time() - t0
    print(f"N = {n}, d = {d}, one episode of {budget} steps each, 1 thread, CPU time in step")
    print("| environment | steps/s | ms per step | vs official |")
    print("|---|---|---|---|")
    for name, seconds in spent.items():
        rate = budget / seconds
        print(
            f"| {name} | {rate:.0f} | {1e3 * seconds / budget:.2f} | "
            f"{spent['official'] / seconds:.1f}x |"
        )


if __name__ == "__main__":
    main()
