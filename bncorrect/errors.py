"""One exception hierarchy for bncorrect.

Every error a user can cause is a :class:`BncorrectError` whose message says what went wrong, names the
file involved and says what to do about it. The library raises these and never prints; only the CLI
catches them and turns them into an exit code (with a traceback only under ``--debug``).
"""

from __future__ import annotations

from pathlib import Path


class BncorrectError(Exception):
    """Base class: an error a user can fix. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.hint = hint
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
