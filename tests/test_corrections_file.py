from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from bncorrect.corrections import FORMAT, Corrections, LayerCorrection, load_corrections, save_corrections
from bncorrect.errors import CorrectionsFileError


def _example() -> Corrections:
    return Corrections(
        {
            "layer1.0.bn1": LayerCorrection(torch.tensor(0.25), torch.tensor(0.125)),
            "fc_bn": LayerCorrection(
                torch.linspace(0, 1, 4), torch.full((4,), 0.5), torch.arange(4.0), torch.ones(4) * 2
            ),
        },
        method="evalnorm-offline",
        train_batch_size=2,
        model_sha256="ab" * 32,
        data="val.npz: 500 examples",
        metrics={"layers": {"fc_bn": {"l_aux": 0.1}}, "nan": float("nan")},
    )


def test_round_trip(tmp_path):
    path = save_corrections(_example(), tmp_path / "c.safetensors")
    back = load_corrections(path)
    assert back.method == "evalnorm-offline" and back.train_batch_size == 2
    assert back.model_sha256 == "ab" * 32 and back.data == "val.npz: 500 examples"
    assert back.metrics == {"layers": {"fc_bn": {"l_aux": 0.1}}, "nan": None}
    assert back.version
    ex = _example()
    for name, lc in ex.layers.items():
        got = back.layers[name]
        for field in ("alpha", "beta", "running_mean", "running_var"):
            a, b = getattr(lc, field), getattr(got, field)
            assert (a is None and b is None) or torch.equal(a, b)
    assert not list(tmp_path.glob(".*tmp"))


def test_metadata_is_the_documented_format(tmp_path):
    from safetensors import safe_open

    path = save_corrections(_example(), tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == FORMAT == "bncorrect/1"
    assert {"method", "train_batch_size", "bncorrect_version", "model_sha256", "data", "metrics"} <= set(meta)
    json.loads(meta["metrics"])
    assert keys == {
        "layer1.0.bn1.alpha",
        "layer1.0.bn1.beta",
        "fc_bn.alpha",
        "fc_bn.beta",
        "fc_bn.running_mean",
        "fc_bn.running_var",
    }


def _write(tmp_path, tensors, meta):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "tensors,meta,match",
    [
        ({"a.alpha": torch.tensor(0.1), "a.beta": torch.tensor(0.1)}, {"format": "other/2"}, "format tag"),
        ({"a.alpha": torch.tensor(0.1), "a.beta": torch.tensor(0.1)}, None, "looks like model weights"),
        (
            {"a.alpha": torch.tensor(1.5), "a.beta": torch.tensor(0.1)},
            {"format": FORMAT},
            r"outside \[0, 1\]",
        ),
        ({"a.alpha": torch.tensor(float("nan")), "a.beta": torch.tensor(0.1)}, {"format": FORMAT}, "NaN"),
        ({"a.alpha": torch.tensor(0.1)}, {"format": FORMAT}, "lacks alpha or beta"),
        ({"a.gamma": torch.tensor(0.1)}, {"format": FORMAT}, "unexpected tensor"),
        (
            {"a.alpha": torch.tensor(0.1), "a.beta": torch.tensor(0.1), "a.running_mean": torch.zeros(2)},
            {"format": FORMAT},
            "only one of",
        ),
    ],
)
def test_invalid_files(tmp_path, tensors, meta, match):
    path = _write(tmp_path, tensors, meta)
    with pytest.raises(CorrectionsFileError, match=match) as info:
        load_corrections(path)
    assert str(path) in str(info.value)


def test_not_safetensors_and_missing(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(CorrectionsFileError, match="not a readable safetensors"):
        load_corrections(junk)
    with pytest.raises(CorrectionsFileError, match="not found"):
        load_corrections(tmp_path / "missing.safetensors")


def test_validate_against_model():
    c = _example()
    c.validate({"layer1.0.bn1": 8, "fc_bn": 4})
    with pytest.raises(CorrectionsFileError, match="not in the model"):
        c.validate({"fc_bn": 4})
    with pytest.raises(CorrectionsFileError, match="has 5 channels"):
        c.validate({"layer1.0.bn1": 8, "fc_bn": 5})
