"""The TSU threshold calibration: the exact quantile on small slides, sampled pairs on large ones."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from sasha_models.tsu import calibrate_tau


class _Bags:
    """The two methods calibrate_tau reads, over in-memory slides."""

    def __init__(self, slides: dict[str, np.ndarray]) -> None:
        self.slides = slides

    def slide_ids(self, split: str | None = None) -> list[str]:
        return list(self.slides)

    def features(self, slide_id: str, kind: str) -> np.ndarray:
        return self.slides[slide_id]


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(16, d))
    return (centres[rng.integers(0, 16, n)] + 0.7 * rng.normal(size=(n, d))).astype(np.float32)


def _level(slides: list[np.ndarray], tau: float) -> float:
    """Exact share of ordered pairs i != j with |cos| <= tau, in blocks (no N x N matrix)."""
    below = total = 0
    for x in slides:
        z = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
        for start in range(0, len(z), 1024):
            c = (z[start : start + 1024] @ z.T).abs()
            rows = torch.arange(start, min(start + 1024, len(z)))
            c[rows - start, rows] = 2.0  # the diagonal never counts
            below += int((c <= tau).sum())
            total += c.numel() - len(rows)
    return below / total


def test_small_slides_give_the_exact_quantile():
    slides = {f"s{i}": _clustered(60 + i, 24, i) for i in range(5)}
    tau = calibrate_tau(_Bags(slides), 0.97, seed=0)
    exact = []
    for x in slides.values():
        z = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
        c = (z @ z.T).abs()
        exact.append(c[~torch.eye(len(z), dtype=torch.bool)].numpy())
    assert tau == float(np.quantile(np.concatenate(exact), 0.97))


def test_at_n_8192_sampled_pairs_hit_the_quantile_within_tolerance():
    slides = {"big": _clustered(8192, 32, 1), "big2": _clustered(8192, 32, 2)}
    q = 0.98
    tau = calibrate_tau(_Bags(slides), q, seed=0)
    m = 2 * (1 << 16)
    assert abs(_level(list(slides.values()), tau) - q) < 3 * np.sqrt(q * (1 - q) / m) + 1e-4


def test_memory_does_not_grow_with_n_squared():
    """Peak memory of calibrating on one N = 8192 slide, measured in a fresh process."""
    code = """
import json, resource, numpy as np
from sasha_models.tsu import calibrate_tau
class B:
    def __init__(s, x): s.x = x
    def slide_ids(s, split=None): return ["a"]
    def features(s, sid, kind): return s.x
x = np.random.default_rng(0).normal(size=(8192, 32)).astype(np.float32)
import torch; torch.ones(1) @ torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
calibrate_tau(B(x), 0.98, 0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_mib": (after - before) / 1024}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew = json.loads(proc.stdout.strip().splitlines()[-1])["grew_mib"]
    assert grew < 64, f"calibrate_tau grew the peak by {grew:.0f} MiB (N x N float32 is 256 MiB)"
