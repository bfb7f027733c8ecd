"""Evaluation on the test split → ``results.json`` (contract in design.md).

``{"methods": [{"method", "frac", "accuracy", "auc", "f1", "ece", "n_slides", ...}, ...],
"split": "test", "class_names": [...], ...}``
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from .bags import StoreBags
from .manifest import read_manifest
from .store import FeatureStore
from .workdir import Workdir

__all__ = ["evaluate_workdir", "format_table", "FULL_RES_METHODS"]

#: methods read from a trained model: (method, model folder, feature kind, frac)
FULL_RES_METHODS = (
    ("hafed", "hafed", "highres", 1.0),
    ("lowres_only", "lowres", "lowres", 0.0),
    ("abmil", "abmil", "highres", 1.0),
    ("meanmil", "meanmil", "highres", 1.0),
    ("maxmil", "maxmil", "highres", 1.0),
    ("transmil", "transmil", "highres", 1.0),
)


def evaluate_workdir(
    wd: Workdir, cfg: dict, split: str = "test", log: Callable[[str], None] = print
) -> dict:
    """Metrics of every method whose model exists in ``wd``, written to ``wd.results``."""
    from sasha_models.lit import load_model, predict_probs
    from sasha_models.metrics import classification_metrics

    manifest = read_manifest(wd.manifest)
    bags = StoreBags(FeatureStore(wd.store), manifest)
    if not bags.slide_ids(split):
        raise RuntimeError(f"no slide of split '{split}' is in the store; cannot evaluate")
    rows = []
    for method, folder, kind, frac in FULL_RES_METHODS:
        path = wd.model(folder)
        if not path.is_file():
            continue
        model = load_model(path)
        ids, probs, labels = predict_probs(model, bags, split, kind)
        metrics = classification_metrics(probs, labels)
        rows.append({"method": method, "frac": frac, **_clean(metrics), "n_slides": len(ids)})
        log(f"[evaluate] {method}: AUC {metrics['auc']:.3f}, accuracy {metrics['accuracy']:.3f}")
    results = {
        "split": split,
        "class_names": bags.class_names,
        "preset": cfg.get("preset"),
        "seed": cfg.get("seed", 0),
        "methods": rows,
    }
    tmp = wd.results.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(wd.results)
    return results


def _clean(metrics: dict) -> dict:
    return {
        k: (None if isinstance(v, float) and math.isnan(v) else float(v))
        for k, v in metrics.items()
    }


def format_table(results: dict | str | Path) -> str:
    """The results as a Markdown table."""
    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text())
    lines = [
        "| method | frac | AUC | accuracy | F1 | ECE |",
        "|---|---|---|---|---|---|",
    ]
    for m in results["methods"]:
        cells = [
            "n/a" if m.get(k) is None else f"{m[k]:.3f}" for k in ("auc", "accuracy", "f1", "ece")
        ]
        lines.append(f"| {m['method']} | {m['frac']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
