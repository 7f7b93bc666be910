"""--data-config: images preprocessed as the model expects (timm pretrained_cfg, torchvision weights)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bncorrect.data import DataSpec, load_data
from bncorrect.data_config import merge, resolve_data_config, spec_from_timm_cfg
from bncorrect.errors import UsageError

from . import toys

TOYS = Path(__file__).resolve().parent / "toys.py"


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            arr = np.random.default_rng(i + 7 * (cls == "b")).integers(0, 255, (12, 16, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def _by_hand(path: Path, short: int, crop: int, interp: int, mean, std) -> torch.Tensor:
    """Resize the shorter side to ``short``, center-crop ``crop``, scale to [0, 1], normalize."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = short / min(w, h)
    img = img.resize((round(w * s) if w > h else short, short if w > h else round(h * s)), interp)
    w, h = img.size
    left, top = round((w - crop) / 2), round((h - crop) / 2)
    arr = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr.transpose(2, 0, 1).copy())
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_timm_cfg_resolves_like_timm():
    spec = spec_from_timm_cfg(toys.TIMM_CFG)
    assert spec.resize == math.floor(8 / 0.8) == 10 and spec.crop == 8
    assert spec.interpolation == "bicubic" and spec.mean == (0.5, 0.4, 0.3)
    squash = spec_from_timm_cfg({**toys.TIMM_CFG, "crop_mode": "squash"})
    assert squash.resize == (10, 10)
    rect = spec_from_timm_cfg({**toys.TIMM_CFG, "input_size": (3, 8, 12)})
    assert rect.resize == (10, 15) and rect.crop == (8, 12)
    assert spec_from_timm_cfg({"input_size": (3, 224, 224)}).resize == 256  # crop_pct 0.875


def test_model_cfg_images_match_a_direct_computation(images):
    spec = resolve_data_config("model", toys.cfg_net())
    ds = load_data(images, spec)
    want = _by_hand(images / "a" / "0.png", 10, 8, Image.BICUBIC, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    torch.testing.assert_close(ds[0][0], want, rtol=1e-5, atol=1e-5)
    assert "from pretrained_cfg cfg_net" in ds.description and "bicubic" in ds.description


def test_torchvision_weights_transforms(images):
    spec = resolve_data_config(f"{TOYS}:WEIGHTS")
    assert (spec.resize, spec.crop, spec.interpolation) == (10, 8, "bilinear")
    ds = load_data(images, spec)
    want = _by_hand(images / "b" / "1.png", 10, 8, Image.BILINEAR, spec.mean, spec.std)
    torch.testing.assert_close(ds[3][0], want, rtol=1e-5, atol=1e-5)


def test_explicit_options_win():
    spec = merge(spec_from_timm_cfg(toys.TIMM_CFG), DataSpec(crop=6, std=(1.0, 1.0, 1.0)))
    assert (
        spec.crop == 6 and spec.std == (1.0, 1.0, 1.0) and spec.resize == 10 and spec.mean == (0.5, 0.4, 0.3)
    )


def test_errors_say_what_to_do(images):
    with pytest.raises(UsageError, match="pretrained_cfg"):
        resolve_data_config("model", toys.conv_net())
    with pytest.raises(UsageError, match="neither weights"):
        resolve_data_config(f"{TOYS}:TIMM_CFG.get")
    with pytest.raises(UsageError, match="interpolation"):
        load_data(images, DataSpec(interpolation="cubicle"))


def test_cli_estimate_with_data_config_model(cli, images, tmp_path):
    sd = tmp_path / "sd.pt"
    torch.save(toys.cfg_net().state_dict(), sd)
    res = cli(
        "estimate", sd, "--arch", f"{TOYS}:cfg_net", "--data", images, "-B", "2", "--data-config", "model"
    )
    assert res.code == 0, res.err
    assert "from pretrained_cfg" in res.err and "resize 10 (bicubic)" in res.err and "crop 8" in res.err
    res = cli(
        "estimate", sd, "--arch", f"{TOYS}:conv_net", "--data", images, "-B", "2", "--data-config", "model"
    )
    assert res.code == 2 and "pretrained_cfg" in res.err and "Fix:" in res.err


def test_cli_recalibrate_with_data_config_weights(cli, images, tmp_path):
    """recalibrate reads images as the weights' transforms do: the first BN's new mean is its input's mean
    over the images preprocessed by hand (resize 10 bilinear, crop 8, ImageNet mean/std)."""
    sd = tmp_path / "sd.pt"
    torch.save(toys.conv_net().state_dict(), sd)
    out = tmp_path / "rec.safetensors"
    res = cli(
        "recalibrate", sd, "--arch", f"{TOYS}:conv_net", "--data", images,
        "--data-config", f"{TOYS}:WEIGHTS", "-o", out,
    )
    assert res.code == 0, res.err
    assert "WEIGHTS" in res.err  # the data line names where the preprocessing came from
    files = sorted(images.rglob("*.png"))
    x = torch.stack(
        [_by_hand(f, 10, 8, Image.BILINEAR, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) for f in files]
    )
    model = toys.conv_net()
    with torch.no_grad():
        h = model[0](x)
    from bncorrect import load_corrections

    got = load_corrections(out).layers["1"].running_mean
    torch.testing.assert_close(got, h.mean((0, 2, 3)), atol=2e-5, rtol=1e-4)
