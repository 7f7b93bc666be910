"""Tests for bncorrect.data: every DATA format, the image pipeline, batching and every error case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bncorrect.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArrayDataset,
    DataSpec,
    ImageFolderDataset,
    iterate_batches,
    load_data,
    make_loader,
    parse_floats,
    parse_size,
)
from bncorrect.errors import BncorrectError, DataError, UsageError

RNG = np.random.default_rng(0)


def _pixels(h: int, w: int, c: int = 3) -> np.ndarray:
    shape = (h, w, c) if c == 3 else (h, w)
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def _save(path: Path, arr: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _expected(arr: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD, normalize: bool = True) -> torch.Tensor:
    """Independent reference: HWC uint8 -> CHW float32 in [0, 1], then (x - mean) / std."""
    a = arr.astype(np.float64) / 255.0
    if a.ndim == 2:
        a = a[:, :, None]
    a = a.transpose(2, 0, 1)
    if normalize:
        m = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
        s = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
        a = (a - m) / s
    return torch.from_numpy(a.astype(np.float32))


def _labelled_folder(root: Path) -> dict[str, np.ndarray]:
    """Class folders created out of order; returns {relative path: pixels}."""
    pix = {}
    for cls in ["zebra", "ant", "Mole"]:  # sorted: Mole, ant, zebra (case-sensitive like ImageFolder)
        for k in range(2):
            rel = f"{cls}/img{k}.png"
            pix[rel] = _save(root / rel, _pixels(6, 5))
    return pix


# ------------------------------------------------------------------------------------------ image folders


def test_class_folders_labels_and_values(tmp_path: Path) -> None:
    pix = _labelled_folder(tmp_path / "val")
    ds = load_data(tmp_path / "val")
    assert isinstance(ds, ImageFolderDataset)
    assert ds.has_labels and ds.num_classes == 3 and ds.skipped == []
    assert ds.classes == ["Mole", "ant", "zebra"]
    assert len(ds) == 6
    assert ds.example_shape() == (3, 6, 5)
    assert "6 images in 3 class folders" in ds.description and "(3, 6, 5)" in ds.description
    order = sorted(pix)  # Mole/img0, Mole/img1, ant/img0, ...
    labels = {"Mole": 0, "ant": 1, "zebra": 2}
    for i, rel in enumerate(order):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 6, 5)
        assert y == labels[rel.split("/")[0]]
        torch.testing.assert_close(x, _expected(pix[rel]), rtol=0, atol=1e-6)


def test_nested_files_in_class_folder_and_hidden_ignored(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "deep" / "x.png", _pixels(4, 4))
    _save(tmp_path / "b" / "y.png", _pixels(4, 4))
    _save(tmp_path / ".hidden" / "z.png", _pixels(4, 4))
    (tmp_path / "b" / ".DS_Store").write_bytes(b"junk")
    ds = load_data(tmp_path)
    assert ds.classes == ["a", "b"]
    assert [lbl for _, lbl in ds.files] == [0, 1]


def test_flat_folder_no_labels_and_not_normalized(tmp_path: Path) -> None:
    a = _save(tmp_path / "b.png", _pixels(5, 7))
    b = _save(tmp_path / "A.PNG", _pixels(5, 7))
    ds = load_data(tmp_path, DataSpec(normalize=False))
    assert not ds.has_labels and ds.num_classes is None
    assert len(ds) == 2
    item = ds[0]
    assert len(item) == 1
    torch.testing.assert_close(item[0], _expected(b, normalize=False), rtol=0, atol=1e-6)
    torch.testing.assert_close(ds[1][0], _expected(a, normalize=False), rtol=0, atol=1e-6)
    assert float(item[0].min()) >= 0 and float(item[0].max()) <= 1
    (batch,) = next(iter(make_loader(ds, 2)))
    assert batch.shape == (2, 3, 5, 7)


def test_grayscale_source_and_channels(tmp_path: Path) -> None:
    g = _save(tmp_path / "g.png", _pixels(4, 6, c=1))
    ds1 = load_data(tmp_path, DataSpec(channels=1))
    gray_mean, gray_std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    torch.testing.assert_close(ds1[0][0], _expected(g, (gray_mean,), (gray_std,)), rtol=0, atol=1e-6)
    assert ds1.example_shape() == (1, 4, 6)
    # grayscale source to 3 channels: replicated
    ds3 = load_data(tmp_path)
    torch.testing.assert_close(ds3[0][0], _expected(np.stack([g, g, g], -1)), rtol=0, atol=1e-6)
    # custom mean/std, one value broadcast
    ds = load_data(tmp_path, DataSpec(channels=1, mean=(0.5,), std=(0.25,)))
    torch.testing.assert_close(ds[0][0], _expected(g, (0.5,), (0.25,)), rtol=0, atol=1e-6)


def test_rgb_source_to_grayscale(tmp_path: Path) -> None:
    rgb = _save(tmp_path / "c.png", _pixels(4, 4))
    ds = load_data(tmp_path, DataSpec(channels=1, normalize=False))
    r, g, b = (rgb[..., k].astype(np.float64) for k in range(3))
    luma = (r * 299 + g * 587 + b * 114) / 1000  # ITU-R 601-2, what PIL uses
    np.testing.assert_allclose(ds[0][0][0].numpy() * 255, luma, atol=1.0)


def test_rgba_and_palette_sources(tmp_path: Path) -> None:
    rgba = RNG.integers(0, 256, size=(3, 3, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(_pixels(3, 3)).convert("P").save(tmp_path / "b.gif")
    ds = load_data(tmp_path, DataSpec(normalize=False))
    torch.testing.assert_close(ds[0][0], _expected(rgba[..., :3], normalize=False), rtol=0, atol=1e-6)
    assert ds[1][0].shape == (3, 3, 3)


def test_jpeg_matches_pil_decode(tmp_path: Path) -> None:
    Image.fromarray(_pixels(8, 8)).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(_pixels(8, 8)).save(tmp_path / "b.JPEG", quality=90)
    ds = load_data(tmp_path, DataSpec(mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7)))
    for i, name in enumerate(["a.jpg", "b.JPEG"]):
        decoded = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        expected = _expected(decoded, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
        torch.testing.assert_close(ds[i][0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("resize", "crop", "shape"),
    [(4, 4, (4, 4)), ((5, 3), None, (5, 3)), (None, (3, 2), (3, 2)), (6, (4, 5), (4, 5))],
)
def test_resize_and_crop_of_different_sizes(tmp_path: Path, resize, crop, shape) -> None:
    sources = {"a.png": _pixels(10, 8), "b.png": _pixels(7, 12)}
    for name, arr in sources.items():
        _save(tmp_path / name, arr)
    ds = load_data(tmp_path, DataSpec(resize=resize, crop=crop))
    assert ds.example_shape() == (3, *shape)
    for i, name in enumerate(sorted(sources)):
        img = Image.fromarray(sources[name])
        w, h = img.size
        if isinstance(resize, int):  # shorter side -> resize (torchvision Resize(int))
            size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
            img = img.resize(size, Image.BILINEAR)
        elif resize is not None:
            img = img.resize((resize[1], resize[0]), Image.BILINEAR)
        arr = np.asarray(img)
        if crop is not None:
            ch, cw = (crop, crop) if isinstance(crop, int) else crop
            top, left = round((arr.shape[0] - ch) / 2), round((arr.shape[1] - cw) / 2)
            arr = arr[top : top + ch, left : left + cw]
        torch.testing.assert_close(ds[i][0], _expected(arr), rtol=0, atol=1e-6)
    x, *_ = next(iter(make_loader(ds, 2)))
    assert x.shape == (2, 3, *shape)


def test_resize_int_keeps_aspect_like_torchvision(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _pixels(10, 25))
    assert load_data(tmp_path, DataSpec(resize=4)).example_shape() == (3, 4, 10)


def test_different_sizes_without_resize_is_clear_error(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _pixels(4, 4))
    _save(tmp_path / "b.png", _pixels(5, 4))
    ds = load_data(tmp_path)
    with pytest.raises(DataError, match=r"b\.png") as err:
        list(make_loader(ds, 2))
    assert "--resize" in str(err.value) and "--crop" in str(err.value)
    # resize int alone keeps aspect ratio: still different shapes; the message says to crop
    _save(tmp_path / "c.png", _pixels(4, 8))
    with pytest.raises(DataError, match="--crop"):
        list(make_loader(load_data(tmp_path, DataSpec(resize=4)), 1))


def test_crop_larger_than_image(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _pixels(4, 4))
    with pytest.raises(DataError, match=r"a\.png.*crop"):
        load_data(tmp_path, DataSpec(crop=5))


def _hook(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).mean().reshape(1, 1, 1) * 2


def _bad_hook(img: Image.Image) -> int:
    return 3


def test_preprocess_hook_string_and_callable(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.png", _pixels(4, 4))
    for hook in (_hook, f"{__name__}:_hook"):
        ds = load_data(tmp_path, DataSpec(preprocess=hook, resize=100))
        expected = torch.tensor(a.astype(np.float32).mean() * 2).reshape(1, 1, 1)
        torch.testing.assert_close(ds[0][0], expected)
        assert "preprocess" in ds.description
    with pytest.raises(DataError, match=r"a\.png.*not a tensor"):
        load_data(tmp_path, DataSpec(preprocess=_bad_hook))
    with pytest.raises(UsageError, match=r"package\.module:function"):
        load_data(tmp_path, DataSpec(preprocess="no_colon"))
    with pytest.raises(UsageError, match="cannot import"):
        load_data(tmp_path, DataSpec(preprocess="no_such_module_xyz:f"))
    with pytest.raises(UsageError, match="no attribute"):
        load_data(tmp_path, DataSpec(preprocess=f"{__name__}:missing"))


# ---------------------------------------------------------------------------------------------- bad files


def _truncated_png(path: Path) -> None:
    _save(path, _pixels(16, 16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["txt", "truncated", "garbage_png"])
def test_bad_file_is_named(tmp_path: Path, kind: str) -> None:
    _save(tmp_path / "cls" / "a.png", _pixels(4, 4))
    bad = tmp_path / "cls" / ("notes.txt" if kind == "txt" else "b.png")
    if kind == "txt":
        bad.write_text("hello")
    elif kind == "truncated":
        _truncated_png(bad)
    else:
        bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError) as err:
        ds = load_data(tmp_path)
        list(make_loader(ds, 1))
    assert str(bad) in str(err.value)
    assert "--skip-bad-files" in str(err.value)


def test_bad_first_file_fails_in_load_data(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"nope")
    _save(tmp_path / "b.png", _pixels(4, 4))
    with pytest.raises(DataError, match=r"a\.png"):
        load_data(tmp_path)


def test_skip_bad_files_records_them(tmp_path: Path) -> None:
    good = _save(tmp_path / "c" / "b.png", _pixels(4, 4))
    (tmp_path / "c" / "a.txt").write_text("x")
    _truncated_png(tmp_path / "c" / "c.png")
    (tmp_path / "c" / "d.jpg").write_bytes(b"\xff\xd8garbage")
    ds = load_data(tmp_path, DataSpec(skip_bad_files=True, normalize=False))
    assert len(ds) == 1
    assert sorted(Path(s).name for s in ds.skipped) == ["a.txt", "c.png", "d.jpg"]
    assert all(str(tmp_path) in s for s in ds.skipped)
    assert "3 bad files skipped" in ds.description
    torch.testing.assert_close(ds[0][0], _expected(good, normalize=False), rtol=0, atol=1e-6)


def test_worker_error_reaches_caller_cleanly(tmp_path: Path) -> None:
    for k in range(3):
        _save(tmp_path / f"{k}.png", _pixels(4, 4))
    _truncated_png(tmp_path / "3.png")
    ds = load_data(tmp_path)
    loader = make_loader(ds, 2, num_workers=1)
    with pytest.raises(DataError) as err:
        list(loader)
    text = str(err.value)
    assert str(tmp_path / "3.png") in text
    assert "Traceback" not in text and "DataLoader worker" not in text
    assert err.value.path == str(tmp_path / "3.png")


def test_worker_size_mismatch_reaches_caller(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _pixels(4, 4))
    _save(tmp_path / "b.png", _pixels(4, 5))
    with pytest.raises(DataError, match="--resize") as err:
        list(make_loader(load_data(tmp_path), 2, num_workers=1))
    assert str(tmp_path / "b.png") in str(err.value) and "Traceback" not in str(err.value)


def test_collate_checks_shapes_of_foreign_items() -> None:
    from bncorrect.data import _collate

    failure = _collate([(torch.zeros(3, 2),), (torch.zeros(3, 3),)])
    with pytest.raises(DataError, match="different shapes"):
        raise failure.error()


def test_workers_give_same_batches(tmp_path: Path) -> None:
    for k in range(4):
        _save(tmp_path / f"{k}.png", _pixels(4, 4))
    ds = load_data(tmp_path)
    batches = list(make_loader(ds, 3, num_workers=1))
    assert [b[0].shape[0] for b in batches] == [3, 1]
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), torch.stack([ds[i][0] for i in range(4)]))


# ---------------------------------------------------------------------------------------- folder errors


def test_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no images") as err:
        load_data(tmp_path / "flat")
    assert "flat" in str(err.value)
    (tmp_path / "cls" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_data(tmp_path / "cls")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images \(1 unreadable"):
        load_data(tmp_path / "bad", DataSpec(skip_bad_files=True))


def test_images_beside_class_folders(tmp_path: Path) -> None:
    _save(tmp_path / "cls" / "a.png", _pixels(4, 4))
    _save(tmp_path / "stray.png", _pixels(4, 4))
    with pytest.raises(DataError, match=r"stray\.png"):
        load_data(tmp_path)


def test_empty_class_folder_keeps_its_index(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    _save(tmp_path / "b" / "x.png", _pixels(4, 4))
    ds = load_data(tmp_path)
    assert ds.num_classes == 2 and ds[0][1] == 1


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (DataSpec(channels=2), "channels"),
        (DataSpec(resize=0), "resize"),
        (DataSpec(crop=(3, -1)), "crop"),
        (DataSpec(mean=(0.1, 0.2)), "mean"),
        (DataSpec(std=(0.0,)), "std"),
    ],
)
def test_bad_spec(tmp_path: Path, spec: DataSpec, match: str) -> None:
    _save(tmp_path / "a.png", _pixels(4, 4))
    with pytest.raises(UsageError, match=match):
        load_data(tmp_path, spec)


# ------------------------------------------------------------------------------------------ array formats


def _write(path: Path, x, y=None) -> None:
    suffix = path.suffix
    if suffix == ".npz":
        np.savez(path, **({"x": x} if y is None else {"x": x, "y": y}))
    elif suffix == ".npy":
        np.save(path, x)
    elif suffix == ".pt":
        d = {"x": torch.as_tensor(x)}
        if y is not None:
            d["y"] = torch.as_tensor(y)
        torch.save(d, path)
    else:
        d = {"x": torch.as_tensor(x).contiguous()}
        if y is not None:
            d["y"] = torch.as_tensor(y).contiguous()
        save_file(d, str(path))


ARRAY_FORMATS = [".npz", ".pt", ".safetensors", ".npy"]
LABELLED_FORMATS = [".npz", ".pt", ".safetensors"]


@pytest.mark.parametrize("suffix", ARRAY_FORMATS)
def test_array_formats_roundtrip(tmp_path: Path, suffix: str) -> None:
    x = RNG.standard_normal((10, 1, 8, 8))
    y = np.arange(10) % 4
    path = tmp_path / f"val{suffix}"
    _write(path, x, None if suffix == ".npy" else y)
    ds = load_data(path)
    assert isinstance(ds, ArrayDataset)
    assert len(ds) == 10 and ds.example_shape() == (1, 8, 8) and ds.skipped == []
    assert ds.x.dtype == torch.float32
    torch.testing.assert_close(ds.x, torch.from_numpy(x.astype(np.float32)))
    if suffix == ".npy":
        assert not ds.has_labels and ds.num_classes is None
        assert ds.description == "val.npy: 10 examples, x (1, 8, 8), no labels"
        assert len(ds[3]) == 1
        (xb,) = next(iter(make_loader(ds, 4)))
    else:
        assert ds.has_labels and ds.num_classes == 4
        assert ds.description == f"val{suffix}: 10 examples, x (1, 8, 8), labels (4 classes)"
        xi, yi = ds[3]
        torch.testing.assert_close(xi, torch.from_numpy(x[3].astype(np.float32)))
        assert isinstance(yi, int) and yi == 3
        xb, yb = next(iter(make_loader(ds, 4)))
        assert yb.dtype == torch.int64 and yb.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(xb, torch.from_numpy(x[:4].astype(np.float32)))


def test_float32_npz_not_copied_per_batch(tmp_path: Path) -> None:
    x = RNG.standard_normal((6, 3)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=x)
    ds = load_data(tmp_path / "a.npz")
    batch = ds.__getitems__([4, 1])
    assert batch.stacked[0].shape == (2, 3) and [len(item) for item in batch] == [1, 1]
    torch.testing.assert_close(batch.stacked[0], torch.from_numpy(x[[4, 1]]))
    # the batch list also works with torch's default collate
    from torch.utils.data import DataLoader

    (xb,) = next(iter(DataLoader(ds, batch_size=6)))
    torch.testing.assert_close(xb, torch.from_numpy(x))


@pytest.mark.parametrize("suffix", LABELLED_FORMATS)
def test_labels_float_integral_ok_and_int_x(tmp_path: Path, suffix: str) -> None:
    x = np.arange(12, dtype=np.int32).reshape(4, 3)
    path = tmp_path / f"d{suffix}"
    _write(path, x, np.array([0.0, 2.0, 1.0, 2.0]))
    ds = load_data(path)
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == [0, 2, 1, 2]
    torch.testing.assert_close(ds.x, torch.arange(12, dtype=torch.float32).reshape(4, 3))


def test_uint8_and_bigendian_npz(tmp_path: Path) -> None:
    x = np.arange(8, dtype=np.uint8).reshape(2, 4)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([1, 0], dtype=">i4"))
    ds = load_data(tmp_path / "a.npz")
    assert ds.x.dtype == torch.float32 and ds.x.flatten().tolist() == list(range(8))
    assert ds.y.tolist() == [1, 0]
    np.savez(tmp_path / "b.npz", x=x.astype(">f8"), y=np.array([3, 0], dtype=np.uint16))
    ds = load_data(tmp_path / "b.npz")
    assert ds.x.flatten().tolist() == list(range(8)) and ds.num_classes == 4


@pytest.mark.parametrize("suffix", LABELLED_FORMATS)
@pytest.mark.parametrize(
    ("y", "match"),
    [
        (np.array([0.0, 1.5, 1.0]), "non-integral"),
        (np.array([0, 1]), "3 examples but y has 2"),
        (np.array([0, -1, 1]), "negative"),
        (np.array([[0], [1], [1]]), "1-D"),
        (np.array([0.0, np.nan, 1.0]), "non-integral"),
    ],
)
def test_bad_labels(tmp_path: Path, suffix: str, y, match: str) -> None:
    path = tmp_path / f"d{suffix}"
    _write(path, np.zeros((3, 2), dtype=np.float32), y)
    with pytest.raises(DataError, match=match) as err:
        load_data(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", ARRAY_FORMATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_x(tmp_path: Path, suffix: str, bad: float) -> None:
    x = np.zeros((4, 2), dtype=np.float32)
    x[2, 1] = bad
    path = tmp_path / f"d{suffix}"
    _write(path, x)
    with pytest.raises(DataError, match=r"NaN/Inf values in 1 of 4 examples \(first: example 2\)") as err:
        load_data(path)
    assert str(path) in str(err.value)


def test_float64_overflow_is_inf(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.array([[1e300, 0.0]]))
    with pytest.raises(DataError, match="NaN/Inf"):
        load_data(tmp_path / "a.npy")


@pytest.mark.parametrize("suffix", ARRAY_FORMATS)
def test_empty_x(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    _write(path, np.zeros((0, 3), dtype=np.float32))
    with pytest.raises(DataError, match="empty") as err:
        load_data(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", ARRAY_FORMATS)
def test_one_dimensional_x(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    _write(path, np.zeros(5, dtype=np.float32))
    with pytest.raises(DataError, match=r"\(N, \.\.\.\)"):
        load_data(path)


def test_missing_x(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", inputs=np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"no array 'x'.*inputs") as err:
        load_data(tmp_path / "a.npz")
    assert "a.npz" in str(err.value) and "numpy.savez" in str(err.value)
    torch.save({"inputs": torch.zeros(2, 2)}, tmp_path / "a.pt")
    with pytest.raises(DataError, match=r"a\.pt has no entry 'x'"):
        load_data(tmp_path / "a.pt")
    save_file({"inputs": torch.zeros(2, 2)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(DataError, match=r"a\.safetensors has no tensor 'x'"):
        load_data(tmp_path / "a.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pt_never_unpickles_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"x": torch.zeros(2, 2), "y": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="plain dict of tensors") as err:
        load_data(tmp_path / "evil.pt")
    assert "evil.pt" in str(err.value)
    assert "pickled code ran" not in capsys.readouterr().out
    torch.save([torch.zeros(2, 2)], tmp_path / "list.pt")
    with pytest.raises(DataError, match="not a dict"):
        load_data(tmp_path / "list.pt")
    torch.save({"x": [1.0, 2.0]}, tmp_path / "notensor.pt")
    with pytest.raises(DataError, match="not a tensor"):
        load_data(tmp_path / "notensor.pt")


def test_object_arrays_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"o\.npy"):
        load_data(tmp_path / "o.npy")
    np.savez(tmp_path / "s.npz", x=np.array([["a", "b"]]))
    with pytest.raises(DataError, match="not numbers"):
        load_data(tmp_path / "s.npz")


@pytest.mark.parametrize("suffix", ARRAY_FORMATS)
def test_corrupt_array_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(b"\x00\x01 definitely not the format")
    with pytest.raises(DataError) as err:
        load_data(path)
    assert str(path) in str(err.value)


def test_missing_path_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        load_data(tmp_path / "nope.npz")
    assert "nope.npz" in str(err.value)
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(DataError, match=r"\.csv") as err:
        load_data(tmp_path / "data.csv")
    for s in (".npz", ".pt", ".safetensors", ".npy", "folder"):
        assert s in str(err.value)


def test_image_options_refused_for_arrays(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(UsageError, match="resize"):
        load_data(tmp_path / "a.npy", DataSpec(resize=4))
    assert len(load_data(tmp_path / "a.npy", DataSpec())) == 2


def test_uppercase_suffix(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 3), dtype=np.float32))
    (tmp_path / "a.npy").rename(tmp_path / "A.NPY")
    assert len(load_data(tmp_path / "A.NPY")) == 2


# ------------------------------------------------------------------------------------------------ batching


@pytest.fixture
def labelled(tmp_path: Path) -> ArrayDataset:
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10))
    return load_data(tmp_path / "d.npz")  # type: ignore[return-value]


def _order(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_sequential_order_and_drop_last(labelled: ArrayDataset) -> None:
    assert _order(make_loader(labelled, 3)) == list(range(10))
    assert [len(y) for _, y in make_loader(labelled, 3)] == [3, 3, 3, 1]
    assert [len(y) for _, y in make_loader(labelled, 3, drop_last=True)] == [3, 3, 3]
    assert len(make_loader(labelled, 3, drop_last=True)) == 3


def test_shuffle_deterministic(labelled: ArrayDataset) -> None:
    a = _order(make_loader(labelled, 4, shuffle=True, seed=1))
    b = _order(make_loader(labelled, 4, shuffle=True, seed=1))
    c = _order(make_loader(labelled, 4, shuffle=True, seed=2))
    assert a == b and a != c and sorted(a) == list(range(10)) and a != list(range(10))
    loader = make_loader(labelled, 4, shuffle=True, seed=1)
    assert _order(loader) == _order(loader) == a  # every pass is the same


def test_max_examples(labelled: ArrayDataset) -> None:
    loader = make_loader(labelled, 4, max_examples=5)
    assert _order(loader) == [0, 1, 2, 3, 4] and len(loader.dataset) == 5
    full = _order(make_loader(labelled, 4, shuffle=True, seed=3))
    assert _order(make_loader(labelled, 4, shuffle=True, seed=3, max_examples=5)) == full[:5]
    assert _order(make_loader(labelled, 4, max_examples=100)) == list(range(10))
    assert [len(y) for _, y in make_loader(labelled, 2, max_examples=5, drop_last=True)] == [2, 2]


def test_batches_match_items(labelled: ArrayDataset) -> None:
    for x, y in make_loader(labelled, 4, shuffle=True, seed=5):
        for xi, yi in zip(x, y, strict=True):
            torch.testing.assert_close(xi, labelled[int(yi)][0])
    got = list(iterate_batches(labelled, 6))
    assert [len(b[1]) for b in got] == [6, 4]


def test_image_folder_shuffle_and_workers(tmp_path: Path) -> None:
    _labelled_folder(tmp_path)
    ds = load_data(tmp_path)
    a = [(x, y) for x, y in make_loader(ds, 4, shuffle=True, seed=7)]
    b = [(x, y) for x, y in make_loader(ds, 4, shuffle=True, seed=7, num_workers=1)]
    assert len(a) == len(b) == 2
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert ya.dtype == torch.int64
        torch.testing.assert_close(xa, xb)
        assert ya.tolist() == yb.tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"batch_size": 0}, "batch size"), ({"batch_size": 2, "max_examples": 0}, "max examples")],
)
def test_loader_bad_args(labelled: ArrayDataset, kwargs, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        make_loader(labelled, **kwargs)


# ---------------------------------------------------------------------------------------------- parsing


def test_parse_floats() -> None:
    assert parse_floats("0.5,0.25, 1") == (0.5, 0.25, 1.0)
    assert parse_floats("2") == (2.0,)
    for junk in ("", "a,b", "1,,2", "nan", "1,inf"):
        with pytest.raises(UsageError):
            parse_floats(junk)


def test_parse_size() -> None:
    assert parse_size("224") == 224
    assert parse_size("224,256") == (224, 256)
    assert parse_size(" 32x48 ") == (32, 48)
    for junk in ("", "0", "-3", "1.5", "1,2,3", "abc"):
        with pytest.raises(UsageError):
            parse_size(junk)


def test_errors_are_bncorrect_errors(tmp_path: Path) -> None:
    with pytest.raises(BncorrectError):
        load_data(tmp_path / "missing")
