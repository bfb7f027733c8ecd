"""The cohort manifest: a CSV with ``slide_id,path,label`` and optional ``split``, ``mask``
and ``mpp``.

``mask`` (optional) names a tumour mask image (PNG/TIFF, any downsample of the slide, nonzero =
tumour), used only for analysis (tumour-hit rates), never for training. ``mpp`` (optional, may
be empty per row) is the slide's level-0 resolution in µm/px, used instead of its metadata.

``path`` is absolute or relative to the CSV's folder. ``label`` is a class name or an
integer. Without ``split``, a stratified train/val/test split is drawn from a seed (and
the caller writes it next to its outputs). Slide ids must be unique, safe file names.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import replace_atomically
from .slide import check_mpp

__all__ = [
    "Manifest",
    "SlideRecord",
    "ManifestError",
    "ParsedManifest",
    "read_manifest",
    "read_manifest_lenient",
    "file_identity",
    "is_safe_id",
    "resolve_csv_path",
    "stratified_split",
]

SPLITS = ("train", "val", "test")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def is_safe_id(slide_id: str) -> bool:
    """A slide id that is a safe file name: letters, digits, '.', '_', '-'; at most 128."""
    return bool(_SAFE_ID.match(slide_id)) and slide_id not in (".", "..")


class ManifestError(ValueError):
    """The manifest is malformed; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class SlideRecord:
    slide_id: str
    path: Path
    label: str
    split: str | None
    mask: Path | None = None
    mpp: float | None = None
    """Level-0 µm/px from the manifest's ``mpp`` column, used instead of the slide's metadata."""


@dataclass
class Manifest:
    """A parsed manifest.

    Attributes:
        path: the CSV file.
        records: one per slide, in file order.
        class_names: sorted label names (integers sort numerically); a label's index is its class.
    """

    path: Path
    records: list[SlideRecord]
    class_names: list[str]

    def label_index(self, label: str) -> int:
        return self.class_names.index(label)

    def by_id(self) -> dict[str, SlideRecord]:
        return {r.slide_id: r for r in self.records}

    def with_split(
        self, seed: int = 0, shares: tuple[float, float, float] = (0.6, 0.2, 0.2)
    ) -> Manifest:
        """This manifest, with a stratified split drawn from ``seed`` where the CSV had none."""
        if all(r.split for r in self.records):
            return self
        labels = [r.label for r in self.records]
        splits = stratified_split(labels, shares, np.random.default_rng(seed))
        records = [
            dataclasses.replace(r, split=r.split or s)
            for r, s in zip(self.records, splits, strict=True)
        ]
        return Manifest(self.path, records, self.class_names)

    def write(self, path: str | Path) -> None:
        """Write as CSV with absolute paths and the split column (and ``mpp`` when a row has one)."""
        with_mpp = any(r.mpp is not None for r in self.records)

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["slide_id", "path", "label", "split", "mask"] + ["mpp"] * with_mpp)
                for r in self.records:
                    row = [r.slide_id, str(r.path), r.label, r.split or "", str(r.mask or "")]
                    w.writerow(row + [repr(r.mpp) if r.mpp is not None else ""] * with_mpp)

        replace_atomically(path, write)


def file_identity(path: str | Path, fingerprint: bool = True) -> dict:
    """What identifies a slide file: size, modification time and a content fingerprint.

    The fingerprint is a SHA-256 of the size and the first and last MiB, cheap on gigapixel
    files and unchanged by copying (which changes ``mtime_ns``). ``fingerprint=False`` skips
    the reads (size and time only).
    """
    path = Path(path)
    stat = path.stat()
    out: dict[str, int | str] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if fingerprint:
        h = hashlib.sha256(str(stat.st_size).encode())
        with path.open("rb") as f:
            h.update(f.read(1 << 20))
            if stat.st_size > 2 << 20:
                f.seek(-(1 << 20), 2)
                h.update(f.read(1 << 20))
        out["fingerprint"] = h.hexdigest()[:32]
    return out


def resolve_csv_path(manifest: Path, value: str) -> Path:
    """A path from the CSV: absolute, or relative to the CSV's folder."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (manifest.parent / p).resolve()


def stratified_split(
    labels: Sequence[object],
    shares: tuple[float, float, float] = (0.6, 0.2, 0.2),
    rng: np.random.Generator | int = 0,
) -> list[str]:
    """Assign ``train``/``val``/``test`` so that every split gets its share of each class.

    Slides are ordered so that each class is spread evenly along the order (by within-class
    rank, classes interleaved in a random order, members shuffled), and the order is cut into
    train/val/test of largest-remainder sizes. Each (class, split) count is then within one
    of ``n_class × share``, every split with a positive share gets a slide when there are
    enough slides, and a class with at least one slide per such split has one in each (a rare
    class may swap a slide with a common one to get there).

    Args:
        labels: one label per slide (any hashable, sortable values).
        shares: train/val/test shares (normalised).
        rng: a generator, or a seed for one.

    Returns:
        The split of each slide, in input order.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    labels = list(labels)
    n = len(labels)
    classes = sorted(set(labels))
    class_first = rng.permutation(len(classes))
    keys = []
    for c, cls in enumerate(classes):
        members = rng.permutation([i for i, lab in enumerate(labels) if lab == cls])
        keys += [((j + 0.5) / len(members), class_first[c], int(i)) for j, i in enumerate(members)]
    order = [i for *_, i in sorted(keys)]

    shares_arr = np.array(shares, float) / float(sum(shares))
    sizes = np.floor(shares_arr * n).astype(int)
    sizes[np.argsort(-(shares_arr * n - sizes), kind="stable")[: n - sizes.sum()]] += 1
    for empty in np.flatnonzero((sizes == 0) & (shares_arr > 0)):
        donor = int(np.argmax(sizes))
        if sizes[donor] > 1:
            sizes[donor] -= 1
            sizes[empty] += 1
    out = [""] * n
    for i, split in zip(order, np.repeat(list(SPLITS), sizes), strict=True):
        out[i] = str(split)
    _cover_rare_classes(
        out, labels, [s for s, share in zip(SPLITS, shares_arr, strict=True) if share > 0]
    )
    return out


def _cover_rare_classes(splits: list[str], labels: list, wanted: list[str]) -> None:
    """Give every class with at least ``len(wanted)`` slides one slide in each wanted split.

    A class absent from a split swaps one slide of its largest split with a slide of the
    split's most represented class (split sizes stay as they are). Only rare classes trip
    this: with enough slides, the even spread already covers every split.
    """
    classes = sorted(set(labels))
    for cls in classes:
        members = [i for i, lab in enumerate(labels) if lab == cls]
        if len(members) < len(wanted):
            continue
        for split in wanted:
            here = [i for i in members if splits[i] == split]
            if here:
                continue
            count = {s: sum(splits[i] == s for i in members) for s in wanted}
            source = max(count, key=lambda s: count[s])
            if count[source] < 2:
                continue
            others = [i for i, lab in enumerate(labels) if splits[i] == split and lab != cls]
            donors = {c: [i for i in others if labels[i] == c] for c in classes if c != cls}
            donor_cls = max(donors, key=lambda c: len(donors[c]), default=None)
            if donor_cls is None or len(donors[donor_cls]) < 2:
                continue
            i = next(i for i in members if splits[i] == source)
            j = donors[donor_cls][0]
            splits[i], splits[j] = split, source


@dataclass
class ParsedManifest:
    """A manifest read leniently: the good rows, and an error per bad slide id or row."""

    manifest: Manifest | None
    errors: dict[str, str]


def read_manifest(path: str | Path, check_files: bool = False) -> Manifest:
    """Parse and validate a manifest CSV, failing on the first bad row.

    Args:
        path: the CSV.
        check_files: also require every slide file to exist.

    Raises:
        ManifestError: missing columns, empty file, duplicate or unsafe ids, bad splits,
            missing files (with ``check_files``).
    """
    parsed = read_manifest_lenient(path, check_files=check_files)
    if parsed.errors:
        raise ManifestError(next(iter(parsed.errors.values())))
    assert parsed.manifest is not None
    return parsed.manifest


def read_manifest_lenient(path: str | Path, check_files: bool = False) -> ParsedManifest:
    """Parse a manifest, keeping the good rows and naming each bad one.

    A row with an unsafe id, an empty path or label, or a bad split is reported under its id
    (or ``line N``); every row of a duplicated id is rejected, since which one is right is
    unknown. Used by extraction, so that one bad row never stops a cohort.

    Raises:
        ManifestError: the file itself is unusable (missing, no header columns, no rows).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = {"slide_id", "path", "label"} - set(columns)
        if missing:
            raise ManifestError(
                f"{path}: missing column(s) {sorted(missing)}; the header must be "
                "'slide_id,path,label' with an optional 'split'"
            )
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise ManifestError(f"{path}: no slides listed")
    errors: dict[str, str] = {}
    lines_of: dict[str, list[int]] = {}
    for line, row in enumerate(rows, start=2):
        lines_of.setdefault(row["slide_id"], []).append(line)
    records: list[SlideRecord] = []
    for line, row in enumerate(rows, start=2):
        sid = row["slide_id"]
        where = f"{path}, line {line}"
        if not is_safe_id(sid):
            errors[sid or f"line {line}"] = (
                f"{where}: slide_id {sid!r} is not a safe file name "
                "(letters, digits, '.', '_', '-'; no slashes; at most 128 characters)"
            )
            continue
        if len(lines_of[sid]) > 1:
            errors[sid] = (
                f"{path}: duplicate slide_id {sid!r} on lines {lines_of[sid]}; ids must be "
                "unique, so none of these rows was used"
            )
            continue
        split = row.get("split") or None
        problem = (
            f"empty path for slide {sid!r}"
            if not row["path"]
            else f"empty label for slide {sid!r}"
            if not row["label"]
            else f"split {split!r} for slide {sid!r}; use one of {', '.join(SPLITS)}"
            if split is not None and split not in SPLITS
            else None
        )
        if problem:
            errors[sid] = f"{where}: {problem}"
            continue
        try:
            mpp = (
                check_mpp(row["mpp"], f"{where}: mpp of slide {sid!r}") if row.get("mpp") else None
            )
        except ValueError as exc:
            errors[sid] = str(exc)
            continue
        slide_path = resolve_csv_path(path, row["path"])
        mask_path = resolve_csv_path(path, row["mask"]) if row.get("mask") else None
        if check_files and not slide_path.is_file():
            errors[sid] = f"{where}: slide file {slide_path} not found"
            continue
        records.append(SlideRecord(sid, slide_path, row["label"], split, mask_path, mpp))
    if not records:
        return ParsedManifest(None, errors)
    labels = {r.label for r in records}
    if all(lab.lstrip("-").isdigit() for lab in labels):
        class_names = sorted(labels, key=int)
    else:
        class_names = sorted(labels)
    return ParsedManifest(Manifest(path, records, class_names), errors)
