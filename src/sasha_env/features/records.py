"""The feature store's attributes as typed records: :class:`StoreInfo` (the store's root) and
:class:`SlideInfo` (one slide group).

``to_attrs()`` gives the JSON attributes the store writes, key for key and in the order
``sasha extract`` and ``sasha import`` have always written them; ``from_attrs()`` reads them
back from any store, old ones included (a key a store lacks reads as ``None``). Nested JSON
objects (a slide's ``source`` and ``import``, the store's ``grid`` and ``imported``) stay
plain dictionaries; their keys are listed with each field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["FORMAT_VERSION", "SlideInfo", "StoreInfo"]

#: Version of the store's layout, written into every store's root attributes.
FORMAT_VERSION = 1


def _tuple(value: Sequence | None) -> tuple | None:
    return None if value is None else tuple(value)


def _list(value: Sequence | None) -> list | None:
    return None if value is None else list(value)


@dataclass(frozen=True)
class StoreInfo:
    """The root attributes that make a store self-describing: what embedded the patches and
    how the slides were cut.

    Attributes:
        backbone: the backbone's name (``efficientnet-lite0``, ``timm:NAME``, ``hf:DIR``), or
            ``imported:<encoder>`` for features from ``sasha import``.
        backbone_dim: d, the feature size.
        backbone_weights_sha256: SHA-256 of the backbone's weights (``None``: imported).
        input_px: side, in pixels, patches are resized to before the backbone (``None``:
            imported).
        patch_px: side of a low-res patch and of a high-res sub-patch, in pixels at their own
            resolution.
        zoom: high-res sub-patches per side of a low-res patch (k = zoom²).
        hi_downsample: the high-res level's downsample from level 0 (the grid setting).
        hi_mpp: the high-res level in µm/px, where the grid fixes it.
        backbone_input_px: the backbone's native input side in pixels (extracted stores).
        backbone_mean, backbone_std: ``(3,)`` the backbone's RGB normalisation (extracted).
        min_tissue: the grid's minimum tissue fraction per patch (extracted).
        grid: the :class:`~sasha_env.slides.grid.GridConfig` as a dict (extracted).
        lowres_size_level0, highres_size_level0: patch sides in level-0 px (imported).
        imported: ``{"tool": "trident" | "clam" | "unknown", "encoder": str}`` (imported).
        format_version: the store layout's version (:data:`FORMAT_VERSION`).
    """

    backbone: str
    backbone_dim: int
    backbone_weights_sha256: str | None = None
    input_px: int | None = None
    patch_px: int | None = None
    zoom: int | None = None
    hi_downsample: float | None = None
    hi_mpp: float | None = None
    backbone_input_px: int | None = None
    backbone_mean: tuple[float, ...] | None = None
    backbone_std: tuple[float, ...] | None = None
    min_tissue: float | None = None
    grid: Mapping[str, Any] | None = None
    lowres_size_level0: float | None = None
    highres_size_level0: float | None = None
    imported: Mapping[str, Any] | None = None
    format_version: int | None = FORMAT_VERSION

    @property
    def k(self) -> int | None:
        """High-res sub-patches per low-res patch, zoom²."""
        return None if self.zoom is None else self.zoom * self.zoom

    @property
    def is_imported(self) -> bool:
        """Whether the features came from ``sasha import`` (TRIDENT or CLAM files)."""
        return self.imported is not None

    def to_attrs(self) -> dict[str, Any]:
        """The root attributes: the keys every store has (``None`` written as null), then
        those only extracted or only imported stores have, where set."""
        attrs: dict[str, Any] = {
            "backbone": self.backbone,
            "backbone_dim": self.backbone_dim,
            "backbone_input_px": self.backbone_input_px,
            "backbone_weights_sha256": self.backbone_weights_sha256,
            "backbone_mean": _list(self.backbone_mean),
            "backbone_std": _list(self.backbone_std),
            "input_px": self.input_px,
            "patch_px": self.patch_px,
            "zoom": self.zoom,
            "k": self.k,
            "hi_downsample": self.hi_downsample,
            "hi_mpp": self.hi_mpp,
            "min_tissue": self.min_tissue,
            "grid": None if self.grid is None else dict(self.grid),
            "lowres_size_level0": self.lowres_size_level0,
            "highres_size_level0": self.highres_size_level0,
            "imported": None if self.imported is None else dict(self.imported),
            "format_version": self.format_version,
        }
        return {k: v for k, v in attrs.items() if v is not None or k not in _STORE_OPTIONAL}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreInfo:
        """Read a store's root attributes (a key it lacks reads as ``None``)."""
        return cls(
            backbone=attrs.get("backbone"),  # type: ignore[arg-type]
            backbone_dim=attrs.get("backbone_dim"),  # type: ignore[arg-type]
            backbone_weights_sha256=attrs.get("backbone_weights_sha256"),
            input_px=attrs.get("input_px"),
            patch_px=attrs.get("patch_px"),
            zoom=attrs.get("zoom"),
            hi_downsample=attrs.get("hi_downsample"),
            hi_mpp=attrs.get("hi_mpp"),
            backbone_input_px=attrs.get("backbone_input_px"),
            backbone_mean=_tuple(attrs.get("backbone_mean")),
            backbone_std=_tuple(attrs.get("backbone_std")),
            min_tissue=attrs.get("min_tissue"),
            grid=attrs.get("grid"),
            lowres_size_level0=attrs.get("lowres_size_level0"),
            highres_size_level0=attrs.get("highres_size_level0"),
            imported=attrs.get("imported"),
            format_version=attrs.get("format_version"),
        )


#: Root keys written only where set (the others are written as null when unknown).
_STORE_OPTIONAL = frozenset(
    {
        "backbone_input_px",
        "backbone_mean",
        "backbone_std",
        "min_tissue",
        "grid",
        "lowres_size_level0",
        "highres_size_level0",
        "imported",
    }
)


@dataclass(frozen=True)
class SlideInfo:
    """A slide group's attributes: the slide, its label and where its patches lie.

    Attributes:
        label: the slide's class name (``None``: unlabelled).
        path: the slide file (for an import without one, the low-res feature file).
        split: ``train``, ``val`` or ``test`` (imported slides; ``None``: none given).
        source: what the group was made from, for caching: extracted slides
            ``{"size", "mtime_ns", "fingerprint"}`` of the slide file, imported ones
            ``{"fingerprint", "lowres", "highres"}`` (each feature file's identity).
        dimensions: level-0 ``(width, height)`` in pixels.
        mpp: level-0 resolution in µm/px the slide was read at (``None``: unknown).
        mpp_source: where ``mpp`` came from: ``"metadata"`` (the file), ``"manifest"`` (the
            manifest's ``mpp`` column) or ``"assumed"`` (``--mpp``); ``None`` in stores written
            before it was recorded (their mpp is the file's).
        level_downsamples: the pyramid's downsample of each level (extracted slides).
        n_patches: N, the number of low-res patches.
        shape: ``(rows, cols)`` of the cell lattice over the slide.
        hi_downsample, lo_downsample: the high- and low-res levels' downsample from level 0.
        patch_px: side of a patch in pixels at its own resolution.
        zoom: high-res sub-patches per side of a patch (k = zoom²).
        cell_px, sub_px: sides of a low-res patch and a high-res sub-patch in level-0 px
            (imported slides).
        import_info: the ``import`` attribute of imported slides: ``{"tool", "lowres_file",
            "highres_file"}`` and the counts of what was left out (see
            :func:`~sasha_env.features.importer.assemble_slide`).
    """

    label: str | None = None
    path: str | None = None
    split: str | None = None
    source: Mapping[str, Any] | None = None
    dimensions: tuple[int, int] | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    level_downsamples: tuple[float, ...] | None = None
    n_patches: int | None = None
    shape: tuple[int, int] | None = None
    hi_downsample: float | None = None
    lo_downsample: float | None = None
    patch_px: int | None = None
    zoom: int | None = None
    cell_px: float | None = None
    sub_px: float | None = None
    import_info: Mapping[str, Any] | None = None

    @property
    def k(self) -> int | None:
        """High-res sub-patches per low-res patch, zoom²."""
        return None if self.zoom is None else self.zoom * self.zoom

    @property
    def fingerprint(self) -> str | None:
        """The content fingerprint of what the group was made from (``source``'s)."""
        return (self.source or {}).get("fingerprint")

    def to_attrs(self) -> dict[str, Any]:
        """The group's attributes, keyed and ordered as ``sasha extract`` writes them, or, for
        an imported slide (``import_info`` set), as ``sasha import`` does; every key of that
        layout is written (``None`` as null), any other field only where set (``k``, which
        follows from ``zoom``, only in the imported layout)."""
        values: dict[str, Any] = {
            "label": self.label,
            "split": self.split,
            "path": self.path,
            "source": None if self.source is None else dict(self.source),
            "dimensions": _list(self.dimensions),
            "mpp": self.mpp,
            "level_downsamples": _list(self.level_downsamples),
            "n_patches": self.n_patches,
            "shape": _list(self.shape),
            "hi_downsample": self.hi_downsample,
            "lo_downsample": self.lo_downsample,
            "patch_px": self.patch_px,
            "zoom": self.zoom,
            "k": self.k,
            "cell_px": self.cell_px,
            "sub_px": self.sub_px,
            "import": None if self.import_info is None else dict(self.import_info),
            "mpp_source": self.mpp_source,
        }
        layout = _IMPORTED_LAYOUT if self.import_info is not None else _EXTRACTED_LAYOUT
        extra = [k for k, v in values.items() if v is not None and k not in (*layout, "k")]
        return {k: values[k] for k in (*layout, *extra)}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> SlideInfo:
        """Read a slide group's attributes (a key it lacks reads as ``None``)."""
        return cls(
            label=attrs.get("label"),
            path=attrs.get("path"),
            split=attrs.get("split"),
            source=attrs.get("source"),
            dimensions=_tuple(attrs.get("dimensions")),
            mpp=attrs.get("mpp"),
            mpp_source=attrs.get("mpp_source"),
            level_downsamples=_tuple(attrs.get("level_downsamples")),
            n_patches=attrs.get("n_patches"),
            shape=_tuple(attrs.get("shape")),
            hi_downsample=attrs.get("hi_downsample"),
            lo_downsample=attrs.get("lo_downsample"),
            patch_px=attrs.get("patch_px"),
            zoom=attrs.get("zoom"),
            cell_px=attrs.get("cell_px"),
            sub_px=attrs.get("sub_px"),
            import_info=attrs.get("import"),
        )


#: The keys of an extracted slide's group, in the order 'sasha extract' writes them.
_EXTRACTED_LAYOUT = (
    "label",
    "path",
    "source",
    "dimensions",
    "mpp",
    "level_downsamples",
    "n_patches",
    "shape",
    "hi_downsample",
    "lo_downsample",
    "patch_px",
    "zoom",
)
#: The keys of an imported slide's group, in the order 'sasha import' writes them.
_IMPORTED_LAYOUT = (
    "label",
    "split",
    "path",
    "source",
    "dimensions",
    "mpp",
    "n_patches",
    "patch_px",
    "zoom",
    "k",
    "hi_downsample",
    "lo_downsample",
    "cell_px",
    "sub_px",
    "shape",
    "import",
)
