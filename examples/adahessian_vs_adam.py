"""AdaHessian vs Adam vs SGD: loss/accuracy curves and wall time per step.

The same model, from the same initial weights and with the same batch order, is
trained with :class:`keras_curv.AdaHessian` (Hutchinson Hessian diagonal, one
Hessian-vector product per step), Adam and SGD with momentum 0.9. Writes
``adahessian_vs_adam.png`` (validation loss and accuracy per epoch, and the median
seconds per training step) and ``adahessian_vs_adam.json``.

Full mode: ``python examples/adahessian_vs_adam.py`` trains the ResNet9 on CIFAR-10
(tensorflow-datasets); ``--dataset mnist1d`` or ``--dataset digits`` train a small
CNN offline. Smoke: ``--smoke`` (a small CNN on ``mnist1d``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _common


def main(argv: Sequence[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], epochs=20, smoke_epochs=2)
    p.add_argument(
        "--dataset",
        default="cifar10",
        choices=["cifar10", "cifar100", "mnist", "fashion_mnist", "digits", "mnist1d"],
        help="cifar10/cifar100 train the ResNet9, the others a small CNN",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (64 smoke)")
    p.add_argument("--adahessian-lr", type=float, default=0.15)
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--sgd-lr", type=float, default=1e-1)
    args = _common.parse(p, argv)
    data = _common.load_data(
        args, args.dataset, smoke_name="mnist1d", smoke_max_train=768, smoke_max_test=256
    )
    if data is None:
        return _common.EXIT_NO_DATA

    import keras

    from keras_curv import AdaHessian
    from keras_curv.models import resnet9, small_cnn

    if data.name.startswith("cifar"):

        def build():
            return resnet9(data.input_shape, data.num_classes)

        model_name = "ResNet9"
    else:

        def build():
            return small_cnn(data.input_shape, data.num_classes)

        model_name = "small CNN"
    batch_size = args.batch_size or (64 if args.smoke else 128)
    optimizers = {
        "AdaHessian": lambda: AdaHessian(args.adahessian_lr),
        "Adam": lambda: keras.optimizers.Adam(args.adam_lr),
        "SGD": lambda: keras.optimizers.SGD(args.sgd_lr, momentum=0.9),
    }
    runs = {}
    for name, make in optimizers.items():
        runs[name] = record = _common.train(
            build, make(), data, epochs=args.epochs, batch_size=batch_size, seed=args.seed
        )
        print(
            f"{name:>10}: val acc {record['val_accuracy'][-1]:.3f}, val loss "
            f"{record['val_loss'][-1]:.4f}, {1e3 * record['step_seconds']:.1f} ms/step"
            f"{' (diverged)' if record['diverged'] else ''}"
        )
    ratio = runs["AdaHessian"]["step_seconds"] / runs["Adam"]["step_seconds"]
    print(f"AdaHessian step / Adam step: {ratio:.2f}x ({model_name} on {data.name})")

    _plot(args, runs, model_name, data.name)
    path = _common.write_json(
        args,
        "adahessian_vs_adam.json",
        {
            "dataset": data.name,
            "model": model_name,
            "num_params": runs["Adam"]["num_params"],
            "batch_size": batch_size,
            "step_time_ratio_adahessian_over_adam": ratio,
            "runs": runs,
        },
    )
    print(f"wrote {path} and {args.output / 'adahessian_vs_adam.png'}")
    return 0


def _plot(args, runs, model_name, dataset) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12.5, 3.6))
    for name, record in runs.items():
        epochs = range(len(record["val_loss"]))
        axes[0].plot(epochs, record["val_loss"], marker=".", label=name)
        axes[1].plot(epochs, record["val_accuracy"], marker=".", label=name)
    for ax, label in zip(axes[:2], ["validation loss", "validation accuracy"]):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend()
    axes[0].set_title(f"{model_name} on {dataset}{_common.mode_label(args)}")
    names = list(runs)
    axes[2].bar(names, [1e3 * runs[n]["step_seconds"] for n in names])
    axes[2].set_ylabel("ms per training step (median)")
    axes[2].set_title("wall time per step")
    _common.save_figure(args, figure, "adahessian_vs_adam.png")


if __name__ == "__main__":
    sys.exit(main())
