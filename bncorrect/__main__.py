"""``python -m bncorrect`` runs the command line."""

from __future__ import annotations

from ._entry import main

main()
