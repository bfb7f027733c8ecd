"""Where a pipeline run keeps its outputs: every stage, the environment and ``predict`` find files here.

::

    WORKDIR/
      config.yaml              the resolved configuration of the run
      manifest.csv             the cohort with absolute paths and a split for every slide
      features.zarr/           feature store (low-res, high-res and, after HAFED, distilled)
      models/<name>/model.pt   exported weights (hafed, tsu, lowres, abmil, meanmil, ...)
      models/tsu-f<f>/model.pt one TSU per zoom budget f instead of models/tsu (tsu.budgets)
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

    def tsu_dir(self, frac: float | None = None) -> Path:
        """``models/tsu`` (one TSU for every budget), or ``models/tsu-f<f>`` (the TSU of
        budget ``frac``, when the tsu stage trains one per budget: ``tsu.budgets``)."""
        return self.model_dir("tsu" if frac is None else f"tsu-f{float(frac):g}")

    def budget_tsus(self) -> dict[float, Path]:
        """The per-budget TSUs present, ``{f: models/tsu-f<f>/model.pt}`` (empty when the
        workdir has one TSU for every budget)."""
        dirs = self.budget_tsu_dirs()
        return {f: d / "model.pt" for f, d in dirs.items() if (d / "model.pt").is_file()}

    def budget_tsu_dirs(self) -> dict[float, Path]:
        """Every per-budget TSU folder, ``{f: models/tsu-f<f>}``, finished or not (a fit
        killed before its export leaves one with its resume point only)."""
        out = {}
        for path in sorted((self.root / "models").glob("tsu-f*")):
            try:
                f = float(path.name[len("tsu-f") :])
            except ValueError:
                continue
            if path.is_dir():
                out[f] = path
        return out

    def tsu_model(self, frac: float | None = None) -> Path:
        """The TSU an environment at zoom budget ``frac`` uses: ``models/tsu-f<f>/model.pt``
        when the tsu stage trained one per budget, else the shared ``models/tsu/model.pt``.

        A budget without its own TSU in a per-budget workdir (the budget curve's f = 0.05,
        0.3, 0.5 of the ``paper`` preset) uses the TSU of the nearest budget that has one
        (the larger on a tie); ``frac=None`` there is an error.

        Raises:
            FileNotFoundError: no TSU (run the tsu stage), or ``frac=None`` in a per-budget
                workdir.
        """
        per_budget = self.budget_tsus()
        if not per_budget:
            return self.require(self.model("tsu"), "tsu")
        if frac is None:
            have = ", ".join(f"{f:g}" for f in per_budget)
            raise FileNotFoundError(
                f"{self.root / 'models'} holds one TSU per zoom budget (f = {have}): name the "
                "budget whose TSU to use"
            )
        nearest = min(per_budget, key=lambda f: (round(abs(f - float(frac)), 9), -f))
        return per_budget[nearest]

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
