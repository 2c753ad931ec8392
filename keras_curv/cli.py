"""The ``keras-curv`` command line.

``keras-curv spectrum`` trains a small classifier for a few epochs and reports the
curvature of its loss: the top Hessian eigenvalues, the trace, and what they cost.
``keras-curv demo`` is the main job that ``make demo`` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-curv", description="Curvature diagnostics for Keras models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, helptext in [
        ("spectrum", "train a small classifier, then report its top Hessian eigenvalues"),
        ("demo", "the main job (what `make demo` runs)"),
    ]:
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument(
            "--dataset",
            default="digits",
            help="digits (default), mnist1d, "
            "or a tensorflow-datasets name (mnist, fashion_mnist, cifar10, cifar100)",
        )
        sub.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory")
        sub.add_argument("--epochs", type=int, default=5)
        sub.add_argument("--batch-size", type=int, default=64)
        sub.add_argument("--learning-rate", type=float, default=3e-3)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument(
            "--top-k",
            type=int,
            default=None,
            help="eigenvalues to compute (default: the number of classes)",
        )
        sub.add_argument("--method", default="lanczos", choices=["lanczos", "nystrom", "power"])
        sub.add_argument(
            "--probe-size",
            type=int,
            default=512,
            help="training samples the Hessian is measured on",
        )
        sub.add_argument(
            "--trace-samples", type=int, default=30, help="Hutch++ matvec budget for the trace"
        )
    return parser


def run_spectrum(args: argparse.Namespace) -> dict:
    """Trains, then measures; returns the figures it prints."""
    import keras

    from keras_curv.curvature import HessianOperator, hutchinson_trace, top_eigenpairs
    from keras_curv.data import load_dataset
    from keras_curv.models import small_cnn

    keras.utils.set_random_seed(args.seed)
    data = load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
    model = small_cnn(data.input_shape, data.num_classes)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate), loss=loss, metrics=["accuracy"]
    )
    print(
        f"Training a {model.count_params():,}-parameter CNN on {data.name} "
        f"({data.num_train} train / {data.num_test} test) for {args.epochs} epochs"
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
    op = HessianOperator(model, loss, data.x_train[:probe], data.y_train[:probe])
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keras-curv`` console script."""
    args = _parser().parse_args(argv)
    from keras_curv.data import DatasetUnavailableError

    try:
        run_spectrum(args)
    except DatasetUnavailableError as error:
        print(f"keras-curv: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
