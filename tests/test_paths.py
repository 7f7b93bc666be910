"""bncorrect.paths: outputs against inputs and each other, as files, before any work; output permissions."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bncorrect.errors import UsageError
from bncorrect.paths import check_paths

# One way to reach the same file: a chain of steps, each a symlink, a hard link, a detour through "..",
# "./" or a symlinked folder.
STEPS = st.lists(st.sampled_from(["symlink", "hardlink", "dotdot", "dot", "dirlink"]), min_size=1, max_size=4)


def _alias(root: Path, target: Path, steps: list[str]) -> Path:
    """A path that names ``target`` through ``steps`` (created under ``root``)."""
    current = target
    for i, step in enumerate(steps):
        if step == "symlink":
            link = root / f"sym{i}{current.suffix}"
            os.symlink(current, link)
            current = link
        elif step == "hardlink":
            real = current.resolve()
            link = root / f"hard{i}{current.suffix}"
            os.link(real, link)
            current = link
        elif step == "dotdot":
            sub = root / f"sub{i}"
            sub.mkdir()
            current = sub / ".." / current.relative_to(root) if current.is_relative_to(root) else current
        elif step == "dot":
            current = Path(str(current.parent) + "/./" + current.name)
        elif step == "dirlink":
            link = root / f"dirlink{i}"
            os.symlink(current.parent, link, target_is_directory=True)
            current = link / current.name
    return current


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS, role=st.sampled_from(["model", "data", "corrections"]))
def test_every_alias_of_an_input_is_refused(steps, role):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        target = root / "input.safetensors"
        target.write_bytes(b"precious")
        alias = _alias(root, target, steps)
        assert alias.exists() and os.path.samefile(alias, target)
        with pytest.raises(UsageError, match="same file"):
            check_paths({role: target}, {"out": alias})
        with pytest.raises(UsageError, match="same file"):  # and the other way round
            check_paths({role: alias}, {"out": target})
        with pytest.raises(UsageError, match="same file"):  # two outputs that are one file
            check_paths({}, {"out": target, "report": alias})
        assert target.read_bytes() == b"precious"
        check_paths({role: target}, {"out": root / "other.safetensors"})  # a different file is fine


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(st.sampled_from(["dotdot", "dot", "dirlink"]), max_size=3), depth=st.integers(0, 2))
def test_outputs_inside_an_input_folder_are_refused(steps, depth):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        folder = root / "images" / "cat"
        folder.mkdir(parents=True)
        (folder / "0.png").write_bytes(b"png")
        inner = root / "images" / "/".join(["cat"] * min(depth, 1))
        out = _alias(root, inner / "new.safetensors", steps) if steps else inner / "new.safetensors"
        with pytest.raises(UsageError, match=r"inside the folder|same file"):
            check_paths({"data": root / "images"}, {"out": out})
        check_paths({"data": root / "images"}, {"out": root / "new.safetensors"})


def test_hard_link_to_a_file_inside_an_image_folder_is_refused(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    img = tmp_path / "images" / "a" / "0.png"
    img.write_bytes(b"png")
    os.link(img, tmp_path / "elsewhere.png")
    with pytest.raises(UsageError, match="same file"):
        check_paths({"data": tmp_path / "images"}, {"plot": tmp_path / "elsewhere.png"})


def test_existing_folder_missing_folder_and_file_as_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="existing folder"):
        check_paths({}, {"out": tmp_path})
    with pytest.raises(UsageError, match="does not exist"):
        check_paths({}, {"out": tmp_path / "no" / "o.pt"})
    with pytest.raises(UsageError, match="not a folder"):
        check_paths({}, {"out": tmp_path / "f" / "o.pt"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the write probe leaves nothing


def test_folder_outputs_overlapping_inputs(tmp_path):
    (tmp_path / "samples" / "s").mkdir(parents=True)
    (tmp_path / "samples" / "s" / "model.pt").write_bytes(b"m")
    for bad in (tmp_path / "samples", tmp_path / "samples" / "s", tmp_path / "samples" / "new"):
        with pytest.raises(UsageError, match="overlaps"):
            check_paths({"samples": tmp_path / "samples"}, folders={"out_dir": bad})
    check_paths({"samples": tmp_path / "samples"}, folders={"out_dir": tmp_path / "demo"})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the probe as another user")
def test_unwritable_folder_is_found_before_any_work():
    """As user 'nobody' (65534): a folder it cannot write is refused at once, with the folder named.

    (root writes anywhere, so the probe is run by a system Python as nobody, on a copy of the two modules
    it needs in a folder nobody can read.)"""
    import shutil

    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:  # pragma: no cover
        pytest.skip("no system python3 that nobody can run")
    pkg = Path(__file__).resolve().parents[1] / "bncorrect"
    with tempfile.TemporaryDirectory() as code_dir, tempfile.TemporaryDirectory() as d:
        (Path(code_dir) / "bncorrect").mkdir()
        (Path(code_dir) / "bncorrect" / "__init__.py").write_text("")
        for name in ("errors.py", "paths.py"):
            shutil.copy(pkg / name, Path(code_dir) / "bncorrect" / name)
        for p in (code_dir, d, *Path(code_dir).rglob("*")):
            os.chmod(p, 0o755 if Path(p).is_dir() else 0o644)
        code = (
            "import sys; from bncorrect.paths import check_paths\n"
            "from bncorrect.errors import UsageError\n"
            "try:\n"
            f"    check_paths({{}}, {{'out': {d!r} + '/o.pt'}})\n"
            "except UsageError as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        try:
            proc = subprocess.run(
                [python, "-c", code],
                user=65534,
                capture_output=True,
                text=True,
                timeout=60,
                cwd="/",
                env={"PYTHONPATH": code_dir, "PATH": "/usr/bin:/bin"},
            )
        except OSError as e:  # pragma: no cover - a sandbox without setuid
            pytest.skip(f"cannot switch user here: {e}")
        assert proc.returncode == 3, proc.stderr
        assert "cannot write to folder" in proc.stdout and d in proc.stdout
        assert os.listdir(d) == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".onnx"])
def test_outputs_respect_the_umask(tmp_path, suffix):
    import numpy as np
    import torch

    import bncorrect

    from . import toys

    sd = tmp_path / "sd.pt"
    torch.save(toys.conv_net().state_dict(), sd)
    x, y = toys.data(16)
    data = tmp_path / "d.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    arch = f"{Path(__file__).resolve().parent / 'toys.py'}:conv_net"
    old = os.umask(0o027)
    try:
        out = tmp_path / f"o{suffix}"
        bncorrect.api.sweep_alpha(
            sd,
            data,
            alphas=[0.0, 0.1],
            arch=arch,
            out=out,
            plot=tmp_path / "p.png",
            report=tmp_path / "r.json",
        )
    finally:
        os.umask(old)
    for p in (out, tmp_path / "p.png", tmp_path / "r.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p


@pytest.mark.parametrize(
    ("sig", "delay", "code", "word"),
    [
        (signal.SIGINT, 0.3, 130, "interrupted"),
        (signal.SIGINT, 0.9, 130, "interrupted"),
        (signal.SIGINT, 1.6, 130, "interrupted"),
        (signal.SIGINT, 2.4, 130, "interrupted"),
        (signal.SIGTERM, 1.2, 143, "terminated"),
    ],
)
def test_a_signal_during_start_up_exits_without_a_traceback(tmp_path, sig, delay, code, word):
    """Ctrl-C (SIGTERM) at any moment of start-up, including inside torch's C++ initialisation, where a
    Python exception would abort the process (pybind11 'terminate called ...', exit -6): exit code
    130 (143) and one line. Later ones land in the command (the sweep), which also ends with 130; one
    that lands after the command finished, during interpreter shutdown, ends the process by the signal
    (the shell's status is 130 / 143 all the same)."""
    exe = Path(sys.executable).parent / "bncorrect"
    sample = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "digits_b2" / "model.pt"
    proc = subprocess.Popen(
        [str(exe), "sweep-alpha", str(sample), "--data", str(sample.parent / "val.npz")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # pragma: no cover - a very fast machine finished first
        pytest.skip("the command finished before the signal")
    if proc.returncode == -sig:
        # The command had finished (its result printed) and the signal came while the interpreter was
        # shutting down, where Python has put back the default handlers: the process ends by the signal,
        # which the shell reports as the same exit status (130 / 143). Nothing may have been cut short.
        assert "nothing written" in err or "wrote" in err.lower(), err
    else:
        assert proc.returncode == code, err
        assert word in err or sig == signal.SIGTERM, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "terminate called" not in err
