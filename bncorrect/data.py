"""Reading the data that ``estimate``, ``recalibrate`` and ``sweep-alpha`` run the model over (``--data``).

Formats (DESIGN §4), chosen by what ``path`` is:

* **a directory of images**. If it has sub-folders, each sub-folder is a class and the label of an image is
  the index of its folder among the *sorted* sub-folder names (images may sit in nested folders below a class
  folder); otherwise it is a flat folder of images without labels. Folders and files whose names start with
  ``.`` are ignored, and so are non-image files directly in the top folder of a class-folder layout (a
  README). An image directly in the top folder *and* class sub-folders is an error (it would be silently
  unlabelled). Recognized image files: ``.png .jpg .jpeg .bmp .gif .tif .tiff .webp`` (any case).
  Images are decoded per item with Pillow (memory stays flat for big folders) and turned into float32
  tensors ``(C, H, W)`` by :class:`DataSpec`: convert to RGB (``channels=3``, the default, what ImageNet
  models expect) or grayscale (``channels=1``); ``resize`` (an int scales the shorter side to that many
  pixels like torchvision ``Resize(int)``; ``(H, W)`` resizes to exactly that; bilinear); ``crop`` (a center
  crop, int or ``(H, W)``); scale to ``[0, 1]``; ``(x - mean) / std`` with the ImageNet mean/std by default
  (for one channel the average of the three), skipped with ``normalize=False``. Every example must have
  the shape of the first one; otherwise the error names the file and suggests ``--resize``/``--crop``.
  EXIF orientation is not applied (as in torchvision). A ``preprocess`` hook (``"module.path:function"``
  or a callable) replaces resize/crop/normalization: it receives the decoded image already converted to
  RGB (or ``L`` with ``channels=1``) and returns a tensor (or numpy array).

  A file that is not an image (a ``.txt`` among the images) or cannot be decoded is an error naming the
  file. With ``skip_bad_files=True`` load_data first does a quick check of every file (the extension, then
  ``PIL.Image.verify()``, which reads headers and, for PNG, the chunk checksums but does not decode) and
  leaves out the files that fail, recording them in ``dataset.skipped`` so the CLI can report them. A file
  that passes the quick check but still fails to decode later (possible for a truncated JPEG) raises a
  :class:`DataError` naming it. Without ``skip_bad_files`` non-image files are reported by load_data and
  undecodable images when they are read.

* **``.npz``** with an array ``x`` and an optional ``y`` (``numpy.load(allow_pickle=False)``).
* **``.pt``** holding a plain dict ``{"x": tensor, "y": tensor}`` (``y`` optional), read with
  ``torch.load(weights_only=True)``: no pickled code is ever run.
* **``.safetensors``** with tensors ``x`` and optionally ``y``.
* **``.npy``**: inputs only (no labels), ``numpy.load(allow_pickle=False)``.

For these array formats ``x`` has shape ``(N, ...)`` and is converted to float32 (values are not rescaled;
NaN/Inf are refused), ``y`` holds ``N`` non-negative integer class labels (a float ``y`` with integral
values is accepted) and becomes int64, or for segmentation ``N`` integer masks ``(N, H, W)`` (class indices;
unlabelled pixels hold the ignore index, 255 by default; values are checked against the model's classes by
``sweep-alpha``), kept as uint8 when stored so, else int64. The arrays are held in memory and batched by
indexing with the batch's indices (no per-example Python objects, no copy of the whole array per batch).

Items and batches: ``dataset[i]`` is ``(x,)`` for unlabelled data and ``(x, y)`` with ``y`` a Python ``int``
(a ``(H, W)`` tensor for masks) for labelled data, the same form for every item of a dataset.
:func:`make_loader` batches them into ``(x,)`` or ``(x, y)`` with ``x`` float32 ``(B, ...)`` and ``y`` a
LongTensor ``(B,)`` (masks: ``(B, H, W)``).

Errors the user can fix raise :class:`~bncorrect.errors.DataError` (problems with the data) or
:class:`~bncorrect.errors.UsageError` (option values that make no sense: a bad ``--resize``, a ``--mean``
of the wrong length, a preprocess hook that cannot be imported); the message names the file and the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from .errors import BncorrectError, DataError, UsageError

__all__ = [
    "ARRAY_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "DataSpec",
    "Dataset",
    "ImageFolderDataset",
    "from_arrays",
    "iterate_batches",
    "load_data",
    "make_loader",
    "parse_floats",
    "parse_size",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ARRAY_SUFFIXES: tuple[str, ...] = (".npz", ".pt", ".safetensors", ".npy")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_SUPPORTED = "a folder of images (class sub-folders or flat), .npz, .pt, .safetensors or .npy"
_SKIP_HINT = "remove or move the file, or pass --skip-bad-files to leave unreadable files out"
_SIZE_HINT = (
    "pass --resize N (shorter side to N pixels) and --crop N (center crop) so every image has the same size, "
    "e.g. --resize 256 --crop 224"
)


# --------------------------------------------------------------------------------------------------------
# Options


@dataclass
class DataSpec:
    """Preprocessing options for image folders (array files are used as they are).

    ``resize``: an int scales the shorter side to that many pixels (aspect ratio kept, like torchvision
    ``Resize(int)``); ``(H, W)`` resizes to exactly that. ``crop``: center crop, int (square) or ``(H, W)``.
    ``mean``/``std``: per channel (or one value for all); ``None`` means the ImageNet values (their average
    for one channel). ``normalize=False`` leaves values in ``[0, 1]``. ``channels``: 3 (RGB) or 1
    (grayscale). ``preprocess``: ``"module.path:function"`` or a callable taking a PIL image and returning a
    tensor; it replaces resize/crop/normalization. ``skip_bad_files``: leave out (and record in
    ``dataset.skipped``) files that are not readable images instead of failing.
    """

    resize: int | tuple[int, int] | None = None
    crop: int | tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None  # None = ImageNet default
    std: tuple[float, ...] | None = None
    normalize: bool = True
    channels: int = 3
    preprocess: str | Callable[..., Any] | None = None
    skip_bad_files: bool = False
    interpolation: str = "bilinear"
    source: str | None = None  # where the options came from (e.g. "timm pretrained_cfg"), for the description


def _check_size(value: Any, name: str) -> tuple[int, int] | int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise UsageError(f"{name} must be a positive int or (H, W), got {value!r}")
    if isinstance(value, (int, np.integer)):
        if value <= 0:
            raise UsageError(f"{name} must be positive, got {value}", hint=f"e.g. --{name} 224")
        return int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise UsageError(f"{name} must be positive integers (H, W), got {value!r}")
            out.append(int(v))
        return (out[0], out[1])
    raise UsageError(f"{name} must be a positive int or (H, W), got {value!r}", hint=f"e.g. --{name} 224,224")


def _per_channel(
    values: Sequence[float] | None, default: Sequence[float], channels: int, name: str
) -> Tensor:
    vals: tuple[float, ...]
    if values is None:
        vals = tuple(default) if channels == 3 else (sum(default) / len(default),)
    else:
        try:
            vals = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise UsageError(f"--{name} must be numbers, got {values!r}") from None
        if len(vals) == 1:
            vals = vals * channels
        if len(vals) != channels:
            raise UsageError(
                f"--{name} has {len(vals)} values but the images have {channels} channel(s)",
                hint=f"give one value or {channels} comma-separated values",
            )
        if not all(math.isfinite(v) for v in vals):
            raise UsageError(f"--{name} must be finite numbers, got {values!r}")
    if name == "std" and any(v <= 0 for v in vals):
        raise UsageError(f"--std must be positive, got {vals}")
    return torch.tensor(vals, dtype=torch.float32).reshape(-1, 1, 1)


def _resolve_hook(hook: str | Callable[..., Any]) -> Callable[..., Any]:
    """A ``preprocess`` callable, or the one ``module.path:function`` / ``path/to/file.py:function`` names
    (:func:`bncorrect.factories.import_callable`: the working folder is never put on ``sys.path``)."""
    if callable(hook):
        return hook
    from .factories import import_callable

    return import_callable(hook, option="preprocess", error=UsageError)


# --------------------------------------------------------------------------------------------------------
# Datasets


class Dataset(torch.utils.data.Dataset):
    """Base of what :func:`load_data` returns.

    ``dataset[i]`` is ``(x,)`` without labels or ``(x, y)`` with ``y`` an ``int``; ``x`` is a float32 tensor.
    """

    path: Path
    has_labels: bool
    description: str
    skipped: list[str]
    num_classes: int | None

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Tensor, int] | tuple[Tensor]:
        raise NotImplementedError

    def example_shape(self) -> tuple[int, ...]:
        """The shape of one ``x`` (of the first example)."""
        raise NotImplementedError


class _Batch(list):  # type: ignore[type-arg]
    """A list of samples (usable by any collate function) that also carries the already stacked tensors."""

    stacked: tuple[Tensor, ...]


class ArrayDataset(Dataset):
    """Examples held in memory: ``x`` float32 ``(N, ...)`` and optional ``y``: int64 class labels ``(N,)``,
    or segmentation masks ``(N, H, W)`` (uint8 or int64; ``label_shape`` is ``(H, W)``, ``num_classes``
    None: the ignore index is not known here)."""

    def __init__(self, path: Path, x: Tensor, y: Tensor | None, *, kind: str) -> None:
        self.path = path
        self.x = x
        self.y = y
        self.has_labels = y is not None
        self.skipped = []
        #: the shape of one example's label: () for class labels, (H, W) for masks
        self.label_shape: tuple[int, ...] = tuple(y.shape[1:]) if y is not None else ()
        masks = y is not None and y.ndim == 3
        self.num_classes = int(y.max().item()) + 1 if y is not None and not masks else None
        if y is None:
            labels = "no labels"
        elif masks:
            labels = f"masks {y.shape[1]}x{y.shape[2]} (values {int(y.min())}..{int(y.max())})"
        else:
            labels = f"labels ({self.num_classes} classes)"
        self.description = f"{path.name}: {len(x)} examples, x {tuple(x.shape[1:])}, {labels}"
        self.kind = kind

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, int] | tuple[Tensor] | tuple[Tensor, Tensor]:
        if self.y is None:
            return (self.x[i],)
        if self.label_shape:  # a mask
            return (self.x[i], self.y[i])
        return (self.x[i], int(self.y[i]))

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Gather a whole batch with one indexing operation (used by DataLoader)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        xs = self.x.index_select(0, idx)
        batch = _Batch()
        if self.y is None:
            batch.extend((row,) for row in xs.unbind(0))
            batch.stacked = (xs,)
        else:
            ys = self.y.index_select(0, idx)
            batch.extend(zip(xs.unbind(0), ys.unbind(0) if self.label_shape else ys.tolist(), strict=True))
            batch.stacked = (xs, ys)
        return batch

    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


class ImageFolderDataset(Dataset):
    """Images decoded one by one from ``files`` (a list of ``(path, label)``; label -1 without labels)."""

    def __init__(
        self,
        root: Path,
        files: list[tuple[Path, int]],
        classes: list[str] | None,
        spec: DataSpec,
        skipped: list[str],
    ) -> None:
        self.path = root
        self.root = root
        self.files = files
        self.classes = classes
        self.spec = spec
        self.skipped = skipped
        self.has_labels = classes is not None
        self.num_classes = len(classes) if classes is not None else None
        self._mode = "RGB" if spec.channels == 3 else "L"
        self._resize = _check_size(spec.resize, "resize")
        self._crop = _check_size(spec.crop, "crop")
        _INTERPOLATION[spec.interpolation]  # an unknown name fails here, not on the first image
        self._mean = _per_channel(spec.mean, IMAGENET_MEAN, spec.channels, "mean")
        self._std = _per_channel(spec.std, IMAGENET_STD, spec.channels, "std")
        self._hook = _resolve_hook(spec.preprocess) if spec.preprocess is not None else None
        self._hook_name = (
            spec.preprocess
            if isinstance(spec.preprocess, str)
            else getattr(spec.preprocess, "__qualname__", repr(spec.preprocess))
        )
        self._ref_shape: tuple[int, ...] | None = None
        self._ref_file: Path | None = None
        # Decode the first image now: fails early on a bad first file and gives the example shape.
        first = self._load(0)
        self._ref_shape = tuple(first.shape)
        self._ref_file = files[0][0]
        self.description = self._describe()

    def _describe(self) -> str:
        n = len(self.files)
        name = self.root.name or str(self.root)
        if self.classes is not None:
            where = f"{n} images in {len(self.classes)} class folders"
            labels = f"labels ({len(self.classes)} classes)"
        else:
            where, labels = f"{n} images", "no labels"
        parts = [f"{name}/: {where}, x {self._ref_shape}, {labels}"]
        if self._hook is not None:
            parts.append(f"preprocess {self._hook_name}")
        else:
            parts.append("RGB" if self.spec.channels == 3 else "grayscale")
            if self.spec.source:
                parts.append(f"from {self.spec.source}")
            if self._resize is not None:
                parts.append(
                    f"resize {self._resize}"
                    + ("" if self.spec.interpolation == "bilinear" else f" ({self.spec.interpolation})")
                )
            if self._crop is not None:
                parts.append(f"crop {self._crop}")
            if self.spec.normalize:
                mean = ",".join(f"{v:g}" for v in self._mean.flatten().tolist())
                std = ",".join(f"{v:g}" for v in self._std.flatten().tolist())
                parts.append(f"mean {mean} std {std}")
            else:
                parts.append("not normalized")
        if self.skipped:
            parts.append(f"{len(self.skipped)} bad files skipped")
        return ", ".join(parts)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | tuple[Tensor]:
        x = self._load(i)
        if self._ref_shape is not None and tuple(x.shape) != self._ref_shape:
            path = self.files[i][0]
            raise DataError(
                f"image {path} gives an example of shape {tuple(x.shape)} but {self._ref_file} gives "
                f"{self._ref_shape}; every example must have the same shape",
                path=path,
                hint=_SIZE_HINT if self._hook is None else "make the preprocess hook return one fixed shape",
            )
        label = self.files[i][1]
        return (x,) if self.classes is None else (x, label)

    def example_shape(self) -> tuple[int, ...]:
        assert self._ref_shape is not None
        return self._ref_shape

    def _load(self, i: int) -> Tensor:
        from PIL import Image

        path = self.files[i][0]
        try:
            with Image.open(path) as img:
                img.load()
                img = img.convert(self._mode)
        except Exception as exc:
            hint = _SKIP_HINT
            if self.spec.skip_bad_files:
                hint = "the file passed the quick check of --skip-bad-files but cannot be decoded; remove it"
            raise DataError(f"cannot read image {path}: {exc}", path=path, hint=hint) from exc
        if self._hook is not None:
            return self._apply_hook(img, path)
        return self._transform(img, path)

    def _apply_hook(self, img: Any, path: Path) -> Tensor:
        try:
            out = self._hook(img)  # type: ignore[misc]
        except BncorrectError:
            raise
        except Exception as exc:
            raise DataError(
                f"preprocess hook {self._hook_name} failed on {path}: {type(exc).__name__}: {exc}",
                path=path,
                hint="fix the preprocess function (it receives a PIL image and must return a tensor)",
            ) from exc
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(np.ascontiguousarray(out))
        if not isinstance(out, Tensor):
            raise DataError(
                f"preprocess hook {self._hook_name} returned {type(out).__name__} for {path}, not a tensor",
                path=path,
                hint="return a torch.Tensor of shape (C, H, W)",
            )
        if out.is_complex() or not (out.is_floating_point() or out.dtype in _INT_DTYPES):
            raise DataError(f"preprocess hook {self._hook_name} returned a {out.dtype} tensor for {path}")
        return out.to(torch.float32)

    def _transform(self, img: Any, path: Path) -> Tensor:

        if self._resize is not None:
            w, h = img.size
            if isinstance(self._resize, int):
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = self._resize, int(self._resize * long / short)
                new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            else:
                new_h, new_w = self._resize
            if (new_w, new_h) != (w, h):
                img = img.resize((new_w, new_h), _INTERPOLATION[self.spec.interpolation])
        arr = np.asarray(img, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self._crop is not None:
            ch, cw = (self._crop, self._crop) if isinstance(self._crop, int) else self._crop
            h, w = arr.shape[:2]
            if ch > h or cw > w:
                raise DataError(
                    f"image {path} is {h}x{w} (after resizing) but the crop is {ch}x{cw}",
                    path=path,
                    hint="resize first (--resize to at least the crop size) or use a smaller --crop",
                )
            top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
            arr = arr[top : top + ch, left : left + cw]
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))) / 255.0
        if self.spec.normalize:
            x = (x - self._mean) / self._std
        return x


def _pil_modes() -> dict[str, int]:
    from PIL import Image

    return {
        "nearest": Image.NEAREST,
        "bilinear": Image.BILINEAR,
        "bicubic": Image.BICUBIC,
        "lanczos": Image.LANCZOS,
    }


class _Modes(dict):  # PIL imported on first use
    def __missing__(self, key: str) -> int:
        self.update(_pil_modes())
        if key not in self:
            raise UsageError(f"interpolation must be one of nearest, bilinear, bicubic, lanczos, got {key!r}")
        return self[key]


_INTERPOLATION = _Modes()

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


# --------------------------------------------------------------------------------------------------------
# Loading


def _default_spec_fields_changed(spec: DataSpec) -> list[str]:
    default = DataSpec()
    changed = [f.name for f in fields(DataSpec) if getattr(spec, f.name) != getattr(default, f.name)]
    return [("data_config" if name == "source" else name) for name in changed]


def from_arrays(x: Any, y: Any = None, *, name: str = "<in-memory>") -> ArrayDataset:
    """A :class:`Dataset` over arrays already in memory (a tensor or numpy array ``x`` of shape (N, ...),
    optional labels ``y``), checked as the array files are (float32 x, finite; integer labels)."""
    path = Path(name)
    xt = _check_x(x, path)
    yt = _check_y(y, len(xt), path) if y is not None else None
    return ArrayDataset(path, xt, yt, kind="arrays")


def load_data(path: str | Path, spec: DataSpec | None = None) -> Dataset:
    """Open ``path`` (an image folder, ``.npz``, ``.pt``, ``.safetensors`` or ``.npy``) as a :class:`Dataset`.

    ``spec`` applies to image folders only; giving non-default options for an array file is a UsageError.
    """
    path = Path(path)
    spec = spec if spec is not None else DataSpec()
    if not path.exists():
        raise DataError(
            f"data {path} does not exist", path=path, hint=f"--data takes {_SUPPORTED}; check the path"
        )
    if path.is_dir():
        if spec.channels not in (1, 3):
            raise UsageError(f"channels must be 1 or 3, got {spec.channels!r}")
        return _load_image_folder(path, spec)
    suffix = path.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise DataError(
            f"unknown data format {suffix or '(no suffix)'!r} of {path}",
            path=path,
            hint=f"--data takes {_SUPPORTED}",
        )
    changed = _default_spec_fields_changed(spec)
    if changed:
        raise UsageError(
            f"the options {', '.join(changed)} apply to image folders only, but {path} is a {suffix} file",
            path=path,
            hint="preprocess the arrays yourself, or drop those options",
        )
    if suffix == ".npz":
        x, y = _read_npz(path)
    elif suffix == ".npy":
        x, y = _read_npy(path), None
    elif suffix == ".pt":
        x, y = _read_pt(path)
    else:
        x, y = _read_safetensors(path)
    xt = _check_x(x, path)
    yt = _check_y(y, len(xt), path) if y is not None else None
    return ArrayDataset(path, xt, yt, kind=suffix)


def _read_npz(path: Path) -> tuple[Any, Any]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            if "x" not in keys:
                raise DataError(
                    f"{path} has no array 'x' (it holds {keys or 'nothing'})",
                    path=path,
                    hint="save it with numpy.savez(path, x=inputs, y=labels)",
                )
            x = npz["x"]
            y = npz["y"] if "y" in keys else None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"cannot read {path} as .npz: {exc}",
            path=path,
            hint="save plain numeric arrays with numpy.savez(path, x=inputs, y=labels) (no object arrays)",
        ) from exc
    return x, y


def _read_npy(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(
            f"cannot read {path} as .npy: {exc}",
            path=path,
            hint="save a plain numeric array with numpy.save(path, inputs) (no object arrays)",
        ) from exc


def _read_pt(path: Path) -> tuple[Any, Any]:
    hint = "the file must hold a plain dict of tensors: torch.save({'x': inputs, 'y': labels}, path)"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        from .errors import torch_load_message

        raise DataError(
            f"cannot read {path} as data without running code from it: {torch_load_message(str(exc))}",
            path=path,
            hint=hint,
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a dict of tensors", path=path, hint=hint)
    if "x" not in obj:
        raise DataError(
            f"{path} has no entry 'x' (it holds {sorted(map(str, obj)) or 'nothing'})", path=path, hint=hint
        )
    for key in ("x", "y"):
        if key in obj and not isinstance(obj[key], Tensor):
            raise DataError(
                f"{path}: entry {key!r} is a {type(obj[key]).__name__}, not a tensor", path=path, hint=hint
            )
    return obj["x"], obj.get("y")


def _read_safetensors(path: Path) -> tuple[Any, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if "x" not in keys:
                raise DataError(
                    f"{path} has no tensor 'x' (it holds {keys or 'nothing'})",
                    path=path,
                    hint="save it with safetensors.torch.save_file({'x': inputs, 'y': labels}, path)",
                )
            x = f.get_tensor("x")
            y = f.get_tensor("y") if "y" in keys else None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"cannot read {path} as .safetensors: {exc}",
            path=path,
            hint="save it with safetensors.torch.save_file({'x': inputs, 'y': labels}, path)",
        ) from exc
    return x, y


def _to_tensor(a: Any, path: Path, name: str) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach().cpu()
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise DataError(
            f"{path}: {name} has dtype {arr.dtype}, not numbers",
            path=path,
            hint=f"store {name} as a float (inputs) or integer (labels) array",
        )
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "u" and arr.dtype != np.uint8:
        arr = arr.astype(np.int64)
    return torch.from_numpy(arr)


def _check_x(x: Any, path: Path) -> Tensor:
    if isinstance(x, np.ndarray) and x.dtype.kind in "biu" and x.dtype != np.uint8:
        x = x.astype(np.float32)  # avoid torch dtypes it may not support (uint16...); exact for small ints
    t = _to_tensor(x, path, "x")
    if t.is_complex():
        raise DataError(f"{path}: x is complex ({t.dtype})", path=path, hint="store real-valued inputs")
    if t.ndim < 2:
        raise DataError(
            f"{path}: x has shape {tuple(t.shape)}; it must be (N, ...) with one row per example",
            path=path,
            hint="for N examples of F features store x with shape (N, F)",
        )
    if t.shape[0] == 0:
        raise DataError(f"{path} is empty: x has 0 examples", path=path, hint="store at least one example")
    t = t.to(torch.float32)  # no copy when it already is float32
    if not t.is_contiguous():
        t = t.contiguous()
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad_rows = (~finite).reshape(len(t), -1).any(dim=1)
        n_bad = int(bad_rows.sum())
        first = int(bad_rows.nonzero()[0, 0])
        raise DataError(
            f"{path}: x has NaN/Inf values in {n_bad} of {len(t)} examples (first: example {first})",
            path=path,
            hint="remove or fix those examples (values beyond the float32 range also become Inf)",
        )
    return t


def labels_hint(shape: tuple[int, ...]) -> str:
    """What labels must look like, and a true suggestion for labels of an unexpected ``shape`` (first axis:
    examples)."""
    base = (
        "y must hold one integer class index per example, shape (N,), or for segmentation one integer mask "
        "per example, shape (N, H, W) (class indices; unlabelled pixels marked by the ignore index, 255 by "
        "default)"
    )
    if len(shape) == 2:
        if shape[1] == 1:
            return base + "; this y is one column (N, 1): y.reshape(-1)"
        return base + f"; a y of shape (N, {shape[1]}) looks like one-hot or soft labels: y.argmax(1)"
    if len(shape) == 4:
        if shape[1] == 1:
            return base + "; this y looks like masks with a channel axis (N, 1, H, W): y[:, 0]"
        if shape[3] == 1:
            return base + "; this y looks like masks with a channel axis (N, H, W, 1): y[..., 0]"
        if shape[1] == 3 or shape[3] == 3:
            return base + (
                "; 3 channels look like colour-coded masks: map each colour to its class index (palette "
                "PNGs such as VOC's hold the indices: read them with PIL without converting to RGB)"
            )
        return base + f"; a y of shape (N, {shape[1]}, H, W) looks like one-hot masks: y.argmax(1)"
    return base


def _check_y(y: Any, n: int, path: Path) -> Tensor:
    """Class labels (N,) -> int64, values >= 0; or segmentation masks (N, H, W) of integers (any value: the
    sweep checks them against the model's classes and the ignore index) -> uint8 if stored as uint8, else
    int64."""
    t = _to_tensor(y, path, "y")
    hint = labels_hint(tuple(t.shape))
    if t.is_complex():
        raise DataError(f"{path}: y is complex ({t.dtype})", path=path, hint=hint)
    masks = t.ndim == 3
    if t.ndim not in (1, 3):
        raise DataError(
            f"{path}: y has shape {tuple(t.shape)}; labels must be 1-D (N,) class indices or (N, H, W) "
            "segmentation masks",
            path=path,
            hint=hint,
        )
    if len(t) != n:
        what = "masks" if masks else "labels"
        raise DataError(
            f"{path}: x has {n} examples but y has {len(t)} {what}",
            path=path,
            hint=f"store exactly one {'mask' if masks else 'label'} per example",
        )
    if t.is_floating_point() and not (bool(torch.isfinite(t).all()) and bool((t == t.round()).all())):
        what = "mask values must be class indices" if masks else "labels must be class indices"
        raise DataError(f"{path}: y has non-integral values; {what}", path=path, hint=hint)
    if t.dtype == torch.bool:
        t = t.to(torch.int64)
    if masks:
        if t.numel() == 0:
            raise DataError(f"{path}: the masks y {tuple(t.shape)} hold no pixels", path=path, hint=hint)
        return t if t.dtype == torch.uint8 else t.to(torch.int64)
    if bool((t < 0).any()):
        raise DataError(f"{path}: y has negative labels (min {int(t.min())})", path=path, hint=hint)
    return t.to(torch.int64)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_files(folder: Path) -> list[Path]:
    """All non-hidden files below ``folder`` in sorted order (following symlinks, like ImageFolder).

    A symlink that leads back into a folder already on the way down (a loop) is a :class:`DataError`
    naming the link, instead of a walk that never ends."""
    out: list[Path] = []

    def visit(d: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            st = d.stat()
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            raise DataError(
                f"cannot read folder {d} ({exc.strerror or exc})",
                path=d,
                hint="check that it exists and is readable (a broken or looping symlink?)",
            ) from None
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            raise DataError(
                f"{d} is a symlink loop: it leads back to a folder above it",
                path=d,
                hint="remove the link, or point it at a folder outside the data folder",
            )
        inside = ancestors | {key}
        for e in entries:
            if _is_hidden(e.name):
                continue
            p = Path(e.path)
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                visit(p, inside)
            else:
                out.append(p)

    visit(folder, frozenset())
    return out


def _quick_check(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
    except Exception:
        return False
    return True


def _load_image_folder(root: Path, spec: DataSpec) -> ImageFolderDataset:
    try:
        entries = sorted((e for e in os.scandir(root) if not _is_hidden(e.name)), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list folder {root}: {exc}", path=root) from exc
    subdirs = [e for e in entries if e.is_dir()]
    top_files = [Path(e.path) for e in entries if e.is_file()]
    classes: list[str] | None
    candidates: list[tuple[Path, int]]
    if subdirs:
        top_images = [p for p in top_files if _is_image(p.name)]
        if top_images:
            raise DataError(
                f"folder {root} has both class sub-folders ({', '.join(e.name for e in subdirs[:3])}"
                f"{', ...' if len(subdirs) > 3 else ''}) and images directly in it ({top_images[0].name}"
                f"{', ...' if len(top_images) > 1 else ''}); those images would have no label",
                path=root,
                hint="for labelled data put every image in a class sub-folder; for unlabelled data "
                "use a flat folder without sub-folders",
            )
        classes = [e.name for e in subdirs]
        candidates = [(p, label) for label, e in enumerate(subdirs) for p in _walk_files(Path(e.path))]
    else:
        classes = None
        candidates = [(p, -1) for p in top_files]

    skipped: list[str] = []
    files: list[tuple[Path, int]] = []
    not_images = [p for p, _ in candidates if not _is_image(p.name)]
    if not_images and not spec.skip_bad_files:
        more = f" and {len(not_images) - 1} more" if len(not_images) > 1 else ""
        raise DataError(
            f"{not_images[0]} is not an image file{more} (in data folder {root}; image files end in "
            f"{' '.join(IMAGE_EXTENSIONS)})",
            path=not_images[0],
            hint=_SKIP_HINT,
        )
    for p, label in candidates:
        if spec.skip_bad_files and (not _is_image(p.name) or not _quick_check(p)):
            skipped.append(str(p))
        else:
            files.append((p, label))
    if not files:
        what = "class sub-folders" if classes is not None else "folder"
        extra = f" ({len(skipped)} unreadable files skipped)" if skipped else ""
        raise DataError(
            f"data folder {root} has no images{extra}",
            path=root,
            hint=f"put image files ({' '.join(IMAGE_EXTENSIONS)}) in the {what}",
        )
    return ImageFolderDataset(root, files, classes, spec, skipped)


# --------------------------------------------------------------------------------------------------------
# Batching


@dataclass
class _Failure:
    """A user error raised in a DataLoader worker, carried back intact to be re-raised in the main process."""

    exc_type: type[BncorrectError]
    message: str
    path: str | None = None
    hint: str | None = None

    @classmethod
    def of(cls, exc: BncorrectError) -> _Failure:
        return cls(type(exc), exc.message, exc.path, exc.hint)

    def error(self) -> BncorrectError:
        return self.exc_type(self.message, path=self.path, hint=self.hint)


class _Guarded(torch.utils.data.Dataset):
    """Wraps a dataset for worker processes: user errors become a :class:`_Failure` value instead of an
    exception, because DataLoader would otherwise re-raise them with the worker's traceback as the message."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except BncorrectError as exc:
            return _Failure.of(exc)

    def __getitems__(self, indices: Sequence[int]) -> Any:
        try:
            if callable(getattr(self.dataset, "__getitems__", None)):
                return self.dataset.__getitems__(indices)
            return [self.dataset[i] for i in indices]
        except BncorrectError as exc:
            return _Failure.of(exc)


def _collate(items: Any) -> tuple[Tensor, ...] | _Failure:
    if isinstance(items, _Failure):
        return items
    if isinstance(items, _Batch):
        return items.stacked
    for item in items:
        if isinstance(item, _Failure):
            return item
    try:
        return _stack(items)
    except BncorrectError as exc:
        return _Failure.of(exc)


def _stack(items: Sequence[Any]) -> tuple[Tensor, ...]:
    xs = [item[0] for item in items]
    shape = xs[0].shape
    for x in xs[1:]:
        if x.shape != shape:
            raise DataError(
                f"examples in one batch have different shapes: {tuple(shape)} and {tuple(x.shape)}",
                hint=_SIZE_HINT,
            )
    x = torch.stack(xs, 0)
    if len(items[0]) == 1:
        return (x,)
    if isinstance(items[0][1], Tensor) and items[0][1].dim():  # segmentation masks
        return (x, torch.stack([item[1] for item in items], 0))
    return (x, torch.tensor([int(item[1]) for item in items], dtype=torch.int64))


class _Loader(DataLoader):
    """A DataLoader whose user errors from worker processes arrive as the original clean error."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        it = super().__iter__()
        for batch in it:
            if isinstance(batch, _Failure):
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                raise batch.error()
            yield batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    max_examples: int | None = None,
    shard: tuple[int, int] | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of ``(x,)`` or ``(x, y)`` (``y`` a LongTensor) over ``dataset``.

    ``shard=(rank, world)``: only this rank's batches of that order (batch ``i`` to rank ``i % world``,
    :func:`bncorrect.distributed.shard_order`). ``pin_memory``: page-locked batches, for copies to a GPU.

    With ``shuffle`` the order is a permutation drawn from ``torch.Generator().manual_seed(seed)`` once, so
    every pass over the loader yields the same batches (the same seed gives the same order everywhere).
    ``max_examples`` keeps the first N examples of that order (a :class:`torch.utils.data.Subset`).
    A :class:`DataError` raised while reading an example (also in a worker process, ``num_workers > 0``)
    reaches the caller with its own message.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or max_examples < 1):
        raise UsageError(f"max examples must be a positive integer, got {max_examples!r}")
    if num_workers < 0:
        raise UsageError(f"num_workers must be >= 0, got {num_workers}")
    n = len(dataset)
    data: Any = dataset
    if shuffle:
        gen = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(n, generator=gen).tolist()
        if max_examples is not None:
            order = order[:max_examples]
        data = Subset(dataset, order)
    elif max_examples is not None and max_examples < n:
        data = Subset(dataset, range(max_examples))
    if shard is not None and shard[1] > 1:
        from .distributed import shard_order

        order = list(data.indices) if isinstance(data, Subset) else list(range(n))
        data = Subset(dataset, shard_order(order, batch_size, *shard))
    if num_workers > 0:
        data = _Guarded(data)
    return _Loader(
        data,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    max_examples: int | None = None,
) -> Iterator[tuple[Tensor, ...]]:
    """Iterate the batches of :func:`make_loader` with the same arguments."""
    yield from make_loader(
        dataset,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        num_workers=num_workers,
        drop_last=drop_last,
        max_examples=max_examples,
    )


# --------------------------------------------------------------------------------------------------------
# Option parsing for the CLI


def parse_floats(text: str) -> tuple[float, ...]:
    """``"0.5,0.5,0.5"`` -> ``(0.5, 0.5, 0.5)``; UsageError on anything that is not finite numbers."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(p == "" for p in parts):
        raise UsageError(f"expected comma-separated numbers, got {text!r}", hint="e.g. 0.485,0.456,0.406")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError(
            f"expected comma-separated numbers, got {text!r}", hint="e.g. 0.485,0.456,0.406"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"expected finite numbers, got {text!r}")
    return values


def parse_size(text: str) -> int | tuple[int, int]:
    """``"224"`` -> ``224``; ``"224,256"`` (or ``"224x256"``) -> ``(224, 256)`` as (H, W)."""
    raw = str(text).strip().lower().replace("x", ",")
    parts = [p.strip() for p in raw.split(",")]
    hint = "give one size (e.g. 224) or height,width (e.g. 224,256)"
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise UsageError(f"expected a size like 224 or 224,256, got {text!r}", hint=hint)
    values = [int(p) for p in parts]
    if any(v <= 0 for v in values):
        raise UsageError(f"sizes must be positive, got {text!r}", hint=hint)
    return values[0] if len(values) == 1 else (values[0], values[1])
