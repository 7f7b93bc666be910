from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from . import toys

ROOT = Path(__file__).resolve().parents[1]
TOYS = Path(__file__).resolve().parent / "toys.py"


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run the real CLI entry point in-process; returns exit code and captured output."""
    from bncorrect.cli import main

    def run(*args: object) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def cli_subprocess():
    """Run ``python -m bncorrect`` in a child process (checks exit codes and absence of tracebacks)."""

    def run(*args: object, cwd: Path | None = None) -> CliResult:
        proc = subprocess.run(
            [sys.executable, "-m", "bncorrect", *[str(a) for a in args]],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=300,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture
def toy_files(tmp_path):
    """A state dict, a pickled module, safetensors weights and labelled data for tests/toys.py:conv_net."""
    from safetensors.torch import save_file

    model = toys.conv_net(seed=0)
    sd = tmp_path / "weights.pt"
    torch.save(model.state_dict(), sd)
    whole = tmp_path / "whole.pt"
    torch.save(model, whole)
    st = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    x, y = toys.data(64, seed=1)
    data = tmp_path / "data.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    return {
        "model": model,
        "state_dict": sd,
        "pickled": whole,
        "safetensors": st,
        "data": data,
        "arch": f"{TOYS}:conv_net",
        "dir": tmp_path,
    }
