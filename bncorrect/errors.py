"""One exception hierarchy for bncorrect.

Every error a user can cause is a :class:`BncorrectError` whose message says what went wrong, names the
file involved and says what to do about it. The library raises these and never prints; only the CLI
catches them and turns them into an exit code (with a traceback only under ``--debug``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Who is calling: "api" (Python, the default) or "cli" (set by bncorrect.cli.main). Hints name options the
# way the caller spells them: ``trust_pickle=True`` in Python, ``--trust-pickle`` on the command line.
_INTERFACE: contextvars.ContextVar[str] = contextvars.ContextVar("bncorrect_interface", default="api")
_CLI_FLAGS = {("strict", False): "--non-strict"}


def current_interface() -> str:
    """``"cli"`` inside :func:`bncorrect.cli.main`, else ``"api"``."""
    return _INTERFACE.get()


@contextlib.contextmanager
def interface(name: str) -> Iterator[None]:
    """Within the block, hints speak ``"cli"`` (option flags) or ``"api"`` (keyword arguments)."""
    token = _INTERFACE.set(name)
    try:
        yield
    finally:
        _INTERFACE.reset(token)


def spell(option: str, value: Any = True) -> str:
    """An option as the caller writes it: ``spell("trust_pickle")`` is ``--trust-pickle`` for the CLI and
    ``trust_pickle=True`` for the Python API; ``spell("arch", "m:f")`` is ``--arch m:f`` / ``arch='m:f'``."""
    if current_interface() == "cli":
        flag = _CLI_FLAGS.get((option, value)) if isinstance(value, bool) else None
        if flag:
            return flag
        base = "--" + option.replace("_", "-")
        if isinstance(value, dict):
            return f"{base} '{json.dumps(value)}'"
        return base if value is True else f"{base} {value}"
    return f"{option}={value!r}"


def shorten(text: str, limit: int = 300) -> str:
    """``text`` on one line, cut at a word boundary (never mid-word) to at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    cut = flat[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + " …"


def torch_load_message(text: str, limit: int = 200) -> str:
    """A ``torch.load`` error without torch's advice to retry with ``weights_only=False`` (which would run
    the file's code; bncorrect says what to do instead), on one line, cut at a word boundary."""
    drop = ("weights_only", "Re-running `torch.load`", "Check the documentation", "In PyTorch 2.6")
    lines = [ln for ln in str(text).splitlines() if ln.strip() and not any(d in ln for d in drop)]
    return shorten(" ".join(lines) or "the file is not a readable checkpoint", limit)


class BncorrectError(Exception):
    """Base class: an error a user can fix. ``exit_code`` is what the CLI exits with.

    ``detail`` holds long diagnostic output (an exporter's log, a graph dump) that the CLI shows only under
    ``--debug``; the message itself stays short."""

    exit_code: int = 1

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        hint: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.hint = hint
        self.detail = detail
        super().__init__(self.render())

    def render(self) -> str:
        text = self.message
        if self.path is not None and self.path not in text:
            text = f"{self.path}: {text}"
        if self.hint:
            text = f"{text}\nFix: {self.hint}"
        return text


class UsageError(BncorrectError):
    """Options that do not fit together or are out of range."""

    exit_code = 2


class ModelLoadError(BncorrectError):
    """The model file is missing, unreadable, in an unknown format, or does not fit ``--arch``."""


class UntrustedPickleError(ModelLoadError):
    """Loading the file would execute pickled code and the user has not allowed it."""


class UntrustedArchError(ModelLoadError):
    """A checkpoint names an architecture factory the user has not confirmed (``arch`` / ``trust_arch``)."""


class NoBatchNormError(BncorrectError):
    """The model has no BatchNorm layer that can be corrected (or its BN was folded away)."""


class CorrectionsFileError(BncorrectError):
    """A corrections file is malformed or does not match the model."""


class DataError(BncorrectError):
    """The data is missing, empty, unreadable, unlabelled where labels are needed, or the wrong shape."""


class NumericalError(BncorrectError):
    """NaN/Inf in statistics or activations."""


class OnnxError(BncorrectError):
    """An ONNX graph cannot be rewritten, exported or verified."""


class VerificationError(OnnxError):
    """The exported graph does not reproduce the PyTorch model within tolerance."""
