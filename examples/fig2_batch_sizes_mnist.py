"""Fig. 2 of the class-subspace paper: SGD vs the quasi-Newton method across batch sizes on MNIST.

A small CNN (:func:`keras_curv.models.small_cnn`) is trained with SGD and with
:class:`keras_curv.ClassSubspaceNewton` at eta = 1e-2 (momentum 0.9, gamma 0.9) for
batch sizes up to full batch. After every epoch the loss over the whole training
set is recorded; the *crossover* is the first epoch where SGD's loss is below the
quasi-Newton method's (the paper: the quasi-Newton method may start faster, but
SGD overtakes it at every batch size, so batch noise does not explain the gap).
Writes ``fig2_batch_sizes.png`` and ``fig2_batch_sizes_mnist.json``.

Full mode: ``python examples/fig2_batch_sizes_mnist.py [--data-dir D]`` (MNIST from
tensorflow-datasets). Smoke: ``--smoke`` (512 ``digits`` images, batch 64 and full).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import _common


def _batch_size(text: str) -> int | str:
    if text == "full":
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive or 'full'; got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], epochs=30, smoke_epochs=3)
    p.add_argument(
        "--batch-sizes",
        type=_batch_size,
        nargs="+",
        default=None,
        help="sizes or 'full' (default 64 512 4096 full; 64 full with --smoke)",
    )
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--filters", type=int, default=8, help="small_cnn filters (default 8)")
    p.add_argument(
        "--max-train",
        type=int,
        default=None,
        help="training samples kept (default all 60,000; full batch holds them all at once)",
    )
    _common.add_curvature_option(p)
    args = _common.parse(p, argv)
    if args.batch_sizes is None:
        args.batch_sizes = [64, "full"] if args.smoke else [64, 512, 4096, "full"]
    data = _common.load_data(
        args, "mnist", max_train=args.max_train, smoke_max_train=512, smoke_max_test=256
    )
    if data is None:
        return _common.EXIT_NO_DATA

    import keras

    from keras_curv import ClassSubspaceNewton
    from keras_curv.models import small_cnn

    def build():
        return small_cnn(data.input_shape, data.num_classes, filters=args.filters)

    lr = args.learning_rate
    optimizers = {
        "SGD": lambda: keras.optimizers.SGD(lr, momentum=0.9),
        "CSN": lambda: ClassSubspaceNewton(lr, gamma=0.9, momentum=0.9, curvature=args.curvature),
    }
    results = {}
    for requested in args.batch_sizes:
        size = data.num_train if requested == "full" else min(int(requested), data.num_train)
        label = "full" if size == data.num_train else str(size)
        runs = {
            name: _common.train(
                build,
                make(),
                data,
                epochs=args.epochs,
                batch_size=size,
                seed=args.seed,
                train_loss=True,
            )
            for name, make in optimizers.items()
        }
        crossover = _common.first_crossover(runs["CSN"]["train_loss"], runs["SGD"]["train_loss"])
        results[label] = {"batch_size": size, "crossover_epoch": crossover, "runs": runs}
        print(
            f"batch {label:>6}: final train loss SGD {runs['SGD']['train_loss'][-1]:.4f} "
            f"CSN {runs['CSN']['train_loss'][-1]:.4f}; SGD below CSN from epoch "
            f"{crossover if crossover is not None else '-'}"
            f"{' (CSN diverged)' if runs['CSN']['diverged'] else ''}"
        )

    _plot(args, results)
    path = _common.write_json(
        args,
        "fig2_batch_sizes_mnist.json",
        {
            "dataset": data.name,
            "num_train": data.num_train,
            "learning_rate": lr,
            "num_params": next(iter(results.values()))["runs"]["SGD"]["num_params"],
            "crossover_epoch": {k: v["crossover_epoch"] for k, v in results.items()},
            "results": results,
        },
    )
    print(f"wrote {path} and {args.output / 'fig2_batch_sizes.png'}")
    return 0


def _plot(args, results) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, len(results), figsize=(3.8 * len(results), 3.4), squeeze=False, sharey=True
    )
    for ax, (label, result) in zip(axes[0], results.items()):
        for name, record in result["runs"].items():
            curve = record["train_loss"]
            ax.plot(range(len(curve)), curve, marker=".", label=name)
        if result["crossover_epoch"] is not None:
            ax.axvline(result["crossover_epoch"], color="grey", linestyle=":", label="crossover")
        ax.set_title(f"batch {label}{_common.mode_label(args)}")
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.legend()
    axes[0][0].set_ylabel("training loss")
    _common.save_figure(args, figure, "fig2_batch_sizes.png")


if __name__ == "__main__":
    sys.exit(main())
