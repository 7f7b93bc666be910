"""Code the user names: the ``--arch`` factory and the ``--preprocess`` hook.

bncorrect imports and calls only what the user names on the command line or in a Python call; a file it
reads never chooses code (a bncorrect checkpoint's recorded architecture is used only with the user's
consent, see :mod:`bncorrect.models`). Two spellings:

- ``package.module:attr`` is imported with :func:`importlib.import_module` from ``sys.path`` as it is: the
  working folder is never added to it (``python -m`` and an empty ``PYTHONPATH`` entry do that themselves,
  by the user's choice);
- ``path/to/file.py:attr`` executes exactly that file (resolved to an absolute path), nothing found on a
  search path.

``attr`` may be dotted (``module:Class.build``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import BncorrectError, ModelLoadError, UsageError, shorten, spell

# The only factories a file may name without the user's consent: bncorrect's own sample architectures,
# which build a fixed nn.Module from numbers and touch nothing else.
BUILTIN_FACTORIES: frozenset[str] = frozenset(
    {"bncorrect.sample_models:digits_cnn", "bncorrect.sample_models:mnist1d_cnn"}
)


_EXAMPLES = {"arch": "mypkg.models:resnet18", "preprocess": "mypkg.transforms:preprocess"}


def is_builtin(spec: str, kwargs: Any = None) -> bool:
    """True for a factory of :data:`BUILTIN_FACTORIES` called with JSON scalars only."""
    if spec not in BUILTIN_FACTORIES:
        return False
    if kwargs is None:
        return True
    return isinstance(kwargs, dict) and all(
        isinstance(k, str) and (v is None or isinstance(v, bool | int | float | str))
        for k, v in kwargs.items()
    )


def import_object(spec: str, *, option: str, error: type[BncorrectError] = UsageError) -> Any:
    """Like :func:`import_callable` for any object (``torchvision.models:ResNet50_Weights.IMAGENET1K_V2``)."""
    return import_callable(spec, option=option, error=error, require_callable=False)


def import_callable(
    spec: str, *, option: str, error: type[BncorrectError] = ModelLoadError, require_callable: bool = True
) -> Callable[..., Any]:
    """Resolve ``package.module:attr`` or ``path/to/file.py:attr`` (see the module docstring) to a callable.

    ``option`` is the option the user gave it with (``"arch"``, ``"preprocess"``); messages name it as the
    caller spells it. Import failures raise ``error``; a malformed spec raises :class:`UsageError`."""
    flag = spell(option, spec)
    example = _EXAMPLES.get(option, "mypkg.module:function")
    local_example = example.replace(".", "_", 1).replace(":", ".py:")
    if not isinstance(spec, str):
        raise UsageError(f"{spell(option, '...')} must be a string 'package.module:function', got {spec!r}")
    mod_name, sep, attr = spec.rpartition(":") if spec.count(":") > 1 else spec.partition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(
            f"{flag} is not of the form 'package.module:function' or 'path/to/file.py:function'",
            hint=f"e.g. {spell(option, example)} or {spell(option, './' + local_example)}",
        )
    if mod_name.endswith(".py"):
        module = _exec_file(Path(mod_name), flag, error)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            local = Path(*mod_name.split(".")).with_suffix(".py")
            where = (
                f" (a file {local} is here, but bncorrect does not import from the working folder by itself: "
                f"pass {spell(option, f'./{local}:{attr}')}, or set PYTHONPATH=.)"
                if local.is_file()
                else ""
            )
            raise error(
                f"{flag}: cannot import module {mod_name!r} ({e}){where}",
                hint=f"install the package that defines it, give the file itself "
                f"({spell(option, 'path/to/file.py:' + attr)}), or put its folder on PYTHONPATH",
            ) from None
        except Exception as e:
            raise error(
                f"{flag}: importing {mod_name!r} failed: {type(e).__name__}: {shorten(str(e))}"
            ) from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise error(
                f"{flag}: {mod_name!r} has no attribute {attr!r}", hint="check the name after ':'"
            ) from None
    if require_callable and not callable(obj):
        raise error(f"{flag}: {attr!r} in {mod_name!r} is a {type(obj).__name__}, not a function or class")
    return obj


def _exec_file(file: Path, flag: str, error: type[BncorrectError]) -> Any:
    file = file.expanduser().resolve()
    if not file.is_file():
        raise error(f"{flag}: file {file} not found", path=file, hint="check the path before ':'")
    name = "_bncorrect_user_" + hashlib.sha256(str(file).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise error(f"{flag}: cannot import {file}", path=file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise error(f"{flag}: running {file} failed: {type(e).__name__}: {shorten(str(e))}", path=file) from e
    return module


__all__ = ["BUILTIN_FACTORIES", "import_callable", "import_object", "is_builtin"]
