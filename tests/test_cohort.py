"""`sasha cohort`: public cohorts as downloaded -> a manifest with SASHA's published splits.

The recipes need only file names (no slide is opened), so the fake layouts are empty files.
The facts' counts are asserted against the official split files' (experiments/cohort_facts.py
asserts them when it regenerates the CSVs from a checkout of the official repository; with
SASHA_OFFICIAL=CHECKOUT, a test checks that the shipped CSVs are what it makes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sasha_env.cli import main
from sasha_env.slides.cohorts import build_cohort, load_facts, report_path
from sasha_env.slides.manifest import read_manifest

SRC = Path(__file__).resolve().parents[1] / "src"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def _camelyon16(root: Path, skip: tuple[str, ...] = ()) -> Path:
    """CAMELYON16 as published: training/normal, training/tumor, testing/images, all 401."""
    for s in load_facts("camelyon16"):
        if s.slide_id in skip:
            continue
        kind = s.slide_id.split("_")[0]
        folder = "testing/images" if kind == "test" else f"training/{kind}"
        _touch(root / folder / f"{s.slide_id}.tif")
    return root


def _split_counts(manifest: Path) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for r in read_manifest(manifest).records:
        out.setdefault(str(r.split), Counter())[r.label] += 1
    return out


# --- the shipped facts -------------------------------------------------------------------------


def test_camelyon16_facts_match_the_official_split_files() -> None:
    facts = {s.slide_id: s for s in load_facts("camelyon16")}
    assert len(facts) == 160 + 111 + 130  # every slide as published
    for k in range(6):
        parts = Counter(s.splits[k] for s in facts.values())
        assert [parts["train"], parts["val"], parts["test"]] == (
            [242, 27, 129] if k < 5 else [239, 30, 129]
        )
        test = [s for s in facts.values() if s.splits[k] == "test"]
        assert Counter(s.label for s in test) == {"tumor": 49, "normal": 80}
    # the official files leave out test_049 (not test_114, as issue 24 said)
    assert not any(facts["test_049"].splits) and facts["test_049"].label == ""
    assert set(facts["test_114"].splits) == {"test"} and facts["test_114"].label == "tumor"
    assert not any(facts["normal_027"].splits) and not any(facts["normal_086"].splits)
    # tumour counts per fold (official notes §6): split_3 98/13, split_4 102/9, split_5 101/10
    for k, (train, val) in {3: (98, 13), 4: (102, 9), 5: (101, 10)}.items():
        tumours = Counter(s.splits[k - 1] for s in facts.values() if s.label == "tumor")
        assert (tumours["train"], tumours["val"]) == (train, val)
    assert facts["test_001"].label == "tumor" and facts["test_003"].label == "normal"


def test_tcga_facts_match_the_official_split_files() -> None:
    facts = load_facts("tcga-nsclc")
    assert len(facts) == 1051
    assert Counter(s.label for s in facts) == {"LUAD": 541, "LUSC": 510}
    assert sum(not any(s.splits) for s in facts) == 13
    for k in range(5):
        parts = Counter(s.splits[k] for s in facts)
        assert [parts["train"], parts["val"], parts["test"]] == [658, 167, 213]
    # split_1_summary.txt: train 339/319, val 86/81, test 104/109 (LUAD/LUSC)
    by = Counter((s.splits[0], s.label) for s in facts)
    assert [by["train", "LUAD"], by["train", "LUSC"], by["val", "LUAD"], by["val", "LUSC"]] == [
        339, 319, 86, 81,
    ]  # fmt: skip
    assert [by["test", "LUAD"], by["test", "LUSC"]] == [104, 109]
    assert all(s.patient and s.slide_id.startswith(s.patient) for s in facts)


@pytest.mark.skipif(
    not os.environ.get("SASHA_OFFICIAL"),
    reason="SASHA_OFFICIAL: a checkout of the official 6385fe6",
)
def test_facts_regenerate_from_the_official_checkout() -> None:
    """The shipped CSVs are what experiments/cohort_facts.py makes of the official files."""
    script = SRC.parent / "experiments" / "cohort_facts.py"
    official = os.environ["SASHA_OFFICIAL"]
    done = subprocess.run(
        [sys.executable, str(script), "--official", official, "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_package_data_ships_every_data_file() -> None:
    """A data file under src/ that pyproject's package-data misses is not in the wheel."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]
    for package, patterns in globs.items():
        files = {
            p for p in (SRC / package).rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
        }
        shipped = {p for pattern in patterns for p in (SRC / package).glob(pattern)}
        assert files <= shipped, sorted(str(p) for p in files - shipped)
    assert list((SRC / "sasha_env" / "slides" / "cohort_data").glob("*.csv"))


# --- camelyon16 --------------------------------------------------------------------------------


def test_camelyon16_as_published(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _camelyon16(tmp_path / "c16")
    out = tmp_path / "out" / "c16.csv"
    assert main(["cohort", "camelyon16", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    counts = _split_counts(out)  # default fold 5
    assert counts == {
        "train": {"normal": 141, "tumor": 101},
        "val": {"normal": 17, "tumor": 10},
        "test": {"normal": 80, "tumor": 49},
    }
    records = read_manifest(out, check_files=True).by_id()
    assert records["test_001"].label == "tumor" and records["test_001"].split == "test"
    assert records["test_001"].path == root / "testing/images/test_001.tif"
    assert "test_049" not in records and "test_114" in records
    # found but left out by the split files: reported, not written
    assert "left out by split_5: 3: normal_027, normal_086, test_049" in printed
    report = json.loads(report_path(out).read_text())
    assert report["fold"] == 5 and report["missing"] == [] and report["written"] == 398
    # other folds: split_4's train has 102 tumours
    assert main(["cohort", "camelyon16", str(root), "--out", str(out), "--fold", "4"]) == 0
    assert _split_counts(out)["train"]["tumor"] == 102
    assert main(["cohort", "camelyon16", str(root), "--out", str(out), "--fold", "6"]) == 0
    assert sum(_split_counts(out)["val"].values()) == 30


def test_camelyon16_name_variants_flat(tmp_path: Path) -> None:
    """Upper/lower case, .tif/.tiff, 'tumour', dashes and unpadded numbers, one flat folder."""
    root = tmp_path / "flat"
    for name in ("Normal_001.TIF", "TUMOR_016.tiff", "tumour-35.tif", "Test_001.tif"):
        _touch(root / name)
    result = build_cohort("camelyon16", root, fold=1)
    found = {r.slide_id: (r.path.name, r.split) for r in result.records}
    assert found == {
        "normal_001": ("Normal_001.TIF", "train"),
        "tumor_016": ("TUMOR_016.tiff", "train"),
        "tumor_035": ("tumour-35.tif", "train"),
        "test_001": ("Test_001.tif", "test"),
    }
    assert len(result.missing) == 398 - 4 and not result.unknown


def test_camelyon16_missing_and_extra_slides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = ("tumor_001", "normal_002", "test_010", "test_011", "test_012", "test_013")
    root = _camelyon16(tmp_path / "c16", skip=missing)
    _touch(root / "training/tumor/tumor_002_mask.tif")
    _touch(root / "extra/other_slide.tif")
    _touch(root / "copy/tumor_003.tiff")  # a second copy: the first path in order is used
    _touch(root / ".hidden/tumor_004.tif")  # hidden folders are not searched
    out = tmp_path / "c16.csv"
    assert main(["cohort", "camelyon16", str(root), "--out", str(out), "--fold", "1"]) == 1
    printed = capsys.readouterr().out
    assert "missing 6: " in printed and "and 1 more" in printed
    assert f"full list: {report_path(out)}" in printed
    assert "not CAMELYON16 slides (ignored): 1: other_slide.tif" in printed
    assert "mask files skipped: 1" in printed
    assert f"tumor_003 found 2 times; using {root / 'copy/tumor_003.tiff'}" in printed
    report = json.loads(report_path(out).read_text())
    assert sorted(m["slide_id"] for m in report["missing"]) == sorted(missing)
    assert {m["split"] for m in report["missing"] if m["slide_id"].startswith("test")} == {"test"}
    assert report["unknown_files"] == [str(root / "extra/other_slide.tif")]
    ids = read_manifest(out).by_id()
    assert len(ids) == 398 - len(missing) and not set(missing) & set(ids)
    assert ids["tumor_003"].path == root / "copy/tumor_003.tiff"
    assert ids["tumor_004"].path == root / "training/tumor/tumor_004.tif"
    assert "tumor_004 found" not in printed


def test_nothing_found_is_an_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "empty"
    _touch(root / "readme.txt")
    out = tmp_path / "c16.csv"
    assert main(["cohort", "camelyon16", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sasha cohort: error: no slide of CAMELYON16's split_5 found under" in err
    assert main(["cohort", "camelyon16", str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not out.exists() and not report_path(out).exists()


def test_help_and_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["cohort", "--help"], ["cohort", "camelyon16", "--help"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0
    assert "testing/images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["cohort", "tcga-nsclc", "--help"])
    assert stop.value.code == 0 and "--patient-disjoint" in capsys.readouterr().out
    for argv in (
        ["cohort", "camelyon16", "r", "--out", "o.csv", "--fold", "7"],
        ["cohort", "tcga-nsclc", "r", "--out", "o.csv", "--fold", "6"],
        ["cohort", "camelyon16", "r", "--out", "o.csv", "--patient-disjoint"],
        ["cohort", "camelyon17", "r", "--out", "o.csv"],
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2, argv


# --- tcga-nsclc --------------------------------------------------------------------------------


def _gdc(root: Path, fold: int, skip: int = 0) -> list[str]:
    """The fold's slides as gdc-client writes them: ROOT/<file uuid>/<slide name>.svs."""
    ids = [s.slide_id for s in load_facts("tcga-nsclc") if s.splits[fold - 1]]
    for i, sid in enumerate(ids[skip:]):
        _touch(root / f"{i:08d}-0000-4000-8000-000000000000" / f"{sid}.svs")
        _touch(root / f"{i:08d}-0000-4000-8000-000000000000" / "logs" / f"{sid}.svs.log")
    return ids


def test_tcga_gdc_layout_as_published(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "gdc"
    ids = _gdc(root, fold=1)
    out = tmp_path / "tcga.csv"
    assert main(["cohort", "tcga-nsclc", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    counts = _split_counts(out)
    assert counts == {
        "train": {"LUAD": 339, "LUSC": 319},
        "val": {"LUAD": 86, "LUSC": 81},
        "test": {"LUAD": 104, "LUSC": 109},
    }
    manifest = read_manifest(out)
    assert {r.slide_id for r in manifest.records} == set(ids)
    assert manifest.class_names == ["LUAD", "LUSC"]  # LUAD = 0, LUSC = 1 as in the official code
    # as published: 11 patients in both train and test, 7 in val and test, said so
    report = json.loads(report_path(out).read_text())
    assert len(report["shared_patients"]["train/test"]) == 11
    assert len(report["shared_patients"]["val/test"]) == 7
    assert "11 patients have slides in both train/test" in printed
    assert "--patient-disjoint drops" in printed
    # every fold splits the same 1,038 slides, with another test set
    assert main(["cohort", "tcga-nsclc", str(root), "--out", str(out), "--fold", "2"]) == 0
    fold2 = read_manifest(out).by_id()
    assert len(fold2) == 1038
    assert {r.slide_id for r in manifest.records if r.split == "test"} != {
        sid for sid, r in fold2.items() if r.split == "test"
    }


def test_tcga_patient_disjoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "gdc"
    _gdc(root, fold=1)
    out = tmp_path / "tcga.csv"
    argv = ["cohort", "tcga-nsclc", str(root), "--out", str(out), "--patient-disjoint"]
    assert main(argv) == 0
    assert "--patient-disjoint: dropped 45 train/val slides" in capsys.readouterr().out
    facts = {s.slide_id: s for s in load_facts("tcga-nsclc")}
    records = read_manifest(out).records
    test_patients = {facts[r.slide_id].patient for r in records if r.split == "test"}
    assert sum(r.split == "test" for r in records) == 213  # test untouched
    assert len(records) == 1038 - 45
    assert not any(facts[r.slide_id].patient in test_patients for r in records if r.split != "test")
    report = json.loads(report_path(out).read_text())
    assert len(report["dropped_patient_disjoint"]) == 45 and report["patient_disjoint"]


def test_tcga_flat_barcode_names_and_reports(tmp_path: Path) -> None:
    facts = [s for s in load_facts("tcga-nsclc") if s.splits[0]]
    root = tmp_path / "flat"
    _touch(root / f"{facts[0].slide_id}.svs")  # full name
    _touch(root / f"{facts[1].slide_id.split('.')[0]}.svs")  # the barcode alone
    _touch(root / f"{facts[2].slide_id.upper()}.SVS")  # case
    _touch(root / "TCGA-XX-0000-01Z-00-DX1.svs")  # not in the cohort
    left_out = next(s for s in load_facts("tcga-nsclc") if not any(s.splits))
    _touch(root / f"{left_out.slide_id}.svs")
    result = build_cohort("tcga-nsclc", root, fold=1)
    assert [r.slide_id for r in result.records] == [s.slide_id for s in facts[:3]]
    assert [p.name for p in result.unknown] == ["TCGA-XX-0000-01Z-00-DX1.svs"]
    assert list(result.left_out) == [left_out.slide_id]
    assert len(result.missing) == 1038 - 3
    with pytest.raises(ValueError, match="no --patient-disjoint"):
        build_cohort("camelyon16", root, patient_disjoint=True)
