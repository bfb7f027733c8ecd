"""Regenerate the cohort facts ``sasha cohort`` ships, from the official SASHA repository.

    git clone https://github.com/coglabiisc/SASHA /path/to/SASHA && git -C /path/to/SASHA checkout 6385fe6
    python experiments/cohort_facts.py --official /path/to/SASHA          # rewrites the CSVs
    python experiments/cohort_facts.py --official /path/to/SASHA --check  # exit 1 if they differ

(From a bare mirror: ``git --git-dir=MIRROR archive 6385fe6 dataset_csv | tar -x -C DIR``.)

Reads only data files of the official repository — slide names, labels and fold lists, which
are facts, not code — and writes ``src/sasha_env/slides/cohort_data/``:

- ``camelyon16.csv``: ``slide_id,label,split_1..split_6``, one row per slide of CAMELYON16 as
  published (``normal_001..160``, ``tumor_001..111``, ``test_001..130``). Labels: training
  slides from their name (the challenge's folder), test slides from the official
  ``dataset_csv/camelyon16/camelyon16.csv`` (checked against the names of the training
  slides); ``split_K`` is ``train``/``val``/``test`` as in ``splits/split_K.json``, empty
  where the split file leaves the slide out (``normal_027``, ``normal_086``, ``test_049``).
  ``test_049`` is in no official file, so its label is empty.
- ``tcga_nsclc.csv``: ``slide_id,patient_id,label,split_1..split_5`` from
  ``dataset_csv/tcga/tcga.csv`` (every slide it lists; ``cancer_type`` is the label) and
  ``splits/split_K.json``.

Every count the docs quote is asserted here, so a different checkout fails loudly.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "sasha_env" / "slides" / "cohort_data"
COMMIT = "6385fe6"
SOURCE = "coglabiisc/SASHA (https://github.com/coglabiisc/SASHA) at commit 6385fe6"
LICENCE = (
    "the official repository is licensed CC BY-NC 4.0; these are its facts (slide names, "
    "labels, fold membership), reformatted, with attribution"
)


def _split_of(split_file: Path) -> dict[str, str]:
    """``{slide_id: 'train'|'val'|'test'}`` of one official ``split_K.json``."""
    data = json.loads(split_file.read_text())
    out: dict[str, str] = {}
    for part in ("train", "val", "test"):
        for sid in data[f"{part}_names"]:
            if sid in out:
                raise SystemExit(f"{split_file}: {sid} is in two parts")
            out[sid] = part
    return out


def _header(name: str, files: list[str], notes: list[str]) -> list[str]:
    return [
        f"# {name}: slide names, labels and SASHA's published folds (split_K: train/val/test, "
        "empty = left out by that split file)",
        f"# source: {SOURCE}: " + ", ".join(files),
        f"# licence note: {LICENCE}",
        *[f"# {n}" for n in notes],
        "# regenerate: python experiments/cohort_facts.py --official CHECKOUT",
    ]


def camelyon16(official: Path) -> str:
    """The text of ``camelyon16.csv`` from the official checkout ``official``."""
    base = official / "dataset_csv" / "camelyon16"
    with (base / "camelyon16.csv").open(newline="") as f:
        labels = {r["slide_id"]: r["label"] for r in csv.DictReader(f)}
    folds = [_split_of(base / "splits" / f"split_{k}.json") for k in range(1, 7)]
    published = (
        [f"normal_{i:03d}" for i in range(1, 161)]
        + [f"tumor_{i:03d}" for i in range(1, 112)]
        + [f"test_{i:03d}" for i in range(1, 131)]
    )
    named = set(labels).union(*folds)
    assert named <= set(published), sorted(named - set(published))
    rows = []
    for sid in published:
        if sid.startswith("test_"):
            code = labels.get(sid)
            label = {"0": "normal", "1": "tumor", None: ""}[code]
        else:
            label = "tumor" if sid.startswith("tumor_") else "normal"
            if sid in labels:
                assert labels[sid] == ("1" if label == "tumor" else "0"), sid
        rows.append([sid, label, *(fold.get(sid, "") for fold in folds)])
    # the counts the docs state
    for k, fold in enumerate(folds, start=1):
        sizes = [sum(p == part for p in fold.values()) for part in ("train", "val", "test")]
        assert sizes == ([242, 27, 129] if k <= 5 else [239, 30, 129]), (k, sizes)
    tests = [r for r in rows if r[2] == "test"]
    assert len({tuple(r[2:]) for r in tests}) == 1  # the same test slides in every split
    assert [r[1] for r in tests].count("tumor") == 49 and len(tests) == 129
    left_out = [r[0] for r in rows if not any(r[2:])]
    assert left_out == ["normal_027", "normal_086", "test_049"], left_out
    notes = [
        "labels: training slides by name; test slides from camelyon16.csv (test_049 is in no "
        "official file: label unknown)",
        "every split_K has the same 129 test slides (49 tumor, 80 normal): all of test_001..130 "
        "but test_049; test_114 is included; no split holds normal_027 or normal_086",
    ]
    files = ["dataset_csv/camelyon16/camelyon16.csv", "splits/split_1..6.json"]
    return _text(
        _header("CAMELYON16", files, notes),
        ["slide_id", "label", *(f"split_{k}" for k in range(1, 7))],
        rows,
    )


def tcga_nsclc(official: Path) -> str:
    """The text of ``tcga_nsclc.csv`` from the official checkout ``official``."""
    base = official / "dataset_csv" / "tcga"
    with (base / "tcga.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    folds = [_split_of(base / "splits" / f"split_{k}.json") for k in range(1, 6)]
    rows = []
    for r in table:
        assert r["slide_id"].endswith(".svs") and r["slide_id"].startswith(r["patient_id"])
        assert {"LUAD": "0", "LUSC": "1"}[r["cancer_type"]] == r["label"]
        sid = r["slide_id"][: -len(".svs")]
        rows.append(
            [sid, r["patient_id"], r["cancer_type"], *(fold.get(sid, "") for fold in folds)]
        )
    rows.sort(key=lambda r: r[0])
    ids = {r[0] for r in rows}
    assert len(ids) == len(rows) == 1051
    for k, fold in enumerate(folds, start=1):
        assert set(fold) <= ids, (k, sorted(set(fold) - ids)[:3])
        sizes = [sum(p == part for p in fold.values()) for part in ("train", "val", "test")]
        assert sizes == [658, 167, 213], (k, sizes)
    notes = [
        "label = cancer_type (LUAD = 0, LUSC = 1 in the official code); 13 slides of tcga.csv "
        "are in no split file",
        "the folds are not patient-disjoint: 11-19 patients have slides in both train and test",
    ]
    files = ["dataset_csv/tcga/tcga.csv", "splits/split_1..5.json"]
    return _text(
        _header("TCGA-NSCLC (LUAD vs LUSC)", files, notes),
        ["slide_id", "patient_id", "label", *(f"split_{k}" for k in range(1, 6))],
        rows,
    )


def _text(header: list[str], columns: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    buf.write("".join(line + "\n" for line in header))
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of 6385fe6")
    parser.add_argument("--out", type=Path, default=OUT, help=f"(default: {OUT})")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    if not (args.official / "dataset_csv").is_dir():
        parser.error(f"{args.official} has no dataset_csv/: give a checkout of SASHA {COMMIT}")
    differ = []
    for name, make in (("camelyon16.csv", camelyon16), ("tcga_nsclc.csv", tcga_nsclc)):
        text = make(args.official)
        path = args.out / name
        if args.check:
            same = path.is_file() and path.read_text() == text
            print(f"{path}: {'same' if same else 'DIFFERS'}")
            differ += [] if same else [name]
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path} ({text.count(chr(10))} lines)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
