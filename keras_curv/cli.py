"""The ``keras-curv`` command line.

* ``keras-curv demo`` (what ``make demo`` runs): trains a small CNN with a curvature
  optimizer while both diagnostic callbacks measure the Hessian, writes TensorBoard logs
  and a PNG report under ``runs/<timestamp>/``.
* ``keras-curv compare``: trains several optimizers on the same data, model and seed and
  overlays their curves (PNG, TensorBoard, JSON, a printed table).
* ``keras-curv spectrum``: trains, then reports the top Hessian eigenvalues and the trace,
  with what they cost.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DATASETS = ("digits", "mnist1d", "mnist", "fashion_mnist", "cifar10", "cifar100")


@dataclass(frozen=True)
class OptimizerPreset:
    """A named optimizer configuration of the command line."""

    description: str
    learning_rate: float | None  # None: the optimizer picks its own (SketchySGD)
    build: Callable[[float, int], Any]


def _presets() -> dict[str, OptimizerPreset]:
    import keras

    from keras_curv.optimizers import (
        KFAC,
        LBFGS,
        OSGM,
        AdaHessian,
        ClassSubspaceNewton,
        LevenbergMarquardt,
        Lookahead,
        NewtonCG,
        NysNewtonCG,
        Shampoo,
        SketchySGD,
        Sophia,
    )

    return {
        "sgd": OptimizerPreset(
            "SGD, heavy-ball momentum 0.9 (the paper's baseline)",
            0.1,
            lambda lr, seed: keras.optimizers.SGD(lr, momentum=0.9),
        ),
        "adam": OptimizerPreset("Adam", 3e-3, lambda lr, seed: keras.optimizers.Adam(lr)),
        "adahessian": OptimizerPreset(
            "AdaHessian (its defaults: the authors' rule with step_cap 1)",
            0.15,
            lambda lr, seed: AdaHessian(lr, seed=seed),
        ),
        "shampoo": OptimizerPreset(
            "Shampoo, Adam grafting, roots every 10 steps (the adam preset's rate)",
            3e-3,
            lambda lr, seed: Shampoo(lr),
        ),
        "csn": OptimizerPreset(
            "ClassSubspaceNewton, paper (eq. 17; Appendix D: gamma 0.9, momentum 0.9)",
            0.1,
            lambda lr, seed: ClassSubspaceNewton(lr, gamma=0.9, momentum=0.9, curvature="paper"),
        ),
        "csn-gn": OptimizerPreset(
            'ClassSubspaceNewton, curvature="gauss_newton", damping 1.0, no momentum',
            0.2,
            lambda lr, seed: ClassSubspaceNewton(
                lr, gamma=0.9, curvature="gauss_newton", damping=1.0
            ),
        ),
        "sophia-h": OptimizerPreset(
            "Sophia-H (Hutchinson estimate every 10 steps; its defaults otherwise)",
            3e-3,
            lambda lr, seed: Sophia(lr, seed=seed),
        ),
        "sophia-g": OptimizerPreset(
            'Sophia-G (estimator="gauss_newton_bartlett"; its defaults otherwise)',
            3e-3,
            lambda lr, seed: Sophia(lr, estimator="gauss_newton_bartlett", seed=seed),
        ),
        "kfac": OptimizerPreset(
            "KFAC (its defaults: model Fisher, damping 0.1, KL norm constraint 0.01)",
            0.1,
            lambda lr, seed: KFAC(lr, seed=seed),
        ),
        "sketchysgd": OptimizerPreset(
            "SketchySGD (its defaults: rank 10, automatic rho and step size)",
            None,
            lambda lr, seed: SketchySGD("auto" if lr is None else lr, seed=seed),
        ),
        "osgm": OptimizerPreset(
            "OSGM, max_scale 1e-3, momentum 0.9",
            1e-4,
            lambda lr, seed: OSGM(lr, max_scale=1e-3),
        ),
        "lookahead": OptimizerPreset(
            "Lookahead(Adam), sync_period 5, slow_step_size 0.5",
            3e-3,
            lambda lr, seed: Lookahead(keras.optimizers.Adam(lr)),
        ),
        "lbfgs": OptimizerPreset(
            "L-BFGS, memory 10, strong Wolfe (full batch)",
            1.0,
            lambda lr, seed: LBFGS(lr),
        ),
        "newton-cg": OptimizerPreset(
            "Newton-CG on the Hessian, adaptive damping (full batch)",
            1.0,
            lambda lr, seed: NewtonCG(lr),
        ),
        "nys-newton-cg": OptimizerPreset(
            "NysNewton-CG, rank 10, mu 1e-4 (full batch)",
            1.0,
            lambda lr, seed: NysNewtonCG(lr, seed=seed),
        ),
        "levenberg-marquardt": OptimizerPreset(
            "Levenberg-Marquardt on the Gauss-Newton matrix (full batch)",
            1.0,
            lambda lr, seed: LevenbergMarquardt(learning_rate=lr),
        ),
    }


OPTIMIZERS = (
    "sgd",
    "adam",
    "adahessian",
    "shampoo",
    "csn",
    "csn-gn",
    "sophia-h",
    "sophia-g",
    "kfac",
    "sketchysgd",
    "osgm",
    "lookahead",
    "lbfgs",
    "newton-cg",
    "nys-newton-cg",
    "levenberg-marquardt",
)
# What `compare` trains without --optimizers: the mini-batch methods (the full-batch
# ones need --batch-size equal to the training set to make sense).
COMPARE_DEFAULT = OPTIMIZERS[: OPTIMIZERS.index("lbfgs")]

_OPTIMIZER_HELP = """optimizers (--optimizer / --optimizers; --learning-rate overrides the rate):
  sgd         SGD, momentum 0.9, lr 0.1 (the paper's baseline, Appendix D)
  adam        Adam, lr 3e-3
  adahessian  AdaHessian with its defaults, lr 0.15 (each step clipped to lr per
              coordinate: step_cap=1; step_cap=None is the authors' rule)
  shampoo     Shampoo with its defaults (Adam grafting, inverse roots every 10 steps),
              lr 3e-3 as the adam preset: grafting gives it Adam's step size
  csn         ClassSubspaceNewton as in the paper: curvature="paper" (eq. 17), lr 0.1,
              gamma 0.9, momentum 0.9 (Appendix D)
  csn-gn      ClassSubspaceNewton, curvature="gauss_newton", damping 1.0, lr 0.2,
              gamma 0.9, no momentum
  sophia-h    Sophia with the Hutchinson estimate (Sophia-H), lr 3e-3, its defaults
              otherwise (rho 0.04, weight decay 0.1, an estimate every 10 steps)
  sophia-g    Sophia with the Gauss-Newton-Bartlett estimate (SophiaG), lr 3e-3
  kfac        KFAC with its defaults, lr 0.1 (docs/kfac.md)
  sketchysgd  SketchySGD with its defaults (automatic step size: lr "auto")
  osgm        OSGM, lr 1e-4 (the online learner's), max_scale 1e-3, momentum 0.9
  lookahead   Lookahead(Adam lr 3e-3), sync_period 5, slow_step_size 0.5
  lbfgs, newton-cg, nys-newton-cg, levenberg-marquardt
              the full-batch solvers with their defaults (lr = the line search's first
              trial step, 1.0); give --batch-size the training-set size (--max-train),
              on mini-batches they warn (docs/full_batch.md). Not in compare's default.

Why csn-gn is the demo's default: on the digits CNN the paper's settings do not
train (epoch 1 loss ~1e19, then chance accuracy; the paper itself reports the
method is volatile and loses to SGD), and "gauss_newton" without damping, with or
without momentum 0.9, also stays at chance. damping 1.0 bounds each Newton step
along a class direction; at lr 0.2 this reaches ~97% validation accuracy on digits
in 6 epochs (seed 0). These values were chosen by a small search on digits only."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _optimizer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPTIMIZERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(OPTIMIZERS)}; got {text!r}"
        )
    return list(dict.fromkeys(names))


def _common_options(optimizer: str | None, epochs: int, logdir: bool) -> argparse.ArgumentParser:
    """The options every training command takes, with this command's defaults."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dataset",
        default="digits",
        choices=DATASETS,
        help="digits (default, embedded) and mnist1d (generated locally) work offline; "
        "the others come from tensorflow-datasets",
    )
    common.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory")
    if optimizer is not None:
        common.add_argument(
            "--optimizer",
            default=optimizer,
            choices=OPTIMIZERS,
            help=f"optimizer preset (default: {optimizer}; see below)",
        )
    common.add_argument("--epochs", type=_positive_int, default=epochs, help=f"(default {epochs})")
    common.add_argument("--batch-size", type=_positive_int, default=64, help="(default 64)")
    common.add_argument(
        "--learning-rate",
        type=_positive_float,
        default=None,
        help="override the preset's learning rate",
    )
    common.add_argument("--seed", type=int, default=0, help="seed of data split, init, probes")
    common.add_argument(
        "--max-train",
        type=_positive_int,
        default=None,
        help="keep at most this many training samples (quick runs)",
    )
    common.add_argument(
        "--max-test", type=_positive_int, default=None, help="keep at most this many test samples"
    )
    if logdir:
        common.add_argument(
            "--logdir",
            default="runs",
            help="base directory; each run writes to <logdir>/<timestamp>/ (default: runs)",
        )
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-curv", description="Second-order optimisation and curvature diagnostics."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    demo = commands.add_parser(
        "demo",
        parents=[_common_options("csn-gn", 6, logdir=True)],
        formatter_class=raw,
        help="train with ClassSubspaceNewton while measuring the Hessian (what `make demo` runs)",
        description="Trains keras_curv.models.small_cnn with a curvature optimizer, with the "
        "HessianSpectrum and SubspaceAlignment callbacks measuring every --every epochs, and "
        "writes TensorBoard logs and report.png under <logdir>/<timestamp>/.",
        epilog=_OPTIMIZER_HELP,
    )
    demo.add_argument(
        "--every", type=_positive_int, default=1, help="measure every N epochs (default 1)"
    )
    demo.add_argument(
        "--probe-size",
        type=_positive_int,
        default=256,
        help="training samples the Hessian is measured on (default 256)",
    )

    compare = commands.add_parser(
        "compare",
        parents=[_common_options(None, 6, logdir=True)],
        formatter_class=raw,
        help="train several optimizers on the same data, model and seed; overlay their curves",
        description="Trains keras_curv.models.small_cnn once per optimizer (same data, "
        "initial weights and batch order) and writes compare.png, compare.json and one "
        "TensorBoard run per optimizer under <logdir>/<timestamp>/.",
        epilog=_OPTIMIZER_HELP,
    )
    compare.add_argument(
        "--optimizers",
        type=_optimizer_list,
        default=list(COMPARE_DEFAULT),
        help=f"comma-separated subset of {','.join(OPTIMIZERS)} "
        f"(default: {','.join(COMPARE_DEFAULT)})",
    )
    compare.add_argument(
        "--every",
        type=_positive_int,
        default=1,
        help="validate and log every N epochs (default 1)",
    )

    spectrum = commands.add_parser(
        "spectrum",
        parents=[_common_options("adam", 5, logdir=False)],
        formatter_class=raw,
        help="train a small classifier, then report its top Hessian eigenvalues",
        epilog=_OPTIMIZER_HELP,
    )
    spectrum.add_argument(
        "--top-k",
        type=_positive_int,
        default=None,
        help="eigenvalues to compute (default: the number of classes)",
    )
    spectrum.add_argument("--method", default="lanczos", choices=["lanczos", "nystrom", "power"])
    spectrum.add_argument(
        "--probe-size",
        type=_positive_int,
        default=512,
        help="training samples the Hessian is measured on",
    )
    spectrum.add_argument(
        "--trace-samples",
        type=_positive_int,
        default=30,
        help="Hutch++ matvec budget for the trace",
    )
    return parser


# Shared steps -----------------------------------------------------------------------------


def _load(args: argparse.Namespace):
    from keras_curv.data import load_dataset

    return load_dataset(
        args.dataset,
        data_dir=args.data_dir,
        seed=args.seed,
        max_train=args.max_train,
        max_test=args.max_test,
    )


def _lr(rate: float | None) -> str:
    """A preset's learning rate for the console (``None``: chosen by the optimizer)."""
    return "auto" if rate is None else format(rate, "g")


def _compiled_model(data, optimizer_name: str, learning_rate: float | None, seed: int):
    """``small_cnn`` compiled with a preset; the same seed gives the same initial weights."""
    import keras

    from keras_curv.models import small_cnn

    preset = _presets()[optimizer_name]
    rate = preset.learning_rate if learning_rate is None else learning_rate
    keras.utils.set_random_seed(seed)
    model = small_cnn(data.input_shape, data.num_classes)
    model.compile(
        optimizer=preset.build(rate, seed),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model, rate


def _run_dir(base: str) -> str:
    """A fresh ``<base>/<timestamp>`` directory (suffixed when that second is taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(base, stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(base, f"{stamp}-{n}")
    os.makedirs(path)
    return path


def _tensorboard(log_dir: str):
    import keras

    return keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False, update_freq="epoch")


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _last(history: dict, key: str) -> float:
    values = history.get(key)
    return float(values[-1]) if values else float("nan")


def _describe(data) -> str:
    return (
        f"{data.name} ({data.num_train} train / {data.num_test} test, {data.num_classes} classes)"
    )


# demo -------------------------------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> dict:
    """Trains with both diagnostic callbacks; writes TensorBoard logs and the PNG report.

    Returns:
        ``{"log_dir", "report", "history", "eigenvalues", "alignment", ...}``.
    """
    import keras
    import numpy as np

    from keras_curv.callbacks import HessianSpectrum, SubspaceAlignment
    from keras_curv.callbacks._protocol import optimizer_preconditioning
    from keras_curv.callbacks.summaries import CurvatureWriter
    from keras_curv.curvature import spectral_density
    from keras_curv.plotting import render_density
    from keras_curv.report import demo_report

    data = _load(args)
    model, rate = _compiled_model(data, args.optimizer, args.learning_rate, args.seed)
    log_dir = _run_dir(args.logdir)
    probe_size = min(args.probe_size, data.num_train)
    probe = (data.x_train[:probe_size], data.y_train[:probe_size])
    spectrum = HessianSpectrum(
        probe, every_n_epochs=args.every, log_dir=log_dir, seed=args.seed, blocks="layer"
    )
    alignment = SubspaceAlignment(probe, every_n_epochs=args.every, log_dir=log_dir, seed=args.seed)
    eigen_rows: list[np.ndarray] = []
    eigen_epochs: list[int] = []

    def keep_eigenvalues(epoch, logs=None):
        # HessianSpectrum measured at this epoch end iff its record grew.
        if len(spectrum.measurements.get("step", [])) > len(eigen_rows):
            eigen_rows.append(np.array(spectrum.eigenvalues, dtype=np.float64))
            eigen_epochs.append(int(epoch))

    print(
        f"Training a {model.count_params():,}-parameter CNN on {_describe(data)} for "
        f"{args.epochs} epochs with {args.optimizer} (lr {_lr(rate)}); Hessian measured on "
        f"{probe_size} training samples every {args.every} epoch(s)"
    )
    start = time.perf_counter()
    history = model.fit(
        data.x_train,
        data.y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(data.x_test, data.y_test),
        callbacks=[
            spectrum,
            alignment,
            keras.callbacks.LambdaCallback(on_epoch_end=keep_eigenvalues),
            _tensorboard(log_dir),
        ],
        verbose=1,
    ).history
    seconds = time.perf_counter() - start

    # The final spectral density (stochastic Lanczos quadrature), once: it is the priciest
    # measurement, and its shape changes slowly.
    slq = spectral_density(spectrum.operator, min(40, spectrum.operator.dim), 2, seed=args.seed)
    writer = CurvatureWriter(log_dir)
    writer.write(
        args.epochs - 1,
        images={"hessian/density": render_density(slq.grid, slq.density, "spectral density")},
    )
    writer.close()

    series = {
        name: alignment.measurements[key]
        for name, key in (
            ("class gradients: best-match cosine", "alignment"),
            ("class gradients: subspace overlap", "subspace_overlap"),
            ("optimizer directions: best-match cosine", "optimizer_alignment"),
        )
        if key in alignment.measurements
    }
    # The callbacks' step is the epoch index when they run on an epoch schedule.
    alignment_epochs = list(alignment.measurements.get("step", []))
    measured = spectrum.measurements
    preconditioning = optimizer_preconditioning(model, spectrum.operator.dim)
    stability = {
        "sharpness": measured.get("sharpness"),
        "threshold": 2.0 / rate,  # gradient descent's: a reference for λ₁ itself
        "preconditioned": measured.get("preconditioned_sharpness"),
        "preconditioned_threshold": getattr(preconditioning, "threshold", None),
    }
    blocks = {
        name: measured[f"{name}_top_eigenvalue"]
        for name in spectrum.block_spectra.operators
        if f"{name}_top_eigenvalue" in measured
    }
    rank = alignment.measurements.get("combined_rank")
    report = demo_report(
        os.path.join(log_dir, "report.png"),
        history,
        eigen_epochs,
        eigen_rows,
        series,
        alignment_epochs,
        (slq.grid, slq.density),
        f"keras-curv demo: small_cnn on {data.name}, {args.optimizer} (lr {_lr(rate)}), "
        f"seed {args.seed}",
        stability=stability,
        blocks=blocks,
        combined_rank=(rank, data.num_classes) if rank else None,
    )

    accuracy, val_accuracy = _last(history, "accuracy"), _last(history, "val_accuracy")
    print(
        f"\nDone in {seconds:.0f} s. Final accuracy: train {accuracy:.3f}, "
        f"validation {val_accuracy:.3f} (validation loss {_last(history, 'val_loss'):.4g})."
    )
    if eigen_rows:
        print(
            f"Top Hessian eigenvalue {eigen_rows[-1][0]:.4g} (x lr: "
            f"{measured['sharpness_x_lr'][-1]:.3g}), trace {measured['hessian_trace'][-1]:.4g}, "
            f"class-gradient alignment {alignment.measurements['alignment'][-1]:.3f}, "
            f"combined rank {rank[-1] if rank else float('nan'):.0f} of "
            f"{2 * data.num_classes} (final epoch)."
        )
        if measured.get("preconditioned_sharpness") and stability["preconditioned_threshold"]:
            print(
                f"Preconditioned sharpness λ₁(P⁻¹H) {measured['preconditioned_sharpness'][-1]:.4g}"
                f" against its threshold {stability['preconditioned_threshold']:.4g}."
            )
        if measured.get("curvature_model_overlap"):
            print(
                "The optimizer's curvature model overlaps the top eigenspace by "
                f"{measured['curvature_model_overlap'][-1]:.2f} (1: the same subspace)."
            )
    print(f"TensorBoard logs: {log_dir}")
    print(f"Report:           {report}")
    print(f"View the logs:    tensorboard --logdir {log_dir}")
    return {
        "log_dir": log_dir,
        "report": report,
        "history": history,
        "eigen_epochs": eigen_epochs,
        "eigenvalues": [row.tolist() for row in eigen_rows],
        "alignment": series,
        "measurements": {**spectrum.measurements, **alignment.measurements},
        "seconds": seconds,
    }


# compare ----------------------------------------------------------------------------------


def _step_timer():
    """A callback timing the training part of each epoch (before validation starts)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.train_seconds: list[float] = []
            self._start = None

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            self._recorded = False

        def _stop(self):
            if self._start is not None and not self._recorded:
                self.train_seconds.append(time.perf_counter() - self._start)
                self._recorded = True

        def on_test_begin(self, logs=None):
            self._stop()

        def on_epoch_end(self, epoch, logs=None):
            self._stop()

    return StepTimer()


def run_compare(args: argparse.Namespace) -> dict:
    """Trains each optimizer from the same initial weights; writes PNG, JSON and TensorBoard.

    Returns:
        The dictionary written to ``compare.json``.
    """
    import numpy as np

    from keras_curv.report import compare_report

    data = _load(args)
    log_dir = _run_dir(args.logdir)
    presets = _presets()
    steps_per_epoch = math.ceil(data.num_train / args.batch_size)
    print(
        f"Comparing {', '.join(args.optimizers)} on {_describe(data)}: small_cnn, "
        f"{args.epochs} epochs, batch {args.batch_size}, seed {args.seed}"
    )
    results, histories = {}, {}
    for name in args.optimizers:
        model, rate = _compiled_model(data, name, args.learning_rate, args.seed)
        timer = _step_timer()
        print(f"\n[{name}] {presets[name].description}, lr {_lr(rate)}")
        start = time.perf_counter()
        history = model.fit(
            data.x_train,
            data.y_train,
            batch_size=args.batch_size,
            epochs=args.epochs,
            validation_data=(data.x_test, data.y_test),
            validation_freq=args.every,
            callbacks=[timer, _tensorboard(os.path.join(log_dir, name))],
            verbose=1,
        ).history
        wall = time.perf_counter() - start
        # The first epoch includes tracing; later epochs show the steady cost of a step.
        steady = timer.train_seconds[1:] or timer.train_seconds
        histories[name] = {key: [float(v) for v in values] for key, values in history.items()}
        results[name] = {
            "description": presets[name].description,
            # An automatic rate (None) is recorded as the step size the optimizer ended with.
            "learning_rate": float(model.optimizer.learning_rate) if rate is None else rate,
            "final": {
                key: _finite_or_none(_last(history, key))
                for key in ("loss", "accuracy", "val_loss", "val_accuracy")
            },
            "wall_seconds": wall,
            "seconds_per_step": float(np.median(steady)) / steps_per_epoch,
            "history": {
                key: [_finite_or_none(v) for v in values] for key, values in histories[name].items()
            },
        }

    report = compare_report(
        os.path.join(log_dir, "compare.png"),
        histories,
        f"small_cnn on {data.name}: {args.epochs} epochs, batch {args.batch_size}, "
        f"seed {args.seed}",
        validation_every=args.every,
    )
    summary = {
        "dataset": data.name,
        "num_train": data.num_train,
        "num_test": data.num_test,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "steps_per_epoch": steps_per_epoch,
        "optimizers": results,
    }
    json_path = os.path.join(log_dir, "compare.json")
    with open(json_path, "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2, allow_nan=False)

    def cell(value, fmt):
        return "nan" if value is None else format(value, fmt)

    print(
        f"\n{'optimizer':<11} {'lr':>7} {'loss':>9} {'acc':>6} {'val_loss':>9} {'val_acc':>7} "
        f"{'wall s':>7} {'ms/step':>8}"
    )
    for name, result in results.items():
        final = result["final"]
        print(
            f"{name:<11} {_lr(result['learning_rate']):>7} {cell(final['loss'], '9.4g')} "
            f"{cell(final['accuracy'], '6.3f')} {cell(final['val_loss'], '9.4g')} "
            f"{cell(final['val_accuracy'], '7.3f')} {result['wall_seconds']:7.1f} "
            f"{1e3 * result['seconds_per_step']:8.2f}"
        )
    print(f"\nTensorBoard logs: {log_dir} (one run per optimizer)")
    print(f"Report:           {report}")
    print(f"Table (JSON):     {json_path}")
    print(f"View the logs:    tensorboard --logdir {log_dir}")
    return {**summary, "log_dir": log_dir, "report": report, "json": json_path}


# spectrum ---------------------------------------------------------------------------------


def run_spectrum(args: argparse.Namespace) -> dict:
    """Trains, then measures; returns the figures it prints."""
    from keras_curv.curvature import HessianOperator, hutchinson_trace, top_eigenpairs

    data = _load(args)
    model, rate = _compiled_model(data, args.optimizer, args.learning_rate, args.seed)
    print(
        f"Training a {model.count_params():,}-parameter CNN on {_describe(data)} for "
        f"{args.epochs} epochs with {args.optimizer} (lr {_lr(rate)})"
    )
    model.fit(
        data.x_train,
        data.y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(data.x_test, data.y_test),
        verbose=2,
    )

    probe = min(args.probe_size, data.num_train)
    op = HessianOperator(model, model.loss, data.x_train[:probe], data.y_train[:probe])
    top_k = args.top_k or data.num_classes
    start = time.perf_counter()
    eigen = top_eigenpairs(op, top_k, method=args.method, tol=1e-3, seed=args.seed)
    eigen_seconds = time.perf_counter() - start
    start = time.perf_counter()
    trace = hutchinson_trace(op, args.trace_samples, seed=args.seed)
    trace_seconds = time.perf_counter() - start

    print(f"\nHessian of the mean training loss on {probe} samples ({op.dim:,} parameters)")
    print(
        f"Top {top_k} eigenvalues ({args.method}, {eigen.num_matvecs} HVPs, "
        f"{eigen_seconds:.1f} s, converged: {bool(eigen.converged)}):"
    )
    for i, value in enumerate(eigen.eigenvalues, start=1):
        print(f"  λ{i:<3d} {value: .6g}")
    print(
        f"Trace (Hutch++, {trace.num_matvecs} HVPs, {trace_seconds:.1f} s): "
        f"{trace.estimate:.6g} ± {trace.std_error:.2g}"
    )
    return {
        "eigenvalues": [float(v) for v in eigen.eigenvalues],
        "trace": float(trace.estimate),
        "num_hvps": int(eigen.num_matvecs + trace.num_matvecs),
    }


_COMMANDS = {"demo": run_demo, "compare": run_compare, "spectrum": run_spectrum}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keras-curv`` console script."""
    args = _parser().parse_args(argv)
    from keras_curv.data import DatasetUnavailableError

    try:
        _COMMANDS[args.command](args)
    except DatasetUnavailableError as error:
        print(f"keras-curv: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
