"""Train the sample checkpoints in ``sample_checkpoints/`` deterministically.

Each sample is a small BatchNorm network (:mod:`bncorrect.sample_models`) trained the way the papers'
"microbatch" / ghost-BN experiments are: SGD batches of ``sgd_batch`` examples, but BatchNorm normalizes
over *ghost batches* of ``B`` examples. Every SGD batch is split into consecutive chunks of B, each chunk is
forwarded separately in training mode (so BN statistics, and running-statistic updates, are per chunk of
B, as with per-GPU BN), the losses are averaged over the whole SGD batch, and one optimizer step is taken.

Datasets (no download; both are generated or bundled locally):

- ``digits``: ``sklearn.datasets.load_digits()`` (1797 images of 8x8), pixels / 16, a fixed per-image
  illumination jitter (gain and offset, drawn once with a fixed seed; see :func:`load_digits_data`), then
  standardized with the training set's mean and std (one scalar each); a fixed stratified split with 500
  validation examples (``split_seed``, independent of the training seed).
- ``mnist1d``: ``mnist1d.data.make_dataset(get_dataset_args())`` (generated with the package's fixed
  default seed): its 4000 training sequences for training and its 1000 test sequences as the validation
  set; standardized with the training mean and std (scalars); shape (N, 1, 40).

Usage::

    python scripts/make_samples.py                         # the four committed samples (seed 0, B in 2, 32)
    python scripts/make_samples.py --only digits --seed 1 --batch-sizes 2,4,8,32 --out /tmp/samples

Output folders are named ``{dataset}_b{B}`` for seed 0 and ``{dataset}_b{B}_seed{S}`` otherwise; each holds
``model.pt`` (a plain-tensor checkpoint dict, loadable with ``torch.load(..., weights_only=True)``),
``val.npz`` (``x`` float32 model-ready, ``y`` int64) and ``model_card.json``.

Other scripts can import :func:`train_sample` (importing this module trains nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bncorrect import sample_models  # noqa: E402
from bncorrect.layers import correct_model, normalization_mode  # noqa: E402

CHECKPOINT_FORMAT = "bncorrect/checkpoint-1"
DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5)


@dataclass(frozen=True)
class DatasetSpec:
    """How to build, feed and train one sample family."""

    name: str
    dataset_id: str
    arch: str
    factory: Callable[[], nn.Module]
    load: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, object]]]
    epochs: int
    lr: float
    sgd_batch: int = 64
    weight_decay: float = 5e-4
    grad_clip: float | None = 2.0
    bn_momentum: float | None = None
    notes: str = ""


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (recorded in the model card)."""

    dataset: str
    train_batch_size: int
    seed: int
    epochs: int
    sgd_batch_size: int
    optimizer: dict[str, object] = field(default_factory=dict)
    split_seed: int = 0


# --------------------------------------------------------------------------------------------- data


def _standardize(x_train: np.ndarray, x_val: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    mean = float(x_train.mean())
    std = float(x_train.std())
    return (
        ((x_train - mean) / std).astype(np.float32),
        ((x_val - mean) / std).astype(np.float32),
        mean,
        std,
    )


#: Per-image illumination jitter of the digits samples (see :func:`load_digits_data`).
DIGITS_JITTER_SEED = 1234
DIGITS_GAIN_LOG_RANGE = 0.5
DIGITS_OFFSET_STD = 1.0


def load_digits_data(
    split_seed: int = 0, n_val: int = 500, jitter: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, object]]:
    """scikit-learn's digits: (x_train, y_train, x_val, y_val, description); x shaped (N, 1, 8, 8).

    Pixels are divided by 16 (range [0, 1]). With ``jitter`` (the default, used for the samples) every
    image then gets its own illumination, drawn once with a fixed seed: ``x * g + o`` with
    ``g = exp(U(-0.5, 0.5))`` and ``o ~ N(0, 1)``, so that per-example statistics vary the way they do in
    real images (and in MNIST-1D); on the clean, uniformly scanned digits a small-B model's EMA statistics
    happen to be nearly right. Finally everything is standardized with the training set's scalar mean/std.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float64) / 16.0)[:, None, :, :]
    if jitter:
        rng = np.random.default_rng(DIGITS_JITTER_SEED)
        shape = (len(x), 1, 1, 1)
        gain = np.exp(rng.uniform(-DIGITS_GAIN_LOG_RANGE, DIGITS_GAIN_LOG_RANGE, size=shape))
        offset = rng.normal(0.0, DIGITS_OFFSET_STD, size=shape)
        x = x * gain + offset
    y = digits.target.astype(np.int64)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x, y, test_size=n_val, stratify=y, random_state=split_seed, shuffle=True
    )
    x_tr, x_va, mean, std = _standardize(x_tr, x_va)
    jitter_text = (
        f"per-image illumination x * g + o, g = exp(U(-{DIGITS_GAIN_LOG_RANGE}, {DIGITS_GAIN_LOG_RANGE})), "
        f"o ~ N(0, {DIGITS_OFFSET_STD}), drawn once per image in dataset order with "
        f"numpy.random.default_rng({DIGITS_JITTER_SEED}) (gains first, then offsets)"
    )
    info: dict[str, object] = {
        "source": "sklearn.datasets.load_digits() (1797 grayscale 8x8 images, 10 classes)",
        "preprocessing": "pixels / 16; "
        + (jitter_text + "; " if jitter else "")
        + "then (x - mean) / std with the training set's scalar mean and std",
        "illumination_jitter": jitter,
        "train_mean": mean,
        "train_std": std,
        "split": f"sklearn train_test_split(test_size={n_val}, stratify=y, random_state={split_seed})",
        "n_train": len(y_tr),
        "n_val": len(y_va),
        "input_shape": [1, 8, 8],
    }
    return x_tr, y_tr.astype(np.int64), x_va, y_va.astype(np.int64), info


def load_mnist1d_data(
    split_seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, object]]:
    """MNIST-1D generated locally: (x_train, y_train, x_val, y_val, description); x shaped (N, 1, 40).

    The split is the generator's own train/test split (fixed by its default seed); ``split_seed`` is
    accepted for a uniform signature and does not change it.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    data = make_dataset(args)
    x_tr = np.asarray(data["x"], dtype=np.float64)[:, None, :]
    x_va = np.asarray(data["x_test"], dtype=np.float64)[:, None, :]
    y_tr = np.asarray(data["y"], dtype=np.int64)
    y_va = np.asarray(data["y_test"], dtype=np.int64)
    x_tr, x_va, mean, std = _standardize(x_tr, x_va)
    info: dict[str, object] = {
        "source": "mnist1d.data.make_dataset(get_dataset_args()) (generated locally, package default seed "
        f"{getattr(args, 'seed', None)}; 10 classes, sequences of length 40)",
        "preprocessing": "(x - mean) / std with the training set's scalar mean and std",
        "train_mean": mean,
        "train_std": std,
        "split": "the generator's own split: 'x'/'y' for training, 'x_test'/'y_test' as validation",
        "n_train": len(y_tr),
        "n_val": len(y_va),
        "input_shape": [1, 40],
    }
    return x_tr, y_tr, x_va, y_va, info


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        name="digits",
        dataset_id="sklearn-digits-jitter",
        arch="bncorrect.sample_models:digits_cnn",
        factory=sample_models.digits_cnn,
        load=load_digits_data,
        epochs=30,
        lr=0.2,
        weight_decay=1e-3,
        notes=(
            "The per-image illumination jitter makes per-example statistics vary (as in MNIST-1D and real "
            "images); training with B = 2 then partly normalizes it away with each example's own statistics, "
            "which EMA eval-mode BN does not. head.branch.1 is a BatchNorm1d on (N, C) features: with B = 2 "
            "it normalizes two numbers per channel (outputs +-gamma + beta, almost no gradient), which is "
            "why the head has a linear skip. Gradient-norm clipping keeps the rare spikes of that layer "
            "(two nearly equal values) from derailing training."
        ),
    ),
    "mnist1d": DatasetSpec(
        name="mnist1d",
        dataset_id="mnist1d",
        arch="bncorrect.sample_models:mnist1d_cnn",
        factory=sample_models.mnist1d_cnn,
        load=load_mnist1d_data,
        epochs=30,
        lr=0.05,
    ),
}


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> dict[str, float]:
    """NLL and top-1 accuracy of ``model`` in eval mode (whatever its BN layers do in eval mode)."""
    model.eval()
    logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    nll = float(F.cross_entropy(logits.double(), y, reduction="mean"))
    top1 = float((logits.argmax(1) == y).double().mean())
    return {"nll": nll, "top1": top1}


def evaluate_alpha(model: nn.Module, x: Tensor, y: Tensor, alpha: float) -> dict[str, float]:
    """Eval-mode NLL/top-1 with every BN layer corrected with alpha = beta = ``alpha`` (a copy is used)."""
    m = correct_model(copy.deepcopy(model), alpha)
    return evaluate(m, x, y)


def evaluate_batch_mode(model: nn.Module, x: Tensor, y: Tensor, group_size: int) -> dict[str, float]:
    """NLL/top-1 with training-mode normalization over consecutive groups of ``group_size`` examples.

    Only BN runs with batch statistics (dropout stays in eval); running statistics are not touched.
    """
    m = correct_model(copy.deepcopy(model), 0.0)
    with normalization_mode(m, "batch", group_size):
        return evaluate(m, x, y)


def alpha_sweep(
    model: nn.Module, x: Tensor, y: Tensor, alphas: Sequence[float] = DEFAULT_ALPHAS
) -> list[dict[str, float]]:
    """Rows ``{"alpha", "nll", "top1"}`` for each alpha (alpha = beta, every BN layer)."""
    return [{"alpha": float(a), **evaluate_alpha(model, x, y, float(a))} for a in alphas]


# -------------------------------------------------------------------------------------------- training


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on conv/linear weights only; none on BN parameters and biases."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)) and name == "weight":
                decay.append(p)
            else:
                no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _train_epochs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    B: int,
    sgd_batch: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    grad_clip: float | None,
    generator: torch.Generator,
    forward_size: int | None = None,
) -> list[float]:
    """Ghost-BN training loop; returns the mean training loss of each epoch.

    Each SGD batch is forwarded in consecutive chunks of ``forward_size`` examples (default ``B``: plain BN
    then normalizes over chunks of B). Layers that form their own normalization groups (Ghost BN,
    Batch-Group Norm, GroupNorm) can take the whole SGD batch at once with ``forward_size=sgd_batch``.
    """
    if sgd_batch % B:
        raise ValueError(f"SGD batch size {sgd_batch} is not a multiple of the normalization batch {B}")
    chunk = B if forward_size is None else int(forward_size)
    if chunk < 1 or sgd_batch % chunk:
        raise ValueError(f"SGD batch size {sgd_batch} is not a multiple of the forward size {chunk}")
    opt = torch.optim.SGD(_param_groups(model, weight_decay), lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(x) // sgd_batch  # drop_last: every ghost batch has exactly B examples
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total)))
    history = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=generator)
        running = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * sgd_batch : (step + 1) * sgd_batch]
            xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            batch_loss = 0.0
            for start in range(0, sgd_batch, chunk):
                logits = model(xb[start : start + chunk])
                loss = F.cross_entropy(logits, yb[start : start + chunk], reduction="sum") / sgd_batch
                loss.backward()
                batch_loss += float(loss.detach())
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sched.step()
            running += batch_loss
        history.append(running / steps_per_epoch)
    model.eval()
    return history


def train_sample(
    dataset: str,
    B: int,
    seed: int = 0,
    epochs: int | None = None,
    *,
    sgd_batch: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    grad_clip: float | None = None,
    bn_momentum: float | None = None,
    split_seed: int = 0,
    alphas: Sequence[float] | None = DEFAULT_ALPHAS,
) -> tuple[nn.Module, np.ndarray, np.ndarray, dict[str, object]]:
    """Train one sample deterministically; returns ``(model, val_x, val_y, card)``.

    ``dataset`` is ``"digits"`` or ``"mnist1d"``; ``B`` the ghost (normalization) batch size. Unset
    hyper-parameters take the dataset's defaults (:data:`DATASETS`). ``card`` is the model card (JSON-able);
    with ``alphas`` it includes an alpha sweep (alpha = beta in every BN layer) for information. Its key
    ``_train_seconds`` (the training wall time) is dropped by :func:`write_sample`, so that written cards are
    byte-for-byte reproducible.
    Runs single-threaded with deterministic algorithms; the global torch settings are restored after.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    spec = DATASETS[dataset]
    epochs = spec.epochs if epochs is None else epochs
    sgd_batch = spec.sgd_batch if sgd_batch is None else sgd_batch
    lr = spec.lr if lr is None else lr
    weight_decay = spec.weight_decay if weight_decay is None else weight_decay
    grad_clip = spec.grad_clip if grad_clip is None else grad_clip
    bn_momentum = spec.bn_momentum if bn_momentum is None else bn_momentum
    if B < 2:
        raise ValueError("B must be >= 2 (BatchNorm cannot normalize a single example over (N, C) features)")

    x_tr, y_tr, x_va, y_va, data_info = spec.load(split_seed)

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model = spec.factory()
        if bn_momentum is not None:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = bn_momentum
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        history = _train_epochs(
            model,
            torch.from_numpy(x_tr),
            torch.from_numpy(y_tr),
            B=B,
            sgd_batch=sgd_batch,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            generator=gen,
        )
        train_seconds = time.perf_counter() - t0

        xv, yv = torch.from_numpy(x_va), torch.from_numpy(y_va)
        ema = evaluate(model, xv, yv)
        batch_mode = evaluate_batch_mode(model, xv, yv, B)
        sweep = alpha_sweep(model, xv, yv, alphas) if alphas else []
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)

    config = TrainConfig(
        dataset=spec.dataset_id,
        train_batch_size=B,
        seed=seed,
        epochs=epochs,
        sgd_batch_size=sgd_batch,
        split_seed=split_seed,
        optimizer={
            "type": "SGD",
            "lr": lr,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": weight_decay,
            "weight_decay_applies_to": "conv/linear weights only (not BN parameters or biases)",
            "grad_clip_norm": grad_clip,
            "schedule": "cosine decay to 0 over all steps, stepped per SGD batch",
            "loss": "cross-entropy, summed over ghost batches and divided by the SGD batch size",
        },
    )
    n_params = sum(p.numel() for p in model.parameters())
    card: dict[str, object] = {
        "name": sample_name(dataset, B, seed),
        "arch": spec.arch,
        "arch_kwargs": {},
        "train_batch_size": B,
        "training": {
            **asdict(config),
            "bn_setup": (
                f"ghost BN: each SGD batch of {sgd_batch} is forwarded in {sgd_batch // B} separate chunks "
                f"of B={B} in training mode (BN statistics and running-statistic updates per chunk, "
                f"momentum {0.1 if bn_momentum is None else bn_momentum}); one optimizer step per SGD batch; "
                "last incomplete SGD batch dropped"
            ),
            "determinism": "torch.manual_seed(seed), torch.set_num_threads(1), "
            "torch.use_deterministic_algorithms(True), CPU",
            "train_loss_per_epoch": [round(v, 6) for v in history],
            "torch_version": torch.__version__,
        },
        "data": data_info,
        "n_parameters": n_params,
        "notes": spec.notes,
        "val": {
            "ema_eval": ema,
            f"batch_mode_B{B}": batch_mode,
            "batch_mode_note": (
                f"training-mode normalization over consecutive groups of {B} validation examples in val.npz "
                "order (dropout off, running statistics untouched); for information only"
            ),
            "alpha_sweep": sweep,
            "alpha_sweep_note": "eval mode with alpha = beta in every BN layer "
            "(bncorrect.layers.correct_model); alpha = 0 is plain EMA BN",
        },
    }
    card["_train_seconds"] = round(train_seconds, 2)  # popped by write_sample: keeps the card reproducible
    return model, x_va, y_va, card


# ------------------------------------------------------------------------------------------------ I/O


def sample_name(dataset: str, B: int, seed: int) -> str:
    """Folder name of a sample: ``{dataset}_b{B}``, with ``_seed{S}`` appended when seed != 0."""
    return f"{dataset}_b{B}" if seed == 0 else f"{dataset}_b{B}_seed{seed}"


def checkpoint_dict(model: nn.Module, dataset: str, B: int, seed: int) -> dict[str, object]:
    """The ``bncorrect/checkpoint-1`` dict: plain tensors and builtins only (``weights_only`` loadable)."""
    spec = DATASETS[dataset]
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": spec.arch,
        "arch_kwargs": {},
        "state_dict": state,
        "corrections": {},
        "meta": {"train_batch_size": B, "dataset": spec.dataset_id, "seed": seed},
    }


def write_sample(
    out_dir: Path, model: nn.Module, val_x: np.ndarray, val_y: np.ndarray, card: dict[str, object]
) -> Path:
    """Write ``model.pt``, ``val.npz`` and ``model_card.json`` into ``out_dir / card['name']``."""
    training = card["training"]
    assert isinstance(training, dict)
    dataset = next(k for k, s in DATASETS.items() if s.dataset_id == training["dataset"])
    card = {k: v for k, v in card.items() if not k.startswith("_")}
    folder = out_dir / str(card["name"])
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_dict(model, dataset, int(training["train_batch_size"]), int(training["seed"]))
    torch.save(ckpt, folder / "model.pt")
    np.savez_compressed(
        folder / "val.npz", x=np.ascontiguousarray(val_x, dtype=np.float32), y=val_y.astype(np.int64)
    )
    (folder / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return folder


def format_sweep(rows: Sequence[dict[str, float]]) -> str:
    """A small text table of an alpha sweep, the NLL-best row marked."""
    best = min(rows, key=lambda r: r["nll"])
    lines = ["  alpha      NLL    top-1"]
    for r in rows:
        mark = "  <- best NLL" if r is best else ""
        lines.append(f"  {r['alpha']:5.3f}  {r['nll']:7.4f}  {r['top1']:7.4f}{mark}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "sample_checkpoints", help="output directory")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated datasets (digits, mnist1d) or sample names (digits_b2, ...) to build",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", default="2,32", help="ghost (normalization) batch sizes B")
    parser.add_argument("--epochs", type=int, default=None, help="override the per-dataset default")
    parser.add_argument("--quiet", action="store_true", help="do not print the alpha sweeps")
    args = parser.parse_args(argv)

    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    wanted = None if args.only is None else {s.strip() for s in args.only.split(",") if s.strip()}
    jobs = []
    for dataset in DATASETS:
        for B in sizes:
            name = sample_name(dataset, B, args.seed)
            if wanted is None or dataset in wanted or name in wanted or f"{dataset}_b{B}" in wanted:
                jobs.append((dataset, B))
    if not jobs:
        parser.error(f"--only {args.only!r} matches nothing")

    for dataset, B in jobs:
        t0 = time.perf_counter()
        model, vx, vy, card = train_sample(dataset, B, args.seed, args.epochs)
        folder = write_sample(args.out, model, vx, vy, card)
        val = card["val"]
        assert isinstance(val, dict)
        print(
            f"{folder}: EMA NLL {val['ema_eval']['nll']:.4f} top-1 {val['ema_eval']['top1']:.4f} "
            f"(training {card['_train_seconds']:.1f} s, total {time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        if not args.quiet and val["alpha_sweep"]:
            print(format_sweep(val["alpha_sweep"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
