"""How sharply a workdir's HAFED separates tumour from normal slides: the reward's signal.

    python experiments/hafed_sharpness.py study/seed-0 study/seed-1 ... [--split test]

Every agent's reward is HAFED's cross-entropy on the current state, so a HAFED whose
probabilities sit near 0.5 even with every patch read gives the agents little to learn from
(docs/budget-f02.md, "HAFED kept at epoch 3"). For each workdir this prints the kept epoch
and the selection rule from ``models/hafed/model.pt``, and HAFED's mean positive-class
probability, by true class, on two states of each slide of the split: the low-res rows only
(what the agent starts from) and every row replaced by its distilled high-res vector (every
patch read). Nothing is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from sasha_env.features.store import FeatureStore
from sasha_env.slides.manifest import read_manifest
from sasha_env.workdir import Workdir
from sasha_models.checkpoint import load_model


def sharpness(workdir: Path, split: str) -> dict:
    """Kept epoch, rule and mean positive-class probabilities of ``workdir``'s HAFED."""
    wd = Workdir(workdir)
    blob = torch.load(wd.model("hafed"), map_location="cpu", weights_only=True)
    hafed = load_model(wd.model("hafed"))
    store = FeatureStore(wd.store)
    manifest = read_manifest(wd.manifest)
    classes = blob["meta"]["class_names"]
    rows = {"lowres": ([], []), "highres": ([], [])}
    with torch.inference_mode():
        for record in manifest.records:
            if record.split != split:
                continue
            positive = classes.index(record.label) == len(classes) - 1
            z = torch.from_numpy(store.read(record.slide_id, "lowres")).float()
            v = hafed.distill(torch.from_numpy(store.read(record.slide_id, "highres")).float())
            for name, state in (("lowres", z), ("highres", v)):
                p = float(torch.softmax(hafed.classify(state), -1)[..., -1])
                rows[name][int(positive)].append(p)
    meta = blob["meta"]
    epoch = meta.get("best_epoch")
    checkpoint = wd.model("hafed").parent / "checkpoints" / "best.ckpt"
    if epoch is None and checkpoint.is_file():  # exported before model.pt recorded it
        epoch = torch.load(checkpoint, map_location="cpu", weights_only=True).get("epoch")
    out = {
        "workdir": str(workdir),
        "rule": meta.get("select_ties", "first"),
        "best_epoch": epoch,
        "best_val_loss": meta.get("best_tie_value"),
    }
    for name, (neg, pos) in rows.items():
        out[name] = (float(np.mean(neg)), float(np.mean(pos)), len(neg), len(pos))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", type=Path, help="pipeline workdirs with a HAFED")
    parser.add_argument("--split", default="test", help="which slides (default: test)")
    args = parser.parse_args()
    print("| workdir | rule | kept epoch | val CE | low-res: normal / tumour | "
          "all read: normal / tumour | slides |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for wd in args.workdirs:
        r = sharpness(wd, args.split)
        loss = "–" if r["best_val_loss"] is None else f"{r['best_val_loss']:.3f}"
        lo, hi = r["lowres"], r["highres"]
        print(
            f"| {r['workdir']} | {r['rule']} | {r['best_epoch']} | {loss} | "
            f"{lo[0]:.2f} / {lo[1]:.2f} | {hi[0]:.2f} / {hi[1]:.2f} | {hi[2]} + {hi[3]} |"
        )


if __name__ == "__main__":
    main()
