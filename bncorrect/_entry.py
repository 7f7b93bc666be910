"""The ``bncorrect`` console script: import the command line and run it, so that Ctrl-C (or SIGTERM)
while Python is still importing torch ends with exit code 130 (143) and one line, not a traceback.

During the imports a signal ends the process at once (``os._exit``): nothing has been opened or written
yet, and a Python exception raised inside torch's C++ start-up (pybind11 callbacks) would not unwind but
abort the process (``terminate called after throwing an instance of 'pybind11::error_already_set'``,
exit -6) or leave half-initialised modules behind. Once the imports are done, Ctrl-C raises
KeyboardInterrupt again, which the command line turns into exit code 130 after its clean-up (staged
outputs removed, inputs untouched)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _exit_now(signum: int, frame: object) -> None:
    os.write(2, b"interrupted\n" if signum == signal.SIGINT else b"terminated\n")
    os._exit(128 + signum)


def _exit_flushed(signum: int, frame: object) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe
            stream.flush()
    _exit_now(signum, frame)


def main() -> None:
    from .allocator import retain_freed_memory

    retain_freed_memory()  # before torch allocates anything: the command's passes reuse freed memory
    signal.signal(signal.SIGINT, _exit_now)
    signal.signal(signal.SIGTERM, _exit_now)
    try:
        import torch  # noqa: F401  (every command imports it; here, under the start-up handlers)

        from .cli import main as cli_main
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _terminated)
    try:
        try:
            code = cli_main()
        finally:
            # The command has ended (outputs committed or removed): a signal from now on cuts nothing
            # short, so it ends the process at once with its exit status instead of raising into the
            # interpreter's shutdown. Late in the shutdown Python puts the default handlers back; the
            # process then ends by the signal, which the shell reports with the same status (130/143).
            signal.signal(signal.SIGINT, _exit_flushed)
            signal.signal(signal.SIGTERM, _exit_flushed)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
