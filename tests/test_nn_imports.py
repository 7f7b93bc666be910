from __future__ import annotations

import subprocess
import sys


def test_import_bncorrect_does_not_import_the_training_layers():
    code = "import sys, bncorrect; print(sorted(m for m in sys.modules if m.startswith('bncorrect.nn')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_public_names():
    import bncorrect.nn as bnn

    for name in bnn.__all__:
        assert getattr(bnn, name) is not None
    assert {"GhostBatchNorm2d", "BatchRenorm2d", "BatchGroupNorm2d", "FullBatchNorm", "param_groups"} <= set(
        bnn.__all__
    )
