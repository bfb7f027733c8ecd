"""Write one API reference page per public module of ``src/`` (run by mkdocs-gen-files).

Walking the source tree, rather than listing modules by hand, keeps the reference in step
with the code: a module that moves or is added gets its page at the next build.
"""

from pathlib import Path

import mkdocs_gen_files

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGES = ("sasha_env", "sasha_models")

nav = mkdocs_gen_files.Nav()
for package in PACKAGES:
    for path in sorted((SRC / package).rglob("*.py")):
        module = path.relative_to(SRC).with_suffix("")
        parts = tuple(module.parts)
        if parts[-1] == "__main__" or any(p.startswith("_") and p != "__init__" for p in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
            doc_path = Path(*parts, "index.md")
        else:
            doc_path = module.with_suffix(".md")
        nav[parts] = doc_path.as_posix()
        with mkdocs_gen_files.open(Path("reference", doc_path), "w") as fd:
            fd.write(f"::: {'.'.join(parts)}\n")
        mkdocs_gen_files.set_edit_path(Path("reference", doc_path), path.relative_to(SRC.parent))

OVERVIEW = """# API reference

Generated from the docstrings, one page per module. Two packages:

- [`sasha_env`](sasha_env/index.md) — the world the agent lives in and the user-facing side:
  slides, features and the store, the `Sasha-WSI-v0` environment, agents, the pipeline,
  `predict` and the `sasha` command. `import sasha_env` registers the environment and exposes
  the public names (`SashaWSIEnv`, `FeatureStore`, `Pipeline`, `Study`, `train_agent`,
  `AgentConfig`, `run_episodes`, `Predictor`, ...) without loading Lightning or W&B.
- [`sasha_models`](sasha_models/index.md) — the model zoo (HAFED, TSU, MIL baselines, the
  actor-critic, metrics, calibration); it imports nothing from `sasha_env`.

Where each piece lives and why: [Design](../design.md).
"""

with mkdocs_gen_files.open("reference/index.md", "w") as fd:
    fd.write(OVERVIEW)

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as nav_file:
    nav_file.write("* [Overview](index.md)\n")
    nav_file.writelines(nav.build_literate_nav())
