"""Atomic output: write to a temporary file beside OUT, rename on success, remove on failure."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError


def check_output(out: str | Path, *inputs: str | Path | None) -> Path:
    """Refuse an OUT that would overwrite one of the inputs, or whose folder does not exist."""
    out = Path(out)
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp)
        if out.resolve() == inp.resolve() or (out.exists() and inp.exists() and out.samefile(inp)):
            raise UsageError(
                f"output {out} is the input file; bncorrect never overwrites its input",
                hint="choose a different -o/--output path",
            )
    if not out.parent.exists():
        raise UsageError(
            f"folder {out.parent} does not exist", path=out, hint=f"create it: mkdir -p {out.parent}"
        )
    return out


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target folder; on success it replaces ``path`` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
