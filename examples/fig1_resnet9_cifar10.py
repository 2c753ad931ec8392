"""Fig. 1 and Table 1 of the class-subspace paper: ResNet9 on CIFAR-10, SGD vs quasi-Newton.

For each learning rate in {1e-1, 5e-2, 1e-2} a ResNet9 (6.5M parameters) is trained
from the same initial weights with SGD (momentum 0.9) and with
:class:`keras_curv.ClassSubspaceNewton` (eq. 15-17, gamma 0.9, momentum 0.9,
Appendix D). Writes the validation-loss curves (``fig1_val_loss.png``) and the
final validation accuracy/loss per learning rate (Table 1 and 2 of Appendix A,
``fig1_resnet9_cifar10.json``).

Full mode: ``python examples/fig1_resnet9_cifar10.py [--data-dir D]`` (CIFAR-10 from
tensorflow-datasets; a GPU is advised). Smoke: ``--smoke`` (a width-4 ResNet9 on the
8x8 ``digits`` set).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _common

LEARNING_RATES = (1e-1, 5e-2, 1e-2)


def main(argv: Sequence[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], epochs=30, smoke_epochs=2)
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (64 with --smoke)")
    p.add_argument("--width", type=int, default=None, help="ResNet9 width (64; 4 with --smoke)")
    p.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        default=None,
        metavar="ETA",
        help="default 0.1 0.05 0.01 (0.05 only with --smoke: each run traces a new step)",
    )
    _common.add_curvature_option(p)
    args = _common.parse(p, argv)
    batch_size = args.batch_size or (64 if args.smoke else 128)
    width = args.width or (4 if args.smoke else 64)
    if args.learning_rates is None:
        args.learning_rates = [5e-2] if args.smoke else list(LEARNING_RATES)
    data = _common.load_data(
        args, "cifar10", smoke_name="digits", smoke_max_train=512, smoke_max_test=256
    )
    if data is None:
        return _common.EXIT_NO_DATA

    import keras

    from keras_curv import ClassSubspaceNewton
    from keras_curv.models import resnet9

    def build():
        return resnet9(data.input_shape, data.num_classes, width=width)

    optimizers = {
        "SGD": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
        "CSN": lambda lr: ClassSubspaceNewton(
            lr, gamma=0.9, momentum=0.9, curvature=args.curvature
        ),
    }
    runs: dict[str, dict[str, dict]] = {}
    for lr in args.learning_rates:
        runs[f"{lr:g}"] = {}
        for name, make in optimizers.items():
            record = _common.train(
                build, make(lr), data, epochs=args.epochs, batch_size=batch_size, seed=args.seed
            )
            runs[f"{lr:g}"][name] = record
            print(
                f"eta={lr:g} {name}: val_acc {record['val_accuracy'][-1]:.3f} "
                f"val_loss {record['val_loss'][-1]:.4f} "
                f"({record['step_seconds'] or float('nan'):.3g} s/step"
                f"{', diverged' if record['diverged'] else ''})"
            )

    table = {
        lr: {
            name: {
                "accuracy": r["val_accuracy"][-1],
                "loss": r["val_loss"][-1],
                "diverged": r["diverged"],
            }
            for name, r in per_opt.items()
        }
        for lr, per_opt in runs.items()
    }
    _plot(args, runs)
    path = _common.write_json(
        args,
        "fig1_resnet9_cifar10.json",
        {
            "dataset": data.name,
            "num_params": next(iter(next(iter(runs.values())).values()))["num_params"],
            "batch_size": batch_size,
            "width": width,
            "table": table,
            "runs": runs,
        },
    )
    print(f"\nTable 1/2 ({data.name}, {args.epochs} epochs): final validation accuracy / loss")
    print(f"{'eta':>6} {'SGD acc':>8} {'CSN acc':>8} {'SGD loss':>9} {'CSN loss':>9}")
    for lr, row in table.items():
        print(
            f"{lr:>6} {row['SGD']['accuracy']:>8.3f} {row['CSN']['accuracy']:>8.3f} "
            f"{row['SGD']['loss']:>9.4f} {row['CSN']['loss']:>9.4f}"
        )
    print(f"wrote {path} and {args.output / 'fig1_val_loss.png'}")
    return 0


def _plot(args, runs) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (lr, per_opt) in zip(axes[0], runs.items()):
        for name, record in per_opt.items():
            ax.plot(range(len(record["val_loss"])), record["val_loss"], marker=".", label=name)
        ax.set_title(f"η = {lr}{_common.mode_label(args)}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation loss")
        ax.legend()
    _common.save_figure(args, figure, "fig1_val_loss.png")


if __name__ == "__main__":
    sys.exit(main())
