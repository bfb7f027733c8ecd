"""A tiny pipeline workdir built by hand, so the environment tests need no pipeline run.

``build_workdir`` writes what ``Sasha-WSI-v0`` reads::

    ROOT/features.zarr            FeatureStore.create + write_slide + write_array("distilled")
    ROOT/manifest.csv             slide_id,path,label,split
    ROOT/models/hafed/model.pt    exported like sasha_models.lit.train_model does
    ROOT/models/tsu/model.pt
    ROOT/slides/<id>.tiff         a uniform-colour single-level TIFF per slide (for render)

Also: random and hand-set HAFED/TSU modules, and a straightforward float64 NumPy
re-implementation of the environment's dynamics (:func:`reference_episode`) that the
tests compare against.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
from torch import nn

from sasha_env.features.records import SlideInfo, StoreInfo
from sasha_env.features.store import FeatureStore
from sasha_models.hafed import HAFED, HAFEDConfig
from sasha_models.tsu import TSU, TSUConfig

PATCH_PX, LO_DOWNSAMPLE = 16, 2.0  # cell side = 32 level-0 px
CELL_PX = int(PATCH_PX * LO_DOWNSAMPLE)
SLIDE_RGB = (236, 200, 222)  # uniform slide colour (pale pink)
CLASS_NAMES = ["normal", "tumor"]


@dataclass
class SlideSpec:
    """One hand-made slide: features ``z``, ``v`` ``(N, d)`` and lattice cells ``(N, 2)``."""

    slide_id: str
    label: str
    split: str
    z: np.ndarray
    v: np.ndarray
    cells: np.ndarray

    @property
    def coords(self) -> np.ndarray:
        """Level-0 ``(x, y)`` of each cell's top-left corner."""
        return np.stack([self.cells[:, 1], self.cells[:, 0]], 1).astype(np.int64) * CELL_PX

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.cells[:, 0].max()) + 1, int(self.cells[:, 1].max()) + 1


def lattice_cells(n: int, cols: int = 4) -> np.ndarray:
    """``(n, 2)`` (row, col) filling a lattice ``cols`` wide, row by row."""
    i = np.arange(n)
    return np.stack([i // cols, i % cols], 1).astype(np.int64)


def random_slides(
    n_slides: int = 6,
    d: int = 8,
    n_range: tuple[int, int] = (5, 12),
    seed: int = 0,
    splits: tuple[str, ...] = ("train", "train", "train", "train", "val", "test"),
) -> list[SlideSpec]:
    """Slides with clustered features (so the TSU has similar patches to update)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_slides):
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        centres = rng.normal(size=(3, d))
        z = centres[rng.integers(0, 3, n)] + 0.15 * rng.normal(size=(n, d))
        v = z + 0.5 * rng.normal(size=(n, d))
        out.append(
            SlideSpec(
                slide_id=f"slide{s:02d}",
                label=CLASS_NAMES[s % 2],
                split=splits[s % len(splits)],
                z=z.astype(np.float32),
                v=v.astype(np.float32),
                cells=lattice_cells(n),
            )
        )
    return out


def random_models(
    d: int, tau: float = 0.9, seed: int = 0, n_branches: int = 2
) -> tuple[HAFED, TSU]:
    """Random-init HAFED (2 classes, small hidden size) and TSU, in eval mode."""
    torch.manual_seed(seed)
    hafed = HAFED(HAFEDConfig(d_in=d, n_classes=2, d_hidden=8, n_branches=n_branches))
    tsu = TSU(TSUConfig(d=d, tau=tau))
    return hafed.eval(), tsu.eval()


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


def export_model(model: nn.Module, kind: str, path: Path, class_names=CLASS_NAMES) -> Path:
    """Write ``model.pt`` in the format ``sasha_models.lit.load_model`` reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": model.cfg.to_dict(),
        "kind": kind,
        "meta": {"class_names": list(class_names), "feature_dim": int(model.d_in)},
    }
    torch.save(blob, path)
    return path


def build_workdir(
    root: Path,
    slides: list[SlideSpec],
    hafed: nn.Module,
    tsu: nn.Module,
    *,
    distilled: bool = True,
    models: tuple[str, ...] = ("hafed", "tsu"),
    tiffs: bool = True,
) -> Path:
    """Write a workdir for ``slides``; ``distilled``/``models`` off leave stages undone."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    d = slides[0].z.shape[1]
    store = FeatureStore.create(
        root / "features.zarr",
        StoreInfo(
            backbone="envkit",
            backbone_dim=d,
            backbone_weights_sha256="none",
            input_px=PATCH_PX,
            patch_px=PATCH_PX,
            zoom=2,
            hi_downsample=1.0,
            hi_mpp=None,
        ),
    )
    rows = []
    for s in slides:
        rows_n, cols_n = s.shape
        path = root / "slides" / f"{s.slide_id}.tiff"
        width, height = cols_n * CELL_PX, rows_n * CELL_PX
        if tiffs:
            path.parent.mkdir(parents=True, exist_ok=True)
            image = np.empty((height, width, 3), np.uint8)
            image[:] = SLIDE_RGB
            tifffile.imwrite(path, image, photometric="rgb")
        n = len(s.z)
        store.write_slide(
            s.slide_id,
            {
                "lowres": s.z,
                "highres": np.repeat(s.v[:, None, :], 4, axis=1),
                "coords": s.coords,
                "cells": s.cells,
                "tissue": np.ones(n, np.float32),
            },
            SlideInfo(
                label=s.label,
                path=str(path),
                dimensions=(width, height),
                mpp=0.5,
                level_downsamples=(1.0,),
                n_patches=n,
                shape=(rows_n, cols_n),
                patch_px=PATCH_PX,
                zoom=2,
                hi_downsample=1.0,
                lo_downsample=LO_DOWNSAMPLE,
            ),
        )
        if distilled:
            store.write_array(s.slide_id, "distilled", s.v)
        rows.append([s.slide_id, str(path), s.label, s.split])
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "path", "label", "split"])
        w.writerows(rows)
    if "hafed" in models:
        export_model(hafed, "hafed", root / "models" / "hafed" / "model.pt")
    if "tsu" in models:
        export_model(tsu, "tsu", root / "models" / "tsu" / "model.pt")
    return root


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
