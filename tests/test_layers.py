"""The house's layers: imports run one way, and the light entry points stay light.

Data flows slides → features → envs → agents → pipeline → predict/cli, and a wing may import
only its own wing and the wings below it (the package-root helpers are below every wing).
``sasha_models`` never imports ``sasha_env``, and only its ``lit`` and ``data`` import
Lightning. Registering the environment and ``sasha predict``
load neither Lightning nor W&B.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sasha_env.workdir import Workdir

SRC = Path(__file__).resolve().parents[1] / "src"

#: Rank of each room of sasha_env: a module may import modules of its own rank or lower.
BASE = ("atomic", "config", "distributed", "lru", "memory", "processes", "threads", "workdir")
WINGS = ("slides", "features", "envs", "agents", "pipeline")
TOP = ("predict", "cli", "testing")


def _rank(module: str) -> int:
    """0 for the root helpers, 1..5 for the wings in flow order, 6 for predict, cli, testing."""
    parts = module.split(".")
    assert parts[0] == "sasha_env", module
    if len(parts) == 1:
        return 7  # the package's __init__ (registration and the public API) sits on top
    room = parts[1]
    if room in BASE:
        return 0
    if room in WINGS:
        return 1 + WINGS.index(room)
    if room in TOP:
        return 1 + len(WINGS)
    raise AssertionError(f"{module}: a room the layer test does not know; add it to a layer")


def _module_name(path: Path, root: Path = SRC) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, root: Path = SRC) -> list[tuple[str, int]]:
    """Absolute names of every module ``path`` imports (also inside functions), with lines."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno))
            # `from . import x` / `from .pkg import mod` may name modules too
            out += [(f"{target}.{a.name}", node.lineno) for a in node.names]
    return out


def _sources(package: str, root: Path = SRC) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def _room_of(target: str) -> str | None:
    """The sasha_env room (module) an import target lands in, or None outside sasha_env."""
    parts = target.split(".")
    if parts[0] != "sasha_env" or len(parts) == 1:
        return None
    return ".".join(parts[:2])


def _upward_imports(root: Path = SRC) -> list[str]:
    """Every import in ``root/sasha_env`` from a room to a higher one, as ``file:line imports X``."""
    violations = []
    for path in _sources("sasha_env", root):
        here = _module_name(path, root)
        for target, line in _imports(path, root):
            room = _room_of(target)
            if room is None or room.split(".")[1] not in (*BASE, *WINGS, *TOP):
                continue  # `from .x import Name` adds a candidate that is a name, not a room
            if _rank(room) > _rank(here):
                violations.append(f"{path.relative_to(root)}:{line} imports {target}")
    return violations


def test_every_wing_imports_only_itself_and_lower_wings():
    violations = _upward_imports()
    assert not violations, "imports that run back up the flow:\n" + "\n".join(violations)


def test_every_room_is_in_a_layer():
    rooms = {_room_of(_module_name(p)) for p in _sources("sasha_env")} - {None}
    known = {f"sasha_env.{r}" for r in (*BASE, *WINGS, *TOP)}
    assert rooms <= known, f"rooms outside every layer: {sorted(rooms - known)}"


def test_sasha_models_imports_nothing_from_sasha_env():
    bad = [
        f"{path.relative_to(SRC)}:{line} imports {target}"
        for path in _sources("sasha_models")
        for target, line in _imports(path)
        if target.split(".")[0] == "sasha_env"
    ]
    assert not bad, "\n".join(bad)


#: The sasha_models modules that may import Lightning: training (lit), its data module (data)
#: and its callbacks (fit_callbacks: the kept epoch and the resume points).
LIGHTNING_MODULES = ("sasha_models.lit", "sasha_models.data", "sasha_models.fit_callbacks")


def _lightning_imports(root: Path = SRC) -> list[str]:
    """Every import of Lightning (``lightning`` or ``pytorch_lightning``, at module level or in
    a function) in ``root/sasha_models`` outside :data:`LIGHTNING_MODULES`, as
    ``file:line imports X``."""
    bad = []
    for path in _sources("sasha_models", root):
        if _module_name(path, root) in LIGHTNING_MODULES:
            continue
        for target, line in _imports(path, root):
            if target.split(".")[0] in ("lightning", "pytorch_lightning"):
                bad.append(f"{path.relative_to(root)}:{line} imports {target}")
    return bad


def test_only_the_training_modules_import_lightning_in_sasha_models():
    """The models, policies, metrics and exports work without Lightning; training does not."""
    bad = _lightning_imports()
    assert not bad, f"Lightning outside {', '.join(LIGHTNING_MODULES)}:\n" + "\n".join(bad)


def test_the_lightning_check_catches_imports_in_functions(tmp_path):
    pkg = tmp_path / "sasha_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "lit.py").write_text("import lightning as L\n")  # allowed
    (pkg / "hafed.py").write_text("import torch\ndef fit():\n    import lightning.pytorch\n")
    (pkg / "metrics.py").write_text("from pytorch_lightning import Trainer\n")
    assert _lightning_imports(tmp_path) == [
        "sasha_models/hafed.py:3 imports lightning.pytorch",
        "sasha_models/metrics.py:1 imports pytorch_lightning",
        "sasha_models/metrics.py:1 imports pytorch_lightning.Trainer",
    ]


def test_the_layer_check_catches_upward_imports(tmp_path):
    """The checker itself: lazy, relative and absolute imports up the flow are all caught."""
    pkg = tmp_path / "sasha_env"
    for room in ("slides", "features", "envs"):
        (pkg / room).mkdir(parents=True)
        (pkg / room / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("from .features import store\n")  # base -> wing
    (pkg / "slides" / "grid.py").write_text(
        "from ..config import load_config\n"  # fine: down to the base
        "from .slide import Slide\n"  # fine: same wing
        "def f():\n    from ..envs.wsi import SashaWSIEnv\n"  # lazy, up two wings
    )
    (pkg / "features" / "store.py").write_text("import sasha_env.envs.render\n")
    found = _upward_imports(tmp_path)
    assert found == [
        "sasha_env/config.py:1 imports sasha_env.features",
        "sasha_env/config.py:1 imports sasha_env.features.store",
        "sasha_env/features/store.py:1 imports sasha_env.envs.render",
        "sasha_env/slides/grid.py:4 imports sasha_env.envs.wsi",
        "sasha_env/slides/grid.py:4 imports sasha_env.envs.wsi.SashaWSIEnv",
    ]


def _loaded_after(code: str, modules: tuple[str, ...] = ("lightning", "wandb")) -> dict[str, bool]:
    """Which of ``modules`` (Lightning and W&B) a fresh interpreter has loaded after ``code``."""
    probe = (
        code
        + f"\nimport sys, json\nprint(json.dumps({{m: m in sys.modules for m in {modules!r}}}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_registering_the_env_loads_no_lightning_or_wandb():
    loaded = _loaded_after(
        "import sasha_env, gymnasium; assert 'Sasha-WSI-v0' in gymnasium.registry"
    )
    assert loaded == {"lightning": False, "wandb": False}


def test_agent_config_loads_no_sb3():
    """The agents' config (read by config checks and stage plans) loads no training code."""
    loaded = _loaded_after(
        "from sasha_env.agents.config import AgentConfig; AgentConfig.from_dict({})",
        ("stable_baselines3", "sb3_contrib", "lightning", "wandb"),
    )
    assert not any(loaded.values()), loaded


def test_the_cli_parses_every_verb_without_lightning_or_wandb():
    """``sasha VERB`` imports a verb's wing only when the verb runs."""
    code = (
        "from sasha_env.cli import build_parser\n"
        "build_parser().parse_args(['predict', '--workdir', 'wd', 'slide.tiff'])"
    )
    assert _loaded_after(code) == {"lightning": False, "wandb": False}


@pytest.mark.parametrize("full", [False, True], ids=["sasha", "full"])
def test_predict_loads_no_lightning_or_wandb(tiny_workdir, full):
    wd = Workdir(tiny_workdir)
    slide = next(
        line.split(",")[1] for line in wd.manifest.read_text().splitlines()[1:] if ",test," in line
    )
    code = (
        "from sasha_env.predict import Predictor\n"
        f"p = Predictor({str(wd.root)!r}, frac=0.1, full={full})\n"
        f"record = p.predict({slide!r})\n"
        "assert record['probabilities']"
    )
    assert _loaded_after(code) == {"lightning": False, "wandb": False}


def test_public_api_resolves_without_lightning_or_wandb():
    import sasha_env

    names = [n for n in sasha_env.__all__ if n != "__version__"]
    code = f"from sasha_env import {', '.join(names)}\nassert callable(Pipeline) and callable(SashaWSIEnv)"
    assert _loaded_after(code) == {"lightning": False, "wandb": False}
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        sasha_env.Nope  # noqa: B018
