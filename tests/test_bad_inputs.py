"""Bad input, as a careless user gives it: every case is one clean error.

Each case runs the real CLI in-process on a workspace of real files and asserts: an exit code that is
neither 0 nor the internal-error code 70, no traceback, a message that names the offending file, option or
layer and says what to do (``Fix:``, or click's ``Try '... --help'`` for option syntax), no file written,
and every input byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from safetensors.torch import save_file

import bncorrect
from bncorrect.models import CHECKPOINT_FORMAT

from . import toys

TOYS = Path(__file__).resolve().parent / "toys.py"
ARCH = f"{TOYS}:conv_net"


def _onnx_conv_bn(opset: int = 13) -> onnx.ModelProto:
    """x (N, 3, 8, 8) -> Conv(3->4) -> BatchNormalization -> Relu -> GlobalAveragePool -> y (N, 4, 1, 1)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, "bn.weight"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bn.bias"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bn.running_mean"),
        numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, "bn.running_var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node(
            "BatchNormalization",
            ["c", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
            ["b"],
            name="bn",
        ),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1, 1])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _checkpoint(ws: Path, name: str, **changes: object) -> None:
    sd = toys.conv_net(seed=0).state_dict()
    obj = {
        "format": CHECKPOINT_FORMAT,
        "arch": ARCH,
        "arch_kwargs": {},
        "state_dict": sd,
        "corrections": {"1": {"alpha": torch.tensor(0.1), "beta": torch.tensor(0.1)}},
        "meta": {},
    }
    obj.update(changes)
    torch.save(obj, ws / name)


def _corrections_file(ws: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(ws / name), metadata={"format": "bncorrect/1", "method": "hand-made"})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("bad_inputs")
    model = toys.conv_net(seed=0)
    torch.save(model.state_dict(), ws / "sd.pt")
    torch.save(toys.conv_net(seed=1).state_dict(), ws / "other.pt")
    torch.save(model, ws / "whole.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ws / "w.safetensors"))
    torch.save(toys.no_bn_net().state_dict(), ws / "nobn.pt")
    broken = model.state_dict()
    broken["5.running_var"] = broken["5.running_var"].clone()
    broken["5.running_var"][2] = float("nan")
    torch.save(broken, ws / "nan_stats.pt")
    negative = model.state_dict()
    negative["1.running_var"] = -negative["1.running_var"]
    torch.save(negative, ws / "neg_stats.pt")

    x, y = toys.data(32, seed=1)
    np.savez(ws / "data.npz", x=x.numpy(), y=y.numpy())
    np.savez(ws / "nolabel.npz", x=x.numpy())
    bad = x.numpy().copy()
    bad[3, 0, 0, 0] = np.nan
    np.savez(ws / "nan.npz", x=bad, y=y.numpy())
    np.savez(ws / "gray.npz", x=x[:, :1].numpy(), y=y.numpy())
    np.savez(ws / "nox.npz", z=x.numpy())
    np.savez(ws / "ylen.npz", x=x.numpy(), y=y[:5].numpy())
    save_file({"x": x.contiguous(), "y": y.contiguous()}, str(ws / "data.safetensors"))
    (ws / "text.pt").write_text("this is not a checkpoint\n")
    (ws / "empty.pt").write_bytes(b"")
    (ws / "notes.txt").write_text("hello\n")
    (ws / "afile").write_text("a plain file\n")
    (ws / "bad_factory.py").write_text(
        "def build():\n    raise RuntimeError('cannot reach the weights server')\n\n"
        "def not_a_model():\n    return 42\n"
    )

    _checkpoint(ws, "ckpt_nosd.pt", state_dict=None)
    _checkpoint(ws, "ckpt_badcorr.pt", corrections={"1": "0.5"})
    _checkpoint(ws, "ckpt_nancorr.pt", corrections={"1": {"alpha": torch.tensor(float("nan")), "beta": 0.1}})
    _checkpoint(ws, "ckpt_nolayer.pt", corrections={"99": {"alpha": torch.tensor(0.1), "beta": 0.1}})
    _checkpoint(ws, "ckpt_arch.pt")

    bncorrect.weight(ws / "sd.pt", 0.1, arch=ARCH, out=ws / "corr.safetensors")
    bncorrect.weight(ws / "other.pt", 0.1, arch=ARCH, out=ws / "corr_other.safetensors")
    _corrections_file(
        ws, "corr_range.safetensors", {"1.alpha": torch.tensor(2.0), "1.beta": torch.tensor(0.1)}
    )
    _corrections_file(
        ws, "corr_unknown.safetensors", {"99.alpha": torch.tensor(0.1), "99.beta": torch.tensor(0.1)}
    )

    for cls in ("a", "b"):
        (ws / "images" / cls).mkdir(parents=True)
        for i in range(3):
            arr = np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(arr).save(ws / "images" / cls / f"{i}.png")
    (ws / "images_loop" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ws / "images_loop" / "a" / "0.png")
    os.symlink("..", ws / "images_loop" / "a" / "up")
    (ws / "images_txt" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ws / "images_txt" / "a" / "0.png")
    (ws / "images_txt" / "a" / "readme.txt").write_text("not an image\n")
    (ws / "empty_dir").mkdir()
    (ws / "existing_dir").mkdir()
    os.symlink("data.safetensors", ws / "data_link.safetensors")

    onnx.save(_onnx_conv_bn(), ws / "model.onnx")
    m = _onnx_conv_bn()
    m.opset_import[0].version = 99
    onnx.save(m, ws / "opset99.onnx")
    m = _onnx_conv_bn()
    m.graph.initializer[1].dims[0] = 2**40
    onnx.save(m, ws / "huge_init.onnx")
    (ws / "garbage.onnx").write_bytes(b"\x00\x01 not a protobuf model \xff" * 10)
    m = _onnx_conv_bn()
    del m.graph.node[1]
    m.graph.node[1].input[0] = "c"
    onnx.save(m, ws / "folded.onnx")
    return ws


@pytest.fixture
def ws(pristine, tmp_path) -> Path:
    """A fresh copy of the workspace for each case (a case that wrongly writes cannot spoil the next)."""
    w = tmp_path / "w"
    shutil.copytree(pristine, w, symlinks=True)
    os.link(w / "sd.pt", w / "sd_hardlink.pt")
    return w


def _snapshot(ws: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(ws):  # does not follow the symlink loop
        for f in filenames:
            p = Path(dirpath) / f
            if p.is_symlink():
                out[str(p.relative_to(ws))] = "link:" + os.readlink(p)
            else:
                out[str(p.relative_to(ws))] = hashlib.sha256(p.read_bytes()).hexdigest()
        for d in dirnames:
            p = Path(dirpath) / d
            if p.is_symlink():
                out[str(p.relative_to(ws))] = "link:" + os.readlink(p)
    return out


M = ["--arch", ARCH]
SD = ["{w}/sd.pt", *M]
D = ["--data", "{w}/data.npz"]

# (id, argv, substrings the message must contain)
CASES: list[tuple[str, list[str], list[str]]] = [
    # ---- the model file
    ("inspect-missing", ["inspect", "{w}/nope.pt"], ["nope.pt", "not found"]),
    ("rule-missing", ["rule", "{w}/nope.pt", "-B", "2", "-o", "{w}/o.pt"], ["nope.pt", "not found"]),
    ("estimate-missing", ["estimate", "{w}/nope.pt", *D, "-B", "2"], ["nope.pt", "not found"]),
    ("inspect-folder", ["inspect", "{w}/existing_dir"], ["existing_dir", "folder"]),
    ("inspect-suffix", ["inspect", "{w}/notes.txt"], ["notes.txt", "unknown model format"]),
    ("inspect-text-pt", ["inspect", "{w}/text.pt"], ["text.pt", "not a PyTorch checkpoint"]),
    ("inspect-empty-pt", ["inspect", "{w}/empty.pt"], ["empty.pt", "empty"]),
    ("inspect-no-arch", ["inspect", "{w}/sd.pt"], ["sd.pt", "--arch"]),
    ("rule-no-arch", ["rule", "{w}/sd.pt", "-B", "2"], ["sd.pt", "--arch"]),
    ("inspect-safetensors-no-arch", ["inspect", "{w}/w.safetensors"], ["w.safetensors", "--arch"]),
    ("arch-no-colon", ["inspect", "{w}/sd.pt", "--arch", "toys"], ["--arch toys", "package.module:function"]),
    ("arch-no-module", ["inspect", "{w}/sd.pt", "--arch", "no_such_pkg_xyz:f"], ["no_such_pkg_xyz"]),
    ("arch-no-attr", ["inspect", "{w}/sd.pt", "--arch", f"{TOYS}:nope"], ["nope", "no attribute"]),
    (
        "arch-file-missing",
        ["inspect", "{w}/sd.pt", "--arch", "{w}/missing.py:f"],
        ["missing.py", "not found"],
    ),
    (
        "arch-factory-raises",
        ["inspect", "{w}/sd.pt", "--arch", "{w}/bad_factory.py:build"],
        ["weights server"],
    ),
    ("arch-not-module", ["inspect", "{w}/sd.pt", "--arch", "{w}/bad_factory.py:not_a_model"], ["nn.Module"]),
    ("arch-kwargs-json", ["inspect", *SD, "--arch-kwargs", "{bad"], ["--arch-kwargs", "JSON"]),
    ("arch-kwargs-list", ["inspect", *SD, "--arch-kwargs", "[1]"], ["--arch-kwargs", "JSON object"]),
    ("arch-kwargs-unknown", ["inspect", *SD, "--arch-kwargs", '{"nope": 1}'], ["nope", "--arch-kwargs"]),
    ("weights-do-not-fit", ["inspect", "{w}/sd.pt", "--arch", f"{TOYS}:conv1d_net"], ["sd.pt", "do not fit"]),
    ("pickle-untrusted", ["inspect", "{w}/whole.pt"], ["whole.pt", "--trust-pickle"]),
    (
        "pickle-untrusted-estimate",
        ["estimate", "{w}/whole.pt", *D, "-B", "2"],
        ["whole.pt", "--trust-pickle"],
    ),
    ("ckpt-untrusted-arch", ["inspect", "{w}/ckpt_arch.pt"], ["ckpt_arch.pt", "--trust-arch", "--arch"]),
    ("ckpt-no-state-dict", ["inspect", "{w}/ckpt_nosd.pt", "--trust-arch"], ["ckpt_nosd.pt", "state_dict"]),
    ("ckpt-corrections-type", ["inspect", "{w}/ckpt_badcorr.pt", *M], ["ckpt_badcorr.pt", "layer"]),
    (
        "ckpt-corrections-nan",
        ["inspect", "{w}/ckpt_nancorr.pt", *M],
        ["ckpt_nancorr.pt", "layer 1", "[0, 1]"],
    ),
    ("ckpt-unknown-layer", ["inspect", "{w}/ckpt_nolayer.pt", *M], ["ckpt_nolayer.pt", "99"]),
    ("nan-stats-rule", ["rule", "{w}/nan_stats.pt", *M, "-B", "2", "-o", "{w}/o.pt"], ["nan_stats.pt", "5"]),
    ("nan-stats-estimate", ["estimate", "{w}/nan_stats.pt", *M, *D, "-B", "2"], ["nan_stats.pt", "NaN"]),
    (
        "nan-stats-diagnose",
        ["diagnose", "{w}/nan_stats.pt", *M, *D, "-B", "2"],
        ["nan_stats.pt", "recalibrate"],
    ),
    ("neg-stats-sweep", ["sweep-alpha", "{w}/neg_stats.pt", *M, *D], ["neg_stats.pt", "negative"]),
    ("no-bn", ["rule", "{w}/nobn.pt", "--arch", f"{TOYS}:no_bn_net", "-B", "2"], ["nobn.pt", "BatchNorm"]),
    # ---- options
    ("rule-B0", ["rule", *SD, "-B", "0"], ["--train-batch-size 0"]),
    ("estimate-B0", ["estimate", *SD, *D, "-B", "0"], ["--train-batch-size 0"]),
    ("diagnose-B0", ["diagnose", *SD, *D, "-B", "0"], ["--train-batch-size 0"]),
    (
        "recalibrate-batch0",
        ["recalibrate", *SD, *D, "--upstream", "train", "--batch-size", "0"],
        ["--batch-size 0"],
    ),
    ("estimate-device", ["estimate", *SD, *D, "-B", "2", "--device", "banana"], ["--device banana"]),
    ("sweep-device", ["sweep-alpha", *SD, *D, "--device", "banana"], ["--device banana"]),
    ("weight-alpha-2", ["weight", *SD, "--alpha", "2"], ["--alpha 2", "[0, 1]"]),
    ("weight-alpha-nan", ["weight", *SD, "--alpha", "nan"], ["--alpha nan", "[0, 1]"]),
    (
        "layer-b-nomatch",
        ["estimate", *SD, *D, "-B", "2", "--layer-batch-size", "head.*=4"],
        ["head.*", "matches no"],
    ),
    (
        "layer-b-format",
        ["estimate", *SD, *D, "-B", "2", "--layer-batch-size", "head"],
        ["--layer-batch-size"],
    ),
    ("upstream-bogus", ["recalibrate", *SD, *D, "--upstream", "bogus"], ["--upstream bogus"]),
    ("recal-train-no-b", ["recalibrate", *SD, *D, "--upstream", "train"], ["--batch-size"]),
    (
        "input-shape-text",
        ["rule", *SD, "-B", "2", "-o", "{w}/o.onnx", "--input-shape", "a,b"],
        ["--input-shape"],
    ),
    (
        "input-shape-channels",
        ["rule", *SD, "-B", "2", "-o", "{w}/o.onnx", "--input-shape", "1,1,8,8"],
        ["channels"],
    ),
    ("onnx-no-shape", ["rule", *SD, "-B", "2", "-o", "{w}/o.onnx"], ["--input-shape"]),
    ("missing-required", ["estimate", *SD, *D], ["--train-batch-size"]),
    ("not-an-int", ["rule", *SD, "-B", "two"], ["--train-batch-size"]),
    # ---- outputs
    ("out-suffix", ["rule", *SD, "-B", "2", "-o", "{w}/o.txt"], ["o.txt", "suffix"]),
    ("out-is-folder", ["rule", *SD, "-B", "2", "-o", "{w}/existing_dir"], ["existing_dir", "folder"]),
    ("out-folder-missing", ["rule", *SD, "-B", "2", "-o", "{w}/nodir/o.pt"], ["nodir", "does not exist"]),
    ("out-under-a-file", ["rule", *SD, "-B", "2", "-o", "{w}/afile/o.pt"], ["afile", "not a folder"]),
    ("out-is-model", ["rule", *SD, "-B", "2", "-o", "{w}/sd.pt"], ["sd.pt", "never overwrites"]),
    ("out-hardlink-model", ["rule", *SD, "-B", "2", "-o", "{w}/sd_hardlink.pt"], ["sd_hardlink.pt", "MODEL"]),
    (
        "out-is-data",
        ["estimate", *SD, "--data", "{w}/data.safetensors", "-B", "2", "-o", "{w}/data.safetensors"],
        ["data.safetensors", "--data"],
    ),
    (
        "out-symlink-data",
        ["estimate", *SD, "--data", "{w}/data.safetensors", "-B", "2", "-o", "{w}/data_link.safetensors"],
        ["data_link.safetensors", "--data"],
    ),
    ("plot-is-data", ["sweep-alpha", *SD, *D, "--plot", "{w}/data.npz"], ["data.npz", "--plot"]),
    ("report-is-data", ["sweep-alpha", *SD, *D, "--report", "{w}/data.npz"], ["data.npz", "--report"]),
    (
        "out-equals-report",
        ["sweep-alpha", *SD, *D, "-o", "{w}/x.safetensors", "--report", "{w}/x.safetensors"],
        ["x.safetensors", "same file"],
    ),
    ("diagnose-plot-is-model", ["diagnose", *SD, *D, "-B", "2", "--plot", "{w}/sd.pt"], ["sd.pt", "--plot"]),
    (
        "out-inside-images",
        ["estimate", *SD, "--data", "{w}/images", "-B", "2", "-o", "{w}/images/a/c.safetensors"],
        ["images", "inside"],
    ),
    (
        "corrections-is-out",
        ["sweep-alpha", *SD, *D, "--corrections", "{w}/corr.safetensors", "-o", "{w}/corr.safetensors"],
        ["corr.safetensors"],
    ),
    (
        "apply-out-is-corrections",
        ["apply", *SD, "{w}/corr.safetensors", "-o", "{w}/corr.safetensors"],
        ["corr.safetensors", "same file"],
    ),
    ("onnx-to-pt", ["rule", "{w}/model.onnx", "-B", "2", "-o", "{w}/o.pt"], ["o.pt", "ONNX"]),
    ("demo-out-is-samples", ["demo", "--samples", "{w}/images", "--out-dir", "{w}/images"], ["images"]),
    # ---- data
    ("data-missing", ["estimate", *SD, "--data", "{w}/nope.npz", "-B", "2"], ["nope.npz"]),
    ("data-suffix", ["estimate", *SD, "--data", "{w}/notes.txt", "-B", "2"], ["notes.txt"]),
    ("data-no-x", ["estimate", *SD, "--data", "{w}/nox.npz", "-B", "2"], ["nox.npz", "x"]),
    ("data-nan", ["estimate", *SD, "--data", "{w}/nan.npz", "-B", "2"], ["nan.npz", "NaN"]),
    ("data-channels", ["estimate", *SD, "--data", "{w}/gray.npz", "-B", "2"], ["gray.npz", "channels"]),
    ("sweep-no-labels", ["sweep-alpha", *SD, "--data", "{w}/nolabel.npz"], ["nolabel.npz", "labels"]),
    ("data-y-length", ["sweep-alpha", *SD, "--data", "{w}/ylen.npz"], ["ylen.npz"]),
    ("images-symlink-loop", ["estimate", *SD, "--data", "{w}/images_loop", "-B", "2"], ["up", "loop"]),
    ("images-not-image", ["estimate", *SD, "--data", "{w}/images_txt", "-B", "2"], ["readme.txt"]),
    ("images-empty", ["estimate", *SD, "--data", "{w}/empty_dir", "-B", "2"], ["empty_dir"]),
    (
        "preprocess-missing",
        ["estimate", *SD, "--data", "{w}/images", "-B", "2", "--preprocess", "no_mod_xyz:f"],
        ["--preprocess no_mod_xyz:f"],
    ),
    (
        "preprocess-format",
        ["estimate", *SD, "--data", "{w}/images", "-B", "2", "--preprocess", "nocolon"],
        ["--preprocess nocolon"],
    ),
    # ---- corrections files
    ("corrections-missing", ["apply", *SD, "{w}/nope.safetensors"], ["nope.safetensors", "not found"]),
    ("corrections-not-ours", ["apply", *SD, "{w}/w.safetensors"], ["w.safetensors", "not a bncorrect"]),
    (
        "corrections-other-model",
        ["apply", *SD, "{w}/corr_other.safetensors", "-o", "{w}/o.pt"],
        ["corr_other.safetensors", "another model", "--force"],
    ),
    ("corrections-range", ["apply", *SD, "{w}/corr_range.safetensors"], ["corr_range.safetensors", "[0, 1]"]),
    (
        "corrections-unknown-layer",
        ["apply", *SD, "{w}/corr_unknown.safetensors"],
        ["corr_unknown.safetensors", "99"],
    ),
    (
        "sweep-corrections-other",
        ["sweep-alpha", *SD, *D, "--corrections", "{w}/corr_other.safetensors"],
        ["corr_other.safetensors", "--force"],
    ),
    (
        "diagnose-corrections-other",
        ["diagnose", *SD, *D, "-B", "2", "--corrections", "{w}/corr_other.safetensors"],
        ["corr_other.safetensors", "--force"],
    ),
    # ---- tune
    ("tune-B0", ["tune", *SD, *D, "-B", "0"], ["--train-batch-size 0"]),
    ("tune-holdout", ["tune", *SD, *D, "-B", "2", "--holdout", "1.5"], ["--holdout"]),
    ("tune-no-labels", ["tune", *SD, "--data", "{w}/nolabel.npz", "-B", "2"], ["nolabel.npz", "labels"]),
    ("tune-onnx", ["tune", "{w}/model.onnx", *D, "-B", "2"], ["model.onnx"]),
    (
        "tune-out-is-data",
        ["tune", *SD, "--data", "{w}/data.safetensors", "-B", "2", "-o", "{w}/data.safetensors"],
        ["data.safetensors", "--data"],
    ),
    # ---- ONNX
    (
        "onnx-opset-99",
        ["weight", "{w}/opset99.onnx", "--alpha", "0.1", "-o", "{w}/o.onnx"],
        ["opset99.onnx", "99"],
    ),
    (
        "onnx-huge-initializer",
        ["weight", "{w}/huge_init.onnx", "--alpha", "0.1", "-o", "{w}/o.onnx"],
        ["huge_init.onnx", "bn.weight"],
    ),
    ("onnx-garbage", ["inspect", "{w}/garbage.onnx"], ["garbage.onnx"]),
    ("onnx-folded", ["rule", "{w}/folded.onnx", "-B", "2"], ["folded.onnx", "BatchNorm"]),
    ("onnx-missing", ["inspect", "{w}/nope.onnx"], ["nope.onnx", "not found"]),
    (
        "budget-below-one",
        ["sweep-alpha", *SD, *D, "-o", "{w}/o.onnx", "--latency-budget", "0.5"],
        ["0.5", ">= 1"],
    ),
    (
        "budget-not-onnx",
        ["tune", *SD, *D, "-B", "2", "-o", "{w}/o.safetensors", "--latency-budget", "1.2"],
        ["o.safetensors", "--latency-budget", "onnx"],
    ),
    ("budget-no-out", ["sweep-alpha", *SD, *D, "--latency-budget", "1.2"], ["--latency-budget", "-o"]),
    (
        "budget-plot-alone",
        ["sweep-alpha", *SD, *D, "--budget-plot", "{w}/c.png"],
        ["--budget-plot", "--latency-budget"],
    ),
    (
        "budget-metric",
        ["sweep-alpha", *SD, *D, "-o", "{w}/o.onnx", "--latency-budget", "2", "--metric", "miou"],
        ["miou"],
    ),
    ("onnx-apply-other", ["apply", "{w}/model.onnx", "{w}/corr.safetensors"], ["model.onnx"]),
]


@pytest.mark.parametrize(("argv", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_error(cli, ws, argv, needles):
    before = _snapshot(ws)
    res = cli(*[a.replace("{w}", str(ws)) for a in argv])
    assert res.code not in (0, 70), (res.code, res.err)
    text = res.err + res.out
    assert "Traceback" not in text and "internal error" not in text, text
    assert "Fix:" in res.err or "Try 'bncorrect" in res.err, res.err
    for needle in needles:
        assert needle.replace("{w}", str(ws)) in res.err, (needle, res.err)
    assert _snapshot(ws) == before, "the failed command wrote or changed files"


def test_at_least_sixty_cases_over_every_command():
    assert len(CASES) >= 60
    from bncorrect.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    used = {argv[0] for _, argv, _ in CASES}
    assert commands - {"demo"} <= used | {"demo"}, commands - used


def test_inspect_marks_broken_statistics_not_correctable(cli, ws):
    res = cli("inspect", ws / "nan_stats.pt", *M, "--json")
    assert res.code == 0, res.err
    layers = {ly["name"]: ly for ly in json.loads(res.out)["layers"]}
    assert layers["5"]["correctable"] is False and "NaN" in layers["5"]["reason"]
    assert layers["1"]["correctable"] is True
    res = cli("inspect", ws / "nan_stats.pt", *M)
    assert res.code == 0 and "2 of 3" in res.out


def test_recalibrate_repairs_broken_statistics(cli, ws, tmp_path):
    """The fix the errors name works: recalibrate accepts a checkpoint with NaN statistics."""
    out = tmp_path / "fixed.safetensors"
    res = cli("recalibrate", ws / "nan_stats.pt", *M, *[a.replace("{w}", str(ws)) for a in D], "-o", out)
    assert res.code == 0, res.err
    corr = bncorrect.load_corrections(out)
    assert torch.isfinite(corr.layers["5"].running_var).all()


def test_broken_onnx_statistics_are_repaired_by_recalibrate_and_refused_otherwise(pristine, tmp_path):
    """An ONNX graph with a NaN running_var: recalibrate writes a graph with finite statistics that
    onnxruntime runs to finite outputs; a correction that does not replace the statistics is refused."""
    import onnxruntime as ort

    from bncorrect.errors import NumericalError

    m = _onnx_conv_bn()
    var = numpy_helper.to_array(m.graph.initializer[4]).copy()
    var[1] = np.nan
    m.graph.initializer[4].CopyFrom(numpy_helper.from_array(var, "bn.running_var"))
    broken = tmp_path / "broken.onnx"
    onnx.save(m, broken)
    layers = bncorrect.inspect(broken)
    assert layers[0]["correctable"] is False and "NaN" in layers[0]["reason"]
    with pytest.raises(NumericalError, match="recalibrate"):
        bncorrect.weight(broken, 0.1, out=tmp_path / "w.onnx")
    fixed = tmp_path / "fixed.onnx"
    out = bncorrect.recalibrate(broken, pristine / "data.npz", out=fixed)
    stats = out.corrections.layers[layers[0]["name"]]
    assert torch.isfinite(stats.running_var).all()
    sess = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
    x = np.load(pristine / "data.npz")["x"][:4]
    assert np.isfinite(sess.run(None, {"x": x})[0]).all()
    assert not (tmp_path / "w.onnx").exists()
