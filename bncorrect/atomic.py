"""Atomic output: write to a temporary file beside OUT, rename on success, remove on failure."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def check_output(out: str | Path, *inputs: str | Path | None) -> Path:
    """Refuse an OUT that would overwrite one of the inputs, or that cannot be written
    (:func:`bncorrect.paths.check_paths`, which commands call with all their paths at once)."""
    from .paths import check_paths

    return check_paths({f"input {i + 1}": p for i, p in enumerate(inputs)}, {"out": out})["out"]


def default_mode() -> int:
    """The permissions a new file gets from ``open()``: 0o666 less the umask (as every other tool)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target folder; on success it replaces ``path`` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, default_mode())  # mkstemp makes 0600 files
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON (no NaN/Inf: strict JSON) to ``path`` after :func:`check_output`,
    atomically (nothing half-written)."""
    path = check_output(path)
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
