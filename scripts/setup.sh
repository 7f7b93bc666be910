#!/usr/bin/env bash
# Set up bncorrect in ./.venv: the CPU build of torch first (when no torch is importable), then the package
# with its dev extra. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # A pinned CPU build: on the project's machines it is installed from local disk; a plain `torch`
  # requirement would pull a multi-GB CUDA build.
  # numpy with it: importing torch without numpy prints "Failed to initialize NumPy"
  .venv/bin/pip install -q "torch==2.13.0" numpy 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -c "import torch" || { echo "torch failed to install" >&2; exit 1; }
fi
.venv/bin/pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import bncorrect, onnxruntime, typer" || { echo "bncorrect failed to install" >&2; exit 1; }
