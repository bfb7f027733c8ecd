"""Cohort recipes: public cohorts as downloaded -> a manifest with SASHA's published splits.

A recipe finds a cohort's slide files under a folder by their names and writes a manifest
(:mod:`sasha_env.slides.manifest`) whose labels and train/val/test split come from facts
shipped with the package (``slides/cohort_data/*.csv``: slide names, labels and fold
membership, converted from the official SASHA repository at 6385fe6 by
``experiments/cohort_facts.py``). Nothing is downloaded and no slide is opened.

- ``camelyon16``: ``normal_*``, ``tumor_*``, ``test_*`` ``.tif``/``.tiff`` files anywhere
  under the root (the published ``training/normal``, ``training/tumor``, ``testing/images``,
  or flat), names in any case (``Tumor_001.tif``, ``tumour-1.tiff``). SASHA's ``split_1``
  .. ``split_6``; default 5, the split of the official HAFED and RL stages.
- ``tcga-nsclc``: TCGA LUAD and LUSC diagnostic slides (``.svs``) as the GDC client writes
  them (``ROOT/<file uuid>/<slide name>.svs``) or flat, named by their full slide name or by
  the barcode alone (``TCGA-05-4244-01Z-00-DX1.svs``). SASHA's ``split_1`` .. ``split_5``;
  default 1, the split of the official HAFED, RL and inference stages for TCGA.

Slides of the chosen split that are not found are listed (not fatal); found files the facts
do not know are reported; files with ``mask`` in the name are skipped (tumour masks).

Example::

    from sasha_env.slides.cohorts import build_cohort, write_cohort

    result = build_cohort("camelyon16", "/data/camelyon16", fold=5)
    print(result.summary())
    write_cohort(result, "camelyon16.csv")   # + camelyon16.cohort.json, the full report
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..atomic import write_json
from .manifest import SPLITS, Manifest, SlideRecord

__all__ = [
    "RECIPES",
    "CohortResult",
    "FactSlide",
    "Recipe",
    "build_cohort",
    "find_slide_files",
    "load_facts",
    "report_path",
    "write_cohort",
]

#: Where the facts were converted from (also in each CSV's header).
SOURCE = "coglabiisc/SASHA at 6385fe6 (dataset_csv/), CC BY-NC 4.0; facts only"


def _camelyon16_keys(stem: str) -> list[str]:
    """``Tumor_001`` / ``tumour-1`` / ``TEST_001`` -> ``tumor_001`` / ``test_001``."""
    m = re.fullmatch(r"(normal|tumou?r|test)[ _-]?0*(\d{1,3})", stem, flags=re.IGNORECASE)
    if not m:
        return []
    kind = m.group(1).lower()
    kind = "tumor" if kind.startswith("tumo") else kind
    return [f"{kind}_{int(m.group(2)):03d}"]


def _tcga_keys(stem: str) -> list[str]:
    """The full slide name (``TCGA-..-DX1.<uuid>``), then the barcode before the first dot."""
    full = stem.lower()
    return [full, full.split(".", 1)[0]]


@dataclass(frozen=True)
class Recipe:
    """How to find one public cohort on disk and where its facts are.

    Attributes:
        name: the ``sasha cohort`` sub-command.
        title: the cohort's name in messages.
        facts: the CSV under ``slides/cohort_data/``.
        folds: number of published folds (``split_1`` .. ``split_<folds>``).
        default_fold: the fold the official code's RL stage uses.
        suffixes: slide file suffixes (lower case).
        keys: file stem -> the lookup keys it may match, in order of preference.
        patients: whether the facts give patient ids (``--patient-disjoint``).
    """

    name: str
    title: str
    facts: str
    folds: int
    default_fold: int
    suffixes: tuple[str, ...]
    keys: Callable[[str], list[str]]
    patients: bool


RECIPES: dict[str, Recipe] = {
    "camelyon16": Recipe(
        name="camelyon16",
        title="CAMELYON16",
        facts="camelyon16.csv",
        folds=6,
        default_fold=5,  # HAFED and RL: step3/step6 docstrings `--seed 5`
        suffixes=(".tif", ".tiff"),
        keys=_camelyon16_keys,
        patients=False,
    ),
    "tcga-nsclc": Recipe(
        name="tcga-nsclc",
        title="TCGA-NSCLC",
        facts="tcga_nsclc.csv",
        folds=5,
        default_fold=1,  # HAFED, RL and inference: step3/step6/step7 docstrings `--seed 1`
        suffixes=(".svs", ".tif", ".tiff"),
        keys=_tcga_keys,
        patients=True,
    ),
}


@dataclass(frozen=True)
class FactSlide:
    """One slide of a published cohort.

    Attributes:
        slide_id: the official name, without extension.
        label: class name (empty where no official file gives it).
        patient: the patient's id, for TCGA the first 12 characters of the slide's barcode
            (``TCGA-05-4244``); None where no official file gives it (CAMELYON16).
        splits: ``train``/``val``/``test`` per fold, ``""`` where the fold leaves it out.
    """

    slide_id: str
    label: str
    patient: str | None
    splits: tuple[str, ...]


def load_facts(recipe: Recipe | str) -> list[FactSlide]:
    """The shipped facts of a recipe: every slide of the cohort as published."""
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    text = resources.files("sasha_env").joinpath("slides", "cohort_data", recipe.facts).read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    fold_cols = [f"split_{k}" for k in range(1, recipe.folds + 1)]
    return [
        FactSlide(
            r["slide_id"],
            r["label"],
            r.get("patient_id") or None,
            tuple(r[c] for c in fold_cols),
        )
        for r in rows
    ]


def find_slide_files(root: str | Path, suffixes: Iterable[str]) -> list[Path]:
    """Files under ``root`` (recursively, following folder links once) with one of
    ``suffixes`` in any case, hidden files and folders skipped; sorted, absolute."""
    root = Path(root).absolute()
    suffixes = tuple(s.lower() for s in suffixes)
    seen: set[str] = set()
    out = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(folder) / name
            if not name.startswith(".") and name.lower().endswith(suffixes) and path.is_file():
                out.append(path)
    return sorted(out)


@dataclass
class CohortResult:
    """What a recipe found: the manifest's records and everything it left out, and why.

    Attributes:
        recipe: the recipe.
        root: the folder searched.
        fold: the published fold used (``split_<fold>``).
        patient_disjoint: whether train/val slides of test patients were dropped.
        records: the manifest rows (found slides of the fold), in the facts' order.
        missing: slides of the fold with no file under ``root``.
        left_out: found slides of the cohort that the fold leaves out: ``{slide_id: path}``.
        unknown: files with a slide suffix that are no slide of the cohort.
        masks: files skipped as masks (``mask`` in the name).
        duplicates: slides found more than once: ``{slide_id: paths}`` (the first is used).
        shared_patients: patients with slides in two parts of the fold as published:
            ``{"train/test": [...], "val/test": [...], "train/val": [...]}`` (recipes with
            patient ids only).
        dropped: train/val slides dropped by ``patient_disjoint`` (whether found or not).
    """

    recipe: Recipe
    root: Path
    fold: int
    patient_disjoint: bool
    records: list[SlideRecord]
    missing: list[FactSlide]
    left_out: dict[str, Path]
    unknown: list[Path]
    masks: list[Path]
    duplicates: dict[str, list[Path]]
    shared_patients: dict[str, list[str]] = field(default_factory=dict)
    dropped: list[FactSlide] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every slide of the fold was found."""
        return not self.missing

    def counts(self) -> dict[str, dict[str, int]]:
        """Written slides per split and label: ``{split: {label: n}}``."""
        out: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
        for r in self.records:
            assert r.split is not None
            out[r.split][r.label] = out[r.split].get(r.label, 0) + 1
        return {s: dict(sorted(labels.items())) for s, labels in out.items()}

    def summary(self, report: Path | None = None) -> str:
        """A few lines for the terminal: counts, then each kind of left-out slide, named."""
        name = f"{self.recipe.title}, SASHA's split_{self.fold}"
        n_fold = len(self.records) + len(self.missing)
        lines = [f"{name}: {len(self.records)} of its {n_fold} slides found under {self.root}"]
        for split, labels in self.counts().items():
            parts = ", ".join(f"{n} {lab}" for lab, n in sorted(labels.items()))
            lines.append(f"  {split:5s} {sum(labels.values()):4d}  ({parts or 'none'})")
        where = f" (full list: {report})" if report else ""
        if self.missing:
            lines.append(
                f"  missing {len(self.missing)}: "
                + _first(f"{s.slide_id} ({s.splits[self.fold - 1]})" for s in self.missing)
                + where
            )
        for pair, patients in self.shared_patients.items():
            if patients:
                lines.append(
                    f"  {len(patients)} patients have slides in both {pair} as published: "
                    + _first(patients)
                )
        if self.patient_disjoint:
            lines.append(
                f"  --patient-disjoint: dropped {len(self.dropped)} train/val slides of patients "
                "with test slides"
                + (": " + _first(s.slide_id for s in self.dropped) if self.dropped else "")
            )
        elif any(self.shared_patients.get(p) for p in ("train/test", "val/test")):
            lines.append(
                "  (as published; --patient-disjoint drops the train/val slides of test patients)"
            )
        if self.left_out:
            lines.append(
                f"  found but left out by split_{self.fold}: {len(self.left_out)}: "
                + _first(self.left_out)
            )
        if self.unknown:
            lines.append(
                f"  not {self.recipe.title} slides (ignored): {len(self.unknown)}: "
                + _first(p.name for p in self.unknown)
            )
        if self.masks:
            lines.append(f"  mask files skipped: {len(self.masks)}")
        for sid, paths in self.duplicates.items():
            lines.append(f"  {sid} found {len(paths)} times; using {paths[0]}")
        return "\n".join(lines)

    def report(self) -> dict:
        """Everything, JSON-ready: what :func:`write_cohort` writes beside the manifest."""
        fold = self.fold - 1
        return {
            "recipe": self.recipe.name,
            "fold": self.fold,
            "split_file": f"split_{self.fold}.json",
            "source": SOURCE,
            "root": str(self.root),
            "patient_disjoint": self.patient_disjoint,
            "written": len(self.records),
            "counts": self.counts(),
            "missing": [
                {"slide_id": s.slide_id, "label": s.label, "split": s.splits[fold]}
                for s in self.missing
            ],
            "left_out_by_split": {k: str(v) for k, v in self.left_out.items()},
            "unknown_files": [str(p) for p in self.unknown],
            "mask_files_skipped": [str(p) for p in self.masks],
            "duplicates": {k: [str(p) for p in v] for k, v in self.duplicates.items()},
            "shared_patients": self.shared_patients,
            "dropped_patient_disjoint": [
                {"slide_id": s.slide_id, "patient": s.patient, "split": s.splits[fold]}
                for s in self.dropped
            ],
        }

    def manifest(self, path: Path) -> Manifest:
        """The records as a :class:`Manifest` at ``path``."""
        return Manifest(path, self.records, sorted({r.label for r in self.records}))


def _first(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def build_cohort(
    recipe: Recipe | str,
    root: str | Path,
    fold: int | None = None,
    patient_disjoint: bool = False,
) -> CohortResult:
    """Find a public cohort's slides under ``root`` and assign SASHA's published split.

    Args:
        recipe: a :data:`RECIPES` name or recipe.
        root: the folder holding the slides (searched recursively).
        fold: the published fold, 1 .. ``recipe.folds`` (default: ``recipe.default_fold``).
        patient_disjoint: drop the train/val slides of patients who have a test slide in the
            fold (recipes with patient ids only).

    Raises:
        ValueError: unknown recipe, fold out of range, ``patient_disjoint`` without patient
            ids, ``root`` not a folder, or no slide of the fold found under it.
    """
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown cohort {recipe!r}; one of {', '.join(RECIPES)}")
        recipe = RECIPES[recipe]
    fold = recipe.default_fold if fold is None else fold
    if not 1 <= fold <= recipe.folds:
        raise ValueError(f"{recipe.title} has folds 1..{recipe.folds} (split_K.json); got {fold}")
    if patient_disjoint and not recipe.patients:
        raise ValueError(f"{recipe.title}'s facts have no patient ids: no --patient-disjoint")
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise ValueError(
            f"{root} is not a folder: give the folder the {recipe.title} slides are in"
        )
    facts = load_facts(recipe)
    k = fold - 1

    # index the facts by every key a file may match
    by_key: dict[str, FactSlide] = {}
    for s in facts:
        for key in recipe.keys(s.slide_id):
            by_key.setdefault(key, s)
    found: dict[str, list[Path]] = {}
    unknown, masks = [], []
    for path in find_slide_files(root, recipe.suffixes):
        stem = path.name[: -len(path.suffix)]
        slide = next((by_key[key] for key in recipe.keys(stem) if key in by_key), None)
        if slide is not None:
            found.setdefault(slide.slide_id, []).append(path)
        elif "mask" in stem.lower():
            masks.append(path)
        else:
            unknown.append(path)

    in_fold = [s for s in facts if s.splits[k]]
    shared: dict[str, list[str]] = {}
    dropped: list[FactSlide] = []
    if recipe.patients:
        part = {p: {s.patient for s in in_fold if s.splits[k] == p} for p in SPLITS}
        for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
            shared[f"{a}/{b}"] = sorted(str(p) for p in part[a] & part[b])
        if patient_disjoint:
            dropped = [s for s in in_fold if s.splits[k] != "test" and s.patient in part["test"]]
            gone = {s.slide_id for s in dropped}
            in_fold = [s for s in in_fold if s.slide_id not in gone]

    records = [
        SlideRecord(s.slide_id, found[s.slide_id][0], s.label, s.splits[k])
        for s in in_fold
        if s.slide_id in found
    ]
    if not records:
        raise ValueError(
            f"no slide of {recipe.title}'s split_{fold} found under {root} (looked for "
            f"{'/'.join(recipe.suffixes)} files named as published, e.g. "
            f"{in_fold[0].slide_id}{recipe.suffixes[0]}); check the folder"
        )
    return CohortResult(
        recipe=recipe,
        root=root,
        fold=fold,
        patient_disjoint=patient_disjoint,
        records=records,
        missing=[s for s in in_fold if s.slide_id not in found],
        left_out={
            s.slide_id: found[s.slide_id][0]
            for s in facts
            if s.slide_id in found and not s.splits[k]
        },
        unknown=unknown,
        masks=masks,
        duplicates={sid: paths for sid, paths in found.items() if len(paths) > 1},
        shared_patients=shared,
        dropped=dropped,
    )


def report_path(manifest: str | Path) -> Path:
    """The report beside a manifest: ``cohort.csv`` -> ``cohort.cohort.json``."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.cohort.json")


def write_cohort(result: CohortResult, out: str | Path) -> Path:
    """Write the manifest to ``out`` and the full report beside it (both atomically).

    Returns:
        The report's path (:func:`report_path`).
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(
            f"--out {out} is a folder; give the manifest's file name, e.g. {out}/cohort.csv"
        )
    result.manifest(out).write(out)
    report = report_path(out)
    write_json(report, result.report())
    return report
