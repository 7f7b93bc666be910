"""Files that try to run code: each test proves with a marker file that nothing ran.

A bncorrect checkpoint records its architecture factory; a hostile (or merely foreign) file can name any
callable. Loading must never import or call it without the user's consent (the same ``arch`` passed, or
``trust_arch``), never import from the working folder by itself, and pickles run only with
``trust_pickle``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bncorrect
from bncorrect.errors import DataError, UntrustedArchError, UntrustedPickleError
from bncorrect.models import CHECKPOINT_FORMAT

from . import toys

TOYS = Path(__file__).resolve().parent / "toys.py"
ARCH = f"{TOYS}:conv_net"
BIN = Path(sys.executable).parent / "bncorrect"


def _hostile_checkpoint(path: Path, arch: str, arch_kwargs: dict | None = None) -> Path:
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "arch": arch,
            "arch_kwargs": arch_kwargs or {},
            "state_dict": toys.conv_net().state_dict(),
            "corrections": {},
            "meta": {},
        },
        path,
    )
    return path


def _evil_module(folder: Path, marker: Path, name: str = "evil") -> Path:
    src = folder / f"{name}.py"
    src.write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "def build(**kw):\n"
        f"    open({str(marker)!r}, 'w').write('called')\n"
        "    import torch\n"
        "    return torch.nn.BatchNorm2d(3)\n"
    )
    return src


def test_os_system_named_by_a_checkpoint_never_runs(tmp_path, cli):
    marker = tmp_path / "pwned"
    ckpt = _hostile_checkpoint(tmp_path / "m.pt", "os:system", {"command": f"touch {marker}"})
    with pytest.raises(UntrustedArchError) as info:
        bncorrect.load(ckpt)
    msg = str(info.value)
    assert "os:system" in msg and "touch" in msg  # the factory and its arguments are shown
    assert "arch='os:system'" in msg and "trust_arch=True" in msg  # both ways forward, in Python's words
    for command in (["inspect"], ["rule", "-B", "2"], ["weight", "--alpha", "0.1"]):
        res = cli(command[0], ckpt, *command[1:])
        assert res.code == 1 and "--trust-arch" in res.err and "--arch os:system" in res.err
    assert not marker.exists()


def test_a_python_file_named_by_a_checkpoint_is_not_executed(tmp_path, cli):
    marker = tmp_path / "pwned"
    evil = _evil_module(tmp_path, marker)
    ckpt = _hostile_checkpoint(tmp_path / "m.pt", f"{evil}:build")
    res = cli("inspect", ckpt)
    assert res.code == 1 and str(evil) in res.err
    with pytest.raises(UntrustedArchError):
        bncorrect.load(ckpt)
    assert not marker.exists()


def test_code_interact_is_refused_without_reading_stdin(tmp_path):
    ckpt = _hostile_checkpoint(tmp_path / "m.pt", "code:interact")
    proc = subprocess.run(
        [str(BIN), "inspect", str(ckpt)],
        input="import os; os.system('touch should-not-exist')\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    assert "code:interact" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "should-not-exist").exists()


def test_the_working_folder_is_never_searched_implicitly(tmp_path):
    """``zoo:build`` recorded in a file, or even given as --arch, does not import ./zoo.py."""
    marker = tmp_path / "pwned"
    _evil_module(tmp_path, marker, name="zoo")
    ckpt = _hostile_checkpoint(tmp_path / "m.pt", "zoo:build")
    sd = tmp_path / "sd.pt"
    torch.save(toys.conv_net().state_dict(), sd)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for argv in (["inspect", str(ckpt)], ["inspect", str(sd), "--arch", "zoo:build"]):
        proc = subprocess.run(
            [str(BIN), *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
        )
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not marker.exists(), argv
    assert "./zoo.py:build" in proc.stderr  # the explicit way is named: the file itself


def test_preprocess_from_the_working_folder_is_not_imported(tmp_path):
    marker = tmp_path / "pwned"
    _evil_module(tmp_path, marker, name="prep")
    (tmp_path / "images" / "a").mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a" / "0.png")
    sd = tmp_path / "sd.pt"
    torch.save(toys.conv_net().state_dict(), sd)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [
            str(BIN),
            "estimate",
            str(sd),
            "--arch",
            ARCH,
            "--data",
            "images",
            "-B",
            "1",
            "--preprocess",
            "prep:build",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 2 and "--preprocess ./prep.py:build" in proc.stderr, proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("where", ["model", "data"])
def test_pickles_with_a_reduce_payload_never_run(tmp_path, cli, where):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as f:
        pickle.dump({"x": Payload(), "y": torch.zeros(2)}, f, protocol=2)
    if where == "model":
        with pytest.raises(UntrustedPickleError, match="trust_pickle=True"):
            bncorrect.load(bad)
        res = cli("inspect", bad)
        assert res.code == 1 and "--trust-pickle" in res.err
    else:
        from bncorrect.data import load_data

        with pytest.raises(DataError):
            load_data(bad)
        sd = tmp_path / "sd.pt"
        torch.save(toys.conv_net().state_dict(), sd)
        res = cli("estimate", sd, "--arch", ARCH, "--data", bad, "-B", "2")
        assert res.code == 1 and "bad.pt" in res.err and "Traceback" not in res.err
    assert not marker.exists()


def test_consent_builds_the_recorded_architecture(tmp_path, cli):
    """With consent (the same --arch, or --trust-arch) a checkpoint written with --arch-kwargs reads back,
    with its recorded arch_kwargs, from the CLI and from Python."""
    sd = tmp_path / "sd.pt"
    model = toys.conv_net(seed=0, dropout=0.25)
    torch.save(model.state_dict(), sd)
    out = tmp_path / "rule.pt"
    res = cli("rule", sd, "--arch", ARCH, "--arch-kwargs", '{"dropout": 0.25}', "-B", "2", "-o", out)
    assert res.code == 0, res.err
    res = cli("inspect", out)  # no consent: refused, naming the factory and its kwargs
    assert res.code == 1 and ARCH in res.err and '"dropout": 0.25' in res.err
    res = cli("inspect", out, "--arch", ARCH, "--json")
    assert res.code == 0, res.err
    res = cli("inspect", out, "--trust-arch")
    assert res.code == 0 and "recorded in the file" in res.err
    x, _ = toys.data(4)
    expected = bncorrect.rule(model, 2).model(x)
    for loaded in (bncorrect.load(out, arch=ARCH), bncorrect.load(out, trust_arch=True)):
        assert loaded[3].p == 0.25  # the recorded arch_kwargs were used
        assert loaded[1].alpha.item() == pytest.approx(0.25)
        torch.testing.assert_close(loaded(x), expected)


def test_builtin_sample_architectures_need_no_consent():
    sample = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "digits_b2" / "model.pt"
    model = bncorrect.load(sample)
    assert isinstance(model, torch.nn.Module) and not model.training


def test_builtin_names_with_odd_kwargs_still_need_consent(tmp_path):
    ckpt = _hostile_checkpoint(tmp_path / "m.pt", "bncorrect.sample_models:digits_cnn", {"width": [1, 2]})
    with pytest.raises(UntrustedArchError):
        bncorrect.load(ckpt)
