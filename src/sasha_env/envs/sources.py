"""What the environment reads: the store, manifest and models, resolved from a workdir or given.

:func:`resolve_sources` turns the ``Sasha-WSI-v0`` constructor's arguments (a pipeline
workdir, or explicit ``store=``/``manifest=``/``hafed=``/``tsu=``) into loaded objects, with an
error that names the missing stage when something is not there. It chains three steps, each
usable alone: :func:`load_models` (checkpoints, feature sizes), :func:`check_classes` (the
classifier against the manifest) and :func:`select_slides` (a split's slides in the store).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from sasha_models.checkpoint import check_feature_dim, load_export

from ..features.store import FeatureStore, StoreError
from ..slides.manifest import Manifest, read_manifest
from ..workdir import Workdir
from .slide_data import _no_distilled

__all__ = [
    "Sources",
    "SlideSelection",
    "check_classes",
    "load_models",
    "resolve_sources",
    "select_slides",
]

PathLike = str | os.PathLike

#: model name → (accepted export kinds, how to name it in errors)
_MODEL_KINDS = {
    "hafed": (("hafed", "mil:attention_mil"), "HAFED classifier"),
    "tsu": (("tsu",), "TSU"),
}


@dataclass
class SlideSelection:
    """The slides an environment draws from.

    Attributes:
        slide_ids: the split's slides that are in the store, in manifest order.
        labels: class index of every manifest slide in the store (any split).
        n_patches: N of each selected slide.
    """

    slide_ids: list[str]
    labels: dict[str, int]
    n_patches: dict[str, int]


@dataclass
class Sources:
    """Everything :class:`~sasha_env.envs.wsi.SashaWSIEnv` reads, resolved and checked."""

    store: FeatureStore
    manifest: Manifest
    hafed: nn.Module
    tsu: nn.Module
    slides: SlideSelection
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    """Each loaded export's ``meta`` (e.g. ``meta["hafed"]["class_names"]``), by model name."""


def load_models(
    store: FeatureStore,
    models: dict[str, nn.Module | PathLike],
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """Load ``hafed`` and ``tsu`` (modules or exported ``model.pt`` paths), checked against the store.

    Returns:
        The models in eval mode by name, and each loaded export's ``meta`` by name.

    Raises:
        FileNotFoundError: a path does not exist (names the stage that writes it).
        ValueError: an export of the wrong kind, or a feature size other than the store's.
    """
    loaded: dict[str, nn.Module] = {}
    meta: dict[str, dict[str, Any]] = {}
    for name, obj in models.items():
        kinds, what = _MODEL_KINDS[name]
        if isinstance(obj, nn.Module):
            loaded[name] = obj.eval()
            label = f"{name} ({type(obj).__name__})"
        else:
            path = Path(obj)
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run the '{name}' stage first")
            loaded[name], meta[name] = load_export(path, kinds, what)
            label = str(path)
        check_feature_dim(loaded[name], store.feature_dim, name=label)
    return loaded, meta


def check_classes(hafed: nn.Module, manifest: Manifest, hafed_meta: dict[str, Any]) -> list[str]:
    """The manifest's class names, after checking that the HAFED classifier was trained on them.

    Raises:
        ValueError: the checkpoint's class names, or the classifier's number of classes,
            differ from the manifest's.
    """
    class_names = [str(c) for c in manifest.class_names]
    ckpt_names = hafed_meta.get("class_names")
    if ckpt_names and [str(c) for c in ckpt_names] != class_names:
        raise ValueError(
            f"the HAFED checkpoint was trained with classes {ckpt_names} but the manifest "
            f"{manifest.path} has {class_names}"
        )
    clf = getattr(hafed, "level2", hafed)
    n_classes = getattr(clf, "n_classes", None)
    if n_classes is not None and n_classes != len(class_names):
        raise ValueError(
            f"the HAFED classifier has {n_classes} classes but the manifest {manifest.path} "
            f"has {len(class_names)} ({class_names})"
        )
    return class_names


def select_slides(store: FeatureStore, manifest: Manifest, split: str | None) -> SlideSelection:
    """The slides of ``split`` (``None``: every slide) that are in the store with distilled features.

    Raises:
        ValueError: the manifest lacks splits, or no slide of the split is in the store.
        StoreError: a selected slide has no ``distilled`` array (run the 'distill' stage).
    """
    if split is not None and any(r.split is None for r in manifest.records):
        raise ValueError(
            f"{manifest.path} has no split for some slides; pass the workdir's manifest.csv "
            "(written with a split for every slide) or split=None for every slide"
        )
    present = set(store.slide_ids())
    in_store = [r for r in manifest.records if r.slide_id in present]
    labels = {r.slide_id: manifest.label_index(r.label) for r in in_store}
    slide_ids = [r.slide_id for r in in_store if split is None or r.split == split]
    if not slide_ids:
        raise ValueError(
            f"no slide of split {split!r} of {manifest.path} is in the store {store.path}"
        )
    missing = [s for s in slide_ids if not store.has_array(s, "distilled")]
    if missing:
        raise StoreError(_no_distilled(store, missing))
    return SlideSelection(slide_ids, labels, {s: store.n_patches(s) for s in slide_ids})


def resolve_sources(
    workdir: PathLike | None,
    split: str | None,
    store: FeatureStore | PathLike | None = None,
    manifest: Manifest | PathLike | None = None,
    hafed: nn.Module | PathLike | None = None,
    tsu: nn.Module | PathLike | None = None,
    frac: float | None = None,
) -> Sources:
    """Load and cross-check the store, manifest and checkpoints.

    Explicit arguments win over the workdir's files. A workdir's TSU is the one of zoom budget
    ``frac`` when it holds one per budget (:meth:`~sasha_env.workdir.Workdir.tsu_model`). Raises ``FileNotFoundError`` naming the
    stage to run when a workdir lacks an output, :class:`~sasha_env.features.store.StoreError`
    when the store lacks distilled features, and ``ValueError`` for mismatched feature sizes
    or class names.
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
    hafed_obj = need(hafed, wd.model("hafed") if wd else None, "hafed", "hafed")
    if tsu is None and wd is not None:
        tsu = wd.tsu_model(frac)  # the TSU of this budget when there is one per budget
    models, meta = load_models(
        store_obj, {"hafed": hafed_obj, "tsu": need(tsu, None, "tsu", "tsu")}
    )
    class_names = check_classes(models["hafed"], man, meta.get("hafed", {}))
    slides = select_slides(store_obj, man, split)
    return Sources(store_obj, man, models["hafed"], models["tsu"], slides, class_names, meta)
