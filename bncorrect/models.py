"""Loading PyTorch models and writing patched checkpoints.

MODEL may be:

- a ``.pt``/``.pth`` holding a whole pickled ``nn.Module``. Unpickling runs code from the file, so it is
  only done with ``trust_pickle=True`` (``--trust-pickle``);
- a ``.pt``/``.pth`` state dict (plain, or under ``state_dict``/``model``/``model_state_dict``) plus
  ``arch="package.module:factory"`` (or ``path/to/file.py:factory``), the factory called with
  ``arch_kwargs``. State dicts are read with ``torch.load(weights_only=True)``: no code runs;
- a ``.safetensors`` file of weights plus ``arch``;
- a bncorrect checkpoint (``format: bncorrect/checkpoint-1``): a state dict that records its ``arch`` and
  per-layer ``corrections``, as written by bncorrect for state-dict inputs. It loads back with
  :func:`load` in one call.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .atomic import atomic_path
from .errors import ModelLoadError, UntrustedPickleError, UsageError
from .layers import coefficients, correct_model, strip_corrections

CHECKPOINT_FORMAT = "bncorrect/checkpoint-1"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
Kind = Literal["pickled-module", "state-dict", "safetensors", "checkpoint"]
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass
class LoadedModel:
    """A PyTorch model and where it came from (needed to write a patched checkpoint of the same kind)."""

    model: nn.Module
    path: Path
    kind: Kind
    sha256: str
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_factory(arch: str) -> Any:
    """Resolve ``package.module:factory`` or ``path/to/file.py:factory`` to the callable."""
    mod_name, sep, attr = arch.partition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(
            f"--arch {arch!r} is not of the form 'package.module:factory'",
            hint="e.g. --arch torchvision.models:resnet18 or --arch my_models.py:build",
        )
    if mod_name.endswith(".py"):
        file = Path(mod_name)
        if not file.is_file():
            raise ModelLoadError(f"--arch file {file} not found", hint="check the path before ':'")
        spec = importlib.util.spec_from_file_location(f"_bncorrect_arch_{file.stem}", file)
        if spec is None or spec.loader is None:
            raise ModelLoadError(f"cannot import {file}")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ModelLoadError(f"importing {file} failed: {type(e).__name__}: {e}") from e
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise ModelLoadError(
                f"--arch: cannot import module {mod_name!r} ({e})",
                hint="install the package that defines the model, or run from the folder that holds it "
                "(or set PYTHONPATH)",
            ) from None
        except Exception as e:
            raise ModelLoadError(f"--arch: importing {mod_name!r} failed: {type(e).__name__}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelLoadError(
            f"--arch: module {mod_name!r} has no attribute {attr!r}", hint="check the name after ':'"
        ) from None


def build_arch(arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Call the ``arch`` factory with ``arch_kwargs`` and check that it returns an ``nn.Module``."""
    factory = import_factory(arch)
    try:
        model = factory(**dict(arch_kwargs or {}))
    except Exception as e:
        raise ModelLoadError(
            f"--arch {arch}: calling the factory failed: {type(e).__name__}: {e}",
            hint="the factory is called with no arguments unless --arch-kwargs '{...}' is given",
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"--arch {arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``--arch-kwargs`` JSON into a dict."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(
            f"--arch-kwargs is not valid JSON: {e}", hint="e.g. --arch-kwargs '{\"num_classes\": 10}'"
        ) from None
    if not isinstance(value, dict):
        raise UsageError("--arch-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _extract_state_dict(obj: object) -> dict[str, Tensor] | None:
    if _is_state_dict(obj):
        sd = dict(obj)  # type: ignore[arg-type]
    elif isinstance(obj, Mapping):
        sd = next((dict(obj[k]) for k in _NESTED_KEYS if k in obj and _is_state_dict(obj[k])), None)
        if sd is None:
            return None
    else:
        return None
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_into(model: nn.Module, sd: Mapping[str, Tensor], path: Path, arch: str, strict: bool) -> list[str]:
    try:
        result = model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:4])
        raise ModelLoadError(
            f"the weights do not fit --arch {arch}: {detail[:600]}",
            path=path,
            hint="pass the factory that built this checkpoint (and --arch-kwargs); "
            "use --non-strict to load anyway, ignoring missing/unexpected keys",
        ) from None
    warnings = []
    if result.missing_keys:
        warnings.append(f"missing keys (left at the factory's values): {', '.join(result.missing_keys[:8])}")
    if result.unexpected_keys:
        warnings.append(f"unexpected keys (ignored): {', '.join(result.unexpected_keys[:8])}")
    return warnings


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a PyTorch MODEL file (see the module docstring). Corrections recorded in a bncorrect checkpoint
    are applied (the model comes back with :class:`~bncorrect.layers.CorrectedNorm` layers). The model is
    returned in eval mode. Non-strict loading records what was skipped in ``meta["warnings"]``."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError("model file not found", path=path, hint="check the path")
    if path.is_dir():
        raise ModelLoadError(
            "is a folder, not a model file", path=path, hint="pass the .pt/.safetensors/.onnx file"
        )
    suffix = path.suffix.lower()
    sha = file_sha256(path)
    if suffix == ".safetensors":
        if arch is None:
            raise ModelLoadError(
                "a .safetensors file holds only weights; bncorrect needs the architecture too",
                path=path,
                hint="pass --arch package.module:factory (the function that builds the model)",
            )
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"not a readable safetensors file ({e})", path=path) from None
        model = build_arch(arch, arch_kwargs)
        warnings = _load_into(model, sd, path, arch, strict)
        return LoadedModel(
            model.eval(), path, "safetensors", sha, arch, dict(arch_kwargs or {}), {"warnings": warnings}
        )
    if suffix not in TORCH_SUFFIXES:
        raise ModelLoadError(
            f"unknown model format {suffix!r}",
            path=path,
            hint="MODEL must be .onnx, .pt/.pth (pickled module or state dict) or .safetensors (with --arch)",
        )
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ModelLoadError(
            "not a PyTorch checkpoint: torch.save writes a zip archive (or, before PyTorch 1.6, a pickle) "
            + (f"and this file starts with {head!r}" if head else "and this file is empty"),
            path=path,
            hint="pass a file written by torch.save, a .safetensors file with --arch, or an .onnx graph; "
            "check that the download or copy is complete",
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
        pickled = False
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise UntrustedPickleError(
                "this file holds pickled Python objects (e.g. a whole nn.Module); loading it runs code "
                "stored in the file",
                path=path,
                hint="if you trust where the file came from, pass --trust-pickle; otherwise load it from "
                "a state dict: torch.save(model.state_dict(), 'weights.pt') and pass --arch module:factory",
            ) from None
        del e
        obj = _load_pickle(path, map_location)
        pickled = True
    except Exception as e:
        raise ModelLoadError(
            f"cannot read this file with torch.load ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            path=path,
            hint="pass a checkpoint written by torch.save",
        ) from None
    if isinstance(obj, nn.Module):
        if not pickled and not trust_pickle:  # pragma: no cover - weights_only never yields modules
            raise UntrustedPickleError("pickled module", path=path, hint="pass --trust-pickle")
        return LoadedModel(obj.eval(), path, "pickled-module", sha)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return _load_bncorrect_checkpoint(obj, path, sha, arch, arch_kwargs, strict)
    sd = _extract_state_dict(obj)
    if sd is None:
        raise ModelLoadError(
            f"holds a {type(obj).__name__} that is neither an nn.Module nor a state dict",
            path=path,
            hint="save the model with torch.save(model) (then pass --trust-pickle) or "
            "torch.save(model.state_dict()) (then pass --arch)",
        )
    if arch is None:
        raise ModelLoadError(
            "this file holds a state dict (weights only); bncorrect needs the architecture too",
            path=path,
            hint="pass --arch package.module:factory, the function that builds the model "
            "(and --arch-kwargs JSON for its arguments)",
        )
    model = build_arch(arch, arch_kwargs)
    warnings = _load_into(model, sd, path, arch, strict)
    return LoadedModel(
        model.eval(), path, "state-dict", sha, arch, dict(arch_kwargs or {}), {"warnings": warnings}
    )


def _load_pickle(path: Path, map_location: str | torch.device) -> object:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:
        raise ModelLoadError(
            f"the pickled model refers to code that is not importable here ({e})",
            path=path,
            hint="install/import the package that defines the model class, or use a state dict with --arch",
        ) from None
    except Exception as e:
        raise ModelLoadError(f"cannot unpickle ({type(e).__name__}: {e})", path=path) from None


def _load_bncorrect_checkpoint(
    obj: Mapping[str, Any],
    path: Path,
    sha: str,
    arch: str | None,
    arch_kwargs: Mapping[str, Any] | None,
    strict: bool,
) -> LoadedModel:
    arch = arch or obj.get("arch")
    if not arch:
        raise ModelLoadError("bncorrect checkpoint without 'arch'", path=path, hint="pass --arch")
    kwargs = dict(obj.get("arch_kwargs") or {}) if arch_kwargs is None else dict(arch_kwargs)
    model = build_arch(arch, kwargs)
    warnings = _load_into(model, obj["state_dict"], path, arch, strict)
    corr = obj.get("corrections") or {}
    if corr:
        alpha = {n: c["alpha"] for n, c in corr.items()}
        beta = {n: c["beta"] for n, c in corr.items()}
        correct_model(model, alpha, beta, layers=list(corr))
    meta = dict(obj.get("meta") or {})
    meta["warnings"] = warnings
    return LoadedModel(model.eval(), path, "checkpoint", sha, arch, kwargs, meta)


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict the model would have without CorrectedNorm wrappers (original key names)."""
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-1] in ("alpha", "beta") and _is_wrapper(model, ".".join(parts[:-1])):
            continue
        cleaned = []
        for i, p in enumerate(parts):
            if p == "norm" and i > 0 and _is_wrapper(model, ".".join(parts[:i])):
                continue
            cleaned.append(p)
        out[".".join(cleaned)] = value.detach().cpu().clone().contiguous()
    return out


def _is_wrapper(model: nn.Module, name: str) -> bool:
    from .layers import CorrectedNorm

    try:
        return isinstance(model.get_submodule(name), CorrectedNorm)
    except AttributeError:
        return False


def save_checkpoint(
    model: nn.Module, out: str | Path, *, source: LoadedModel, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write the (corrected) model to ``out`` as the same kind of checkpoint it was loaded from.

    A pickled-module source gives a pickled module (load with ``torch.load(out, weights_only=False)``;
    bncorrect must be importable). Any other source gives a bncorrect checkpoint: the original state dict
    keys plus the recorded arch and per-layer alpha/beta, which :func:`load` rebuilds in one call.
    """
    out = Path(out)
    with atomic_path(out) as tmp:
        if source.kind == "pickled-module":
            torch.save(model, tmp)
        else:
            corr = {
                name: {"alpha": a.clone(), "beta": b.clone()} for name, (a, b) in coefficients(model).items()
            }
            obj = {
                "format": CHECKPOINT_FORMAT,
                "arch": source.arch,
                "arch_kwargs": dict(source.arch_kwargs),
                "state_dict": plain_state_dict(model),
                "corrections": corr,
                "meta": {k: v for k, v in {**source.meta, **(meta or {})}.items() if k != "warnings"},
            }
            torch.save(obj, tmp)
    return out


def load(
    path: str | Path,
    arch: str | None = None,
    *,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
) -> nn.Module:
    """Load a model (e.g. a patched checkpoint written by bncorrect) ready for inference, in eval mode.

    >>> model = bncorrect.load("corrected.pt")          # arch is recorded in bncorrect checkpoints
    """
    return load_model(
        path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, strict=strict
    ).model


__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadedModel",
    "build_arch",
    "file_sha256",
    "import_factory",
    "load",
    "load_model",
    "parse_arch_kwargs",
    "plain_state_dict",
    "save_checkpoint",
    "strip_corrections",
]
