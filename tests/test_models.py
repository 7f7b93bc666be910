from __future__ import annotations

import pickle

import pytest
import torch

from bncorrect import load
from bncorrect.errors import ModelLoadError, UntrustedPickleError, UsageError
from bncorrect.layers import CorrectedNorm, correct_model
from bncorrect.models import build_arch, load_model, parse_arch_kwargs, plain_state_dict, save_checkpoint

from . import toys
from .conftest import TOYS


def _same_outputs(a, b, x):
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("kind", ["state_dict", "safetensors"])
def test_weights_with_arch(toy_files, kind):
    loaded = load_model(toy_files[kind], arch=toy_files["arch"])
    x, _ = toys.data(4)
    assert _same_outputs(loaded.model, toy_files["model"], x)
    assert loaded.kind == ("state-dict" if kind == "state_dict" else "safetensors")
    assert len(loaded.sha256) == 64


@pytest.mark.parametrize("kind", ["state_dict", "safetensors"])
def test_weights_without_arch_say_what_to_do(toy_files, kind):
    with pytest.raises(ModelLoadError, match=r"arch='package\.module:factory'"):
        load_model(toy_files[kind])


def test_pickle_needs_trust_and_never_runs_code_without_it(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(UntrustedPickleError, match="trust_pickle=True"):
        load_model(bad)
    assert not marker.exists()


def test_pickled_module_with_trust(toy_files):
    with pytest.raises(UntrustedPickleError):
        load_model(toy_files["pickled"])
    loaded = load_model(toy_files["pickled"], trust_pickle=True)
    assert loaded.kind == "pickled-module"
    assert _same_outputs(loaded.model, toy_files["model"], toys.data(4)[0])


def test_nested_and_ddp_state_dicts(tmp_path, toy_files):
    sd = toy_files["model"].state_dict()
    nested = tmp_path / "nested.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, nested)
    loaded = load_model(nested, arch=toy_files["arch"])
    assert _same_outputs(loaded.model, toy_files["model"], toys.data(4)[0])


def test_strict_and_non_strict(tmp_path, toy_files):
    sd = dict(toy_files["model"].state_dict())
    sd.pop("0.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match="strict=False"):
        load_model(path, arch=toy_files["arch"])
    loaded = load_model(path, arch=toy_files["arch"], strict=False)
    warnings = " ".join(loaded.meta["warnings"])
    assert "0.weight" in warnings and "extra.weight" in warnings


def test_arch_errors(toy_files):
    with pytest.raises(UsageError, match=r"package\.module:function"):
        build_arch("no_colon")
    with pytest.raises(ModelLoadError, match="cannot import module"):
        build_arch("not_a_module_xyz:f")
    with pytest.raises(ModelLoadError, match="no attribute"):
        build_arch(f"{TOYS}:nope")
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(toy_files["state_dict"], arch=f"{TOYS}:conv1d_net")
    with pytest.raises(ModelLoadError, match=r"not a torch\.nn\.Module"):
        build_arch(f"{TOYS}:data", {"n": 2})
    assert parse_arch_kwargs('{"seed": 3}') == {"seed": 3}
    with pytest.raises(UsageError, match="JSON"):
        parse_arch_kwargs("{bad")
    with pytest.raises(UsageError, match="JSON object"):
        parse_arch_kwargs("[1]")


def test_arch_kwargs_are_passed(toy_files):
    model = build_arch(f"{TOYS}:conv_net", {"seed": 9})
    assert not torch.equal(model[0].weight, toy_files["model"][0].weight)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.pt")
    junk = tmp_path / "model.h5"
    junk.write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="unknown model format"):
        load_model(junk)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip or pickle")
    for trust in (False, True):  # never called a pickle, never unpickled
        with pytest.raises(ModelLoadError, match="not a PyTorch checkpoint") as info:
            load_model(garbage, trust_pickle=trust)
        assert not isinstance(info.value, UntrustedPickleError)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(b"PK\x03\x04" + b"\0" * 20)  # zip magic, then nothing readable
    with pytest.raises(ModelLoadError, match=r"cannot read this file with torch\.load"):
        load_model(truncated)


@pytest.mark.parametrize("kind", ["state_dict", "pickled"])
def test_patched_checkpoint_round_trip(tmp_path, toy_files, kind):
    opts = {"arch": toy_files["arch"]} if kind == "state_dict" else {"trust_pickle": True}
    loaded = load_model(toy_files[kind], **opts)
    correct_model(loaded.model, {"1": 0.3, "5": 0.1, "10": torch.linspace(0, 1, 5)}, {"1": 0.2})
    out = save_checkpoint(loaded.model, tmp_path / "patched.pt", source=loaded)
    # state-dict sources: one call, no arch needed (recorded), loadable without unpickling code
    back = load(out, trust_arch=True) if kind == "state_dict" else load(out, trust_pickle=True)
    if kind == "state_dict":
        torch.load(out, weights_only=True)
    assert isinstance(back.get_submodule("10"), CorrectedNorm)
    x, _ = toys.data(6)
    assert _same_outputs(back, loaded.model, x)
    assert not _same_outputs(back, toy_files["model"], x)


def test_plain_state_dict_keeps_original_keys(toy_files):
    model = toy_files["model"]
    keys = set(model.state_dict())
    correct_model(model, 0.2)
    assert set(plain_state_dict(model)) == keys
