from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bncorrect import load, load_corrections
from bncorrect.cli import app
from bncorrect.layers import CorrectedNorm, coefficients

from . import toys

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_commands_exist():
    assert {"inspect", "rule", "weight", "apply", "estimate", "recalibrate"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(cli, command):
    res = cli(command, "--help")
    assert res.code == 0
    assert "Usage" in res.out and len(res.out) > 200


def test_top_level_help_and_version(cli):
    res = cli("--help")
    assert res.code == 0 and all(c in res.out for c in COMMANDS)
    assert cli("--version").out.strip().startswith("bncorrect ")


def test_inspect_table_and_json(cli, toy_files):
    res = cli("inspect", toy_files["state_dict"], "--arch", toy_files["arch"])
    assert res.code == 0 and "BatchNorm2d" in res.out and "3 of 3" in res.out
    res = cli("inspect", toy_files["state_dict"], "--arch", toy_files["arch"], "--json")
    data = json.loads(res.out)
    layers = data["layers"]
    assert [ly["name"] for ly in layers] == ["1", "5", "10"]
    assert [ly["channels"] for ly in layers] == [6, 8, 5]
    assert all({"name", "type", "channels", "eps"} <= set(ly) for ly in layers)
    bn = toy_files["model"][1]
    assert layers[0]["running_var_mean"] == pytest.approx(float(bn.running_var.mean()))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_rule_writes_one_over_b_squared(cli, toy_files, suffix):
    out = toy_files["dir"] / f"rule{suffix}"
    res = cli("rule", toy_files["state_dict"], "--arch", toy_files["arch"], "-B", 4, "-o", out)
    assert res.code == 0, res.err
    if suffix == ".safetensors":
        corr = load_corrections(out)
        assert corr.method == "rule-of-thumb" and corr.train_batch_size == 4
        assert all(float(lc.alpha) == float(lc.beta) == 1 / 16 for lc in corr.layers.values())
    else:
        model = load(out, arch=toy_files["arch"])
        assert {n: (float(a), float(b)) for n, (a, b) in coefficients(model).items()} == {
            n: (1 / 16, 1 / 16) for n in ("1", "5", "10")
        }


def test_weight_and_apply_round_trip(cli, toy_files):
    d = toy_files["dir"]
    res = cli(
        "weight",
        toy_files["state_dict"],
        "--arch",
        toy_files["arch"],
        "--alpha",
        0.2,
        "--beta",
        0.1,
        "-o",
        d / "w.safetensors",
    )
    assert res.code == 0, res.err
    res = cli(
        "apply",
        toy_files["safetensors"],
        d / "w.safetensors",
        "--arch",
        toy_files["arch"],
        "-o",
        d / "applied.pt",
    )
    assert res.code == 0, res.err
    model = load(d / "applied.pt", arch=toy_files["arch"])
    x, _ = toys.data(8)
    ref = toys.conv_net(seed=0)
    from bncorrect.layers import correct_model

    correct_model(ref, 0.2, 0.1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


def test_pickled_model_round_trip(cli, toy_files):
    out = toy_files["dir"] / "patched_whole.pt"
    res = cli("weight", toy_files["pickled"], "--trust-pickle", "--alpha", 0.3, "-o", out)
    assert res.code == 0, res.err
    model = torch.load(out, weights_only=False)
    assert isinstance(model[1], CorrectedNorm) and float(model[1].alpha) == pytest.approx(0.3)


def test_estimate_end_to_end(cli, toy_files):
    d = toy_files["dir"]
    out = d / "est.pt"
    res = cli(
        "estimate",
        toy_files["state_dict"],
        "--arch",
        toy_files["arch"],
        "--data",
        toy_files["data"],
        "-B",
        2,
        "-o",
        out,
        "--json",
    )
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["train_batch_size"] == 2
    assert [ly["name"] for ly in report["layers"]] == ["1", "5", "10"]
    assert all({"name", "alpha", "beta", "l_aux_ema", "l_aux"} <= set(ly) for ly in report["layers"])
    assert all(ly["l_aux"] <= ly["l_aux_ema"] for ly in report["layers"])
    model = load(out, arch=toy_files["arch"])
    got = {n: (float(a), float(b)) for n, (a, b) in coefficients(model).items()}
    assert got == {ly["name"]: pytest.approx((ly["alpha"], ly["beta"]), abs=1e-6) for ly in report["layers"]}
    # the table form runs too, and a corrections file records the method and data
    res = cli(
        "estimate",
        toy_files["state_dict"],
        "--arch",
        toy_files["arch"],
        "--data",
        toy_files["data"],
        "-B",
        2,
        "-o",
        d / "est.safetensors",
    )
    assert res.code == 0 and "L_aux" in res.out
    corr = load_corrections(d / "est.safetensors")
    assert corr.method == "evalnorm-offline" and corr.train_batch_size == 2 and "data.npz" in corr.data
    assert set(corr.metrics["layers"]) == {"1", "5", "10"}


def test_recalibrate_writes_statistics(cli, toy_files):
    out = toy_files["dir"] / "recal.safetensors"
    res = cli(
        "recalibrate",
        toy_files["state_dict"],
        "--arch",
        toy_files["arch"],
        "--data",
        toy_files["data"],
        "-o",
        out,
    )
    assert res.code == 0, res.err
    corr = load_corrections(out)
    assert all(lc.running_mean is not None and lc.running_var is not None for lc in corr.layers.values())
    x = torch.from_numpy(np.load(toy_files["data"])["x"])
    with torch.no_grad():
        h = toy_files["model"][0](x)
    torch.testing.assert_close(corr.layers["1"].running_mean, h.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- errors: one message, exit != 0, no OUT


def _assert_clean_error(res, *needles):
    assert res.code != 0
    assert "Traceback" not in res.err and "Traceback" not in res.out
    for n in needles:
        assert n in res.err, res.err


def test_error_missing_model(cli, tmp_path):
    res = cli("inspect", tmp_path / "nope.pt")
    _assert_clean_error(res, "nope.pt", "not found")


def test_error_pickle_without_trust(cli, toy_files):
    _assert_clean_error(cli("inspect", toy_files["pickled"]), "--trust-pickle", "whole.pt")


def test_error_state_dict_without_arch(cli, toy_files):
    _assert_clean_error(cli("rule", toy_files["state_dict"], "-B", 2), "--arch")


def test_error_never_overwrites_input(cli, toy_files):
    before = toy_files["state_dict"].read_bytes()
    res = cli(
        "rule", toy_files["state_dict"], "--arch", toy_files["arch"], "-B", 2, "-o", toy_files["state_dict"]
    )
    _assert_clean_error(res, "never overwrites")
    assert toy_files["state_dict"].read_bytes() == before


def test_error_unknown_output_suffix(cli, toy_files):
    res = cli(
        "rule",
        toy_files["state_dict"],
        "--arch",
        toy_files["arch"],
        "-B",
        2,
        "-o",
        toy_files["dir"] / "x.txt",
    )
    _assert_clean_error(res, ".safetensors")


def test_error_no_batchnorm(cli, tmp_path):
    from .conftest import TOYS

    path = tmp_path / "nobn.pt"
    torch.save(toys.no_bn_net().state_dict(), path)
    _assert_clean_error(cli("rule", path, "--arch", f"{TOYS}:no_bn_net", "-B", 2), "no BatchNorm")


def test_error_alpha_out_of_range(cli, toy_files):
    res = cli("weight", toy_files["state_dict"], "--arch", toy_files["arch"], "--alpha", 1.5)
    _assert_clean_error(res, "[0, 1]")


def test_error_corrections_for_another_model(cli, toy_files, tmp_path):
    from bncorrect.corrections import Corrections, save_corrections

    bad = save_corrections(
        Corrections.uniform(["layer9.bn"], 0.1, method="x"), tmp_path / "other.safetensors"
    )
    res = cli("apply", toy_files["state_dict"], bad, "--arch", toy_files["arch"], "-o", tmp_path / "o.pt")
    _assert_clean_error(res, "layer9.bn", "other.safetensors")
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize(
    "case,needles",
    [
        ("shape", ["failed on a data batch"]),
        ("nan", ["NaN", "layer 1"]),
        ("b1", ["variance of one example"]),
        ("missing", ["does not exist"]),
    ],
)
def test_estimate_errors_leave_no_output(cli, toy_files, tmp_path, case, needles):
    data = toy_files["data"]
    b = 2
    if case == "shape":
        data = tmp_path / "wrong.npz"
        np.savez(data, x=np.zeros((8, 4, 8, 8), np.float32))
    elif case == "nan":
        x, _ = toys.data(8)
        x[0] = 3e38  # finite data whose convolution overflows: the first BN layer sees Inf
        data = tmp_path / "nan.pt"
        torch.save({"x": x}, data)
    elif case == "b1":
        b = 1
    elif case == "missing":
        data = tmp_path / "missing.npz"
    out = tmp_path / "out.pt"
    res = cli(
        "estimate", toy_files["state_dict"], "--arch", toy_files["arch"], "--data", data, "-B", b, "-o", out
    )
    _assert_clean_error(res, *needles)
    assert not out.exists() and not list(tmp_path.glob(".out.pt*"))


def test_debug_shows_traceback(cli, tmp_path):
    from bncorrect.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        cli("inspect", tmp_path / "nope.pt", "--debug")


def test_subprocess_exit_codes(cli_subprocess, toy_files):
    res = cli_subprocess("inspect", toy_files["pickled"])
    assert res.code == 1 and "Traceback" not in res.err and "--trust-pickle" in res.err
    res = cli_subprocess(
        "weight", toy_files["state_dict"], "--arch", toy_files["arch"], "--alpha", 0.1, "--json"
    )
    assert res.code == 0 and json.loads(res.out)["layers"][0]["alpha"] == pytest.approx(0.1)
    res = cli_subprocess("rule", toy_files["state_dict"])
    assert res.code == 2 and "Traceback" not in res.err


def test_onnx_export_inspect_and_cross_format_apply(cli, toy_files):
    import onnxruntime as ort

    from bncorrect import apply_to_module

    d = toy_files["dir"]
    shape = "2,3,8,8"
    res = cli(
        "weight",
        toy_files["state_dict"],
        "--arch",
        toy_files["arch"],
        "--alpha",
        0,
        "-o",
        d / "plain.onnx",
        "--input-shape",
        shape,
    )
    assert res.code == 0, res.err
    res = cli("inspect", d / "plain.onnx", "--json")
    layers = json.loads(res.out)["layers"]
    assert [ly["torch_name"] for ly in layers] == ["1", "5", "10"] and all(ly["correctable"] for ly in layers)
    res = cli(
        "estimate",
        toy_files["state_dict"],
        "--arch",
        toy_files["arch"],
        "--data",
        toy_files["data"],
        "-B",
        2,
        "-o",
        d / "est.safetensors",
    )
    assert res.code == 0, res.err
    res = cli("apply", d / "plain.onnx", d / "est.safetensors", "-o", d / "corrected.onnx", "--json")
    assert res.code == 0, res.err
    assert set(json.loads(res.out)["matched"]) == {"1", "5", "10"}
    model = apply_to_module(toys.conv_net(seed=0), load_corrections(d / "est.safetensors"))
    x = toys.data(16, seed=9)[0]
    sess = ort.InferenceSession(str(d / "corrected.onnx"))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)
    # a state-dict model cannot become ONNX without an example input shape
    res = cli("rule", toy_files["state_dict"], "--arch", toy_files["arch"], "-B", 2, "-o", d / "x.onnx")
    _assert_clean_error(res, "--input-shape")
    assert not (d / "x.onnx").exists()
