"""Progress of passes over data: the callback the library reports to, and a console bar for it.

The library never prints: every pass calls ``progress(description, completed, total)`` (examples;
``total`` may be None) when given one. :class:`ConsoleProgress` is that callback as rich progress bars on
stderr, one per description (what the CLI shows, and what ``progress=True`` gives in Python);
:func:`progress_callback` turns the API's ``progress`` argument (None/False, True, or a callable) into a
callback for the duration of a command.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from .errors import UsageError

Progress = Callable[[str, int, "int | None"], None]


#: what a task counts, by the start of its description (passes count examples)
_UNITS = (("ONNX", "steps"), ("solve", "layers"))


class ConsoleProgress:
    """Rich progress bars on stderr, one task per description; call it as a progress callback."""

    def __init__(self, enabled: bool = True, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            console=console if console is not None else Console(stderr=True),
            transient=False,
            disable=not enabled,
        )
        self.tasks: dict[str, Any] = {}

    def __call__(self, description: str, completed: int, total: int | None) -> None:
        if description not in self.tasks:
            unit = next((u for prefix, u in _UNITS if description.startswith(prefix)), "examples")
            self.tasks[description] = self.progress.add_task(description, total=total, unit=unit)
        self.progress.update(self.tasks[description], completed=completed, total=total)

    def __enter__(self) -> ConsoleProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


@contextlib.contextmanager
def progress_callback(progress: Any) -> Iterator[Progress | None]:
    """``None``/``False``: no reporting; ``True``: a :class:`ConsoleProgress` on stderr for the block; a
    callable: itself."""
    if progress is None or progress is False:
        yield None
    elif progress is True:
        with ConsoleProgress() as bar:
            yield bar
    elif callable(progress):
        yield progress
    else:
        raise UsageError(
            f"progress must be True, False or a function (description, completed, total), got {progress!r}"
        )


__all__ = ["ConsoleProgress", "Progress", "progress_callback"]
