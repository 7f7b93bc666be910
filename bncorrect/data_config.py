"""Image preprocessing that follows the model's own conventions (``--data-config``).

A model trained on images was evaluated with one resize, crop, interpolation and mean/std; statistics
computed on differently preprocessed images are wrong for it. Two conventions are read:

- **timm**: a model carries ``pretrained_cfg`` (older timm: ``default_cfg``), a dict with ``input_size``
  (C, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct`` (default 0.875) and ``crop_mode``. As timm's
  ``resolve_data_config`` + ``transforms_imagenet_eval``: the shorter side is resized to
  ``floor(H / crop_pct)`` (``crop_mode="squash"``: both sides), then a center crop of (H, W).
  ``--data-config model`` reads it from the loaded model.
- **torchvision**: weights enums (``torchvision.models.ResNet50_Weights.IMAGENET1K_V2``) whose
  ``transforms()`` is an ``ImageClassification`` with ``resize_size``, ``crop_size``, ``interpolation``,
  ``mean`` and ``std``. ``--data-config torchvision.models:ResNet50_Weights.IMAGENET1K_V2`` names one (an
  import the user asks for, resolved like ``--arch``: the working folder is never searched by itself).

Explicit ``--resize``/``--crop``/``--mean``/``--std`` still win over the model's values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from .data import DataSpec
from .errors import UsageError, spell

_HINT = (
    "pass --data-config model for a timm model (it reads model.pretrained_cfg), or a torchvision weights "
    "enum such as --data-config torchvision.models:ResNet50_Weights.IMAGENET1K_V2, or give --resize, "
    "--crop, --mean and --std yourself"
)


def spec_from_timm_cfg(cfg: Mapping[str, Any]) -> DataSpec:
    """The :class:`DataSpec` of a timm ``pretrained_cfg`` (module docstring)."""
    size = cfg.get("input_size") or cfg.get("test_input_size")
    if not size or len(size) != 3:
        raise UsageError(f"the model's pretrained_cfg has no input_size (C, H, W): {dict(cfg)!r}", hint=_HINT)
    c, h, w = (int(v) for v in size)
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    mode = cfg.get("crop_mode") or "center"
    resize: int | tuple[int, int]
    if mode == "squash":
        resize = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    else:
        resize = math.floor(h / crop_pct) if h == w else (math.floor(h / crop_pct), math.floor(w / crop_pct))
    return DataSpec(
        resize=resize,
        crop=h if h == w else (h, w),
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        channels=c if c in (1, 3) else 3,
        interpolation=str(cfg.get("interpolation") or "bilinear"),
        source=f"pretrained_cfg {cfg.get('architecture') or cfg.get('hf_hub_id') or ''}".strip(),
    )


def spec_from_transforms(transforms: Any, name: str) -> DataSpec:
    """The :class:`DataSpec` of a torchvision ``ImageClassification`` preset (``weights.transforms()``)."""
    try:
        resize = [int(v) for v in transforms.resize_size]
        crop = [int(v) for v in transforms.crop_size]
        mean = tuple(float(v) for v in transforms.mean)
        std = tuple(float(v) for v in transforms.std)
    except (AttributeError, TypeError) as e:
        raise UsageError(
            f"{spell('data_config', name)}: its transforms() is not a torchvision ImageClassification preset "
            f"({type(transforms).__name__})",
            hint=_HINT,
        ) from e
    interp = getattr(transforms, "interpolation", "bilinear")
    interp = str(getattr(interp, "value", interp)).lower()
    return DataSpec(
        resize=resize[0] if len(resize) == 1 else (resize[0], resize[1]),
        crop=crop[0] if len(crop) == 1 else (crop[0], crop[1]),
        mean=mean,
        std=std,
        interpolation=interp,
        source=f"{name}.transforms()",
    )


def resolve_data_config(option: str, model: Any = None) -> DataSpec:
    """``--data-config``: ``"model"`` (the timm ``pretrained_cfg`` of ``model``) or ``module:Weights.NAME``
    (torchvision weights, or any object with a ``transforms()`` preset or a timm-style cfg dict)."""
    if option == "model":
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if not isinstance(cfg, Mapping):
            what = type(model).__name__ if model is not None else "this model"
            raise UsageError(
                f"{spell('data_config', 'model')}: {what} has no pretrained_cfg (only timm models carry one)",
                hint=_HINT,
            )
        return spec_from_timm_cfg(cfg)
    from .factories import import_object

    obj = import_object(option, option="data_config")
    if isinstance(obj, Mapping):
        return spec_from_timm_cfg(obj)
    transforms = getattr(obj, "transforms", None)
    if callable(transforms):
        return spec_from_transforms(transforms(), option)
    cfg = getattr(obj, "pretrained_cfg", None)
    if isinstance(cfg, Mapping):
        return spec_from_timm_cfg(cfg)
    raise UsageError(
        f"{spell('data_config', option)} is a {type(obj).__name__}: neither weights with transforms() nor a "
        "timm pretrained_cfg",
        hint=_HINT,
    )


def merge(config: DataSpec, explicit: DataSpec) -> DataSpec:
    """The model's preprocessing with the options the user gave explicitly on top."""
    default = DataSpec()
    changes = {
        f.name: getattr(explicit, f.name)
        for f in dataclasses.fields(DataSpec)
        if getattr(explicit, f.name) != getattr(default, f.name)
    }
    return dataclasses.replace(config, **changes)


__all__ = ["merge", "resolve_data_config", "spec_from_timm_cfg", "spec_from_transforms"]
