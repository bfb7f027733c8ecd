"""Writing files so that readers see the old content or the new one, never a half-written file."""

from __future__ import annotations

import csv
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PartialCSV", "replace_atomically", "temp_path", "write_json"]


def temp_path(path: Path) -> Path:
    """A fresh hidden temporary name next to ``path``: ``.<name>.<pid>.<random>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The folder is created when missing; a failed ``write`` leaves ``path`` untouched and no
    temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (non-JSON values as strings), atomically."""
    text = json.dumps(obj, indent=indent, default=str) + "\n"
    replace_atomically(path, lambda tmp: tmp.write_text(text))


class PartialCSV:
    """A CSV written row by row under ``.<name>.partial`` and renamed to ``path`` by :meth:`close`
    (a killed run never leaves a half-written file under the real name)."""

    def __init__(self, path: str | os.PathLike, header: list[str]) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.file = self.partial.open("w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(header)

    def write(self, row: list) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self.partial.replace(self.path)
