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
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .atomic import atomic_path
from .errors import (
    ModelLoadError,
    UntrustedArchError,
    UntrustedPickleError,
    UsageError,
    shorten,
    spell,
    torch_load_message,
)
from .factories import import_callable, is_builtin
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
    fingerprint: str = ""  # of the BN layers (bncorrect.fingerprint), filled in by bncorrect.api.open_model


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _KW_EXAMPLE() -> str:
    return spell("arch_kwargs", {"num_classes": 10})


def import_factory(arch: str) -> Any:
    """Resolve ``package.module:factory`` or ``path/to/file.py:factory`` to the callable
    (:func:`bncorrect.factories.import_callable`: the working folder is never put on ``sys.path``)."""
    return import_callable(arch, option="arch")


def build_arch(arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Call the ``arch`` factory with ``arch_kwargs`` and check that it returns an ``nn.Module``."""
    factory = import_factory(arch)
    kwargs = dict(arch_kwargs or {})
    try:
        model = factory(**kwargs)
    except Exception as e:
        given = (
            f"it was called with {spell('arch_kwargs', kwargs)}"
            if kwargs
            else f"it was called with no arguments (pass {_KW_EXAMPLE()} for its arguments)"
        )
        raise ModelLoadError(
            f"{spell('arch', arch)}: calling the factory failed: {type(e).__name__}: {shorten(str(e))}",
            hint=f"{given}; check that it builds the model without downloading anything",
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"{spell('arch', arch)} returned {type(model).__name__}, not a torch.nn.Module",
            hint="pass the function (or class) that builds the model",
        )
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
        raise UsageError(
            f"--arch-kwargs must be a JSON object, got {type(value).__name__}",
            hint="e.g. --arch-kwargs '{\"num_classes\": 10}'",
        )
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
            f"the weights do not fit {spell('arch', arch)}: {shorten(detail, 600)}",
            path=path,
            hint=f"pass the factory that built this checkpoint (and {_KW_EXAMPLE()}); "
            f"use {spell('strict', False)} to load anyway, ignoring missing/unexpected keys",
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
    trust_arch: bool = False,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a PyTorch MODEL file (see the module docstring). Corrections recorded in a bncorrect checkpoint
    are applied (the model comes back with :class:`~bncorrect.layers.CorrectedNorm` layers). The model is
    returned in eval mode. Non-strict loading records what was skipped in ``meta["warnings"]``.

    No code the file names runs without consent: a pickle needs ``trust_pickle=True``; the architecture a
    bncorrect checkpoint records is used only when ``arch`` names the same factory or ``trust_arch=True``
    (bncorrect's own sample architectures excepted)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError("model file not found", path=path, hint="check the path")
    if path.is_dir():
        raise ModelLoadError(
            "is a folder, not a model file", path=path, hint="pass the .pt/.safetensors/.onnx file"
        )
    suffix = path.suffix.lower()
    try:
        sha = file_sha256(path)
    except OSError as e:
        raise ModelLoadError(
            f"cannot read the file ({e.strerror or e})", path=path, hint="check its permissions"
        ) from None
    if suffix == ".safetensors":
        if arch is None:
            raise ModelLoadError(
                "a .safetensors file holds only weights; bncorrect needs the architecture too",
                path=path,
                hint=f"pass {spell('arch', 'package.module:factory')} (the function that builds the model)",
            )
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(
                f"not a readable safetensors file ({shorten(str(e), 200)})", path=path
            ) from None
        if not sd:
            raise ModelLoadError(
                "the safetensors file holds no tensors", path=path, hint="pass the model's weights"
            )
        model = build_arch(arch, arch_kwargs)
        warnings = _load_into(model, sd, path, arch, strict)
        return LoadedModel(
            model.eval(), path, "safetensors", sha, arch, dict(arch_kwargs or {}), {"warnings": warnings}
        )
    if suffix not in TORCH_SUFFIXES:
        raise ModelLoadError(
            f"unknown model format {suffix or '(no suffix)'!r}",
            path=path,
            hint="MODEL must be .onnx, .pt/.pth (pickled module or state dict) or .safetensors (with an "
            "architecture)",
        )
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ModelLoadError(
            "not a PyTorch checkpoint: torch.save writes a zip archive (or, before PyTorch 1.6, a pickle) "
            + (f"and this file starts with {head!r}" if head else "and this file is empty"),
            path=path,
            hint="pass a file written by torch.save, a .safetensors file with an architecture, or an .onnx "
            "graph; check that the download or copy is complete",
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
        pickled = False
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise UntrustedPickleError(
                "this file holds pickled Python objects (e.g. a whole nn.Module); loading it runs code "
                "stored in the file",
                path=path,
                hint=f"if you trust where the file came from, pass {spell('trust_pickle')}; otherwise save a "
                "state dict: torch.save(model.state_dict(), 'weights.pt') and pass "
                f"{spell('arch', 'module:factory')}",
            ) from None
        obj = _load_pickle(path, map_location)
        pickled = True
    except Exception as e:
        raise ModelLoadError(
            f"cannot read this file with torch.load ({type(e).__name__}: {torch_load_message(str(e))})",
            path=path,
            hint="pass a checkpoint written by torch.save; check that the download or copy is complete",
        ) from None
    if isinstance(obj, nn.Module):
        if not pickled and not trust_pickle:  # pragma: no cover - weights_only never yields modules
            raise UntrustedPickleError("pickled module", path=path, hint=f"pass {spell('trust_pickle')}")
        return LoadedModel(obj.eval(), path, "pickled-module", sha)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return _load_bncorrect_checkpoint(obj, path, sha, arch, arch_kwargs, strict, trust_arch)
    sd = _extract_state_dict(obj)
    if sd is None:
        raise ModelLoadError(
            f"holds a {type(obj).__name__} that is neither an nn.Module nor a state dict",
            path=path,
            hint=f"save the model with torch.save(model) (then pass {spell('trust_pickle')}) or "
            f"torch.save(model.state_dict()) (then pass {spell('arch', 'module:factory')})",
        )
    if arch is None:
        raise ModelLoadError(
            "this file holds a state dict (weights only); bncorrect needs the architecture too",
            path=path,
            hint=f"pass {spell('arch', 'package.module:factory')}, the function that builds the model "
            f"(and {_KW_EXAMPLE()} for its arguments)",
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
            hint="install/import the package that defines the model class, or use a state dict with "
            f"{spell('arch', 'module:factory')}",
        ) from None
    except Exception as e:
        raise ModelLoadError(
            f"cannot unpickle ({type(e).__name__}: {shorten(str(e), 200)})", path=path
        ) from None


def _recorded_arch(obj: Mapping[str, Any], path: Path) -> tuple[str | None, dict[str, Any]]:
    arch = obj.get("arch")
    kwargs = obj.get("arch_kwargs")
    if arch is not None and not isinstance(arch, str):
        raise ModelLoadError(
            f"the checkpoint's 'arch' is a {type(arch).__name__}, not a 'module:factory' string",
            path=path,
            hint=f"pass {spell('arch', 'package.module:factory')}",
        )
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ModelLoadError(
            f"the checkpoint's 'arch_kwargs' is a {type(kwargs).__name__}, not a dict of keyword arguments",
            path=path,
            hint=f"pass {spell('arch', 'package.module:factory')} and {_KW_EXAMPLE()}",
        )
    return arch or None, dict(kwargs)


def _consented_arch(
    recorded: str | None,
    recorded_kwargs: dict[str, Any],
    arch: str | None,
    arch_kwargs: Mapping[str, Any] | None,
    trust_arch: bool,
    path: Path,
) -> tuple[str, dict[str, Any], list[str]]:
    """The factory and kwargs to build a bncorrect checkpoint with, and notes on the choice: the user's
    ``arch`` (the recorded kwargs only when it is the recorded factory), else the recorded one with
    ``trust_arch`` or when it is one of bncorrect's built-in sample architectures; else refuse."""
    kw_text = json.dumps(recorded_kwargs, default=str) if recorded_kwargs else ""
    if arch is not None:
        if arch_kwargs is not None:
            return arch, dict(arch_kwargs), []
        if arch == recorded:
            notes = [f"using the arch_kwargs recorded in the file: {kw_text}"] if recorded_kwargs else []
            return arch, recorded_kwargs, notes
        notes = (
            [f"the file records the architecture {recorded}; building {arch} as you asked"]
            if recorded
            else []
        )
        return arch, {}, notes
    if recorded is None:
        raise ModelLoadError(
            "bncorrect checkpoint without 'arch'",
            path=path,
            hint=f"pass {spell('arch', 'package.module:factory')}, the function that builds the model",
        )
    kw = dict(recorded_kwargs) if arch_kwargs is None else dict(arch_kwargs)
    if trust_arch:
        return recorded, kw, [f"building the architecture recorded in the file: {recorded}({kw_text})"]
    if is_builtin(recorded, kw):
        return recorded, kw, []
    shown = f"{recorded} with arch_kwargs {kw_text}" if kw_text else recorded
    raise UntrustedArchError(
        f"this checkpoint names the architecture factory {shown}; building the model would import and "
        "call that code, and bncorrect runs no code a file names without your consent",
        path=path,
        hint=f"if that is the factory you expect, pass {spell('arch', recorded)}"
        + (" (the recorded arch_kwargs are then used)" if kw_text else "")
        + f", or pass {spell('trust_arch')} to trust what the file records",
    )


def _load_bncorrect_checkpoint(
    obj: Mapping[str, Any],
    path: Path,
    sha: str,
    arch: str | None,
    arch_kwargs: Mapping[str, Any] | None,
    strict: bool,
    trust_arch: bool = False,
) -> LoadedModel:
    recorded, recorded_kwargs = _recorded_arch(obj, path)
    sd = obj.get("state_dict")
    if not _is_state_dict(sd):
        what = (
            "no 'state_dict'"
            if sd is None
            else f"a 'state_dict' that is a {type(sd).__name__} of non-tensors"
        )
        raise ModelLoadError(
            f"bncorrect checkpoint with {what}",
            path=path,
            hint="the file is damaged or was not written by bncorrect; use the original checkpoint",
        )
    corr = _checkpoint_corrections(obj.get("corrections"), path)
    meta_in = obj.get("meta") or {}
    if not isinstance(meta_in, Mapping):
        raise ModelLoadError(f"the checkpoint's 'meta' is a {type(meta_in).__name__}, not a dict", path=path)
    build, kwargs, notes = _consented_arch(recorded, recorded_kwargs, arch, arch_kwargs, trust_arch, path)
    model = build_arch(build, kwargs)
    warnings = _load_into(model, sd, path, build, strict)
    if corr:
        from .layers import find_norm_layers

        known = {ly.name for ly in find_norm_layers(model)}
        unknown = sorted(set(corr) - known)
        if unknown:
            raise ModelLoadError(
                f"the checkpoint corrects layers the model does not have: {', '.join(unknown[:5])}"
                f" (its BN layers: {', '.join(sorted(known)[:5]) or 'none'})",
                path=path,
                hint="the file does not belong to this architecture; pass the factory that made it",
            )
        alpha = {n: c["alpha"] for n, c in corr.items()}
        beta = {n: c["beta"] for n, c in corr.items()}
        try:
            correct_model(model, alpha, beta, layers=list(corr))
        except UsageError as e:
            raise ModelLoadError(
                f"the checkpoint's corrections do not fit the model: {e.message}", path=path
            ) from None
    meta = dict(meta_in)
    meta["warnings"] = warnings
    meta["notes"] = notes
    return LoadedModel(model.eval(), path, "checkpoint", sha, build, kwargs, meta)


def _checkpoint_corrections(corr: Any, path: Path) -> dict[str, dict[str, Tensor]]:
    """The per-layer alpha/beta of a bncorrect checkpoint, validated (types, finite, in [0, 1])."""
    if corr is None:
        return {}
    if not isinstance(corr, Mapping):
        raise ModelLoadError(
            f"the checkpoint's 'corrections' is a {type(corr).__name__}, not a dict of layers",
            path=path,
            hint="the file is damaged or was not written by bncorrect; use the original checkpoint",
        )
    out: dict[str, dict[str, Tensor]] = {}
    for name, entry in corr.items():
        if not isinstance(name, str) or not isinstance(entry, Mapping):
            raise ModelLoadError(
                f"the checkpoint's corrections for layer {name!r} are a {type(entry).__name__}, not "
                "{'alpha': tensor, 'beta': tensor}",
                path=path,
                hint="the file is damaged or was not written by bncorrect; use the original checkpoint",
            )
        values = {}
        for label in ("alpha", "beta"):
            v = entry.get(label)
            if isinstance(v, int | float) and not isinstance(v, bool):
                v = torch.tensor(float(v))
            if not isinstance(v, Tensor) or not v.is_floating_point() or v.dim() > 1:
                raise ModelLoadError(
                    f"the checkpoint's {label} for layer {name} is "
                    f"{'missing' if v is None else type(v).__name__}, not a number or a vector",
                    path=path,
                    hint="the file is damaged or was not written by bncorrect; use the original checkpoint",
                )
            bad = ~torch.isfinite(v) | (v < 0) | (v > 1)
            if bool(bad.any()):
                shown = v.tolist() if v.dim() == 0 else f"{int(bad.sum())} entries such as {float(v[bad][0])}"
                raise ModelLoadError(
                    f"the checkpoint's {label} for layer {name} must lie in [0, 1], got {shown}",
                    path=path,
                    hint="the file is damaged; re-create it with bncorrect from the original checkpoint",
                )
            values[label] = v
        out[name] = values
    return out


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


def importable_factory(model: nn.Module) -> str | None:
    """``module:Class`` for a model whose class can be imported and rebuilt with no arguments into the same
    structure (same ``repr``, same state-dict keys and shapes): then a state dict plus that factory saves
    it without pickling code. None otherwise (a ``Sequential`` from a function, a class defined in
    ``__main__`` or a function, constructor arguments that matter)."""
    import copy

    plain = strip_corrections(copy.deepcopy(model))
    cls = type(plain)
    if cls.__module__ in ("__main__", "builtins") or "<locals>" in cls.__qualname__:
        return None
    if cls.__module__.startswith("torch.nn"):
        return None  # Sequential, ModuleList...: their structure is not in the class
    spec = f"{cls.__module__}:{cls.__qualname__}"
    try:
        if import_callable(spec, option="arch") is not cls:
            return None
        rebuilt = cls()
    except Exception:
        return None
    a, b = plain.state_dict(), rebuilt.state_dict()
    if repr(rebuilt) != repr(plain) or a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return None
    return spec


def save_checkpoint(
    model: nn.Module, out: str | Path, *, source: LoadedModel, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write the (corrected) model to ``out`` as the same kind of checkpoint it was loaded from.

    A pickled-module source gives a pickled module (load with ``torch.load(out, weights_only=False)``;
    bncorrect must be importable). Any other source gives a bncorrect checkpoint: the original state dict
    keys plus the recorded arch and per-layer alpha/beta, which :func:`load` rebuilds in one call. A module
    passed in from Python becomes a bncorrect checkpoint when its class can be rebuilt from its import
    path (:func:`importable_factory`), and a pickle only when it cannot.
    """
    out = Path(out)
    arch, arch_kwargs = source.arch, dict(source.arch_kwargs)
    pickled = source.kind == "pickled-module"
    if pickled and str(source.path) == "<in-memory>":
        arch = importable_factory(model)
        pickled, arch_kwargs = arch is None, {}
    with atomic_path(out) as tmp:
        if pickled:
            torch.save(model, tmp)
        else:
            corr = {
                name: {"alpha": a.clone(), "beta": b.clone()} for name, (a, b) in coefficients(model).items()
            }
            obj = {
                "format": CHECKPOINT_FORMAT,
                "arch": arch,
                "arch_kwargs": arch_kwargs,
                "state_dict": plain_state_dict(model),
                "corrections": corr,
                "meta": {
                    k: v for k, v in {**source.meta, **(meta or {})}.items() if k not in ("warnings", "notes")
                },
            }
            torch.save(obj, tmp)
    return out


def load(
    path: str | Path,
    arch: str | None = None,
    *,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_arch: bool = False,
    strict: bool = True,
) -> nn.Module:
    """Load a model (e.g. a patched checkpoint written by bncorrect) ready for inference, in eval mode.

    >>> model = bncorrect.load("corrected.pt", arch="my_models:resnet")   # confirm the recorded factory
    >>> model = bncorrect.load("corrected.pt", trust_arch=True)           # or trust what the file records
    """
    return load_model(
        path,
        arch=arch,
        arch_kwargs=arch_kwargs,
        trust_pickle=trust_pickle,
        trust_arch=trust_arch,
        strict=strict,
    ).model


__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadedModel",
    "build_arch",
    "file_sha256",
    "import_factory",
    "importable_factory",
    "load",
    "load_model",
    "parse_arch_kwargs",
    "plain_state_dict",
    "save_checkpoint",
    "strip_corrections",
]
