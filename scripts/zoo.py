"""Model-zoo run: every bncorrect command on random-initialised torchvision and timm models (docs/zoo.md).

Run by hand, in a separate venv that has torchvision, timm, onnx, onnxruntime and onnxscript next to an
editable bncorrect (they are not dependencies of the project, and this script is not a test):

    /work/zoo-venv/bin/python scripts/zoo.py                       # every family, then writes docs/zoo.md
    /work/zoo-venv/bin/python scripts/zoo.py --families tv_resnet18,timm_regnetx_002 --n 32 --size 64
    /work/zoo-venv/bin/python scripts/zoo.py --md-only             # rewrite docs/zoo.md from the JSON

No network: models are built with ``weights=None`` / ``pretrained=False``; their BN statistics are warmed up
by a few training-mode batches of synthetic data (cumulative average, under ``torch.no_grad``), so running
statistics are not the trivial 0/1. Every family runs in its own subprocess (a timeout per family, and peak
memory that is not inherited from the families before). Per command: wall time, peak RSS (sampled from
/proc/self/statm every 10 ms by a thread, process-wide, so it includes the model, the data and the Python
heap), and output parity against an independent float64 reference: a float64 copy of the original model
whose BN layers are replaced by a vectorised float64 implementation of the README's formula with the
command's alpha/beta (and statistics).

A section of docs/zoo.md between ``<!-- findings -->`` and ``<!-- /findings -->`` is kept when the file is
rewritten (hand-written findings).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

FAMILIES = (
    "tv_resnet18",
    "tv_mobilenet_v3_small",
    "tv_efficientnet_b0",
    "tv_regnet_x_400mf",
    "tv_densenet121",
    "timm_efficientnet_b0",
    "timm_mobilenetv3_small_100",
    "timm_regnetx_002",
    "tv_lraspp_mobilenet_v3_large",
    "tv_resnet18_fpn_frozenbn",
    "tv_fasterrcnn_mobilenet_v3_large_fpn",
)

COMMANDS = (
    "inspect",
    "rule",
    "weight",
    "weight0",
    "estimate",
    "recal_eval",
    "recal_train",
    "sweep",
    "tune",
    "diagnose",
    "apply",
    "onnx",
    "onnx_legacy",
    "cli",
)

COMMAND_TITLES = {
    "inspect": "inspect",
    "rule": "rule -B 2",
    "weight": "weight 0.1",
    "weight0": "weight 0",
    "estimate": "estimate -B 2",
    "recal_eval": "recalibrate eval",
    "recal_train": "recalibrate train -B 2",
    "sweep": "sweep-alpha",
    "tune": "tune -B 2",
    "diagnose": "diagnose -B 2",
    "apply": "apply (.pt)",
    "onnx": "apply (.onnx)",
    "onnx_legacy": "TorchScript export + apply .onnx (the hint)",
    "cli": "CLI inspect + rule (--arch)",
}

NUM_CLASSES = 10
SEG_CLASSES = 5
DET_CLASSES = 5
TRAIN_B = 2
IGNORE = 255


class Skip(Exception):
    """A command that does not apply (recorded as "skipped" with the reason)."""


# ----------------------------------------------------------------------------------------------- memory
class RssSampler:
    """Peak resident set size of this process while a block runs, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.start = self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.rss())


# ------------------------------------------------------------------------------------------------ models
def _warm_up(model: Any, batches: list[Any]) -> None:
    """Running statistics = the cumulative average of a few training-mode batches (BN layers only in
    training mode; dropout and everything else in eval), under no_grad."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    model.eval()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()


def synthetic_images(n: int, size: int, seed: int) -> Any:
    """Smooth-ish random images: per-channel offsets plus noise upsampled from a coarser grid."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, max(2, size // 8), max(2, size // 8), generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.5 * torch.randn(n, 3, size, size, generator=g)
    return x + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)


class Family:
    """One model family: how to build it, what task its output is, what applies."""

    def __init__(
        self,
        name: str,
        build: Callable[[], Any],
        task: str,
        *,
        output_key: str | None = None,
        features: Callable[[Any, Any], Any] | None = None,
        note: str = "",
        source: str = "",
        arch: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.build = build
        self.task = task  # classification | segmentation | features | detection
        self.output_key = output_key
        self.features = features  # what the parity check compares (default: the whole output)
        self.note = note
        self.source = source
        self.arch = arch  # the --arch factory for the CLI check (None: not available)
        self.arch_kwargs = arch_kwargs or {}


def _detection_features(model: Any, x: Any) -> Any:
    images, _ = model.transform(list(x))
    return model.backbone(images.tensors)


def make_family(name: str, size: int) -> Family:
    import timm
    import torchvision
    from torchvision.models import detection, segmentation

    tv = torchvision.models
    classifiers = {
        "tv_resnet18": ("torchvision.models.resnet18", lambda: tv.resnet18(weights=None, num_classes=10)),
        "tv_mobilenet_v3_small": (
            "torchvision.models.mobilenet_v3_small",
            lambda: tv.mobilenet_v3_small(weights=None, num_classes=10),
        ),
        "tv_efficientnet_b0": (
            "torchvision.models.efficientnet_b0",
            lambda: tv.efficientnet_b0(weights=None, num_classes=10),
        ),
        "tv_regnet_x_400mf": (
            "torchvision.models.regnet_x_400mf",
            lambda: tv.regnet_x_400mf(weights=None, num_classes=10),
        ),
        "tv_densenet121": (
            "torchvision.models.densenet121",
            lambda: tv.densenet121(weights=None, num_classes=10),
        ),
        "timm_efficientnet_b0": (
            "timm efficientnet_b0",
            lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=10),
        ),
        "timm_mobilenetv3_small_100": (
            "timm mobilenetv3_small_100",
            lambda: timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10),
        ),
        "timm_regnetx_002": (
            "timm regnetx_002",
            lambda: timm.create_model("regnetx_002", pretrained=False, num_classes=10),
        ),
    }
    if name in classifiers:
        src, fn = classifiers[name]
        if name.startswith("timm_"):
            arch = "timm:create_model"
            kwargs: dict[str, Any] = {"model_name": src.split()[1], "pretrained": False}
        else:
            arch, kwargs = src.replace("models.", "models:"), {"weights": None}
        kwargs["num_classes"] = NUM_CLASSES
        return Family(
            name, fn, "classification", source=f"{src}, {NUM_CLASSES} classes", arch=arch, arch_kwargs=kwargs
        )
    if name == "tv_lraspp_mobilenet_v3_large":
        return Family(
            name,
            lambda: segmentation.lraspp_mobilenet_v3_large(
                weights=None, weights_backbone=None, num_classes=SEG_CLASSES
            ),
            "segmentation",
            output_key="out",
            source=f"torchvision.models.segmentation.lraspp_mobilenet_v3_large, {SEG_CLASSES} classes",
            arch="torchvision.models.segmentation:lraspp_mobilenet_v3_large",
            arch_kwargs={"weights": None, "weights_backbone": None, "num_classes": SEG_CLASSES},
        )
    if name == "tv_resnet18_fpn_frozenbn":
        return Family(
            name,
            _fpn_frozen,
            "features",
            source="torchvision resnet_fpn_backbone('resnet18', norm_layer=FrozenBatchNorm2d, "
            "trainable_layers=3)",
            note="FrozenBatchNorm2d statistics copied from a warmed-up BatchNorm2d twin",
            arch="torchvision.models.detection.backbone_utils:resnet_fpn_backbone",
            arch_kwargs={"backbone_name": "resnet18", "weights": None, "trainable_layers": 3},
        )
    if name == "tv_fasterrcnn_mobilenet_v3_large_fpn":
        return Family(
            name,
            lambda: detection.fasterrcnn_mobilenet_v3_large_fpn(
                weights=None, weights_backbone=None, num_classes=DET_CLASSES, min_size=size, max_size=size
            ),
            "detection",
            features=_detection_features,
            source=f"torchvision fasterrcnn_mobilenet_v3_large_fpn(min_size=max_size={size}), "
            f"{DET_CLASSES} classes",
            note="parity on the backbone+FPN features (where every BN layer is); the boxes depend on "
            "top-k/NMS ties",
            arch="torchvision.models.detection:fasterrcnn_mobilenet_v3_large_fpn",
            arch_kwargs={
                "weights": None,
                "weights_backbone": None,
                "num_classes": DET_CLASSES,
                "min_size": size,
                "max_size": size,
            },
        )
    raise SystemExit(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")


def _fpn_frozen() -> Any:
    import torch
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    twin = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=torch.nn.BatchNorm2d, trainable_layers=5
    )
    frozen = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    frozen._bn_twin = [twin]  # type: ignore[attr-defined]  # warmed, then copied in (build_model)
    return frozen


def build_model(fam: Family, size: int, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    model = fam.build()
    warm = [synthetic_images(16, size, 1000 + k) for k in range(4)]
    twin = getattr(model, "_bn_twin", None)
    if twin is not None:  # FrozenBatchNorm2d: statistics from the warmed-up BatchNorm2d twin
        del model._bn_twin
        _warm_up(twin[0], warm)
        state = {k: v for k, v in twin[0].state_dict().items() if not k.endswith("num_batches_tracked")}
        model.load_state_dict(state)
    else:
        _warm_up(model, warm)
    return model.eval()


# ---------------------------------------------------------------------------------------------- reference
def is_bn_like(m: Any) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm
    from torchvision.ops.misc import FrozenBatchNorm2d

    return isinstance(m, _BatchNorm | FrozenBatchNorm2d)


def _ref_bn_class() -> Any:
    import torch
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

    class _RefBN(nn.Module):
        """README "What it computes", in float64, vectorised; ``post``: what the layer's own forward does
        after normalizing (timm BatchNormAct2d: drop, then act)."""

        def __init__(self, m: Any, alpha: Any, beta: Any, mean: Any = None, var: Any = None) -> None:
            super().__init__()
            c = m.running_mean.numel()

            def vec(v: Any, default: float) -> Any:
                if v is None:
                    return torch.full((c,), default, dtype=torch.float64)
                return torch.as_tensor(v, dtype=torch.float64).detach().clone().broadcast_to((c,)).clone()

            self.rm = (m.running_mean if mean is None else mean).detach().double().clone()
            self.rv = (m.running_var if var is None else var).detach().double().clone()
            self.w = vec(None if m.weight is None else m.weight, 1.0)
            self.b = vec(None if m.bias is None else m.bias, 0.0)
            self.eps = float(m.eps)
            self.alpha, self.beta = vec(alpha, 0.0), vec(beta, 0.0)
            forward = type(m).forward
            plain = not isinstance(m, _BatchNorm) or forward is _BatchNorm.forward
            self.post = None
            if not plain:
                if type(m).__name__ != "BatchNormAct2d":
                    raise TypeError(f"no reference for {type(m).__name__}")
                self.post = nn.Sequential(copy.deepcopy(m.drop), copy.deepcopy(m.act)).double()

        def forward(self, x: Any) -> Any:
            x = x.double()
            shape = (1, -1) + (1,) * (x.dim() - 2)
            if x.dim() == 2:
                mu_i, var_i = x, torch.zeros_like(x)
            else:
                dims = tuple(range(2, x.dim()))
                mu_i = x.mean(dim=dims, keepdim=True)
                var_i = ((x - mu_i) ** 2).mean(dim=dims, keepdim=True)
            rm, rv = self.rm.view(shape), self.rv.view(shape)
            a, b = self.alpha.view(shape), self.beta.view(shape)
            d = mu_i - rm
            mu_hat = rm + a * d
            var_hat = b * var_i + (1 - b) * rv + b * (1 - b) * d * d
            y = (x - mu_hat) / torch.sqrt(var_hat + self.eps) * self.w.view(shape) + self.b.view(shape)
            return y if self.post is None else self.post(y)

    return _RefBN


def check_reference(repo: Path) -> float | None:
    """The float64 reference layer against the project's loop-based tests/reference.py (random BN layer,
    per-channel alpha/beta): the largest difference, or None when that file is not there."""
    import importlib.util

    import torch

    path = repo / "tests" / "reference.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("bncorrect_test_reference", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5, generator=g))
        bn.running_var.copy_(torch.rand(5, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(5, generator=g))
        bn.bias.copy_(torch.randn(5, generator=g))
    x = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64)
    a, b = torch.rand(5, generator=g), torch.rand(5, generator=g)
    got = _ref_bn_class()(bn, a, b)(x).numpy()
    want = mod.corrected_bn_reference(
        x.numpy(),
        bn.running_mean.double().numpy(),
        bn.running_var.double().numpy(),
        bn.weight.detach().double().numpy(),
        bn.bias.detach().double().numpy(),
        bn.eps,
        a.double().numpy(),
        b.double().numpy(),
    )
    return float(abs(got - want).max())


def reference_model(original: Any, corrections: Any = None) -> Any:
    """A float64 copy of ``original`` with every BN-like layer replaced by the reference; coefficients and
    statistics from ``corrections`` (a bncorrect Corrections) where it names the layer, else plain BN."""
    ref_cls = _ref_bn_class()
    model = copy.deepcopy(original).double().eval()
    layers = {} if corrections is None else corrections.layers
    names = [n for n, m in model.named_modules() if is_bn_like(m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        m = getattr(parent, child)
        lc = layers.get(name)
        ref = ref_cls(
            m,
            None if lc is None else lc.alpha,
            None if lc is None else lc.beta,
            None if lc is None else lc.running_mean,
            None if lc is None else lc.running_var,
        )
        setattr(parent, child, ref)
    unknown = set(layers) - set(names)
    if unknown:
        raise AssertionError(f"corrections name layers the reference does not know: {sorted(unknown)[:4]}")
    return model


def flat(out: Any) -> Any:
    """Every tensor of an output (tensor, dict, list/tuple, detection lists of dicts): one float64 vector."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.detach().double().reshape(-1)
    if isinstance(out, dict):
        parts = [flat(v) for v in out.values()]
    elif isinstance(out, list | tuple):
        parts = [flat(v) for v in out]
    else:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def forward(fam: Family, model: Any, x: Any) -> Any:
    import torch

    dtype = next(model.parameters()).dtype
    x = x.to(dtype)
    with torch.no_grad():
        if fam.features is not None:
            return fam.features(model, x)
        return model(x)


def compare(a: Any, b: Any) -> dict[str, float]:
    """max |a - b| and that relative to max |b| (b: the float64 reference)."""
    fa, fb = flat(a), flat(b)
    if fa.shape != fb.shape:
        return {"max_abs": math.nan, "rel": math.nan, "note": f"shapes differ {fa.shape} {fb.shape}"}
    diff = float((fa - fb).abs().max()) if fa.numel() else 0.0
    scale = float(fb.abs().max()) if fb.numel() else 0.0
    return {"max_abs": diff, "rel": diff / max(scale, 1e-30)}


# ---------------------------------------------------------------------------------------------- the worker
class Worker:
    def __init__(self, fam: Family, args: argparse.Namespace, json_path: Path) -> None:
        import torch

        self.fam = fam
        self.args = args
        self.json_path = json_path
        self.tmp = Path(tempfile.mkdtemp(prefix=f"zoo-{fam.name}-"))
        self.result: dict[str, Any] = {"family": fam.name, "task": fam.task, "commands": {}}
        n, size = args.n, args.size
        self.n, self.size = n, size
        t0 = time.perf_counter()
        self.model = build_model(fam, size, args.seed)
        self.result["build_s"] = time.perf_counter() - t0
        self.result["params"] = sum(p.numel() for p in self.model.parameters())
        self.result["buffers_bn"] = sum(1 for m in self.model.modules() if is_bn_like(m))
        self.result["source"] = fam.source
        import bncorrect

        self.result["bncorrect_file"] = bncorrect.__file__
        self.result["note"] = fam.note
        self.x = synthetic_images(n, size, args.seed + 1)
        self.probe = synthetic_images(8, size, args.seed + 2)
        g = torch.Generator().manual_seed(args.seed + 3)
        if fam.task == "segmentation":
            y = torch.randint(0, SEG_CLASSES, (n, size, size), generator=g)
            y[torch.rand(n, size, size, generator=g) < 0.05] = IGNORE
        else:
            y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        self.y = y
        self.result["data"] = {
            "n": n,
            "size": size,
            "x": list(self.x.shape),
            "y": list(y.shape),
            "probe": list(self.probe.shape),
        }
        self.plain_out = forward(fam, self.model, self.probe)
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model(self.x)
        self.result["forward_s"] = time.perf_counter() - t0  # one eval forward over the data, as a yardstick
        self.ref_plain = forward(fam, reference_model(self.model), self.probe)
        self.result["float32_floor"] = compare(self.plain_out, self.ref_plain)
        self.est_path = self.tmp / "evalnorm.safetensors"
        self.save()

    def save(self) -> None:
        self.json_path.write_text(json.dumps(self.result, indent=1, default=str))

    def run(
        self, command: str, fn: Callable[[], dict[str, Any]], *, refusal_expected: bool = False
    ) -> dict[str, Any]:
        """Run one command; a BncorrectError is a clean error ("error"; "na" when ``refusal_expected``),
        anything else a crash (with the traceback)."""
        from bncorrect.errors import BncorrectError

        entry: dict[str, Any] = {"status": "running"}
        self.result["commands"][command] = entry
        self._entry = entry
        self.save()
        print(f"[{self.fam.name}] {command} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                extra = fn()
                entry["status"] = "ok"
                entry.update(extra or {})
            except Skip as e:
                entry["status"] = "skipped"
                entry["message"] = str(e)
            except BncorrectError as e:
                entry["status"] = "na" if refusal_expected else "error"
                entry["error_type"] = type(e).__name__
                entry["message"] = e.render()
                entry["traceback"] = traceback.format_exc()
            except Exception as e:
                entry["status"] = "crash"
                entry["error_type"] = type(e).__name__
                entry["message"] = f"{type(e).__name__}: {e}"
                entry["traceback"] = traceback.format_exc()
        entry["total_s"] = time.perf_counter() - t0  # the API call and the checks after it
        entry.setdefault("time_s", entry["total_s"])
        msgs = []
        for w in caught:
            text = f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}"
            if text not in msgs:
                msgs.append(text)
        entry["warnings"] = msgs[:6]
        print(
            f"[{self.fam.name}] {command}: {entry['status']} {entry['time_s']:.1f}s "
            f"{entry.get('message', '')[:300]}",
            file=sys.stderr,
            flush=True,
        )
        self.save()
        return entry

    def api(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call one bncorrect API function, recording its wall time and peak RSS (the checks after it
        are not counted)."""
        sampler = RssSampler()
        t0 = time.perf_counter()
        try:
            with sampler:
                return fn(*args, **kwargs)
        finally:
            self._entry["time_s"] = time.perf_counter() - t0
            self._entry["peak_rss_mib"] = sampler.peak / 2**20
            self._entry["rss_start_mib"] = sampler.start / 2**20

    # -- helpers
    def parity(self, outcome: Any) -> dict[str, Any]:
        ref = reference_model(self.model, outcome.corrections)
        got = forward(self.fam, outcome.model, self.probe)
        want = forward(self.fam, ref, self.probe)
        out = compare(got, want)
        out["changed_vs_plain"] = compare(got, self.plain_out)["max_abs"]
        # bncorrect's own correction applied to a float64 copy: its math against the reference without
        # float32 rounding (which ill-conditioned layers amplify)
        from bncorrect.api import apply_to_module

        mine64 = apply_to_module(copy.deepcopy(self.model).double(), outcome.corrections).eval()
        out["float64"] = compare(forward(self.fam, mine64, self.probe), want)
        return out

    def coeff_summary(self, corrections: Any) -> dict[str, Any]:
        import torch

        alphas = torch.cat([lc.alpha.reshape(-1).double() for lc in corrections.layers.values()])
        betas = torch.cat([lc.beta.reshape(-1).double() for lc in corrections.layers.values()])
        return {
            "layers": len(corrections.layers),
            "alpha": [float(alphas.min()), float(alphas.median()), float(alphas.max())],
            "beta": [float(betas.min()), float(betas.median()), float(betas.max())],
        }

    def bitwise_alpha0(self, outcome: Any) -> dict[str, Any]:
        import torch

        got = forward(self.fam, outcome.model, self.probe)
        out: dict[str, Any] = {"bit_identical": bool(torch.equal(flat(got), flat(self.plain_out)))}
        if self.fam.features is not None:  # detection: the boxes too, not only the features
            with torch.no_grad():
                full_a, full_b = flat(self.model(self.probe)), flat(outcome.model(self.probe))
            out["bit_identical_full_output"] = bool(torch.equal(full_a, full_b))
        return out

    # -- commands
    def c_inspect(self) -> dict[str, Any]:
        import bncorrect

        layers = self.api(bncorrect.inspect, self.model)
        types = Counter(ly["type"] for ly in layers)
        mine = sum(1 for m in self.model.modules() if is_bn_like(m))
        return {
            "layers": len(layers),
            "correctable": sum(1 for ly in layers if ly["correctable"]),
            "types": dict(types),
            "reasons": sorted({str(ly["reason"]) for ly in layers if not ly["correctable"]}),
            "reference_count": mine,
        }

    def c_rule(self) -> dict[str, Any]:
        import bncorrect

        outcome = self.api(bncorrect.rule, self.model, TRAIN_B)
        return {"parity": self.parity(outcome), "coefficients": self.coeff_summary(outcome.corrections)}

    def c_weight(self) -> dict[str, Any]:
        import bncorrect

        outcome = self.api(bncorrect.weight, self.model, 0.1, out=self.tmp / "weight.safetensors")
        return {"parity": self.parity(outcome)}

    def c_weight0(self) -> dict[str, Any]:
        import bncorrect

        outcome = self.api(bncorrect.weight, self.model, 0.0)
        return {"alpha0": self.bitwise_alpha0(outcome)}

    def c_estimate(self) -> dict[str, Any]:
        import bncorrect

        outcome = self.api(
            bncorrect.estimate, self.model, (self.x,), TRAIN_B, out=self.est_path, progress=False
        )
        res = outcome.report["estimate"]
        l_ema = [ly.l_aux_ema for ly in res.layers]
        l_fit = [ly.l_aux for ly in res.layers]
        return {
            "parity": self.parity(outcome),
            "coefficients": self.coeff_summary(outcome.corrections),
            "l_aux_ema_mean": sum(l_ema) / max(1, len(l_ema)),
            "l_aux_mean": sum(l_fit) / max(1, len(l_fit)),
            "examples": res.examples,
            "dropped": res.dropped,
        }

    def c_recal_eval(self) -> dict[str, Any]:
        from torch.utils.data import DataLoader, TensorDataset

        import bncorrect

        # batches of 16, so that the iterative scheme has several batches to reconcile
        loader = DataLoader(TensorDataset(self.x), batch_size=16)
        outcome = self.api(bncorrect.recalibrate, self.model, loader, upstream="eval", progress=False)
        res = outcome.report["recalibrate"]
        return {
            "parity": self.parity(outcome),
            "passes": res.passes,
            "batches": len(loader),
            **{k: getattr(res, k, None) for k in ("scheme", "converged", "exact", "max_change", "changes")},
            "fixed_point": self.fixed_point(outcome.model, outcome.corrections),
            "fixed_point_float64": self.fixed_point(
                reference_model(self.model, outcome.corrections), outcome.corrections
            ),
        }

    def fixed_point(self, model: Any, corrections: Any) -> dict[str, float]:
        """upstream=eval promises each layer's statistics are the population moments of what it receives
        when the recalibrated model runs in inference form: run ``model`` over the data with hooks on the
        BN layers and compare the moments (float64 sums) with the recalibrated statistics."""

        record: list[Any] = []
        handles = [
            model.get_submodule(n).register_forward_pre_hook(
                lambda mod, args, _n=n: record.append((_n, args[0]))
            )
            for n in corrections.layers
        ]
        sums: dict[str, list[Any]] = {}
        try:
            for i in range(0, self.n, 16):
                record.clear()
                forward(self.fam, model, self.x[i : i + 16])
                for name, inp in record:
                    inp = inp.double()
                    dims = (0, *range(2, inp.dim()))
                    s = sums.setdefault(name, [0, 0.0, 0.0])
                    s[0] += inp.numel() // inp.shape[1]
                    s[1] = s[1] + inp.sum(dim=dims)
                    s[2] = s[2] + (inp * inp).sum(dim=dims)
        finally:
            for h in handles:
                h.remove()
        worst_mean = worst_var = 0.0
        for name, lc in corrections.layers.items():
            if name not in sums:
                continue
            cnt, s1, s2 = sums[name]
            mean = s1 / cnt
            var = s2 / cnt - mean * mean
            got_m, got_v = lc.running_mean.double(), lc.running_var.double()
            scale = var.clamp_min(1e-12).sqrt()
            worst_mean = max(worst_mean, float(((got_m - mean).abs() / scale).max()))
            worst_var = max(worst_var, float(((got_v - var).abs() / var.clamp_min(1e-12)).max()))
        return {"mean_rel_sigma": worst_mean, "var_rel": worst_var, "layers": len(sums)}

    def c_recal_train(self) -> dict[str, Any]:
        import bncorrect

        outcome = self.api(
            bncorrect.recalibrate, self.model, (self.x,), upstream="train", batch_size=TRAIN_B, progress=False
        )
        return {"parity": self.parity(outcome), "passes": outcome.report["recalibrate"].passes}

    def c_sweep(self) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        import bncorrect

        corrections = self.est_path if self.est_path.exists() else None
        outcome = self.api(
            bncorrect.api.sweep_alpha,
            self.model,
            (self.x, self.y),
            train_batch_size=TRAIN_B,
            corrections=corrections,
            output_key=self.fam.output_key,
            ignore_index=IGNORE,
            progress=False,
        )
        res = outcome.report["sweep"]
        best = res.best

        def nll(model: Any) -> float:
            with torch.no_grad():
                out = model(self.x.double() if next(model.parameters()).dtype == torch.float64 else self.x)
            if self.fam.output_key is not None:
                out = out[self.fam.output_key]
            return float(F.cross_entropy(out.double(), self.y, ignore_index=IGNORE))

        ref = reference_model(self.model, outcome.corrections)
        return {
            "parity": self.parity(outcome),
            "rows": len(res.rows),
            "metric": res.metric,
            "task": res.task,
            "strategy": res.strategy,
            "best_alpha": best.alpha,
            "best_nll": best.nll,
            "ema_nll": res.ema.nll,
            "ema_nll_reference": nll(reference_model(self.model)),
            "best_nll_reference": nll(ref),
            "miou_best": best.miou,
            "notes": list(res.notes)[:3],
        }

    def c_tune(self) -> dict[str, Any]:
        import bncorrect

        outcome = self.api(
            bncorrect.api.tune,
            self.model,
            (self.x, self.y),
            TRAIN_B,
            output_key=self.fam.output_key,
            progress=False,
        )
        res = outcome.report["tune"]
        chosen = res.chosen
        return {
            "parity": self.parity(outcome),
            "chosen": getattr(chosen, "label", str(chosen)),
            "candidates": len(res.rows),
            "split": [res.n_fit, res.n_monitor, res.n_heldout],
            "coefficients": self.coeff_summary(outcome.corrections),
        }

    def c_diagnose(self) -> dict[str, Any]:
        import bncorrect

        corrections = self.est_path if self.est_path.exists() else None
        res = self.api(
            bncorrect.api.diagnose, self.model, (self.x,), TRAIN_B, corrections=corrections, progress=False
        )
        l1e = [ly.l1_eval for ly in res.layers]
        l1c = [ly.l1_corrected for ly in res.layers if ly.l1_corrected is not None]
        return {
            "layers": len(res.layers),
            "l1_eval_mean": sum(l1e) / max(1, len(l1e)),
            "l1_corrected_mean": (sum(l1c) / len(l1c)) if l1c else None,
            "recommendation": res.recommendation[:300],
        }

    def _corrections_source(self) -> Any:
        """The estimate's file, or the rule's corrections when estimate failed."""
        import bncorrect

        if self.est_path.exists():
            return self.est_path, "evalnorm.safetensors"
        return bncorrect.rule(self.model, TRAIN_B).corrections, "rule 1/B^2 (estimate failed)"

    def c_apply(self) -> dict[str, Any]:
        import torch

        import bncorrect

        corr, what = self._corrections_source()
        out_path = self.tmp / "applied.pt"
        outcome = self.api(bncorrect.apply, self.model, corr, out=out_path)
        parity = self.parity(outcome)
        how = "trust_arch"
        try:
            loaded = bncorrect.load(out_path, trust_arch=True)
        except bncorrect.errors.BncorrectError:
            how = "trust_pickle"
            loaded = bncorrect.load(out_path, trust_pickle=True)
        same = bool(
            torch.equal(
                flat(forward(self.fam, loaded, self.probe)),
                flat(forward(self.fam, outcome.model, self.probe)),
            )
        )
        return {
            "parity": parity,
            "corrections": what,
            "reload": how,
            "reload_bit_identical": same,
            "size_mib": out_path.stat().st_size / 2**20,
        }

    def c_onnx(self) -> dict[str, Any]:
        import numpy as np
        import onnxruntime as ort

        import bncorrect

        corr, what = self._corrections_source()
        out_path = self.tmp / "corrected.onnx"
        outcome = self.api(
            bncorrect.apply,
            self.model,
            corr,
            out=out_path,
            export=bncorrect.api.ExportOptions(input_shape=(2, 3, self.size, self.size)),
        )
        rep = outcome.report["export"]
        sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
        import torch

        # a graph written for a fixed batch (a trace that splits the batch into images, e.g. Faster R-CNN)
        # runs the probe in pieces of that size; PyTorch and the reference run the same pieces, so the
        # flattened outputs line up
        batch = sess.get_inputs()[0].shape[0]
        pieces = self.probe.split(batch) if isinstance(batch, int) and batch > 0 else (self.probe,)
        got = [np.asarray(a) for p in pieces for a in sess.run(None, {sess.get_inputs()[0].name: p.numpy()})]
        ort_flat = torch.cat([torch.from_numpy(a.astype(np.float64)).reshape(-1) for a in got])
        ref_model = reference_model(self.model, outcome.corrections)
        with torch.no_grad():
            torch_out = torch.cat([flat(outcome.model(p)) for p in pieces])
            ref_out = torch.cat([flat(ref_model(p.double())) for p in pieces])
        res: dict[str, Any] = {
            "corrections": what,
            "opset": rep.opset,
            "verify_max_abs": rep.max_abs_diff,
            "verify_rel": rep.rel_diff,
            "rewritten": len(rep.rewritten),
            "kept": len(rep.kept),
            "size_mib": out_path.stat().st_size / 2**20,
            "ort_inputs": len(sess.get_inputs()),
            "ort_outputs": len(got) // len(pieces),
            "ort_batch": batch if isinstance(batch, int) else "symbolic",
        }
        if ort_flat.shape == torch_out.shape:
            res["ort_vs_torch"] = compare(ort_flat, torch_out)
        else:
            res["ort_vs_torch"] = {"note": f"output sizes differ: {ort_flat.shape} vs {torch_out.shape}"}
        if ort_flat.shape == ref_out.shape:
            res["ort_vs_reference"] = compare(ort_flat, ref_out)
        return res

    def c_onnx_legacy(self) -> dict[str, Any]:
        """Where bncorrect's own export failed: follow its hint (export with BN kept by the TorchScript
        exporter, then ``apply`` the corrections onto that graph) and check onnxruntime against PyTorch."""
        import numpy as np
        import onnxruntime as ort
        import torch

        import bncorrect

        first = self.result["commands"].get("onnx", {})
        if first.get("status") in ("ok", None):
            raise Skip("not needed: apply (.onnx) worked" if first else "apply (.onnx) did not run")
        corr, what = self._corrections_source()
        plain = self.tmp / "plain_legacy.onnx"
        example = self.probe[:2]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                copy.deepcopy(self.model).eval(),
                (example,),
                str(plain),
                dynamo=False,
                opset_version=17,
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=False,
            )
        t_export = time.perf_counter() - t0
        out_path = self.tmp / "corrected_legacy.onnx"
        outcome = self.api(bncorrect.apply, plain, corr, out=out_path)
        self._entry["time_s"] += t_export
        rw = outcome.report["rewrite"]
        sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})
        ort_flat = torch.cat([torch.from_numpy(np.asarray(a).astype(np.float64)).reshape(-1) for a in got])
        torch_model = bncorrect.apply(self.model, corr).model
        with torch.no_grad():
            torch_out = flat(torch_model(example))
        res: dict[str, Any] = {
            "corrections": what,
            "export_s": t_export,
            "rewritten": len(rw.rewritten),
            "kept": len(rw.kept),
            "formulation": getattr(rw, "formulation", None),
            "ort_outputs": len(got),
        }
        if ort_flat.shape == torch_out.shape:
            res["ort_vs_torch"] = compare(ort_flat, torch_out)
        else:
            res["ort_vs_torch"] = {"note": f"output sizes differ: {ort_flat.shape} vs {torch_out.shape}"}
        return res

    def c_cli(self) -> dict[str, Any]:
        """The command line on a state dict with --arch: inspect --json and rule -o .pt, read back with
        bncorrect.load(arch=...) and compared with the API's rule (bit for bit)."""
        import torch

        import bncorrect

        if self.fam.arch is None:
            raise bncorrect.errors.UsageError("no --arch factory for this family")
        sd = self.tmp / "state_dict.pt"
        torch.save(self.model.state_dict(), sd)
        arch = ["--arch", self.fam.arch, "--arch-kwargs", json.dumps(self.fam.arch_kwargs)]
        base = [sys.executable, "-m", "bncorrect"]
        t0 = time.perf_counter()
        ins = subprocess.run([*base, "inspect", str(sd), *arch, "--json"], capture_output=True, text=True)
        t_inspect = time.perf_counter() - t0
        if ins.returncode != 0:
            raise RuntimeError(f"bncorrect inspect exited {ins.returncode}: {ins.stderr.strip()[-500:]}")
        out = self.tmp / "cli_rule.pt"
        t0 = time.perf_counter()
        rule = subprocess.run(
            [*base, "rule", str(sd), *arch, "-B", str(TRAIN_B), "-o", str(out)],
            capture_output=True,
            text=True,
        )
        t_rule = time.perf_counter() - t0
        self._entry["time_s"] = t_inspect + t_rule
        # the largest RSS of the worker's children (these two CLI runs)
        self._entry["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if rule.returncode != 0:
            raise RuntimeError(f"bncorrect rule exited {rule.returncode}: {rule.stderr.strip()[-500:]}")
        loaded = bncorrect.load(out, arch=self.fam.arch)
        api_model = bncorrect.rule(self.model, TRAIN_B).model
        same = bool(
            torch.equal(
                flat(forward(self.fam, loaded, self.probe)), flat(forward(self.fam, api_model, self.probe))
            )
        )
        layers = json.loads(ins.stdout)
        n_layers = len(layers) if isinstance(layers, list) else len(layers.get("layers", []))
        return {
            "inspect_s": t_inspect,
            "rule_s": t_rule,
            "inspect_layers": n_layers,
            "rule_matches_api": same,
        }

    def go(self, commands: list[str]) -> None:
        for c in commands:
            expected = (c == "sweep" and self.fam.task in ("features", "detection")) or (
                c == "tune" and self.fam.task != "classification"
            )
            self.run(c, getattr(self, f"c_{c}"), refusal_expected=expected)
        self.result["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.result["done"] = True
        self.save()


def worker_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fam = make_family(args.worker, args.size)
    w = Worker(fam, args, Path(args.json))
    w.go(args.commands.split(","))


# ---------------------------------------------------------------------------------------------- the driver
def snapshot(repo: Path, rev: str, out_dir: Path) -> tuple[str, Path]:
    """``git archive`` of ``rev``'s bncorrect/ into ``out_dir``: the workers import that committed tree
    (PYTHONPATH comes before the editable install's finder), not a working tree others are editing."""
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = out_dir / f"bncorrect-{commit[:10]}"
    if not (dest / "bncorrect" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", commit, "bncorrect"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit, dest


def versions(commit: str | None = None) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript", "numpy", "bncorrect"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception as e:  # pragma: no cover - report what is missing
            out[mod] = f"not importable ({type(e).__name__})"
    if commit:
        out["bncorrect_commit"] = (
            f"{commit[:10]} (the committed tree, `git archive`; uncommitted edits excluded)"
        )
        return out
    with contextlib.suppress(Exception):
        import bncorrect

        root = Path(bncorrect.__file__).resolve().parents[1]
        out["bncorrect_commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "bncorrect"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if dirty:
            files = ", ".join(line.split()[-1] for line in dirty.splitlines())
            out["bncorrect_commit"] += f" + uncommitted changes in {files}"
    return out


def host() -> dict[str, str]:
    model = ""
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    return {
        "cpu": model or platform.processor(),
        "cores": str(os.cpu_count()),
        "load_at_start": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "platform": platform.platform(),
    }


def driver(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "meta.json"
    families = FAMILIES if args.families == "all" else tuple(args.families.split(","))
    if not args.md_only:
        env = dict(os.environ)
        commit = None
        if args.snapshot != "none":
            commit, dest = snapshot(Path(args.repo), args.snapshot, out_dir)
            sys.path.insert(0, str(dest))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(dest), env.get("PYTHONPATH", "")]))
        meta = {
            "host": host(),
            "versions": versions(commit),
            "reference_vs_tests_reference": check_reference(Path(args.repo)),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "args": vars(args),
        }
        meta_path.write_text(json.dumps(meta, indent=1))
        for name in families:
            path = out_dir / f"{name}.json"
            n = args.n
            for override in filter(None, args.n_override.split(",")):
                fam_name, _, value = override.partition("=")
                if fam_name == name:
                    n = int(value)
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                name,
                "--json",
                str(path),
                "--n",
                str(n),
                "--size",
                str(args.size),
                "--seed",
                str(args.seed),
                "--threads",
                str(args.threads),
                "--commands",
                args.commands,
            ]
            t0 = time.perf_counter()
            print(f"== {name} (n={n})", file=sys.stderr, flush=True)
            try:
                proc = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True, env=env)
                rc, err = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired as e:
                rc = "timeout"
                err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            sys.stderr.write(err[-4000:])
            (out_dir / f"{name}.log").write_text(err)
            result = json.loads(path.read_text()) if path.exists() else {"family": name, "commands": {}}
            result["worker_rc"] = rc
            result["wall_s"] = time.perf_counter() - t0
            if rc != 0:
                result["worker_error"] = err[-3000:]
            path.write_text(json.dumps(result, indent=1, default=str))
        meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        meta["load_at_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
        meta_path.write_text(json.dumps(meta, indent=1))
    meta = json.loads(meta_path.read_text())
    results = [json.loads(p.read_text()) for name in FAMILIES if (p := out_dir / f"{name}.json").exists()]
    write_markdown(Path(args.md), meta, results)
    print(f"wrote {args.md}", file=sys.stderr)


# -------------------------------------------------------------------------------------------- the report
def _fmt(v: Any, spec: str = ".2g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def _cell_status(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "–"
    st = entry.get("status")
    t = entry.get("time_s")
    ts = f" {t:.1f} s" if isinstance(t, int | float) else ""
    if st == "ok":
        return f"ok{ts}"
    if st == "na":
        return "n/a (refused cleanly)"
    if st == "skipped":
        return "skipped"
    if st == "error":
        return f"**error** ({entry.get('error_type')}){ts}"
    if st == "crash":
        return f"**CRASH** ({entry.get('error_type')}){ts}"
    return f"**{st}**"


def _parity_cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("status") != "ok":
        return "–"
    p = entry.get("parity")
    if not p:
        return "–"
    p64 = p.get("float64", {}).get("rel")
    return f"{_fmt(p.get('rel'))} ({_fmt(p64)})"


def write_markdown(path: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    kept = ""
    if path.exists():
        text = path.read_text()
        a, b = text.find("<!-- findings -->"), text.find("<!-- /findings -->")
        if a >= 0 and b > a:
            kept = text[a : b + len("<!-- /findings -->")]
    if not kept:
        kept = "<!-- findings -->\n(none written yet)\n<!-- /findings -->"
    v, h, a = meta["versions"], meta["host"], meta["args"]
    lines: list[str] = []
    w = lines.append
    w("# Model zoo: every command on random-initialised torchvision and timm models")
    w("")
    w(
        "Generated by `scripts/zoo.py` (run by hand in a separate venv with torchvision and timm, which are "
        "not dependencies of bncorrect). Each model is built with random weights (`weights=None` / "
        "`pretrained=False`; no network); its BN running statistics are the cumulative average of 4 "
        "training-mode batches of 16 synthetic images (BN layers alone in training mode, `torch.no_grad`), "
        "then `eval()`. Every command runs through the Python API (`bncorrect.inspect`, `rule`, ...) on "
        "the `nn.Module`. **The accuracy numbers mean nothing** (random weights, random labels); what is "
        "checked is that each command runs, gives clean errors, and computes what it says."
    )
    w("")
    w(
        f"- Host: {h['cpu']}, {h['cores']} cores (shared with other jobs: load average "
        f"{h['load_at_start']} at the start, {meta.get('load_at_end', '?')} at the end — times are "
        f"indicative only), {h['platform']}; {a['threads']} torch threads."
    )
    w("- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".")
    w(
        f"- Data: synthetic images (N, 3, {a['size']}, {a['size']}) (smooth noise plus channel offsets), "
        f"N = {a['n']} per family unless the family table says otherwise; labels: random classes "
        f"0..{NUM_CLASSES - 1} (classifiers), random masks (N, {a['size']}, {a['size']}) over "
        f"{SEG_CLASSES} classes with 5% pixels = {IGNORE} (segmentation); parity probe: 8 other images. "
        f"B = {TRAIN_B} wherever a command takes a training batch size. Run {meta['started']} to "
        f"{meta.get('finished', '?')}."
    )
    w(
        "- Time: wall clock of the API call alone (its copy of the model included; the checks after it "
        "not). Peak memory: RSS of the worker process "
        "sampled from /proc/self/statm every 10 ms during the call (process-wide: interpreter, torch, "
        "the model and the data are included; one process per family)."
    )
    w(
        "- Parity: max |corrected model − reference| / max |reference| on the probe, where the reference "
        "is a float64 deep copy of the *original* model whose BN layers are replaced by an independent "
        "float64 implementation of the README formula (with the command's alpha/beta and, for "
        "recalibrate, its statistics; timm's BatchNormAct2d keeps its drop/act after). 'floor' is the same "
        "number for the unmodified float32 model against the plain float64 reference: float32 rounding "
        "alone. The reference layer agrees with the project's loop-based `tests/reference.py` to "
        f"{_fmt(meta.get('reference_vs_tests_reference'))} (random layer, per-channel alpha/beta)."
    )
    w("")
    w("## Families")
    w("")
    w(
        "| family | model | params | N | BN layers (types) | correctable | float32 floor "
        "| one eval forward over the N images (s) |"
    )
    w("|---|---|---|---|---|---|---|---|")
    for r in results:
        ins = r.get("commands", {}).get("inspect", {})
        types = ", ".join(f"{k} {c}" for k, c in (ins.get("types") or {}).items())
        floor = r.get("float32_floor", {}).get("rel")
        corr = ins.get("correctable", "–")
        note = f" ({r['note']})" if r.get("note") else ""
        w(
            f"| {r['family']} | {r.get('source', '')}{note} | {r.get('params', 0) / 1e6:.1f} M | "
            f"{r.get('data', {}).get('n', '–')} | {ins.get('layers', '–')} ({types}) | {corr} | "
            f"{_fmt(floor)} | {_fmt(r.get('forward_s'), '.2f')} |"
        )
    w("")
    w("## Status and wall time per command")
    w("")
    cmds = [c for c in COMMANDS if any(c in r.get("commands", {}) for r in results)]
    w("| family | " + " | ".join(COMMAND_TITLES[c] for c in cmds) + " |")
    w("|---|" + "---|" * len(cmds))
    for r in results:
        cells = [_cell_status(r.get("commands", {}).get(c)) for c in cmds]
        extra = ""
        if r.get("worker_rc") not in (0, None):
            extra = f" (worker: {r.get('worker_rc')})"
        w(f"| {r['family']}{extra} | " + " | ".join(cells) + " |")
    w("")
    w("## Peak RSS per command (MiB)")
    w("")
    w("| family | " + " | ".join(COMMAND_TITLES[c] for c in cmds) + " |")
    w("|---|" + "---|" * len(cmds))
    for r in results:
        cells = []
        for c in cmds:
            e = r.get("commands", {}).get(c)
            cells.append("–" if not e or "peak_rss_mib" not in e else f"{e['peak_rss_mib']:.0f}")
        w(f"| {r['family']} | " + " | ".join(cells) + " |")
    w("")
    w("## Output parity against the float64 reference (max relative difference)")
    w("")
    w(
        "Each cell: the corrected float32 model against the reference, and in parentheses bncorrect's own "
        "correction applied to a float64 copy (`bncorrect.api.apply_to_module`) against the reference, "
        "which separates bncorrect's math from float32 rounding. Fixed point (recalibrate eval): the "
        "recalibrated model is run over the data with hooks on its BN layers; worst |stored mean − mean "
        "of the layer's input| / σ and worst relative variance difference over all channels, in the "
        "float32 model and (parentheses) in the float64 reference with the recalibrated statistics."
    )
    w("")
    pcmds = ["rule", "weight", "estimate", "recal_eval", "recal_train", "sweep", "tune", "apply"]
    w(
        "| family | floor | "
        + " | ".join(COMMAND_TITLES[c] for c in pcmds)
        + " | weight 0 bit-identical | recalibrate eval fixed point: mean/σ, var rel (float64) "
        "| .pt reload bit-identical |"
    )
    w("|---|---|" + "---|" * (len(pcmds) + 3))
    for r in results:
        cm = r.get("commands", {})
        cells = [_parity_cell(cm.get(c)) for c in pcmds]
        a0 = cm.get("weight0", {}).get("alpha0")
        a0s = "–"
        if a0:
            a0s = "yes" if a0["bit_identical"] else "**NO**"
            if "bit_identical_full_output" in a0:
                a0s += f" (full output: {'yes' if a0['bit_identical_full_output'] else '**NO**'})"
        fps = "–"
        fp, fp64 = (
            cm.get("recal_eval", {}).get("fixed_point"),
            cm.get("recal_eval", {}).get("fixed_point_float64"),
        )
        if fp and fp64:
            fps = (
                f"{_fmt(fp['mean_rel_sigma'])} / {_fmt(fp['var_rel'])} "
                f"({_fmt(fp64['mean_rel_sigma'])} / {_fmt(fp64['var_rel'])})"
            )
        rl = cm.get("apply", {})
        rls = "–"
        if "reload_bit_identical" in rl:
            rls = ("yes" if rl["reload_bit_identical"] else "**NO**") + f" ({rl.get('reload')})"
        floor = _fmt(r.get("float32_floor", {}).get("rel"))
        w(f"| {r['family']} | {floor} | " + " | ".join(cells) + f" | {a0s} | {fps} | {rls} |")
    w("")
    w("## ONNX export (apply with the estimate's corrections, `out=corrected.onnx`, verified)")
    w("")
    w(
        "| family | status | opset | BN nodes rewritten / kept | bncorrect's verification max abs (rel) "
        "| onnxruntime vs PyTorch on the 8-image probe, max abs (rel) "
        "| onnxruntime vs float64 reference (rel) |"
    )
    w("|---|---|---|---|---|---|---|")
    for r in results:
        e = r.get("commands", {}).get("onnx")
        if not e:
            continue
        if e.get("status") != "ok":
            w(f"| {r['family']} | {_cell_status(e)} | – | – | – | – | – |")
            continue
        ot = e.get("ort_vs_torch", {})
        orf = e.get("ort_vs_reference", {})
        ots = ot.get("note") or f"{_fmt(ot.get('max_abs'))} ({_fmt(ot.get('rel'))})"
        w(
            f"| {r['family']} | {_cell_status(e)} | {e.get('opset')} "
            f"| {e.get('rewritten')} / {e.get('kept')} | "
            f"{_fmt(e.get('verify_max_abs'))} ({_fmt(e.get('verify_rel'))}) | {ots} | "
            f"{_fmt(orf.get('rel'))} |"
        )
    w("")
    legacy = [(r, r["commands"]["onnx_legacy"]) for r in results if "onnx_legacy" in r.get("commands", {})]
    legacy = [(r, e) for r, e in legacy if e.get("status") != "skipped"]
    if legacy:
        w("")
        w(
            "Where the export failed, its hint was followed: "
            "`torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17, "
            "training=TrainingMode.PRESERVE, do_constant_folding=False)` on the plain model, then "
            "`bncorrect.apply(f, corrections, out=corrected.onnx)`; onnxruntime against the PyTorch "
            "model corrected alike, on the 2-image export input:"
        )
        w("")
        for r, e in legacy:
            if e.get("status") != "ok":
                w(f"- {r['family']}: {_cell_status(e)}: {' '.join(str(e.get('message')).split())[:300]}")
                continue
            ot = e.get("ort_vs_torch", {})
            ots = ot.get("note") or f"max abs {_fmt(ot.get('max_abs'))} (rel {_fmt(ot.get('rel'))})"
            w(
                f"- {r['family']}: ok (export {e['export_s']:.1f} s, "
                f"apply {e['time_s'] - e['export_s']:.1f} s); "
                f"{e['rewritten']} BN nodes rewritten, {e['kept']} kept ({e.get('formulation')}); "
                f"{e['ort_outputs']} outputs; onnxruntime vs PyTorch: {ots}"
            )
    w("")
    w("## What the commands found")
    w("")
    w(
        "| family | estimate alpha min/median/max | beta min/median/max | L_aux EMA → fitted (mean) "
        "| sweep: rows, best alpha, NLL of EMA and best (float64 reference) | diagnose L1 eval → corrected "
        "| recalibrate eval passes | tune: chosen candidate (fit/monitor/held-out examples) |"
    )
    w("|---|---|---|---|---|---|---|---|")
    for r in results:
        cm = r.get("commands", {})
        es = cm.get("estimate", {})
        co = es.get("coefficients")
        al = "–" if not co else "/".join(_fmt(x, ".3g") for x in co["alpha"])
        be = "–" if not co else "/".join(_fmt(x, ".3g") for x in co["beta"])
        la = "–"
        if "l_aux_mean" in es:
            la = f"{_fmt(es['l_aux_ema_mean'], '.3g')} → {_fmt(es['l_aux_mean'], '.3g')}"
        sw = cm.get("sweep", {})
        sws = "–"
        if sw.get("status") == "ok":
            sws = (
                f"{sw['rows']} rows ({sw['task']}), alpha = {_fmt(sw['best_alpha'], '.3g')}, "
                f"NLL EMA {_fmt(sw['ema_nll'], '.5g')} ({_fmt(sw['ema_nll_reference'], '.5g')}), "
                f"best {_fmt(sw['best_nll'], '.5g')} ({_fmt(sw['best_nll_reference'], '.5g')})"
            )
        elif sw:
            sws = "n/a" if sw.get("status") == "error" else _cell_status(sw)
        dg = cm.get("diagnose", {})
        dgs = "–"
        if dg.get("status") == "ok":
            dgs = f"{_fmt(dg['l1_eval_mean'], '.3g')} → {_fmt(dg.get('l1_corrected_mean'), '.3g')}"
        re_ = cm.get("recal_eval", {})
        tu = cm.get("tune", {})
        tus = (
            _cell_status(tu)
            if tu.get("status") != "ok"
            else f"{tu['chosen']} ({'/'.join(map(str, tu['split']))})"
        )
        w(f"| {r['family']} | {al} | {be} | {la} | {sws} | {dgs} | {re_.get('passes', '–')} | {tus} |")
    w("")
    w("## Errors")
    w("")
    any_err = False
    for r in results:
        for c, e in r.get("commands", {}).items():
            if e.get("status") in ("ok", "skipped"):
                continue
            any_err = True
            msg = " ".join(str(e.get("message", e.get("status"))).split())
            w(
                f"- **{r['family']} / {COMMAND_TITLES.get(c, c)}** ({e.get('status')}, "
                f"{e.get('error_type')}): {msg}"
            )
        if r.get("worker_rc") not in (0, None):
            any_err = True
            tail = " ".join(str(r.get("worker_error", "")).split())[-400:]
            w(f"- **{r['family']}**: worker ended with {r.get('worker_rc')}: {tail}")
    if not any_err:
        w("(none)")
    w("")
    w("Warnings raised during the commands (first of each kind):")
    w("")
    seen: dict[str, list[str]] = {}
    for r in results:
        for c, e in r.get("commands", {}).items():
            for msg in e.get("warnings", []):
                seen.setdefault(msg, []).append(f"{r['family']}/{c}")
    if not seen:
        w("(none)")
    for msg, where in seen.items():
        shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
        w(f"- `{msg[:160]}` ({shown})")
    w("")
    w("## Findings")
    w("")
    w(kept)
    w("")
    w("## Reproduce")
    w("")
    w("```bash")
    cmdline = (
        f"--n {a['n']} --size {a['size']} --threads {a['threads']} --snapshot {a.get('snapshot', 'none')}"
    )
    if a.get("n_override"):
        cmdline += f" --n-override {a['n_override']}"
    w(f"/work/zoo-venv/bin/python scripts/zoo.py {cmdline}   # per-family JSON and logs in {a['out_dir']}/")
    w("```")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="all", help="comma-separated, or 'all': " + ", ".join(FAMILIES))
    p.add_argument("--n", type=int, default=64, help="examples per family")
    p.add_argument("--n-override", default="", help="per-family N, e.g. tv_densenet121=32")
    p.add_argument("--size", type=int, default=64, help="image height = width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--commands", default=",".join(COMMANDS))
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per family")
    p.add_argument("--out-dir", default="zoo-out")
    p.add_argument("--md", default=str(ROOT / "docs" / "zoo.md"))
    p.add_argument("--md-only", action="store_true", help="rewrite the markdown from --out-dir's JSON")
    p.add_argument(
        "--snapshot",
        default="HEAD",
        help="run the bncorrect of this commit (git archive into --out-dir), or 'none' for the installed one",
    )
    p.add_argument("--repo", default=str(ROOT), help="the bncorrect repository (for --snapshot)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
