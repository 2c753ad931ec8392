"""Fig. 3 of the class-subspace paper: the top-30 Hessian eigenvalues of a ~60k-parameter CNN.

A :func:`keras_curv.models.small_cnn` sized to about 60,000 parameters is trained
briefly (SGD, momentum 0.9), then the 30 largest eigenvalues of the Hessian of the
mean training loss on a probe set are computed by Lanczos
(:func:`keras_curv.curvature.top_eigenpairs`). The paper's observation: knowing C,
the C-th eigenvalue is a plausible cut-off of the outliers, but the spectrum alone
does not reveal C. Writes ``fig3_top30_eigenvalues.png`` (stem plot, C marked) and
``fig3_top30_eigenvalues.json``.

Full mode: ``python examples/fig3_top30_eigenvalues.py [--dataset cifar10] [--data-dir D]``.
Smoke: ``--smoke`` (a ~10k-parameter CNN on ``digits``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import _common


def main(argv: Sequence[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], epochs=5, smoke_epochs=2)
    p.add_argument(
        "--dataset",
        default="cifar10",
        choices=["cifar10", "cifar100", "mnist", "fashion_mnist", "digits", "mnist1d"],
    )
    p.add_argument("--params", type=int, default=None, help="target size (60,000; 10,000 smoke)")
    p.add_argument("--top-k", type=int, default=30)
    p.add_argument("--probe-size", type=int, default=None, help="probe samples (2048; 256 smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (32 smoke)")
    p.add_argument("--learning-rate", type=float, default=1e-2)
    args = _common.parse(p, argv)
    data = _common.load_data(args, args.dataset, smoke_max_train=512, smoke_max_test=256)
    if data is None:
        return _common.EXIT_NO_DATA

    import keras
    import numpy as np

    from keras_curv.curvature import HessianOperator, top_eigenpairs
    from keras_curv.models import small_cnn

    target = args.params or (10_000 if args.smoke else 60_000)
    filters = _common.small_cnn_filters(data.input_shape, data.num_classes, target)
    record, model = _common.fit(
        lambda: small_cnn(data.input_shape, data.num_classes, filters=filters),
        keras.optimizers.SGD(args.learning_rate, momentum=0.9),
        data,
        epochs=args.epochs,
        batch_size=args.batch_size or (32 if args.smoke else 128),
        seed=args.seed,
    )

    probe = min(args.probe_size or (256 if args.smoke else 2048), data.num_train)
    op = HessianOperator(
        model, _common.sparse_ce(), data.x_train[:probe], data.y_train[:probe], batch_size=512
    )
    k = min(args.top_k, op.dim)
    start = time.perf_counter()
    eigen = top_eigenpairs(op, k, tol=1e-3, seed=args.seed)
    seconds = time.perf_counter() - start
    values = np.asarray(eigen.eigenvalues)
    c = data.num_classes
    gap = float(values[c - 1] / values[c]) if k > c and values[c] > 0 else None

    _plot(args, values, c, model.count_params(), data.name)
    path = _common.write_json(
        args,
        "fig3_top30_eigenvalues.json",
        {
            "dataset": data.name,
            "num_params": int(model.count_params()),
            "filters": filters,
            "num_classes": c,
            "probe_size": probe,
            "eigenvalues": values,
            "residuals": eigen.residuals,
            "converged": eigen.converged,
            "num_matvecs": eigen.num_matvecs,
            "eigen_seconds": seconds,
            "gap_at_num_classes": gap,
            "training": record,
        },
    )
    print(
        f"{model.count_params():,}-parameter CNN on {data.name}, val acc "
        f"{record['val_accuracy'][-1]:.3f}; top {k} Hessian eigenvalues on {probe} samples "
        f"({eigen.num_matvecs} HVPs, {seconds:.1f} s, converged {eigen.converged}):"
    )
    print("  " + " ".join(f"{v:.3g}" for v in values))
    if gap is not None:
        print(f"  lambda_C / lambda_(C+1) = {gap:.2f} (C = {c})")
    print(f"wrote {path} and {args.output / 'fig3_top30_eigenvalues.png'}")
    return 0


def _plot(args, values, num_classes, num_params, name) -> None:
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6.4, 3.6))
    ranks = range(1, len(values) + 1)
    ax.stem(ranks, values)
    ax.axvline(num_classes + 0.5, color="tab:red", linestyle="--", label=f"C = {num_classes}")
    ax.set_xlabel("eigenvalue rank")
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_title(
        f"Top {len(values)} eigenvalues, {num_params:,}-param CNN on {name}"
        f"{_common.mode_label(args)}"
    )
    ax.legend()
    _common.save_figure(args, figure, "fig3_top30_eigenvalues.png")


if __name__ == "__main__":
    sys.exit(main())
