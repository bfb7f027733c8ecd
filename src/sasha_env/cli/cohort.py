"""The ``cohort`` verb: ``sasha cohort camelyon16|tcga-nsclc ROOT --out CSV [--fold K]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..slides.cohorts import RECIPES, build_cohort, write_cohort
from .common import EXIT_OK, EXIT_PARTIAL, SubParsers

_LAYOUTS = {
    "camelyon16": "CAMELYON16 as published: ROOT/training/normal/normal_*.tif, "
    "ROOT/training/tumor/tumor_*.tif, ROOT/testing/images/test_*.tif, or any other folders "
    "(names in any case, .tif or .tiff). Test labels are bundled. Folds: SASHA's split_1..6 "
    "(242/27/129 slides in 1-5, 239/30/129 in 6; the same 129 test slides in each).",
    "tcga-nsclc": "TCGA LUAD and LUSC diagnostic slides as the GDC client downloads them: "
    "ROOT/<file uuid>/<slide name>.svs, or flat; a file named by the barcode alone "
    "(TCGA-05-4244-01Z-00-DX1.svs) is matched too. Folds: SASHA's split_1..5 (658/167/213, "
    "a different test set in each). SASHA's folds share 11-19 patients between train and "
    "test; they are kept as published unless --patient-disjoint.",
}


def add_cohort(sub: SubParsers) -> None:
    """Register ``sasha cohort RECIPE ROOT --out CSV``."""
    p = sub.add_parser(
        "cohort",
        help="a manifest for CAMELYON16 or TCGA-NSCLC as downloaded, with SASHA's splits",
        description="Find a public cohort's slides under ROOT by their names and write a "
        "manifest with the labels and SASHA's published train/val/test split (facts shipped "
        "with sasha; nothing is downloaded, no slide is opened). Slides of the split that are "
        "not found are listed and left out (exit status 1); other files are reported. The "
        "full report goes beside the manifest (CSV's stem + .cohort.json).",
    )
    recipes = p.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    for name, recipe in RECIPES.items():
        r = recipes.add_parser(
            name,
            help=f"{recipe.title} with SASHA's split_1..{recipe.folds}",
            description=_LAYOUTS.get(name, recipe.title),
        )
        r.add_argument("root", type=Path, metavar="ROOT", help="the folder holding the slides")
        r.add_argument(
            "--out", type=Path, required=True, metavar="CSV", help="the manifest to write"
        )
        r.add_argument(
            "--fold",
            type=int,
            choices=range(1, recipe.folds + 1),
            default=recipe.default_fold,
            metavar="K",
            help=f"SASHA's split_K.json, 1..{recipe.folds} (default: {recipe.default_fold}, "
            "the split of the official code's RL stage)",
        )
        if recipe.patients:
            r.add_argument(
                "--patient-disjoint",
                action="store_true",
                help="drop the train/val slides of patients who also have a test slide "
                "(default: the split as published)",
            )
        r.set_defaults(func=_cmd_cohort)


def _cmd_cohort(args: argparse.Namespace) -> int:
    result = build_cohort(
        args.recipe,
        args.root,
        fold=args.fold,
        patient_disjoint=getattr(args, "patient_disjoint", False),
    )
    report = write_cohort(result, args.out)
    print(result.summary(report))
    print(f"wrote {args.out} ({len(result.records)} slides) and {report}")
    return EXIT_OK if result.ok else EXIT_PARTIAL
