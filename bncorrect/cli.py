"""The ``bncorrect`` command line: parse options, call one API function, render the result with rich.

Errors a user can cause (:class:`~bncorrect.errors.BncorrectError`) are caught here only, printed as one
message and turned into a non-zero exit code; ``--debug`` (anywhere on the command line) shows the
traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import BncorrectError, interface

app = typer.Typer(
    name="bncorrect",
    help="Fix BatchNorm models trained with small normalization batches, after training "
    "(EvalNorm alpha/beta, inference example weighing, exact population statistics).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# Piped output (files, CI logs, tests) gets a wide table instead of rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "140"))
out_console = Console(soft_wrap=True, width=_WIDTH)
err_console = Console(stderr=True, soft_wrap=True)
_DEBUG = {"on": False}

# ---------------------------------------------------------------- shared options
ModelArg = Annotated[
    Path, typer.Argument(help="Model: .pt/.pth (state dict or pickled module), .safetensors, .onnx.")
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Write the result: .safetensors (corrections file), .pt/.pth (patched checkpoint), "
        ".onnx (graph).",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        help="Architecture factory 'package.module:function' (or 'file.py:function') for state dicts."
    ),
]
ArchKwargsOpt = Annotated[
    str | None, typer.Option(help="JSON object of keyword arguments for the --arch factory.")
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow unpickling a whole pickled nn.Module (this runs code stored in the file).",
    ),
]
TrustArchOpt = Annotated[
    bool,
    typer.Option(
        "--trust-arch",
        help="Build the architecture a bncorrect checkpoint records (imports and calls the factory the file "
        "names); without it, pass the same --arch to confirm.",
    ),
]
NonStrictOpt = Annotated[
    bool, typer.Option("--non-strict", help="Load weights even if some keys are missing/unexpected (warns).")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")
]
InputShapeOpt = Annotated[
    str | None, typer.Option(help="Example input shape for ONNX export from PyTorch, e.g. 1,3,224,224.")
]
OpsetOpt = Annotated[
    int | None, typer.Option(help="ONNX opset for export from PyTorch (default: exporter's).")
]
NoVerifyOpt = Annotated[
    bool, typer.Option("--no-verify", help="Skip checking the exported ONNX graph against PyTorch.")
]


def _load_options(
    arch: str | None, arch_kwargs: str | None, trust_pickle: bool, non_strict: bool, trust_arch: bool
) -> dict[str, Any]:
    from .models import parse_arch_kwargs

    return {
        "arch": arch,
        "arch_kwargs": parse_arch_kwargs(arch_kwargs) if arch_kwargs else None,
        "trust_pickle": trust_pickle,
        "trust_arch": trust_arch,
        "strict": not non_strict,
    }


ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Use a corrections file even though it was made for another model (its BN fingerprint differs).",
    ),
]
LatencyBudgetOpt = Annotated[
    float | None,
    typer.Option(
        help="Writing .onnx: correct only the layers worth their latency, so the written graph's latency "
        "ratio over the plain graph (onnxruntime, measured) stays <= R (1: every BN plain). Per layer: the "
        "leave-one-out gain on the held-out part (sweep-alpha: the data) and the measured cost; the exact "
        "additive Pareto frontier of layer subsets is measured as real graphs and the best measured one "
        "within R is written. Costs two stacked scoring passes and two timing runs; prints the curve "
        "metric vs latency ratio.",
    ),
]
BudgetPlotOpt = Annotated[
    Path | None, typer.Option(help="With --latency-budget: write a PNG of held-out metric vs latency ratio.")
]
MinEffectOpt = Annotated[
    float | None,
    typer.Option(
        help="Writing .onnx: layers whose correction changes their output by less than this (relative to "
        "its RMS, on the first data batch) stay plain BN, which runtimes fold into the Conv before it.",
        min=0.0,
    ),
]


def _export_options(
    input_shape: str | None, opset: int | None, no_verify: bool, min_effect: float | None = None
) -> Any:
    from .api import ExportOptions, parse_shape

    return ExportOptions(
        input_shape=parse_shape(input_shape) if input_shape else None,
        opset=opset,
        verify=not no_verify,
        min_effect=min_effect,
    )


def _print_json(data: Any) -> None:
    out_console.print_json(json.dumps(data, default=_json_default))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    return str(obj)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _warn_outcome(outcome: Any) -> None:
    """Warnings the library returned (e.g. a corrections file without a fingerprint, or --force used)."""
    for w in getattr(outcome, "report", {}).get("warnings", []) or getattr(outcome, "warnings", []) or []:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)


def _warn_load(outcome_source: Any) -> None:
    meta = getattr(outcome_source, "meta", {}) or {}
    for w in meta.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    for note in meta.get("notes", []):
        err_console.print(f"[dim]{note}[/]", highlight=False)


def _report_written(outcome: Any, json_out: bool) -> None:
    if outcome.output is None:
        if not json_out:
            err_console.print("[dim]No --output given: nothing written.[/]")
        return
    if json_out:
        return
    err_console.print(f"[green]Wrote[/] {outcome.output}")
    export = outcome.report.get("export")
    if export is not None:
        diff = getattr(export, "max_abs_diff", None)
        if diff is not None:
            err_console.print(f"  verified against PyTorch: max abs diff {diff:.3g}")
    check = getattr(export, "runtime_check", None) or getattr(
        outcome.report.get("rewrite"), "runtime_check", None
    )
    if check and str(outcome.output).lower().endswith(".onnx"):
        err_console.print(f"  {check}", highlight=False)
    effect = outcome.report.get("min_effect") or getattr(export, "min_effect", None)
    if effect is not None:
        err_console.print(
            f"  --min-effect {effect.tol:g}: {len(effect.kept)} layers kept plain "
            f"({', '.join(effect.kept) or 'none'}), {len(effect.corrected)} corrected"
        )
    rw = outcome.report.get("rewrite") or getattr(export, "rewrite", None)
    if rw is not None:
        err_console.print(
            f"  {len(rw.rewritten)} BN nodes rewritten, {len(rw.kept)} kept as plain BN (alpha = beta = 0)"
        )
        for name, reason in rw.skipped:
            err_console.print(f"  [yellow]not corrected:[/] {name}: {reason}")


def _layer_labels(source: Any) -> dict[str, str]:
    """For an ONNX model: BN node name -> "node (parameter prefix)", e.g. the PyTorch layer it came from."""
    from .api import OnnxModel

    if not isinstance(source, OnnxModel):
        return {}
    from .onnx_rewrite import find_bn_nodes

    return {
        ly.name: f"{ly.name} ({ly.torch_name})"
        for ly in find_bn_nodes(source.proto)
        if ly.torch_name and ly.torch_name != ly.name
    }


def _coefficient_table(outcome: Any, title: str) -> Table:
    table = Table(title=title)
    table.add_column("layer")
    table.add_column("alpha", justify="right")
    table.add_column("beta", justify="right")
    shown = _layer_labels(outcome.source)
    for name, lc in outcome.corrections.layers.items():
        a = lc.alpha.tolist() if lc.alpha.dim() == 0 else f"per-channel, mean {float(lc.alpha.mean()):.4g}"
        b = lc.beta.tolist() if lc.beta.dim() == 0 else f"per-channel, mean {float(lc.beta.mean()):.4g}"
        table.add_row(shown.get(name, name), _fmt(a), _fmt(b))
    return table


def _outcome_json(outcome: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    c = outcome.corrections
    data: dict[str, Any] = {
        "method": c.method,
        "train_batch_size": c.train_batch_size,
        "output": None if outcome.output is None else str(outcome.output),
        "layers": [
            {"name": n, "alpha": lc.alpha.tolist(), "beta": lc.beta.tolist()} for n, lc in c.layers.items()
        ],
    }
    if "matched" in outcome.report:
        data["matched"] = outcome.report["matched"]
    data.update(_written_json(outcome))
    data.update(extra or {})
    return data


def _written_json(outcome: Any) -> dict[str, Any]:
    """What was written and how it was checked: output path, ONNX verification, --min-effect report."""
    data: dict[str, Any] = {"output": None if outcome.output is None else str(outcome.output)}
    export = outcome.report.get("export")
    if export is not None:
        data["verify_max_abs_diff"] = getattr(export, "max_abs_diff", None)
    check = getattr(export, "runtime_check", None) or getattr(
        outcome.report.get("rewrite"), "runtime_check", None
    )
    if check and data["output"] and data["output"].lower().endswith(".onnx"):
        data["runtime_check"] = check
    if outcome.report.get("warnings"):
        data["warnings"] = list(outcome.report["warnings"])
    effect = outcome.report.get("min_effect") or getattr(export, "min_effect", None)
    if effect is not None:
        data["min_effect"] = effect.summary()
    plan = outcome.report.get("latency_budget")
    if plan is not None:
        data["latency_budget"] = plan.summary()
    return data


def _budget_table(outcome: Any, budget_plot: Path | None) -> None:
    """--latency-budget: the measured curve, what was chosen, and the PNG."""
    plan = outcome.report.get("latency_budget")
    if plan is None:
        return
    out_console.print(plan.table())
    c = plan.curve.index(plan.chosen)
    out_console.print(
        f"--latency-budget {plan.budget:g}: {len(plan.selected)} of {len(plan.layers)} corrected layers kept "
        f"({', '.join(plan.summary()['selected']) or 'none'}); {plan.metric} ({plan.scored_on}) "
        f"{plan.metrics[c]:.4f} "
        f"at latency ratio {plan.chosen.ratio:.3f} (full correction: {plan.full_metric:.4f} at "
        f"{plan.full_ratio:.3f}, plain: {plan.metrics[0]:.4f})."
    )
    if budget_plot is not None:
        err_console.print(f"[green]Wrote[/] budget plot {budget_plot}")


# ---------------------------------------------------------------- commands
def _version(value: bool) -> None:
    if value:
        out_console.print(f"bncorrect {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Fix BatchNorm after training."""
    if debug:
        _DEBUG["on"] = True


@app.command()
def inspect(
    model: ModelArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    trust_arch: TrustArchOpt = False,
    non_strict: NonStrictOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """List the BatchNorm layers of MODEL, their statistics and whether they can be corrected."""
    if model.suffix.lower() == ".onnx":  # without importing torch: a fast start for graphs
        from .onnx_rewrite import load_onnx, require_bn_nodes

        layers = [ly.summary() for ly in require_bn_nodes(load_onnx(model), source=model)]
    else:
        from . import api

        load = _load_options(arch, arch_kwargs, trust_pickle, non_strict, trust_arch)
        source = api.open_model(model, **load)
        _warn_load(source)
        layers = api.inspect(source)
    if json_out:
        _print_json({"model": str(model), "layers": layers})
        return
    table = Table(title=f"BatchNorm layers of {model}")
    headers = ("layer", "type", "C", "eps", "momentum", "|running mean|", "running var (min)", "correctable")
    for col in headers:
        left = col in ("layer", "type", "correctable")
        table.add_column(col, justify="left" if left else "right", overflow="fold")
    for ly in layers:
        var = "-"
        if "running_var_mean" in ly:
            var = f"{ly['running_var_mean']:.3g} (min {ly['running_var_min']:.3g})"
        table.add_row(
            ly["name"],
            ly["type"],
            str(ly["channels"]),
            _fmt(ly["eps"]),
            _fmt(ly.get("momentum")),
            _fmt(ly.get("running_mean_abs_mean")),
            var,
            "yes" if ly["correctable"] else f"[yellow]no[/]: {ly['reason']}",
        )
    out_console.print(table)
    n_ok = sum(1 for ly in layers if ly["correctable"])
    out_console.print(f"{n_ok} of {len(layers)} BatchNorm layers can be corrected.")


@app.command()
def rule(
    model: ModelArg,
    train_batch_size: Annotated[
        int, typer.Option("--train-batch-size", "-B", help="Examples per normalization batch in training.")
    ],
    output: OutOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    trust_arch: TrustArchOpt = False,
    non_strict: NonStrictOpt = False,
    input_shape: InputShapeOpt = None,
    opset: OpsetOpt = None,
    no_verify: NoVerifyOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """alpha = beta = 1/B^2 for every BN layer (EvalNorm's rule of thumb)."""
    from . import api

    with _progress_bar(enabled=not json_out and _writes_onnx(output)) as bar:
        outcome = api.rule(
            model,
            train_batch_size,
            out=output,
            progress=bar,
            export=_export_options(input_shape, opset, no_verify),
            **_load_options(arch, arch_kwargs, trust_pickle, non_strict, trust_arch),
        )
    _warn_load(outcome.source)
    _warn_outcome(outcome)
    if json_out:
        _print_json(_outcome_json(outcome))
    else:
        a = 1.0 / train_batch_size**2
        out_console.print(
            f"Rule of thumb for B = {train_batch_size}: alpha = beta = 1/B^2 = {a:.6g} "
            f"on {len(outcome.corrections.layers)} BN layers."
        )
    _report_written(outcome, json_out)


@app.command()
def weight(
    model: ModelArg,
    alpha: Annotated[
        float | None, typer.Option(help="Weight of the example's own statistics, in [0, 1].")
    ] = None,
    beta: Annotated[float | None, typer.Option(help="Weight for the variance (default: = alpha).")] = None,
    prior_strength: Annotated[
        float | None,
        typer.Option(
            help="Instead of --alpha: the running statistics weigh as N examples, alpha = 1/(N+1) "
            "(test-time BN adaptation's N)."
        ),
    ] = None,
    output: OutOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    trust_arch: TrustArchOpt = False,
    non_strict: NonStrictOpt = False,
    input_shape: InputShapeOpt = None,
    opset: OpsetOpt = None,
    no_verify: NoVerifyOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """One alpha (and beta) for every BN layer (inference example weighing)."""
    from . import api

    with _progress_bar(enabled=not json_out and _writes_onnx(output)) as bar:
        outcome = api.weight(
            model,
            alpha,
            beta,
            prior_strength=prior_strength,
            out=output,
            progress=bar,
            export=_export_options(input_shape, opset, no_verify),
            **_load_options(arch, arch_kwargs, trust_pickle, non_strict, trust_arch),
        )
    _warn_load(outcome.source)
    _warn_outcome(outcome)
    if json_out:
        _print_json(_outcome_json(outcome))
    else:
        first = next(iter(outcome.corrections.layers.values()))
        a_used, b = float(first.alpha), float(first.beta)
        prior = "" if prior_strength is None else f" (prior strength N = {prior_strength:g}: 1/(N+1))"
        out_console.print(
            f"Example weighing: alpha = {a_used:.6g}{prior}, beta = {b:.6g} "
            f"on {len(outcome.corrections.layers)} BN layers."
        )
    _report_written(outcome, json_out)


@app.command()
def apply(
    model: ModelArg,
    corrections: Annotated[
        Path, typer.Argument(help="Corrections file (.safetensors) written by bncorrect.")
    ],
    output: OutOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    trust_arch: TrustArchOpt = False,
    non_strict: NonStrictOpt = False,
    input_shape: InputShapeOpt = None,
    opset: OpsetOpt = None,
    no_verify: NoVerifyOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Apply a corrections file to MODEL (also across formats: PyTorch corrections onto its ONNX export)."""
    from . import api

    with _progress_bar(enabled=not json_out and _writes_onnx(output)) as bar:
        outcome = api.apply(
            model,
            corrections,
            out=output,
            force=force,
            progress=bar,
            export=_export_options(input_shape, opset, no_verify),
            **_load_options(arch, arch_kwargs, trust_pickle, non_strict, trust_arch),
        )
    _warn_load(outcome.source)
    _warn_outcome(outcome)
    if json_out:
        _print_json(_outcome_json(outcome))
    else:
        out_console.print(
            _coefficient_table(outcome, f"Corrections from {corrections} ({outcome.corrections.method})")
        )
        matched = outcome.report.get("matched")
        if matched:
            renamed = {k: v for k, v in matched.items() if k != v}
            if renamed:
                out_console.print(f"Matched {len(matched)} layers to ONNX nodes by parameter names:")
                for k, v in renamed.items():
                    out_console.print(f"  {k} -> {v}")
    _report_written(outcome, json_out)


# ---------------------------------------------------------------- data options and progress
DataOpt = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Data: folder of images (class sub-folders or flat), .npz (x, y), .pt {'x','y'}, "
        ".safetensors, .npy.",
    ),
]
MaxExamplesOpt = Annotated[
    int | None, typer.Option(help="Use at most N examples (after shuffling with --seed).")
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps or auto.")]
WorkersOpt = Annotated[int, typer.Option(help="DataLoader worker processes.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for shuffling and sampling (results are reproducible).")]
ResizeOpt = Annotated[str | None, typer.Option(help="Images: resize the shorter side to N, or to H,W.")]
CropOpt = Annotated[str | None, typer.Option(help="Images: center crop to N or H,W.")]
MeanOpt = Annotated[str | None, typer.Option(help="Images: per-channel mean (default ImageNet's).")]
StdOpt = Annotated[str | None, typer.Option(help="Images: per-channel std (default ImageNet's).")]
NoNormOpt = Annotated[bool, typer.Option("--no-normalize", help="Images: keep pixel values in [0, 1].")]
ChannelsOpt = Annotated[int, typer.Option(help="Images: 3 (RGB) or 1 (grayscale).")]
PreprocessOpt = Annotated[
    str | None, typer.Option(help="Images: 'module:function' taking a PIL image and returning a tensor.")
]
DataConfigOpt = Annotated[
    str | None,
    typer.Option(
        help="Images: preprocess as the model expects. 'model' reads a timm model's pretrained_cfg; "
        "'module:Weights.NAME' a torchvision weights enum's transforms() (e.g. "
        "torchvision.models:ResNet50_Weights.IMAGENET1K_V2). --resize/--crop/--mean/--std still win.",
    ),
]
SkipBadOpt = Annotated[
    bool,
    typer.Option(
        "--skip-bad-files", help="Images: skip unreadable files (and list them) instead of failing."
    ),
]


def _data_spec(
    resize: str | None,
    crop: str | None,
    mean: str | None,
    std: str | None,
    no_normalize: bool,
    channels: int,
    preprocess: str | None,
    skip_bad_files: bool,
) -> Any:
    from .data import DataSpec, parse_floats, parse_size

    return DataSpec(
        resize=parse_size(resize) if resize else None,
        crop=parse_size(crop) if crop else None,
        mean=parse_floats(mean) if mean else None,
        std=parse_floats(std) if std else None,
        normalize=not no_normalize,
        channels=channels,
        preprocess=preprocess,
        skip_bad_files=skip_bad_files,
    )


def _writes_onnx(output: Path | None) -> bool:
    return output is not None and output.suffix.lower() == ".onnx"


def _say_preprocessing(dataset: Any, json_out: bool) -> None:
    """Image folders: which preprocessing is used (resize, crop, mean/std, where they came from)."""
    if not json_out and getattr(dataset, "root", None) is not None:
        err_console.print(f"[dim]data: {dataset.description}[/]", highlight=False)


def _model_and_spec(model: Path, spec: Any, data_config: str | None, load_options: dict[str, Any]) -> Any:
    """With --data-config: the loaded model (passed on to the command, so it is loaded once) and the
    preprocessing the model expects, merged with the options given explicitly."""
    if not data_config:
        return model, spec
    from . import api
    from .data_config import merge, resolve_data_config

    source = api.open_model(model, **load_options)
    if data_config == "model" and not isinstance(source, api.LoadedModel):
        from .errors import UsageError

        raise UsageError(
            "--data-config model reads a PyTorch model's pretrained_cfg; an ONNX graph has none",
            path=model,
            hint="name the weights instead (--data-config module:Weights.NAME), or give "
            "--resize/--crop/--mean/--std",
        )
    return source, merge(resolve_data_config(data_config, getattr(source, "model", None)), spec)


def _progress_bar(enabled: bool = True) -> Any:
    from .progress import ConsoleProgress

    return ConsoleProgress(enabled=enabled, console=err_console)


def _parse_layer_batch_sizes(items: list[str] | None) -> dict[str, int]:
    from .errors import UsageError

    out: dict[str, int] = {}
    for item in items or []:
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern or not value.strip().isdigit():
            raise UsageError(
                f"--layer-batch-size {item!r} is not PATTERN=B", hint="e.g. --layer-batch-size 'head.*=16'"
            )
        out[pattern] = int(value)
    return out


def _warn_skipped(dataset_or_outcome: Any) -> None:
    for name in getattr(dataset_or_outcome, "skipped", []) or []:
        err_console.print(f"[yellow]skipped unreadable file:[/] {name}")


@app.command()
def estimate(
    model: ModelArg,
    data: DataOpt,
    train_batch_size: Annotated[
        int,
        typer.Option(
            "--train-batch-size",
            "-B",
            help="Examples per normalization batch in training (per GPU / ghost batch).",
        ),
    ],
    output: OutOpt = None,
    layer_batch_size: Annotated[
        list[str] | None,
        typer.Option(
            help="PATTERN=B: layers (glob on names; BN node names for .onnx) that normalized over B "
            "examples. Repeatable."
        ),
    ] = None,
    recalibrate: Annotated[
        bool, typer.Option("--recalibrate", help="First replace running statistics by exact population ones.")
    ] = False,
    upstream: Annotated[
        str, typer.Option(help="With --recalibrate: 'eval' or 'train' (see recalibrate).")
    ] = "eval",
    max_examples: MaxExamplesOpt = None,
    device: DeviceOpt = "auto",
    num_workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    trust_arch: TrustArchOpt = False,
    non_strict: NonStrictOpt = False,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    no_normalize: NoNormOpt = False,
    channels: ChannelsOpt = 3,
    preprocess: PreprocessOpt = None,
    skip_bad_files: SkipBadOpt = False,
    data_config: DataConfigOpt = None,
    input_shape: InputShapeOpt = None,
    opset: OpsetOpt = None,
    no_verify: NoVerifyOpt = False,
    min_effect: MinEffectOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Offline EvalNorm: estimate per-layer alpha/beta over a data pass (minimising L_aux)."""
    from . import api

    spec = _data_spec(resize, crop, mean, std, no_normalize, channels, preprocess, skip_bad_files)
    load = _load_options(arch, arch_kwargs, trust_pickle, non_strict, trust_arch)
    model_or_source, spec = _model_and_spec(model, spec, data_config, load)
    dataset = api.open_data(data, spec)
    _warn_skipped(dataset)
    _say_preprocessing(dataset, json_out)
    with _progress_bar(enabled=not json_out) as bar:
        outcome = api.estimate(
            model_or_source,
            dataset,
            train_batch_size,
            out=output,
            layer_batch_size=_parse_layer_batch_sizes(layer_batch_size),
            recalibrate_first=recalibrate,
            upstream=upstream,
            max_examples=max_examples,
            device=device,
            num_workers=num_workers,
            seed=seed,
            progress=bar,
            export=_export_options(input_shape, opset, no_verify, min_effect),
            **load,
        )
    _warn_load(outcome.source)
    _warn_outcome(outcome)
    result = outcome.report["estimate"]
    if json_out:
        data_out = {**result.as_dict(), **_written_json(outcome)}
        data_out["method"] = outcome.corrections.method
        _print_json(data_out)
        return
    table = Table(title=f"EvalNorm offline estimate, B = {train_batch_size} ({result.examples} examples)")
    for col in ("layer", "B", "alpha", "beta", "L_aux EMA", "L_aux corrected", "change"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    shown = _layer_labels(outcome.source)
    for ly in result.layers:
        change = (ly.l_aux - ly.l_aux_ema) / ly.l_aux_ema if ly.l_aux_ema > 0 else 0.0
        table.add_row(
            shown.get(ly.name, ly.name),
            str(ly.train_batch_size),
            f"{ly.alpha:.4f}",
            f"{ly.beta:.4f}",
            f"{ly.l_aux_ema:.4g}",
            f"{ly.l_aux:.4g}",
            f"{100 * change:+.1f}%",
        )
    out_console.print(table)
    if result.dropped:
        err_console.print(
            f"[dim]{result.dropped} examples did not fill a whole normalization batch; not used.[/]"
        )
    _report_written(outcome, json_out)


@app.command()
def recalibrate(
    model: ModelArg,
    data: DataOpt,
    output: OutOpt = None,
    upstream: Annotated[
        str,
        typer.Option(
            help="'eval': each layer's statistics with earlier layers already recalibrated "
            "(inference-consistent); 'train': training-mode normalization over batches of --batch-size "
            "(PreciseBN)."
        ),
    ] = "eval",
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Normalization batch size for --upstream train.")
    ] = None,
    exact: Annotated[
        bool | None,
        typer.Option(
            "--exact/--iterative",
            help="--upstream eval scheme. --exact: layer by layer, one partial pass per BN layer (about L/2 "
            "passes for L layers), the reference. --iterative: full passes until the statistics settle "
            "(--tolerance, --max-passes), exact after at most depth + 1 passes and after one pass when the "
            "data is one batch. Default: --exact when L/2 <= --max-passes and the data is several batches, "
            "else --iterative.",
            show_default=False,
        ),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            help="--upstream eval: stop when no layer's per-batch input moments changed by more than this "
            "since the previous pass (means relative to the std, variances relative to the variance; "
            "default 1e-4)."
        ),
    ] = None,
    max_passes: Annotated[
        int | None,
        typer.Option(help="--upstream eval: at most this many passes (default 10; a warning if reached)."),
    ] = None,
    max_examples: MaxExamplesOpt = None,
    device: DeviceOpt = "auto",
    num_workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    trust_arch: TrustArchOpt = False,
    non_strict: NonStrictOpt = False,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    no_normalize: NoNormOpt = False,
    channels: ChannelsOpt = 3,
    preprocess: PreprocessOpt = None,
    skip_bad_files: SkipBadOpt = False,
    data_config: DataConfigOpt = None,
    input_shape: InputShapeOpt = None,
    opset: OpsetOpt = None,
    no_verify: NoVerifyOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Replace running statistics by exact population statistics over a data pass."""
    from . import api

    spec = _data_spec(resize, crop, mean, std, no_normalize, channels, preprocess, skip_bad_files)
    load = _load_options(arch, arch_kwargs, trust_pickle, non_strict, trust_arch)
    model_or_source, spec = _model_and_spec(model, spec, data_config, load)
    dataset = api.open_data(data, spec)
    _warn_skipped(dataset)
    _say_preprocessing(dataset, json_out)
    with _progress_bar(enabled=not json_out) as bar:
        outcome = api.recalibrate(
            model_or_source,
            dataset,
            out=output,
            upstream=upstream,
            batch_size=batch_size,
            exact=exact,
            tolerance=tolerance,
            max_passes=max_passes,
            max_examples=max_examples,
            device=device,
            num_workers=num_workers,
            seed=seed,
            progress=bar,
            export=_export_options(input_shape, opset, no_verify),
            **load,
        )
    _warn_load(outcome.source)
    _warn_outcome(outcome)
    recal = outcome.report["recalibrate"]
    if json_out:
        _print_json(
            {
                "upstream": recal.upstream,
                "examples": recal.examples,
                "passes": recal.passes,
                **(
                    {
                        "scheme": recal.scheme,
                        "max_change": recal.max_change,
                        "tolerance": recal.tolerance,
                        "converged": recal.converged,
                        "exact": recal.exact,
                    }
                    if recal.upstream == "eval"
                    else {}
                ),
                "output": None if outcome.output is None else str(outcome.output),
                "layers": [
                    {"name": n, "running_mean": m.tolist(), "running_var": v.tolist()}
                    for n, (m, v) in recal.stats.items()
                ],
            }
        )
        return
    table = Table(title=f"Recalibrated statistics (upstream {recal.upstream}, {recal.examples} examples)")
    for col in ("layer", "|mean| avg", "var avg"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for name, (mean_t, var_t) in recal.stats.items():
        table.add_row(name, f"{float(mean_t.abs().mean()):.4g}", f"{float(var_t.mean()):.4g}")
    out_console.print(table)
    if recal.upstream == "eval":
        how = (
            f"layer by layer, {recal.passes} partial passes"
            if recal.scheme == "layer by layer"
            else f"{recal.passes} pass{'es' if recal.passes > 1 else ''}"
            + ("" if recal.max_change is None else f", last change {recal.max_change:.2g}")
            + (" (exact)" if recal.exact else f" (tolerance {recal.tolerance:g})")
        )
        err_console.print(f"[dim]inference-consistent statistics: {how}[/]", highlight=False)
    _report_written(outcome, json_out)


@app.command("sweep-alpha")
def sweep_alpha(
    model: ModelArg,
    data: DataOpt,
    alphas: Annotated[
        str | None,
        typer.Option(help="Comma-separated alphas to try, e.g. 0,0.01,0.05,0.1 (default: 0 … 0.5)."),
    ] = None,
    alpha_range: Annotated[
        str | None,
        typer.Option(help="START:STOP:N evenly spaced alphas, e.g. 0:0.3:16 (instead of --alphas)."),
    ] = None,
    prior_strengths: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated prior strengths N, e.g. 1,3,7,15: alphas 1/(N+1) (instead of --alphas)."
        ),
    ] = None,
    beta_mode: Annotated[
        str, typer.Option(help="beta for each alpha: 'equal' (= alpha), 'zero', or a fixed number in [0, 1].")
    ] = "equal",
    metric: Annotated[
        str,
        typer.Option(
            help="Choose alpha by: nll, top1 or top5; for segmentation (masks y (N, H, W)) pixel-nll, miou "
            "or pixel-acc (nll means pixel-nll there)."
        ),
    ] = "nll",
    train_batch_size: Annotated[
        int | None, typer.Option("--train-batch-size", "-B", help="Also evaluate the rule alpha = 1/B^2.")
    ] = None,
    corrections: Annotated[
        Path | None, typer.Option(help="Also evaluate this corrections file (e.g. from estimate).")
    ] = None,
    output_key: Annotated[
        str | None,
        typer.Option(
            help="For models returning a tuple/dict: the index or key of the logits (torchvision "
            "segmentation models: out)."
        ),
    ] = None,
    ignore_index: Annotated[
        int, typer.Option(help="Segmentation: the mask value of unlabelled pixels, left out of every metric.")
    ] = 255,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of every metric against alpha.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the JSON report to this file.")] = None,
    output: OutOpt = None,
    max_examples: MaxExamplesOpt = None,
    device: DeviceOpt = "auto",
    num_workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    trust_arch: TrustArchOpt = False,
    non_strict: NonStrictOpt = False,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    no_normalize: NoNormOpt = False,
    channels: ChannelsOpt = 3,
    preprocess: PreprocessOpt = None,
    skip_bad_files: SkipBadOpt = False,
    data_config: DataConfigOpt = None,
    input_shape: InputShapeOpt = None,
    opset: OpsetOpt = None,
    no_verify: NoVerifyOpt = False,
    min_effect: MinEffectOpt = None,
    latency_budget: LatencyBudgetOpt = None,
    budget_plot: BudgetPlotOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Choose one inference example weight alpha for every BN layer on labelled validation data."""
    from . import api
    from .sweep import alphas_from_options, parse_beta_mode

    if prior_strengths is not None:
        from .errors import UsageError
        from .tune import alphas_from_prior_strengths, parse_prior_strengths

        if alphas is not None or alpha_range is not None:
            raise UsageError(
                "--prior-strengths and --alphas/--alpha-range both given",
                hint="give one grid: the prior strengths N mean alphas 1/(N+1)",
            )
        grid = alphas_from_prior_strengths(parse_prior_strengths(prior_strengths))
    else:
        grid = alphas_from_options(alphas, alpha_range, train_batch_size)
    key: str | int | None = output_key
    if output_key is not None and output_key.lstrip("-").isdigit():
        key = int(output_key)
    spec = _data_spec(resize, crop, mean, std, no_normalize, channels, preprocess, skip_bad_files)
    load = _load_options(arch, arch_kwargs, trust_pickle, non_strict, trust_arch)
    model_or_source, spec = _model_and_spec(model, spec, data_config, load)
    dataset = api.open_data(data, spec)
    _warn_skipped(dataset)
    _say_preprocessing(dataset, json_out)
    with _progress_bar(enabled=not json_out) as bar:
        outcome = api.sweep_alpha(
            model_or_source,
            dataset,
            alphas=grid,
            beta_mode=parse_beta_mode(beta_mode),
            train_batch_size=train_batch_size,
            corrections=corrections,
            metric=metric,
            output_key=key,
            ignore_index=ignore_index,
            out=output,
            plot=plot,
            report=report,
            max_examples=max_examples,
            device=device,
            num_workers=num_workers,
            seed=seed,
            progress=bar,
            force=force,
            export=_export_options(input_shape, opset, no_verify, min_effect),
            latency_budget=latency_budget,
            budget_plot=budget_plot,
            **load,
        )
    _warn_load(outcome.source)
    _warn_outcome(outcome)
    result = outcome.report["sweep"]
    if json_out:
        data_out = {**result.as_report(), **_written_json(outcome)}
        _print_json(data_out)
        return
    out_console.print(result.table())
    _budget_table(outcome, budget_plot)
    best = result.best
    if result.task == "segmentation":
        out_console.print(
            f"{result.n_examples} validation images ({result.n_pixels} labelled pixels). Chosen by "
            f"{result.metric}: alpha = {best.alpha:g}, beta = {best.beta:g} (pixel-nll {best.pixel_nll:.4f}, "
            f"mIoU {100 * (best.miou or 0.0):.2f}%, pixel accuracy {100 * (best.pixel_acc or 0.0):.2f}%)."
        )
    else:
        lo, hi = best.top1_ci95
        out_console.print(
            f"{result.n_examples} validation examples. Chosen by {metric}: "
            f"alpha = {best.alpha:g}, beta = {best.beta:g} (nll {best.nll:.4f}, "
            f"top-1 {100 * best.top1:.2f}%, 95% interval {100 * lo:.1f}-{100 * hi:.1f}%)."
        )
    for note in result.notes:
        err_console.print(f"[dim]{note}[/]")
    for label, path in (("plot", plot), ("report", report)):
        if path is not None:
            err_console.print(f"[green]Wrote[/] {label} {path}")
    _report_written(outcome, json_out)


@app.command()
def tune(
    model: ModelArg,
    data: DataOpt,
    train_batch_size: Annotated[
        int,
        typer.Option(
            "--train-batch-size",
            "-B",
            help="Examples per normalization batch in training (per GPU / ghost batch).",
        ),
    ],
    metric: Annotated[
        str,
        typer.Option(
            help="Choose by held-out nll, top1 or top5; segmentation (masks y (N, H, W)): pixel-nll (= nll), "
            "miou or pixel-acc."
        ),
    ] = "nll",
    holdout: Annotated[
        float,
        typer.Option(
            help="Fraction of the data held out to score the candidates (stratified by label; per image for "
            "masks)."
        ),
    ] = 0.3,
    recalibrate: Annotated[
        bool | None,
        typer.Option(
            "--recalibrate/--no-recalibrate",
            help="Score EvalNorm offline also after recalibrating the statistics on the fitting part (the "
            "default; --no-recalibrate leaves that candidate out, for speed).",
            show_default=False,
        ),
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option(
            help="Statistics of the recalibrated EvalNorm candidate: 'train' (training-consistent, default) "
            "or 'eval' (see recalibrate)."
        ),
    ] = None,
    ignore_index: Annotated[
        int, typer.Option(help="Segmentation: the mask value of unlabelled pixels (ignored everywhere).")
    ] = 255,
    per_channel: Annotated[
        bool, typer.Option("--per-channel", help="Fit alpha/beta vectors of length C instead of scalars.")
    ] = False,
    strengths: Annotated[
        str | None,
        typer.Option(
            help="L1 strengths toward plain BN, relative to the NLL, fitted side by side; the monitor slice "
            "of the fitting part chooses (default 0,0.01,0.1)."
        ),
    ] = None,
    alphas: Annotated[
        str | None, typer.Option(help="Grid of the global-alpha candidate (default: sweep-alpha's).")
    ] = None,
    max_epochs: Annotated[
        int | None, typer.Option(help="Epochs of the per-layer fit at most (early stopping; default 10).")
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Write a JSON report (rows, per-layer alpha/beta) to this file.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG of per-layer alpha/beta (chosen beside EvalNorm).")
    ] = None,
    output: OutOpt = None,
    output_key: Annotated[
        str | None, typer.Option(help="For models returning a tuple/dict: the index or key of the logits.")
    ] = None,
    max_examples: MaxExamplesOpt = None,
    device: DeviceOpt = "auto",
    num_workers: WorkersOpt = 0,
    seed: Annotated[int, typer.Option(help="Seed of the split, the loaders and the fit (reproducible).")] = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    trust_arch: TrustArchOpt = False,
    non_strict: NonStrictOpt = False,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    no_normalize: NoNormOpt = False,
    channels: ChannelsOpt = 3,
    preprocess: PreprocessOpt = None,
    skip_bad_files: SkipBadOpt = False,
    data_config: DataConfigOpt = None,
    input_shape: InputShapeOpt = None,
    opset: OpsetOpt = None,
    no_verify: NoVerifyOpt = False,
    latency_budget: LatencyBudgetOpt = None,
    budget_plot: BudgetPlotOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The best safe correction: per-layer alpha/beta fitted to the metric beside EMA, the rule, the best
    global alpha and EvalNorm (without and with recalibration), all scored on a held-out part; never worse
    than EMA there. Classifiers (labels y (N,)) and segmentation nets (masks y (N, H, W))."""
    from . import api
    from .sweep import parse_alphas
    from .tune import parse_strengths

    key: str | int | None = output_key
    if output_key is not None and output_key.lstrip("-").isdigit():
        key = int(output_key)
    spec = _data_spec(resize, crop, mean, std, no_normalize, channels, preprocess, skip_bad_files)
    load = _load_options(arch, arch_kwargs, trust_pickle, non_strict, trust_arch)
    model_or_source, spec = _model_and_spec(model, spec, data_config, load)
    dataset = api.open_data(data, spec)
    _warn_skipped(dataset)
    _say_preprocessing(dataset, json_out)
    with _progress_bar(enabled=not json_out) as bar:
        outcome = api.tune(
            model_or_source,
            dataset,
            train_batch_size,
            metric=metric,
            holdout=holdout,
            seed=seed,
            recalibrate=recalibrate,
            upstream=upstream,
            ignore_index=ignore_index,
            per_channel=per_channel,
            strengths=parse_strengths(strengths) if strengths is not None else None,
            alphas=parse_alphas(alphas) if alphas is not None else None,
            max_epochs=max_epochs,
            out=output,
            report=report,
            plot=plot,
            max_examples=max_examples,
            device=device,
            num_workers=num_workers,
            output_key=key,
            progress=bar,
            export=_export_options(input_shape, opset, no_verify),
            latency_budget=latency_budget,
            budget_plot=budget_plot,
            **load,
        )
    _warn_load(outcome.source)
    _warn_outcome(outcome)
    result = outcome.report["tune"]
    if json_out:
        _print_json({**result.as_report(), **_written_json(outcome)})
        return
    out_console.print(result.table())
    out_console.print(result.layer_table())
    _budget_table(outcome, budget_plot)
    zero = len(result.zero_layers)
    out_console.print(
        f"Chosen by held-out {result.metric}: {result.summary()}. "
        f"Tuned fit: L1 strength {result.fit.best.strength:g}, {zero} of {len(result.layers)} layers plain "
        f"BN, {result.fit.epochs} epochs ({result.fit.mode}; {result.fit.cache})."
    )
    for note in result.notes + result.fit.notes:
        err_console.print(f"[dim]{note}[/]")
    for label, path in (("plot", plot), ("report", report)):
        if path is not None:
            err_console.print(f"[green]Wrote[/] {label} {path}")
    _report_written(outcome, json_out)


@app.command()
def diagnose(
    model: ModelArg,
    data: DataOpt,
    train_batch_size: Annotated[
        int, typer.Option("--train-batch-size", "-B", help="Examples per normalization batch in training.")
    ],
    corrections: Annotated[
        Path | None, typer.Option(help="Also measure the gap after this corrections file.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG: per-layer gap, and one channel's histograms.")
    ] = None,
    histogram_layer: Annotated[
        str | None, typer.Option(help="Layer for the histograms (default: the one with the largest gap).")
    ] = None,
    max_examples: MaxExamplesOpt = None,
    device: DeviceOpt = "auto",
    num_workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    trust_arch: TrustArchOpt = False,
    non_strict: NonStrictOpt = False,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    no_normalize: NoNormOpt = False,
    channels: ChannelsOpt = 3,
    preprocess: PreprocessOpt = None,
    skip_bad_files: SkipBadOpt = False,
    data_config: DataConfigOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """How far eval-mode normalization is from training-mode normalization, per BN layer."""
    from . import api

    spec = _data_spec(resize, crop, mean, std, no_normalize, channels, preprocess, skip_bad_files)
    load = _load_options(arch, arch_kwargs, trust_pickle, non_strict, trust_arch)
    model_or_source, spec = _model_and_spec(model, spec, data_config, load)
    dataset = api.open_data(data, spec)
    _warn_skipped(dataset)
    _say_preprocessing(dataset, json_out)
    with _progress_bar(enabled=not json_out) as bar:
        result = api.diagnose(
            model_or_source,
            dataset,
            train_batch_size,
            corrections=corrections,
            plot=plot,
            histogram_layer=histogram_layer,
            force=force,
            max_examples=max_examples,
            device=device,
            num_workers=num_workers,
            seed=seed,
            progress=bar,
            **load,
        )
    _warn_outcome(result)
    if json_out:
        data_out = result.as_dict()
        data_out["plot"] = None if plot is None else str(plot)
        _print_json(data_out)
        return
    table = Table(
        title=f"Eval vs training normalization, B = {train_batch_size} ({result.examples} examples)"
    )
    cols = ["layer", "mean L1 eval"]
    if corrections is not None:
        cols.append("mean L1 corrected")
    cols += ["range eval/train", "bound", "eval outside bound"]
    for col in cols:
        table.add_column(col, justify="left" if col == "layer" else "right")
    for ly in result.layers:
        row = [ly.name, f"{ly.l1_eval:.4f}"]
        if corrections is not None:
            row.append("-" if ly.l1_corrected is None else f"{ly.l1_corrected:.4f}")
        row += [f"{ly.range_ratio:.2f}", f"±{ly.bound:.3g}", f"{100 * ly.outside_bound:.2f}%"]
        table.add_row(*row)
    out_console.print(table)
    out_console.print(f"[bold]Recommendation:[/] {result.recommendation}")
    if plot is not None:
        err_console.print(f"[green]Wrote[/] {plot}")


@app.command()
def demo(
    out_dir: Annotated[
        Path, typer.Option("--out-dir", "-o", help="Folder for the corrections files, plots and ONNX graphs.")
    ] = Path("bncorrect-demo"),
    samples: Annotated[
        Path | None,
        typer.Option(help="Folder of sample checkpoints (default: the repository's sample_checkpoints/)."),
    ] = None,
    dataset: Annotated[
        list[str] | None, typer.Option(help="Sample dataset(s): digits, mnist1d (repeatable; default both).")
    ] = None,
    batch_size: Annotated[
        list[int] | None,
        typer.Option(
            "--train-batch-size", "-B", help="Samples trained with these B (repeatable; default 2 and 32)."
        ),
    ] = None,
    fast: Annotated[bool, typer.Option(help="200 validation examples and 5 alphas (a quick look).")] = False,
    device: DeviceOpt = "cpu",
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Show the correction at work on the sample checkpoints (B = 2 beside B = 32): inspect, rule,
    estimate, sweep-alpha, a verified ONNX export and tune, then a comparison table and tune's held-out
    table."""
    from .demo import METHODS, TUNE_ROWS, run_demo

    with _progress_bar(enabled=not json_out) as bar:
        result = run_demo(
            out_dir,
            samples_dir=samples,
            datasets=tuple(dataset) if dataset else ("digits", "mnist1d"),
            batch_sizes=tuple(batch_size) if batch_size else (2, 32),
            fast=fast,
            device=device,
            seed=seed,
            progress=bar,
        )
    if json_out:
        _print_json(result.as_dict())
        return
    table = Table(title="Validation NLL (top-1) by how BN normalizes at inference")
    table.add_column("method")
    for s in result.samples:
        table.add_column(f"{s.name}\n(B = {s.train_batch_size}, {s.n_examples} ex.)", justify="right")
    for method in METHODS:
        cells = []
        for s in result.samples:
            m = s.methods[method]
            alpha = "" if m.alpha is None or method.startswith(("EMA", "rule")) else f" a={m.alpha:g}"
            cells.append(f"{m.nll:.4f} ({100 * m.top1:.1f}%){alpha}")
        style = "dim" if method.startswith("train-mode") else None
        table.add_row(method, *cells, style=style)
    out_console.print(table)
    out_console.print(
        "The last row normalizes as training did, over groups of B validation examples: what the model "
        "saw in training, noisy at small B and needing B examples at once, so a reference, not an "
        "inference method. EvalNorm offline picked per-layer alphas of "
        + ", ".join(
            f"{s.evalnorm_alpha_range[0]:.2f}-{s.evalnorm_alpha_range[1]:.2f} ({s.name})"
            for s in result.samples
        )
        + "."
    )
    tuned = [s for s in result.samples if s.tune is not None]
    if tuned:
        table = Table(
            title="tune: NLL (top-1) on the held-out half, every candidate fitted on the other half; "
            "◀ written"
        )
        table.add_column("candidate")
        for s in tuned:
            assert s.tune is not None
            table.add_column(f"{s.name}\n({s.tune.n_fit} fit / {s.tune.n_heldout} held out)", justify="right")
        for kind, label in TUNE_ROWS:
            cells = []
            for s in tuned:
                assert s.tune is not None
                m = s.tune.heldout[kind]
                alpha = f" a={m.alpha:g}" if kind == "global" and m.alpha is not None else ""
                mark = " ◀" if s.tune.chosen == kind else ""
                cells.append(f"{m.nll:.4f} ({100 * m.top1:.1f}%){alpha}{mark}")
            table.add_row(label, *cells)
        out_console.print(table)
        for s in tuned:
            assert s.tune is not None
            plain = (
                f" (the per-layer fit leaves {s.tune.zero_layers} of {s.tune.n_layers} layers plain BN)"
                if s.tune.zero_layers and s.tune.chosen == "tuned"
                else ""
            )
            out_console.print(f"{s.name}: tune wrote {s.tune.chosen_label}{plain}")
    for s in result.samples:
        diff = "" if s.onnx_max_abs_diff is None else f" (verified, max abs diff {s.onnx_max_abs_diff:.2g})"
        err_console.print(
            f"[green]Wrote[/] {result.out_dir / s.name}/: rule, evalnorm, sweep plot and report, "
            f"corrected.onnx{diff}, tuned.safetensors with tune.json and tune.png"
        )


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, turning library errors into exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    with interface("cli"):
        return _run(args)


def _device_arg(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a.startswith("--device="):
            return a.split("=", 1)[1]
        if a == "--device" and i + 1 < len(args):
            return args[i + 1]
    return None


def _run(args: list[str]) -> int:
    """Under torchrun (``WORLD_SIZE`` > 1) the command joins the process group; only rank 0 prints (and
    writes, and shows progress): the other ranks stay quiet, also about errors, which rank 0 reports."""
    from . import distributed

    if distributed.env_world_size() > 1:
        distributed.quiet_warnings()
        if distributed.env_rank() != 0:
            out_console.quiet = err_console.quiet = True
    try:
        made_group = distributed.init_from_env(_device_arg(args))
    except BncorrectError as e:  # joining the group failed
        err_console.print(Text.assemble(("error: ", "bold red"), e.render()), highlight=False)
        return e.exit_code
    try:
        return _run_app(args)
    finally:
        if made_group:
            distributed.shutdown()


def _run_app(args: list[str]) -> int:
    _DEBUG["on"] = "--debug" in args
    if _DEBUG["on"]:  # accepted anywhere on the command line, not only before the command
        args = ["--debug", *[a for a in args if a != "--debug"]]
        from .allocator import status

        err_console.print(f"[dim]{status()}[/]", highlight=False)
    try:
        rc = app(args=args, prog_name="bncorrect", standalone_mode=False)
    except BncorrectError as e:
        if _DEBUG["on"]:
            if e.detail:
                err_console.print(e.detail, highlight=False, markup=False)
            raise
        err_console.print(Text.assemble(("error: ", "bold red"), e.render()), highlight=False)
        return e.exit_code
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]")
        return 130
    except Exception as e:  # usage errors of the CLI framework, and genuine bugs
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()  # click/typer usage error: prints usage and the message
            return e.exit_code
        if type(e).__name__ == "Abort":
            return 1
        if _DEBUG["on"]:
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {e}\n"
            "This is a bug in bncorrect; re-run with --debug for the traceback and report it.",
            highlight=False,
        )
        return 70
    if rc == 130:  # typer turns Ctrl-C into a silent exit code 130 (no command returns one)
        err_console.print("[red]interrupted[/]")
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
