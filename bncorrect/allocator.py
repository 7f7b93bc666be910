"""The process's memory allocator: keep freed memory for reuse instead of handing it back to the kernel.

glibc's ``malloc`` serves large blocks from fresh ``mmap`` mappings and trims its heap as soon as more than
``M_TRIM_THRESHOLD`` bytes are free at its top (both thresholds adjust themselves at run time, starting at
128 KiB). A data pass allocates and frees the same activation-sized tensors at every layer of every batch,
so with those defaults many of them are fresh pages each time: the kernel maps and zero-fills every 4 KiB
page at its first touch (a minor page fault), and the arithmetic then runs on cold memory. A pass that makes
more temporaries than a plain eval loop (per-example statistics, the estimator's samples) pays for it more:
measured on the PNG-folder benchmark (``benchmarks/bench_loading.py``, ResNet-style net, 2048 images of
32x32, B = 2), ``estimate`` took 450,000-500,000 minor page faults per pass (1.2 s of kernel time) against
100,000-120,000 for the plain loop, and its batches 259-326 ms against 178-229 ms; with the settings below
both made fewer than 50 faults and the batches took 197-217 against 177-185 ms.

:func:`retain_freed_memory` sets, through ``mallopt``, ``M_MMAP_THRESHOLD`` to glibc's largest value (blocks
up to 32 MiB come from the heap, where a freed block is reused) and ``M_TRIM_THRESHOLD`` to 1 GiB (the heap
gives memory back only when that much is free at its top): what a caching allocator (jemalloc, tcmalloc,
PyTorch's own CUDA allocator) does. The process then keeps up to its peak heap size mapped until it exits.
The ``bncorrect`` command calls it at start-up; the library never does (a process-wide setting is the
application's choice): call it yourself, first thing, in a script that runs passes over data.

Nothing is changed where it would not be glibc's malloc or where the user has chosen already: another
libc, an allocator preloaded with ``LD_PRELOAD`` (jemalloc, tcmalloc, mimalloc), glibc malloc settings in
the environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
``MALLOC_MMAP_MAX_``, or ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``), or ``BNCORRECT_ALLOCATOR=system``.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: the largest M_MMAP_THRESHOLD glibc accepts on 64-bit hosts (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD = 32 << 20
#: free memory the heap keeps at its top before giving it back
TRIM_THRESHOLD = 1 << 30

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_state: dict[str, str] = {}


def _reason_to_leave() -> str | None:
    """Why the allocator is left as it is (None: it is glibc's, with no settings chosen by the user)."""
    if os.environ.get("BNCORRECT_ALLOCATOR", "").strip().lower() == "system":
        return "BNCORRECT_ALLOCATOR=system"
    chosen = [k for k in _USER_SETTINGS if k in os.environ]
    if chosen or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return f"malloc settings in the environment ({', '.join(chosen) or 'GLIBC_TUNABLES'})"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "an allocator preloaded with LD_PRELOAD"
    if not _glibc():
        return "not glibc's malloc"
    return None


def _glibc() -> bool:
    """Whether the C library this process runs on is glibc (asked of the library itself, not read from the
    interpreter's binary)."""
    try:
        return platform.system() == "Linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr, or a libc that does not know the name
        return False


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse (see the module docstring); returns
    whether the settings were applied. Process-wide and meant for start-up; calling it again is harmless."""
    if "applied" in _state:
        return _state["applied"] == "yes"
    reason = _reason_to_leave()
    ok = False
    if reason is None:
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # the mmap threshold first: setting either turns off glibc's own adjustment of both
            ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            )
            reason = None if ok else "mallopt refused the settings"
        except (OSError, AttributeError):  # pragma: no cover - a libc without mallopt
            reason = "no mallopt in this C library"
    _state["applied"] = "yes" if ok else "no"
    _state["reason"] = reason or ""
    return ok


def status() -> str:
    """One line for ``--debug`` output and reports: what :func:`retain_freed_memory` did."""
    if "applied" not in _state:
        return "allocator: as the system set it (retain_freed_memory not called)"
    if _state["applied"] == "yes":
        return (
            f"allocator: glibc malloc keeps freed blocks (M_MMAP_THRESHOLD {MMAP_THRESHOLD >> 20} MiB, "
            f"M_TRIM_THRESHOLD {TRIM_THRESHOLD >> 20} MiB)"
        )
    return f"allocator: left as it is ({_state['reason']})"
