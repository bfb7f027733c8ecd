"""Hand-set models and a NumPy reference of the environment's dynamics, for the env tests.

The workdir builders (slides, random models, ``write_workdir``) live in :mod:`sasha_env.testing`;
here are what only these tests need: HAFED/TSU modules whose outputs are computable by hand
(:func:`hand_models`), and a straightforward float64 NumPy re-implementation of the
environment's dynamics (:func:`reference_episode`) that the tests compare against.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from sasha_env.testing import random_models
from sasha_models.hafed import HAFED
from sasha_models.tsu import TSU


def hand_models(
    d: int, W: np.ndarray, b: np.ndarray, c: np.ndarray, tau: float
) -> tuple[HAFED, TSU]:
    """Models whose outputs are computable by hand.

    HAFED: every attention logit is 0, so each branch attends uniformly and the slide logits
    are ``W @ mean(S) + b``. TSU: the output LayerNorm has gain 0 and bias ``c``, so
    ``TSU(·) = c`` whatever its input.
    """
    hafed, tsu = random_models(d, tau=tau)
    with torch.no_grad():
        att = hafed.level2.attention
        att.w.weight.zero_()
        att.w.bias.zero_()
        hafed.level2.slide_head.weight.copy_(torch.as_tensor(W, dtype=torch.float32))
        hafed.level2.slide_head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
        ln = tsu.net[-1]
        ln.weight.zero_()
        ln.bias.copy_(torch.as_tensor(c, dtype=torch.float32))
    return hafed, tsu


# ----------------------------------------------------------------- NumPy reference
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def reference_classifier(hafed: HAFED, S: np.ndarray) -> np.ndarray:
    """Slide logits ``(C,)`` of HAFED's level 2 on ``S (N, d)``, in float64 NumPy."""
    clf = hafed.level2
    att = clf.attention
    gate = np.tanh(S @ _np(att.V.weight).T + _np(att.V.bias)) * (
        1 / (1 + np.exp(-(S @ _np(att.U.weight).T + _np(att.U.bias))))
    )
    a = gate @ _np(att.w.weight).T + _np(att.w.bias)  # (N, M)
    a = np.exp(a - a.max(0))
    attn = (a / a.sum(0)).mean(1)  # (N,) branch-averaged
    return _np(clf.slide_head.weight) @ (attn @ S) + _np(clf.slide_head.bias)


def reference_tsu(tsu: TSU, v_a: np.ndarray, anchor: np.ndarray, z_j: np.ndarray) -> np.ndarray:
    """``TSU([v_a, anchor, z_j])`` for rows ``z_j (n, d)``, in float64 NumPy."""
    lin1, _, lin2, out_norm = tsu.net
    x = np.concatenate(
        [np.broadcast_to(v_a, z_j.shape), np.broadcast_to(anchor, z_j.shape), z_j], 1
    )
    h = x @ _np(lin1.weight).T + _np(lin1.bias)
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    y = h @ _np(lin2.weight).T + _np(lin2.bias)
    if isinstance(out_norm, nn.LayerNorm):
        y = (y - y.mean(1, keepdims=True)) / np.sqrt(y.var(1, keepdims=True) + out_norm.eps)
        y = y * _np(out_norm.weight) + _np(out_norm.bias)
    return z_j + y if getattr(tsu.cfg, "residual", False) else y


def reference_episode(
    z: np.ndarray,
    v: np.ndarray,
    label: int,
    actions: list[int],
    hafed: HAFED,
    tsu: TSU,
    tau: float,
    anchor: str = "state",
    reward: str = "ce",
) -> tuple[list[np.ndarray], list[set[int]], list[float]]:
    """States after each step, the sets of TSU-updated rows (ever), and rewards.

    Written as plainly as possible from the paper / official code; all actions are legal.
    """
    z, v = z.astype(np.float64), v.astype(np.float64)
    S = z.copy()
    zoomed: set[int] = set()
    updated: set[int] = set()

    def ce(state: np.ndarray) -> float:
        logits = reference_classifier(hafed, state)
        m = logits.max()
        return float(m + np.log(np.exp(logits - m).sum()) - logits[label])

    prev = ce(S)
    states, updates, rewards = [], [], []
    for a in actions:
        anc = S[a].copy() if anchor == "state" else z[a].copy()
        targets = []
        for j in range(len(S)):
            if j == a or j in zoomed or j in updated:
                continue
            cos = S[j] @ anc / (np.linalg.norm(S[j]) * np.linalg.norm(anc))
            if abs(cos) >= tau:
                targets.append(j)
        if targets:
            S[targets] = reference_tsu(tsu, v[a], anc, z[targets])
            updated |= set(targets)
        S[a] = v[a]
        zoomed.add(a)
        now = ce(S)
        rewards.append(-now if reward == "ce" else prev - now)
        prev = now
        states.append(S.copy())
        updates.append(set(updated))
    return states, updates, rewards
