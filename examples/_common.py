"""Plumbing shared by the example scripts: arguments, data, training records and output.

Every example is ``python examples/<name>.py [--smoke] [--data-dir D] [--epochs N]
[--output DIR] [--seed S] [--no-download]``. Full mode reads tensorflow-datasets data
(see :func:`load_data`); ``--smoke`` trains on the offline ``digits``/``mnist1d``
sets for a few seconds, so the scripts themselves can be tested.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The NumPy/SciPy work here is on small matrices (Lanczos tridiagonals, C x C cosines);
# BLAS threads spinning against TensorFlow's thread pool made it 50x slower on 2 cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import matplotlib  # noqa: E402

# Figures go to files only; no display is needed (or available on a cluster node).
matplotlib.use("Agg")

try:
    import keras_curv  # noqa: F401
except ImportError:
    # Running from a source checkout without `pip install -e .`: use the checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_curv.data import DatasetSplits, DatasetUnavailableError, load_dataset  # noqa: E402

EXIT_NO_DATA = 2
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "output"


def parser(description: str, *, epochs: int, smoke_epochs: int) -> argparse.ArgumentParser:
    """The options every example takes; scripts add their own before parsing.

    Args:
        description: First line of ``--help``.
        epochs: Default ``--epochs`` in full mode.
        smoke_epochs: Default ``--epochs`` with ``--smoke``.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a few-second run on offline data (digits/mnist1d), tiny models",
    )
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory")
    p.add_argument(
        "--no-download",
        action="store_true",
        help="fail (exit 2) instead of downloading missing tensorflow-datasets data",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs (default {epochs}; {smoke_epochs} with --smoke)",
    )
    p.add_argument(
        "--output",
        default=str(DEFAULT_OUTPUT),
        help="folder for the PNG figures and the JSON numbers (default examples/output/)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(_epochs=(epochs, smoke_epochs))
    return p


def add_curvature_option(p: argparse.ArgumentParser) -> None:
    """``--curvature`` for the scripts that train ClassSubspaceNewton."""
    p.add_argument(
        "--curvature",
        default="paper",
        choices=["paper", "gauss_newton", "projected_newton"],
        help="ClassSubspaceNewton curvature (paper = eq. 17, as published)",
    )


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses ``argv``, fills the mode-dependent defaults and creates the output folder."""
    args = p.parse_args(argv)
    full, smoke = args._epochs
    if args.epochs is None:
        args.epochs = smoke if args.smoke else full
    if args.epochs < 1:
        p.error(f"--epochs must be at least 1; got {args.epochs}")
    args.output = Path(args.output)
    args.output.mkdir(parents=True, exist_ok=True)
    return args


def load_data(
    args: argparse.Namespace,
    name: str,
    *,
    smoke_name: str = "digits",
    max_train: int | None = None,
    max_test: int | None = None,
    smoke_max_train: int | None = None,
    smoke_max_test: int | None = None,
) -> DatasetSplits | None:
    """The example's dataset: ``name`` in full mode, ``smoke_name`` with ``--smoke``.

    Returns ``None`` (after printing one line to stderr) when a tensorflow-datasets
    set is unavailable; the caller then exits with :data:`EXIT_NO_DATA`.
    """
    if args.smoke:
        name, max_train, max_test = smoke_name, smoke_max_train, smoke_max_test
    try:
        return load_dataset(
            name,
            data_dir=args.data_dir,
            seed=args.seed,
            max_train=max_train,
            max_test=max_test,
            download=not args.no_download,
        )
    except DatasetUnavailableError as error:
        message = str(error).rstrip(".")
        print(f"{Path(sys.argv[0]).name}: {message}; or run with --smoke.", file=sys.stderr)
        return None


def sparse_ce() -> keras.losses.Loss:
    """The loss every example trains: cross-entropy on logits, sparse labels."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class _Recorder(keras.callbacks.Callback):
    """Per-epoch metrics (optionally the loss on the whole training set) and step times."""

    def __init__(self, train_eval: tuple | None, batch_size: int):
        super().__init__()
        self.train_eval = train_eval
        self.batch_size = batch_size
        self.train_loss: list[float] = []
        self.step_seconds: list[float] = []
        self._begin = 0.0
        self._steps = 0

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        # Keras converts `logs` to Python floats before calling back, so the step has
        # finished here. The very first step (tracing) is not counted.
        if self._steps > 0:
            self.step_seconds.append(time.perf_counter() - self._begin)
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.train_eval is not None:
            self.train_loss.append(evaluate_loss(self.model, *self.train_eval, self.batch_size))


def evaluate_loss(model: keras.Model, x, y, batch_size: int) -> float:
    """Mean loss of a compiled model on ``(x, y)`` (NaN when it has diverged)."""
    result = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
    return float(result["loss"])


def train(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`fit` without the model: just its record."""
    return fit(*args, **kwargs)[0]


def fit(
    build: Callable[[], keras.Model],
    optimizer: keras.optimizers.Optimizer,
    data: DatasetSplits,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    train_loss: bool = False,
    eval_batch_size: int = 1024,
) -> tuple[dict[str, Any], keras.Model]:
    """Trains a fresh model and returns its curves and the trained model.

    The seed is reset before the model is built, so runs that differ only in the
    optimizer start from the same weights and see the batches in the same order.
    Entry 0 of every curve is the untrained model; entry ``e`` follows epoch ``e``.

    Args:
        build: Makes the (uncompiled, logit-output) model.
        optimizer: A fresh optimizer instance.
        data: Train/test arrays; the test split is the validation set.
        epochs: Training epochs.
        batch_size: Training batch size (``len(x_train)`` for full batch).
        seed: Seeds the weights and the shuffling.
        train_loss: Also record the loss over the whole training set after each epoch
            (``train_loss``), not only Keras's running average over the epoch (``loss``).
        eval_batch_size: Batch size of evaluation passes.

    Returns:
        ``(record, model)``: ``record`` is a dict with lists ``loss``, ``accuracy``,
        ``val_loss``, ``val_accuracy`` (and ``train_loss``), floats ``step_seconds``
        (median seconds per training step), ``seconds`` (wall time of ``fit``),
        ``num_params``, ``diverged``.
    """
    keras.utils.set_random_seed(seed)
    model = build()
    model.compile(optimizer=optimizer, loss=sparse_ce(), metrics=["accuracy"])
    train_xy = (data.x_train, data.y_train)
    test_xy = (data.x_test, data.y_test)
    start_train = model.evaluate(*train_xy, batch_size=eval_batch_size, verbose=0, return_dict=True)
    start_test = model.evaluate(*test_xy, batch_size=eval_batch_size, verbose=0, return_dict=True)
    recorder = _Recorder(train_xy if train_loss else None, eval_batch_size)
    start = time.perf_counter()
    history = model.fit(
        *train_xy,
        batch_size=batch_size,
        epochs=epochs,
        validation_data=test_xy,
        validation_batch_size=eval_batch_size,
        callbacks=[recorder, keras.callbacks.TerminateOnNaN()],
        verbose=0,
    )
    seconds = time.perf_counter() - start
    h = history.history
    record = {
        "loss": [float(start_train["loss"])] + [float(v) for v in h.get("loss", [])],
        "accuracy": [float(start_train["accuracy"])] + [float(v) for v in h.get("accuracy", [])],
        "val_loss": [float(start_test["loss"])] + [float(v) for v in h.get("val_loss", [])],
        "val_accuracy": [float(start_test["accuracy"])]
        + [float(v) for v in h.get("val_accuracy", [])],
    }
    if train_loss:
        record["train_loss"] = [float(start_train["loss"])] + recorder.train_loss
    finite = all(math.isfinite(v) for curve in record.values() for v in curve)
    record.update(
        step_seconds=float(np.median(recorder.step_seconds)) if recorder.step_seconds else None,
        seconds=seconds,
        num_params=int(model.count_params()),
        # TerminateOnNaN stops early, so a short curve also means divergence.
        diverged=(not finite) or len(record["val_loss"]) < epochs + 1,
    )
    return record, model


def first_crossover(reference: Sequence[float], other: Sequence[float]) -> int | None:
    """The first epoch ``e >= 1`` with ``other[e] < reference[e]``; ``None`` if none.

    Used for Fig. 2: the epoch where SGD's loss (``other``) drops below the
    quasi-Newton method's (``reference``). ``1`` means SGD was ahead after the first
    epoch (the paper's "crossover within the first epoch" of small batches).
    """
    for epoch in range(1, min(len(reference), len(other))):
        if other[epoch] < reference[epoch]:
            return epoch
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        # JSON has no NaN/inf: a diverged run's loss is written as null.
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(args: argparse.Namespace, filename: str, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` (plus the run's arguments) to ``<output>/<filename>``."""
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    path = args.output / filename
    text = json.dumps(_jsonable({"args": settings, **payload}), indent=2, allow_nan=False)
    path.write_text(text + "\n")
    return path


def save_figure(args: argparse.Namespace, figure, filename: str) -> Path:
    """Saves a matplotlib figure to ``<output>/<filename>`` and closes it."""
    import matplotlib.pyplot as plt

    path = args.output / filename
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def mode_label(args: argparse.Namespace) -> str:
    """``" (smoke)"`` for titles of smoke-mode figures, else ``""``."""
    return " (smoke)" if args.smoke else ""


def small_cnn_filters(input_shape: Sequence[int], num_classes: int, target: int) -> int:
    """The ``filters`` of :func:`keras_curv.models.small_cnn` closest to ``target`` parameters.

    ``small_cnn`` has ``conv(f) -> conv(2f) -> pool(2) -> dense(C)``, i.e.
    ``(k c + 1) f + (2 k f + 1) 2f + (P/2^d * 2f + 1) C`` parameters for a
    ``d``-dimensional input with ``P`` positions, ``c`` channels and ``k`` kernel taps.
    """
    spatial, channels = list(input_shape[:-1]), int(input_shape[-1])
    taps = 3 ** len(spatial)
    positions = int(np.prod([s // 2 for s in spatial]))

    def count(f: int) -> int:
        return (
            (taps * channels + 1) * f
            + (taps * f + 1) * 2 * f
            + (positions * 2 * f + 1) * (num_classes)
        )

    return min(range(1, 257), key=lambda f: abs(count(f) - target))
