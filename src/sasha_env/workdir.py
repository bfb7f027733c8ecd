"""Where a pipeline run keeps its outputs: every stage, the environment and ``predict`` find files here.

::

    WORKDIR/
      config.yaml              the resolved configuration of the run
      manifest.csv             the cohort with absolute paths and a split for every slide
      features.zarr/           feature store (low-res, high-res and, after HAFED, distilled)
      models/<name>/model.pt   exported weights (hafed, tsu, lowres, abmil, meanmil, ...)
      models/<name>/logs/      CSV (and W&B) logs of the training run
      agents/<name>/           trained agents
      stages/<stage>.json      completion markers: a stage whose marker matches is skipped
      stages/<stage>.units/    finished units of a stage with several (one agent per budget)
      calibration.json         temperature and bias per method, fitted on the val split
      results.json             the results table on the test split
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Workdir"]


@dataclass(frozen=True)
class Workdir:
    root: Path

    def __init__(self, root: str | os.PathLike[str]):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def dropped_rows(self) -> Path:
        """Rows of the given manifest that were left out, with their reasons (JSON)."""
        return self.root / "manifest_dropped.json"

    @property
    def store(self) -> Path:
        return self.root / "features.zarr"

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def model(self, name: str) -> Path:
        return self.model_dir(name) / "model.pt"

    def agent_dir(self, name: str) -> Path:
        return self.root / "agents" / name

    def marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    def require(self, path: Path, stage: str) -> Path:
        """``path`` if it exists, else a clear error naming the stage that makes it."""
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: run the '{stage}' stage first "
                f"(sasha pipeline --workdir {self.root} ...)"
            )
        return path
