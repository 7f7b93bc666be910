"""Which files a command reads and writes, checked against each other before any work is done.

Every command names its inputs (MODEL, ``--data``, CORRECTIONS, the demo's samples) and its outputs
(OUT, ``--plot``, ``--report``, the demo's folder). :func:`check_paths` refuses, before any pass over data:

- an output that is an input, compared as files (after resolving symlinks and ``..``, and by device and
  inode, so a hard link is caught too), or that lies inside an input folder (an image folder: the new
  file would become data, or replace an image);
- two outputs that are the same file;
- an output that is an existing folder, or whose folder does not exist or cannot be written (probed by
  creating and removing a temporary file there, which is what writing will do: a permission check would
  be wrong for root and for ACLs).

Nothing is created or changed by the check itself, apart from the probe file it removes at once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from .errors import UsageError, current_interface

PathLike = str | os.PathLike[str]

# How each role is named in messages: on the command line, and in the Python API.
_CLI_NAMES = {
    "model": "MODEL",
    "data": "--data",
    "corrections": "the corrections file",
    "out": "-o/--output",
    "plot": "--plot",
    "report": "--report",
    "out_dir": "--out-dir",
    "samples": "--samples",
}


def role(name: str) -> str:
    """The role's name as the caller writes it (``-o/--output`` on the command line, ``out=`` in Python)."""
    if current_interface() == "cli":
        return _CLI_NAMES.get(name, "--" + name.replace("_", "-"))
    return f"{name}="


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _files_below(folder: Path, limit: int = 1_000_000) -> Iterator[Path]:
    """Files below ``folder``, following symlinks, each folder visited once (loops are not followed)."""
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    count = 0
    while stack:
        d = stack.pop()
        key = _identity(d)
        if key is None or key in seen:
            continue
        seen.add(key)
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            p = Path(e.path)
            try:
                if e.is_dir():
                    stack.append(p)
                    continue
            except OSError:
                continue
            count += 1
            if count > limit:
                return
            yield p


def check_paths(
    reads: Mapping[str, PathLike | None] | None = None,
    writes: Mapping[str, PathLike | None] | None = None,
    *,
    folders: Mapping[str, PathLike | None] | None = None,
) -> dict[str, Path]:
    """Check the outputs ``writes`` (role -> path) against the inputs ``reads`` (role -> file or folder)
    and against each other (module docstring); ``folders`` are output folders (the demo's). Returns the
    outputs as :class:`Path`. Raises :class:`UsageError` naming both paths and the way out."""
    read_files: list[tuple[str, Path, tuple[int, int] | None]] = []
    read_dirs: list[tuple[str, Path]] = []
    for name, p in (reads or {}).items():
        if p is None:
            continue
        path = Path(p)
        if path.is_dir():
            read_dirs.append((name, path.resolve()))
            read_files.extend((name, f, _identity(f)) for f in _files_below(path))
        elif path.exists():
            read_files.append((name, path, _identity(path)))
    outs: dict[str, Path] = {}
    seen: list[tuple[str, Path, tuple[int, int] | None]] = []
    for name, p in (writes or {}).items():
        if p is None:
            continue
        out = Path(p)
        resolved = out.resolve()
        ident = _identity(out)
        for rname, rpath, rident in read_files:
            if resolved == rpath.resolve() or (ident is not None and ident == rident):
                raise UsageError(
                    f"{role(name)} {out} is the same file as {role(rname)} {rpath}; bncorrect never "
                    "overwrites what it reads",
                    path=out,
                    hint=f"choose another path for {role(name)}",
                )
        for rname, rdir in read_dirs:
            if resolved == rdir or rdir in resolved.parents:
                raise UsageError(
                    f"{role(name)} {out} lies inside the folder {role(rname)} {rdir}: it would be read as "
                    "input next time, or replace one",
                    path=out,
                    hint=f"write {role(name)} outside {rdir}",
                )
        for oname, opath, oident in seen:
            if resolved == opath.resolve() or (ident is not None and ident == oident):
                raise UsageError(
                    f"{role(name)} and {role(oname)} are the same file ({out}); one would replace the other",
                    path=out,
                    hint="give each output its own path",
                )
        if out.is_dir():
            raise UsageError(
                f"{role(name)} {out} is an existing folder, not a file name",
                path=out,
                hint=f"name a file inside it, e.g. {out / ('corrected' + _suffix_example(name))}",
            )
        _check_writable_folder(out.parent, name, out)
        seen.append((name, out, ident))
        outs[name] = out
    for name, p in (folders or {}).items():
        if p is None:
            continue
        folder = Path(p)
        resolved = folder.resolve()
        for rname, rdir in read_dirs:
            if resolved == rdir or rdir in resolved.parents or resolved in rdir.parents:
                raise UsageError(
                    f"{role(name)} {folder} overlaps the folder {role(rname)} {rdir} that bncorrect reads",
                    path=folder,
                    hint=f"choose a {role(name)} outside {rdir}",
                )
        for rname, rpath, _ in read_files:
            if rpath.resolve().parent == resolved or resolved in rpath.resolve().parents:
                raise UsageError(
                    f"{role(name)} {folder} holds {role(rname)} {rpath}, which bncorrect reads",
                    path=folder,
                    hint=f"choose a {role(name)} that holds none of the inputs",
                )
        if folder.exists() and not folder.is_dir():
            raise UsageError(
                f"{role(name)} {folder} is a file, not a folder",
                path=folder,
                hint=f"name a folder for {role(name)} (it is created when missing)",
            )
        parent = folder if folder.is_dir() else _existing_parent(folder)
        _check_writable_folder(parent, name, folder)
        outs[name] = folder
    return outs


def _suffix_example(name: str) -> str:
    return {"plot": ".png", "report": ".json"}.get(name, ".safetensors")


def _existing_parent(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_folder(folder: Path, name: str, out: Path) -> None:
    folder = folder if str(folder) else Path(".")
    if not folder.exists():
        raise UsageError(
            f"folder {folder} (of {role(name)} {out}) does not exist",
            path=out,
            hint=f"create it first: mkdir -p {folder}",
        )
    if not folder.is_dir():
        raise UsageError(
            f"{folder} (in {role(name)} {out}) is a file, not a folder",
            path=out,
            hint=f"choose a {role(name)} in an existing folder",
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".bncorrect-probe-", dir=folder)
    except OSError as e:
        raise UsageError(
            f"cannot write to folder {folder} ({e.strerror or e})",
            path=out,
            hint=f"choose a {role(name)} in a folder you can write to",
        ) from None
    os.close(fd)
    os.unlink(probe)


__all__ = ["check_paths", "role"]
