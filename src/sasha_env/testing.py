"""Small, complete workdirs in seconds, for the project's tests and for tests of your own agents.

:func:`make_workdir` writes a pipeline workdir — feature store, manifest, HAFED and TSU exports,
distilled features and, if asked, one trained agent per zoom budget — that everything reading a
workdir accepts: ``gymnasium.make("Sasha-WSI-v0", workdir=...)``, :func:`sasha_env.train_agent`,
:func:`sasha_env.agents.export.load_policy`, calibration and evaluation. :func:`check_env` runs
Gymnasium's and SB3's environment checkers on a ``Sasha-WSI-v0``, as
``stable_baselines3.common.env_checker.check_env`` does for any env.

Example::

    import gymnasium as gym

    import sasha_env  # registers Sasha-WSI-v0
    from sasha_env import AgentConfig, train_agent
    from sasha_env.testing import check_env, make_workdir

    made = make_workdir("/tmp/sasha-wd", seed=0)  # 8 slides, HAFED, TSU, an agent for f = 0.1
    env = gym.make("Sasha-WSI-v0", workdir=made, split="train", frac=0.1)
    check_env(env)  # Gymnasium's and SB3's checkers, warnings as errors
    cfg = AgentConfig(total_timesteps=64, n_envs=1, n_steps=32, batch_size=32)
    model = train_agent(made, 0.1, cfg, progress=False)

In a pytest suite, build it once per session::

    @pytest.fixture(scope="session")
    def workdir(tmp_path_factory):
        return make_workdir(tmp_path_factory.mktemp("sasha") / "wd")

What is real and what is synthetic:

- **real**: every file is written by the package's own code — the store by
  :class:`~sasha_env.features.store.FeatureStore`, the manifest by
  :class:`~sasha_env.slides.manifest.Manifest`, the models by
  :func:`sasha_models.checkpoint.save_export` (the pipeline's format), the distilled features
  by the pipeline's distill stage (:func:`~sasha_env.pipeline.stages.distill_store`), the
  agents by :func:`sasha_env.train_agent` (weights-only export included). The layout is a
  pipeline workdir's (:mod:`sasha_env.workdir`).
- **synthetic**: no slide is rendered and no backbone runs. Features are random: each slide's
  low-res rows ``z`` come from three clusters (so the TSU finds similar patches to update),
  its high-res sub-patches scatter around ``v = z + noise``. Labels alternate between the two
  classes and carry no signal in the features. HAFED and the TSU are random-init, untrained
  (so predictions and rewards are arbitrary), the agents train for a few dozen steps. The
  slide files are uniform-colour single-level TIFFs (for ``render_mode="rgb_array"``), their
  size matching the patch lattice. There are no stage markers (``stages/``) and no
  ``config.yaml``: ``sasha pipeline`` on the folder would recompute every stage, and
  ``sasha predict`` does not apply (it needs the backbone).

Use it to test that code runs on the real formats and spaces, not that something learns.

The lower-level builders — :func:`random_slides`, :func:`random_models`,
:func:`write_workdir` — write a workdir from features and models you choose (hand-set values
for exact checks, say).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile
import torch
from gymnasium.utils.env_checker import check_env as gymnasium_check_env

from sasha_models.checkpoint import export_dict, save_export
from sasha_models.hafed import HAFED, HAFEDConfig
from sasha_models.tsu import TSU, TSUConfig

from .features.records import SlideInfo, StoreInfo
from .features.store import FeatureStore
from .pipeline.stages import distill_store
from .slides.manifest import Manifest, SlideRecord
from .workdir import Workdir

if TYPE_CHECKING:
    import gymnasium as gym

__all__ = [
    "CELL_PX",
    "CLASS_NAMES",
    "EXPECTED_CHECKER_WARNINGS",
    "K",
    "LO_DOWNSAMPLE",
    "PATCH_PX",
    "SLIDE_RGB",
    "SlideSpec",
    "SyntheticWorkdir",
    "check_env",
    "export_model",
    "lattice_cells",
    "make_workdir",
    "random_models",
    "random_slides",
    "write_workdir",
]

#: Side of a low-res patch and of a high-res sub-patch, in pixels at their level.
PATCH_PX = 16
#: Low-res downsample of level 0 (zoom 2 over high-res sub-patches read at level 0).
LO_DOWNSAMPLE = 2.0
#: Side of a lattice cell (one low-res patch) in level-0 pixels.
CELL_PX = int(PATCH_PX * LO_DOWNSAMPLE)
#: High-res sub-patches per low-res patch (zoom²).
K = 4
#: The uniform colour (RGB) of every slide file.
SLIDE_RGB = (236, 200, 222)
#: The two classes; class index = position.
CLASS_NAMES = ["normal", "tumor"]


@dataclass
class SlideSpec:
    """One synthetic slide.

    Attributes:
        slide_id: a safe file name.
        label: one of :data:`CLASS_NAMES`.
        split: ``train``, ``val`` or ``test``.
        z: low-res features ``(N, d)`` float32.
        v: high-res features per patch ``(N, d)`` float32: :func:`write_workdir` stores them as
            the distilled features, and repeats them ``K`` times as the high-res sub-patches
            unless ``highres`` is given.
        cells: lattice ``(row, col)`` of each patch ``(N, 2)`` int64.
        highres: high-res sub-patch features ``(N, K, d)`` float32, or ``None``.
    """

    slide_id: str
    label: str
    split: str
    z: np.ndarray
    v: np.ndarray
    cells: np.ndarray
    highres: np.ndarray | None = field(default=None, repr=False)

    @property
    def coords(self) -> np.ndarray:
        """Level-0 ``(x, y)`` of each cell's top-left corner, ``(N, 2)`` int64."""
        return np.stack([self.cells[:, 1], self.cells[:, 0]], 1).astype(np.int64) * CELL_PX

    @property
    def shape(self) -> tuple[int, int]:
        """Lattice ``(rows, cols)``."""
        return int(self.cells[:, 0].max()) + 1, int(self.cells[:, 1].max()) + 1


def lattice_cells(n: int, cols: int = 4) -> np.ndarray:
    """``(n, 2)`` int64 ``(row, col)`` filling a lattice ``cols`` wide, row by row."""
    i = np.arange(n)
    return np.stack([i // cols, i % cols], 1).astype(np.int64)


def random_slides(
    n_slides: int = 6,
    d: int = 8,
    n_range: tuple[int, int] = (5, 12),
    seed: int = 0,
    splits: Sequence[str] = ("train", "train", "train", "train", "val", "test"),
    highres_noise: float | None = None,
) -> list[SlideSpec]:
    """Slides with clustered features, so that the TSU has similar patches to update.

    Slide ``s`` is ``slide{s:02d}``, labelled ``CLASS_NAMES[s % 2]``, in ``splits[s %
    len(splits)]``, with N drawn from ``n_range`` (inclusive). ``z`` rows are three cluster
    centres plus noise (sd 0.15), ``v = z + noise`` (sd 0.5).

    Args:
        n_slides, d, n_range, seed, splits: as above.
        highres_noise: if set, also ``highres = v + noise`` of this sd, ``(N, K, d)`` (drawn
            after every slide's ``z`` and ``v``, so the features do not depend on it).
    """
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
    if highres_noise is not None:
        for spec in out:
            noise = highres_noise * rng.normal(size=(len(spec.v), K, spec.v.shape[1]))
            spec.highres = (spec.v[:, None, :] + noise).astype(np.float32)
    return out


def random_models(
    d: int, tau: float = 0.9, seed: int = 0, n_branches: int = 2
) -> tuple[HAFED, TSU]:
    """Random-init HAFED (2 classes, hidden size 8) and TSU (threshold ``tau``), in eval mode.

    The weights depend on ``seed`` alone; torch's global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hafed = HAFED(HAFEDConfig(d_in=d, n_classes=2, d_hidden=8, n_branches=n_branches))
        tsu = TSU(TSUConfig(d=d, tau=tau))
    return hafed.eval(), tsu.eval()


def export_model(
    model: HAFED | TSU, kind: str, path: Path, class_names: Sequence[str] = CLASS_NAMES
) -> Path:
    """Write ``model.pt`` as the pipeline exports it (read by ``sasha_models.checkpoint``).

    Args:
        model: a HAFED or TSU.
        kind: ``"hafed"`` or ``"tsu"``.
        path: the file.
        class_names: recorded in the export's ``meta`` (the env checks them on HAFED).
    """
    meta = {"class_names": list(class_names), "feature_dim": int(model.d_in)}
    return save_export(path, export_dict(model, kind, model.cfg.to_dict(), meta))


def _store_info(d: int) -> StoreInfo:
    """Root attributes of the store: the geometry above, a backbone named ``synthetic``."""
    return StoreInfo(
        backbone="synthetic",
        backbone_dim=d,
        backbone_weights_sha256="none",
        input_px=PATCH_PX,
        patch_px=PATCH_PX,
        zoom=int(math.isqrt(K)),
        hi_downsample=1.0,
        hi_mpp=None,
    )


def write_workdir(
    root: str | os.PathLike,
    slides: Sequence[SlideSpec],
    hafed: HAFED,
    tsu: TSU,
    *,
    distilled: bool = True,
    models: tuple[str, ...] = ("hafed", "tsu"),
    tiffs: bool = True,
) -> Path:
    """Write a workdir holding exactly ``slides``, ``hafed`` and ``tsu``.

    ::

        ROOT/features.zarr          lowres, highres, coords, cells, tissue (1.0), distilled = v
        ROOT/manifest.csv           slide_id,path,label,split,mask
        ROOT/models/hafed/model.pt  the pipeline's export format
        ROOT/models/tsu/model.pt
        ROOT/slides/<id>.tiff       a uniform-colour single-level TIFF per slide (for render)

    Args:
        root: the workdir (created).
        slides: what the store holds, in manifest order; all with the same ``d``.
        hafed, tsu: the models to export.
        distilled: store each slide's ``v`` as its distilled features; ``False`` leaves the
            distill stage undone.
        models: which of ``hafed`` and ``tsu`` to export (fewer leave stages undone).
        tiffs: write the slide files (``False``: the manifest names files that do not exist).

    Returns:
        ``root`` as a ``Path``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    d = slides[0].z.shape[1]
    store = FeatureStore.create(root / "features.zarr", _store_info(d))
    records = []
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
        highres = np.repeat(s.v[:, None, :], K, axis=1) if s.highres is None else s.highres
        store.write_slide(
            s.slide_id,
            {
                "lowres": s.z,
                "highres": highres,
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
                zoom=int(math.isqrt(K)),
                hi_downsample=1.0,
                lo_downsample=LO_DOWNSAMPLE,
            ),
        )
        if distilled:
            store.write_array(s.slide_id, "distilled", s.v)
        records.append(SlideRecord(s.slide_id, path, s.label, s.split))
    manifest = root / "manifest.csv"
    Manifest(manifest, records, sorted({s.label for s in slides})).write(manifest)
    wd = Workdir(root)
    exports: tuple[tuple[str, HAFED | TSU], ...] = (("hafed", hafed), ("tsu", tsu))
    for name, model in exports:
        if name in models:
            export_model(model, name, wd.model(name))
    return root


@dataclass(frozen=True)
class SyntheticWorkdir:
    """What :func:`make_workdir` built. Usable as a path (``os.PathLike``): pass it wherever
    a workdir goes.

    Attributes:
        root: the workdir.
        slide_ids: every slide, in manifest order.
        splits: slide id → ``train``/``val``/``test``.
        d: feature size.
        agents: zoom budget f → the trained agent's folder (``agents/sasha-<f>/``).
        config: the configuration sections calibration and evaluation read
            (``evaluate_workdir(Workdir(made), made.config)``): ``seed`` and ``agents``.
    """

    root: Path
    slide_ids: tuple[str, ...]
    splits: dict[str, str]
    d: int
    agents: dict[float, Path]
    config: dict[str, Any]

    def __fspath__(self) -> str:
        return str(self.root)


def _splits(n_slides: int) -> list[str]:
    """A quarter of the slides (at least 2, both classes) each for val and test, the rest train."""
    n_held = max(2, 2 * round(n_slides / 8))
    n_train = n_slides - 2 * n_held
    if n_train < 2:
        raise ValueError(f"make_workdir needs n_slides >= 6 (2 per split), got {n_slides}")
    return ["train"] * n_train + ["val"] * n_held + ["test"] * n_held


def make_workdir(
    path: str | os.PathLike,
    *,
    n_slides: int = 8,
    d: int = 8,
    n_patches: tuple[int, int] = (5, 12),
    seed: int = 0,
    fracs: Sequence[float] = (0.1,),
    agents: bool = True,
    tau: float = 0.9,
    timesteps: int = 64,
    tiffs: bool = True,
) -> SyntheticWorkdir:
    """Build a small, complete pipeline workdir at ``path`` (see the module docstring for what
    is real and what is synthetic).

    On a 2-core CPU it takes well under a second without agents, and a second or two per
    agent (plus about 2 s for importing SB3 the first time). The same arguments give the same
    store arrays, manifest, model weights and agent weights, bit for bit (on the CPU).

    Args:
        path: the workdir (created; it should be empty or absent).
        n_slides: slides; a quarter each (at least 2, both classes) in val and test, the
            rest in train; labels alternate between ``normal`` and ``tumor``.
        d: feature size.
        n_patches: range of N, the patches of a slide (inclusive; at least 1).
        seed: seeds the features, the model weights and the agents' training.
        fracs: zoom budgets; one agent each when ``agents``.
        agents: train the agents (``sasha_env.train_agent``: MaskablePPO with the SASHA policy,
            ``timesteps`` steps, ``d_hidden`` 16); ``False`` leaves the agents stage undone.
        tau: the TSU's similarity threshold (its config's ``tau``, which the env uses).
        timesteps: environment steps per agent.
        tiffs: write the (uniform-colour) slide files, needed by ``render_mode="rgb_array"``.

    Returns:
        A :class:`SyntheticWorkdir` (an ``os.PathLike`` of the workdir).
    """
    root = Path(path)
    splits = _splits(n_slides)
    slides = random_slides(n_slides, d, n_patches, seed=seed, splits=splits, highres_noise=0.1)
    hafed, tsu = random_models(d, tau=tau, seed=seed)
    write_workdir(root, slides, hafed, tsu, distilled=False, tiffs=tiffs)
    wd = Workdir(root)
    distill_store(wd)  # the pipeline's distill stage: HAFED's level 1 on the sub-patches
    section: dict[str, Any] = {
        "fracs": [float(f) for f in fracs],
        "curve_fracs": [float(f) for f in fracs],
        "total_timesteps": int(timesteps),
        "n_envs": 1,
        "n_steps": 32,
        "batch_size": 32,
        "n_epochs": 1,
        "d_hidden": 16,
        "random_seeds": 1,
    }
    trained: dict[float, Path] = {}
    if agents:
        from . import AgentConfig, train_agent  # lazy: SB3, only to train agents
        from .agents.config import agent_name  # lazy: as above

        cfg = AgentConfig.from_dict(section)
        for frac in cfg.fracs:
            train_agent(wd, frac, cfg, seed=seed, progress=False)
            trained[frac] = wd.agent_dir(agent_name(frac, cfg.algo))
    return SyntheticWorkdir(
        root=root,
        slide_ids=tuple(s.slide_id for s in slides),
        splits={s.slide_id: s.split for s in slides},
        d=d,
        agents=trained,
        config={"seed": seed, "agents": section},
    )


#: Warnings Gymnasium's and SB3's checkers give on every ``Sasha-WSI-v0``, by design (regular
#: expressions, searched in the message): the features are unbounded, and the observations are
#: per-patch rows (``features (P, d)``, ``coords (P, 2)``) that the SASHA policy reads row by
#: row, not images or flat vectors.
EXPECTED_CHECKER_WARNINGS: tuple[str, ...] = (
    r"A Box observation space (minimum|maximum) value is -?infinity",
    r"Your observation (features|coords) has an unconventional shape",
)


def check_env(env: gym.Env) -> None:
    """Run Gymnasium's and SB3's environment checkers on ``env``, every warning an error
    except :data:`EXPECTED_CHECKER_WARNINGS`.

    Args:
        env: a ``Sasha-WSI-v0`` (wrapped or not); it is reset and stepped.

    Raises:
        AssertionError, UserWarning...: what the checkers raise or warn.
    """
    from stable_baselines3.common.env_checker import (  # lazy: SB3, only for this check
        check_env as sb3_check_env,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pattern in EXPECTED_CHECKER_WARNINGS:
            warnings.filterwarnings("ignore", message=f".*{pattern}")
        gymnasium_check_env(env.unwrapped)
        sb3_check_env(env, warn=True)
