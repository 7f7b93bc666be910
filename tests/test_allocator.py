"""bncorrect.allocator: the command's passes reuse freed memory instead of faulting in fresh pages.

Each case runs in a fresh interpreter (the settings are process-wide and must come before torch
allocates); the page faults are the kernel's count for that process (``ru_minflt``), not a timing."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PASS = """
import resource, sys
if sys.argv[1] == "retain":
    from bncorrect.allocator import retain_freed_memory, status
    assert retain_freed_memory(), status()
import torch
from torch import nn
from bncorrect.estimation import estimate_alpha_beta
torch.manual_seed(0)
torch.set_num_threads(1)
w = 32
layers = []
for cin in (3, w, w):
    layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 4)).eval()
x = torch.randn(256, 3, 32, 32)
batches = [(x[i : i + 64],) for i in range(0, 256, 64)]
estimate_alpha_beta(model, batches[:2], 2)  # warm-up: the allocator's pools and torch's own caches
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
estimate_alpha_beta(model, batches, 2)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without malloc settings or the opt-out, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "BNCORRECT_ALLOCATOR"}
    return {**base, **(extra or {})}


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=_env(env),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


def _huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@glibc
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages: a fault may map 2 MiB, not 4 KiB")
def test_an_estimate_pass_stops_faulting_in_fresh_pages():
    """The same estimate pass (3 conv + BN layers, 32x32, 4 batches of 64) makes tens of thousands of minor
    page faults with glibc's defaults (activation-sized blocks given back to the kernel and mapped again)
    and few once freed blocks are kept: measured 46,000-90,000 against 260-5,400 (both vary from run to
    run)."""
    default = int(_python(PASS, "default"))
    retained = int(_python(PASS, "retain"))
    assert default > 20_000, default
    assert retained * 6 < default, (retained, default)


@glibc
def test_the_command_line_applies_it_and_respects_the_users_choice():
    code = (
        "import atexit, sys\n"
        "from bncorrect import allocator\n"
        "atexit.register(lambda: print(allocator.status()))\n"
        "sys.argv = ['bncorrect', '--help']\n"
        "from bncorrect._entry import main\n"
        "main()\n"
    )
    assert _python(code).splitlines()[-1].startswith("allocator: glibc malloc keeps freed blocks")
    chosen = _python(code, env={"MALLOC_TRIM_THRESHOLD_": "131072"}).splitlines()[-1]
    assert chosen == "allocator: left as it is (malloc settings in the environment (MALLOC_TRIM_THRESHOLD_))"
    tunables = _python(code, env={"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}).splitlines()[-1]
    assert "GLIBC_TUNABLES" in tunables and "left as it is" in tunables
    opted_out = _python(code, env={"BNCORRECT_ALLOCATOR": "system"}).splitlines()[-1]
    assert opted_out == "allocator: left as it is (BNCORRECT_ALLOCATOR=system)"


def test_the_library_alone_leaves_the_allocator_as_it_is():
    """Importing bncorrect and running its API changes no process-wide setting: that is the application's
    choice (the command line makes it)."""
    code = (
        "import torch, bncorrect\n"
        "from bncorrect import allocator, api, layers\n"
        "print(allocator.status())\n"
    )
    assert _python(code) == "allocator: as the system set it (retain_freed_memory not called)"


@glibc
def test_debug_says_what_the_command_did_with_the_allocator():
    exe = Path(sys.executable).parent / "bncorrect"
    sample = ROOT / "sample_checkpoints" / "digits_b2" / "model.pt"
    for extra, expected in (
        ({}, "allocator: glibc malloc keeps freed blocks"),
        ({"BNCORRECT_ALLOCATOR": "system"}, "allocator: left as it is (BNCORRECT_ALLOCATOR=system)"),
    ):
        proc = subprocess.run(
            [str(exe), "inspect", str(sample), "--debug"],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(extra),
        )
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stderr, proc.stderr
        assert "allocator" not in proc.stdout
