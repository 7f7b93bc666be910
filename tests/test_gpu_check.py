"""scripts/gpu_check.py runs (on the CPU, tiny sizes): its GPU numbers are measured only on a GPU machine,
but its code path, checks and output are exercised here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny",
         "--skip-samples", "--images", "12"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    for what in (
        "plain eval pass",
        "estimate (B = 8)",
        "recalibrate eval",
        "recalibrate train",
        "sweep-alpha",
    ):
        assert what in out and "images/s" in out
    assert "sweep speed ratio" in out
    assert out.count("PASS") == 4 and "FAIL" not in out
    assert "0 checks failed" in out


def test_gpu_check_refuses_cuda_without_a_gpu():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "CUDA is not available" in proc.stdout
