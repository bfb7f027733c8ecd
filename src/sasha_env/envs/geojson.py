"""An episode as GeoJSON for slide viewers (QuPath's conventions), in level-0 pixels.

``episode_geojson`` returns a ``FeatureCollection`` that QuPath imports by drag and drop
(File ▸ Import objects in 0.4+) and that other viewers read as plain GeoJSON:

1. one ``annotation`` per zoom, in zoom order, classified ``Zoomed``, named ``zoom <i>``, with
   measurements ``zoom order``, ``attention`` and ``P(<class>) after zoom`` (the slide's
   probabilities once this zoom and its TSU updates are in the state);
2. one ``detection`` per TSU-updated patch (updated and never zoomed), classified
   ``TSU-updated``;
3. one ``tile`` per patch of the grid with its ``attention`` (HAFED's level-2 attention on the
   final state) and ``P(<class>)`` (HAFED on that patch's row alone) as measurements — colour
   by measurement in QuPath's Measurement maps.

Geometries are the patches' squares ``[x, y, x + side, y + side]`` (level-0 top-left
``coords``, ``side`` level-0 pixels), clipped to the slide; every feature carries its patch
index as ``properties.patch``. Measurements are a name → number object, as QuPath 0.4+ writes
them. Slide-level results go in the collection's ``properties``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import replace_atomically
from .render import UPDATED_RGB, ZOOMED_RGB

__all__ = ["episode_geojson", "replay_geojson", "write_geojson"]


def _square(x: float, y: float, side: float, dims: tuple[int, int]) -> dict:
    w, h = dims
    x0, y0 = max(0.0, float(x)), max(0.0, float(y))
    x1, y1 = min(float(w), float(x) + side), min(float(h), float(y) + side)
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Polygon", "coordinates": [ring]}


def _feature(
    geometry: dict, object_type: str, patch: int, measurements: dict, cls: str | None = None,
    color: Sequence[int] | None = None, name: str | None = None,
) -> dict:  # fmt: skip
    props: dict = {"objectType": object_type, "patch": patch, "measurements": measurements}
    if cls is not None:
        props["classification"] = {"name": cls, "color": list(color or (0, 0, 0))}
    if name is not None:
        props["name"] = name
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}


def episode_geojson(
    slide_id: str,
    dimensions: tuple[int, int],
    coords: np.ndarray,
    side_px: float,
    zoomed: Sequence[int],
    updated: Sequence[int],
    class_names: Sequence[str],
    attention: np.ndarray | None = None,
    patch_probabilities: np.ndarray | None = None,
    step_probabilities: np.ndarray | None = None,
    slide_probabilities: np.ndarray | None = None,
) -> dict:
    """The episode's zooms, TSU updates and per-patch scores as a GeoJSON ``FeatureCollection``.

    Args:
        slide_id: the slide's id (collection property).
        dimensions: level-0 ``(width, height)`` of the slide in pixels.
        coords: ``(N, 2)`` level-0 ``[x, y]`` top-left corners of the low-res patches.
        side_px: a patch's side in level-0 pixels.
        zoomed: patch indices in zoom order; updated: TSU-updated patches never zoomed.
        class_names: the C class names.
        attention: ``(N,)`` final-state attention, or ``None``.
        patch_probabilities: ``(N, C)`` per-patch probabilities, or ``None``.
        step_probabilities: ``(T, C)`` slide probabilities after each zoom, or ``None``.
        slide_probabilities: ``(C,)`` the final slide probabilities, or ``None``.
    """
    coords = np.asarray(coords, np.float64)
    dims = (int(dimensions[0]), int(dimensions[1]))
    features = []
    for order, i in enumerate(zoomed, start=1):
        m: dict = {"zoom order": order}
        if attention is not None:
            m["attention"] = float(attention[i])
        if step_probabilities is not None:
            for c, p in zip(class_names, step_probabilities[order - 1], strict=True):
                m[f"P({c}) after zoom"] = float(p)
        features.append(
            _feature(_square(coords[i][0], coords[i][1], side_px, dims), "annotation", int(i), m, "Zoomed",
                     ZOOMED_RGB, f"zoom {order}")
        )  # fmt: skip
    for i in updated:
        features.append(
            _feature(_square(coords[i][0], coords[i][1], side_px, dims), "detection", int(i), {}, "TSU-updated",
                     UPDATED_RGB)
        )  # fmt: skip
    if attention is not None or patch_probabilities is not None:
        for i in range(len(coords)):
            m = {}
            if attention is not None:
                m["attention"] = float(attention[i])
            if patch_probabilities is not None:
                for c, p in zip(class_names, patch_probabilities[i], strict=True):
                    m[f"P({c})"] = float(p)
            features.append(
                _feature(_square(coords[i][0], coords[i][1], side_px, dims), "tile", i, m)
            )
    props: dict = {"slide_id": slide_id, "n_patches": len(coords), "n_zoomed": len(zoomed)}
    if slide_probabilities is not None:
        props["probabilities"] = {
            c: float(p) for c, p in zip(class_names, slide_probabilities, strict=True)
        }
    return {"type": "FeatureCollection", "properties": props, "features": features}


def write_geojson(collection: dict, out_dir: str | os.PathLike, slide_id: str) -> Path:
    """Write ``out_dir/<slide_id>.geojson`` (through a temporary name); returns the path."""
    path = Path(out_dir) / f"{slide_id}.geojson"
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(collection)))
    return path


def replay_geojson(env, slide_id: str, zoomed: Sequence[int]) -> dict:
    """Replay an episode's zooms on ``env`` (the dynamics are deterministic) and return its
    GeoJSON with per-zoom probabilities, final attention and per-patch probabilities.

    Args:
        env: a :class:`~sasha_env.envs.wsi.SashaWSIEnv` whose store holds ``slide_id``, at the
            episode's budget.
        zoomed: the episode's zooms in order (e.g. ``info["zoomed"]`` or an ``episodes/*.json``
            entry).
    """
    env.reset(options={"slide_id": slide_id})
    steps = []
    for a in zoomed:
        env.step(int(a))
        steps.append(env.probabilities)
    data = env.slide
    return episode_geojson(
        slide_id,
        data.dimensions,
        data.coords,
        data.cell_px,
        list(zoomed),
        env.updated,
        env.class_names,
        attention=env.attention(),
        patch_probabilities=env.patch_probabilities(),
        step_probabilities=np.stack(steps) if steps else None,
        slide_probabilities=env.probabilities,
    )
