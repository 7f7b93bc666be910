"""The ``bncorrect`` console script: import the command line and run it, so that Ctrl-C (or SIGTERM)
while Python is still importing torch ends with exit code 130 (143) and one line, not a traceback."""

from __future__ import annotations

import signal
import sys


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        from .cli import main as cli_main

        code = cli_main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
