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
            fd.write(f"# `{'.'.join(parts)}`\n\n::: {'.'.join(parts)}\n")
        mkdocs_gen_files.set_edit_path(Path("reference", doc_path), path.relative_to(SRC.parent))

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as nav_file:
    nav_file.writelines(nav.build_literate_nav())
