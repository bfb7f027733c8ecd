"""What the environment reads: the store, manifest and models, resolved from a workdir or given.

:func:`resolve_sources` turns the ``Sasha-WSI-v0`` constructor's arguments (a pipeline
workdir, or explicit ``store=``/``manifest=``/``hafed=``/``tsu=``) into loaded objects, with an
error that names the missing stage when something is not there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from sasha_models.checkpoint import build_model, check_feature_dim, load_checkpoint

from ..features.store import FeatureStore, StoreError
from ..slides.manifest import Manifest, read_manifest
from ..workdir import Workdir
from .slide_data import _no_distilled

__all__ = [
    "Sources",
    "episode_budget",
    "n_patches_of",
    "resolve_sources",
]

PathLike = str | os.PathLike


@dataclass
class Sources:
    """Everything :class:`~sasha_env.env.SashaWSIEnv` reads, resolved and checked."""

    store: FeatureStore
    manifest: Manifest
    hafed: nn.Module
    tsu: nn.Module
    slide_ids: list[str]
    labels: dict[str, int]
    n_patches: dict[str, int]
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _load_export(path: Path, expected: tuple[str, ...], what: str) -> tuple[nn.Module, dict]:
    blob = load_checkpoint(path)
    if not any(blob["kind"] == k or blob["kind"].startswith(k) for k in expected):
        raise ValueError(f"{path} holds a {blob['kind']!r} model, not a {what}")
    model = build_model(blob["kind"], blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), dict(blob.get("meta") or {})


def resolve_sources(
    workdir: PathLike | None,
    split: str | None,
    store: FeatureStore | PathLike | None = None,
    manifest: Manifest | PathLike | None = None,
    hafed: nn.Module | PathLike | None = None,
    tsu: nn.Module | PathLike | None = None,
) -> Sources:
    """Load and cross-check the store, manifest and checkpoints.

    Explicit arguments win over the workdir's files. Raises ``FileNotFoundError`` naming the
    stage to run when a workdir lacks an output, :class:`~sasha_env.store.StoreError` when
    the store lacks distilled features, and ``ValueError`` for mismatched feature sizes or
    class names.
    """
    wd = Workdir(workdir) if workdir is not None else None
    if wd is not None and not wd.root.is_dir():
        raise FileNotFoundError(f"workdir {wd.root} does not exist; run 'sasha pipeline' first")

    def need(given: Any, path_of: Any, stage: str, what: str) -> Any:
        if given is not None:
            return given
        if wd is None:
            raise ValueError(f"pass workdir= or {what}=")
        return wd.require(path_of, stage)

    store_obj = need(store, wd.store if wd else None, "extract", "store")
    if not isinstance(store_obj, FeatureStore):
        store_obj = FeatureStore(store_obj)
    man = need(manifest, wd.manifest if wd else None, "extract", "manifest")
    if not isinstance(man, Manifest):
        man = read_manifest(man)

    meta: dict[str, Any] = {}
    models: dict[str, nn.Module] = {}
    for name, given, kinds, label in (
        ("hafed", hafed, ("hafed", "mil:attention_mil"), "HAFED classifier"),
        ("tsu", tsu, ("tsu",), "TSU"),
    ):
        obj = need(given, wd.model(name) if wd else None, name, name)
        if isinstance(obj, nn.Module):
            models[name] = obj.eval()
            check_feature_dim(obj, store_obj.feature_dim, name=f"{name} ({type(obj).__name__})")
        else:
            path = Path(obj)
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run the '{name}' stage first")
            models[name], meta[name] = _load_export(path, kinds, label)
            check_feature_dim(models[name], store_obj.feature_dim, name=str(path))

    class_names = [str(c) for c in man.class_names]
    ckpt_names = meta.get("hafed", {}).get("class_names")
    if ckpt_names and [str(c) for c in ckpt_names] != class_names:
        raise ValueError(
            f"the HAFED checkpoint was trained with classes {ckpt_names} but the manifest "
            f"{man.path} has {class_names}"
        )
    clf = getattr(models["hafed"], "level2", models["hafed"])
    n_classes = getattr(clf, "n_classes", None)
    if n_classes is not None and n_classes != len(class_names):
        raise ValueError(
            f"the HAFED classifier has {n_classes} classes but the manifest {man.path} "
            f"has {len(class_names)} ({class_names})"
        )

    if split is not None and any(r.split is None for r in man.records):
        raise ValueError(
            f"{man.path} has no split for some slides; pass the workdir's manifest.csv "
            "(written with a split for every slide) or split=None for every slide"
        )
    present = set(store_obj.slide_ids())
    labels = {r.slide_id: man.label_index(r.label) for r in man.records if r.slide_id in present}
    slide_ids = [
        r.slide_id
        for r in man.records
        if r.slide_id in present and (split is None or r.split == split)
    ]
    if not slide_ids:
        raise ValueError(
            f"no slide of split {split!r} of {man.path} is in the store {store_obj.path}"
        )
    missing = [s for s in slide_ids if not store_obj.has_array(s, "distilled")]
    if missing:
        raise StoreError(_no_distilled(store_obj, missing))
    n_patches = {s: n_patches_of(store_obj, s) for s in slide_ids}
    return Sources(
        store_obj,
        man,
        models["hafed"],
        models["tsu"],
        slide_ids,
        labels,
        n_patches,
        class_names,
        meta,
    )


def n_patches_of(store: FeatureStore, sid: str) -> int:
    """N of a slide, from its attributes (or its ``coords`` array)."""
    n = store.slide_attrs(sid).get("n_patches")
    if n is None:
        n = store.read(sid, "coords").shape[0]
    return int(n)


def episode_budget(frac: float, n: int) -> int:
    """Zooms per episode, ``⌈frac·N⌉`` (at least 1, at most N).

    ``frac·N`` is rounded to 9 decimals first, so that 0.1 × 150 gives 15, not the 16 that
    ``math.ceil(15.000000000000002)`` would.
    """
    return max(1, min(n, math.ceil(round(frac * n, 9))))
