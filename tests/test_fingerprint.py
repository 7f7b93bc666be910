"""Corrections know which model they were made for (bncorrect.fingerprint).

The fingerprint is computed from the BN layers' own statistics and parameters, so a file recalibrated on
one checkpoint is refused on another checkpoint of the same architecture and accepted on the first one's
ONNX export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open

import bncorrect
from bncorrect.errors import CorrectionsFileError
from bncorrect.fingerprint import combine, layer_digest, onnx_fingerprint, torch_fingerprint
from bncorrect.onnx_export import export_plain

from . import toys

TOYS = Path(__file__).resolve().parent / "toys.py"
ARCH = f"{TOYS}:conv_net"


@pytest.fixture
def two_checkpoints(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(toys.conv_net(seed=0).state_dict(), a)
    torch.save(toys.conv_net(seed=1).state_dict(), b)
    x, y = toys.data(48, seed=3)
    data = tmp_path / "val.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    onnx_a = tmp_path / "a.onnx"
    onnx.save(export_plain(toys.conv_net(seed=0), x[:2]), onnx_a)
    return {"a": a, "b": b, "data": data, "onnx_a": onnx_a, "x": x, "dir": tmp_path}


def test_fingerprint_by_hand():
    """The documented formula, computed independently with hashlib over the float32 bytes."""
    import hashlib

    model = toys.conv_net(seed=0)
    digests = []
    for bn in (model[1], model[5], model[10]):
        h = hashlib.sha256()
        h.update(np.float32(bn.eps).tobytes())
        for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias):
            h.update(t.detach().numpy().astype("<f4").tobytes())
        digests.append(h.hexdigest())
    expected = hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:32]
    assert torch_fingerprint(model) == expected


def test_equal_for_an_onnx_export_and_changed_by_one_ulp(two_checkpoints):
    model = toys.conv_net(seed=0)
    fp = torch_fingerprint(model)
    assert onnx_fingerprint(onnx.load(two_checkpoints["onnx_a"])) == fp
    assert torch_fingerprint(toys.conv_net(seed=1)) != fp
    with torch.no_grad():
        model[5].running_var[3] = torch.nextafter(model[5].running_var[3], torch.tensor(10.0))
    assert torch_fingerprint(model) != fp
    # a layer without affine hashes as weight 1, bias 0 (what exporters write)
    assert layer_digest(1e-5, [0.0], [1.0]) == layer_digest(1e-5, [0.0], [1.0], [1.0], [0.0])
    assert combine(["b", "a"]) == combine(["a", "b"])


def test_recalibrated_on_one_checkpoint_refused_on_another(two_checkpoints, cli):
    t = two_checkpoints
    corr = t["dir"] / "recal_a.safetensors"
    bncorrect.recalibrate(t["a"], t["data"], arch=ARCH, out=corr)
    with safe_open(str(corr), framework="pt") as f:
        meta = f.metadata()
    assert meta["model_fingerprint"] == torch_fingerprint(toys.conv_net(seed=0))
    assert meta["model_file"] == "a.pt"

    with pytest.raises(CorrectionsFileError) as info:
        bncorrect.apply(t["b"], corr, arch=ARCH)
    msg = str(info.value)
    assert "recal_a.safetensors" in msg and "b.pt" in msg and "a.pt" in msg and "force=True" in msg
    res = cli("apply", t["b"], corr, "--arch", ARCH, "-o", t["dir"] / "out.pt")
    assert res.code == 1 and "--force" in res.err and not (t["dir"] / "out.pt").exists()

    # accepted on the model it was made for, and on that model's ONNX export
    ok = bncorrect.apply(t["a"], corr, arch=ARCH)
    assert ok.report["warnings"] == []
    out = t["dir"] / "a_recal.onnx"
    res = cli("apply", t["onnx_a"], corr, "-o", out)
    assert res.code == 0, res.err
    # the rewritten graph computes the recalibrated model (same x, onnxruntime vs PyTorch)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: t["x"][:8].numpy()})[0]
    with torch.no_grad():
        want = ok.model(t["x"][:8]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_force_applies_and_warns(two_checkpoints, cli):
    t = two_checkpoints
    corr = t["dir"] / "w_a.safetensors"
    bncorrect.weight(t["a"], 0.2, arch=ARCH, out=corr)
    forced = bncorrect.apply(t["b"], corr, arch=ARCH, force=True)
    assert any("another model" in w for w in forced.report["warnings"])
    res = cli("apply", t["b"], corr, "--arch", ARCH, "--force", "-o", t["dir"] / "forced.safetensors")
    assert res.code == 0 and "warning" in res.err and "another model" in res.err
    # the written corrections now belong to b
    written = bncorrect.load_corrections(t["dir"] / "forced.safetensors")
    assert written.model_fingerprint == torch_fingerprint(toys.conv_net(seed=1))


def test_sweep_and_diagnose_check_their_corrections(two_checkpoints):
    t = two_checkpoints
    corr = t["dir"] / "w_a.safetensors"
    bncorrect.weight(t["a"], 0.2, arch=ARCH, out=corr)
    with pytest.raises(CorrectionsFileError, match="another model"):
        bncorrect.api.sweep_alpha(t["b"], t["data"], corrections=corr, alphas=[0.0], arch=ARCH)
    with pytest.raises(CorrectionsFileError, match="another model"):
        bncorrect.api.diagnose(t["b"], t["data"], 2, corrections=corr, arch=ARCH)
    result = bncorrect.api.sweep_alpha(t["a"], t["data"], corrections=corr, alphas=[0.0], arch=ARCH)
    assert result.report["warnings"] == []


def test_file_without_fingerprint_is_applied_with_a_warning(two_checkpoints, cli):
    from safetensors.torch import save_file

    t = two_checkpoints
    old = t["dir"] / "old.safetensors"
    save_file(
        {"1.alpha": torch.tensor(0.1), "1.beta": torch.tensor(0.1)},
        str(old),
        metadata={"format": "bncorrect/1", "method": "example-weighing", "bncorrect_version": "0.1.0"},
    )
    res = cli("apply", t["a"], old, "--arch", ARCH, "--json")
    assert res.code == 0 and "no model fingerprint" in res.err


def test_patched_checkpoint_records_the_fingerprint(two_checkpoints):
    t = two_checkpoints
    out = t["dir"] / "patched.pt"
    bncorrect.weight(t["a"], 0.1, arch=ARCH, out=out)
    obj = torch.load(out, weights_only=True)
    assert obj["meta"]["model_fingerprint"] == torch_fingerprint(toys.conv_net(seed=0))
