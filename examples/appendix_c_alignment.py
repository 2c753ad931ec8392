"""Appendix C / Fig. 4 of the class-subspace paper: class gradients vs the top Hessian subspace.

A small CNN is trained with SGD (momentum 0.9). On recorded batches, *before* the
step, the batch class directions :math:`c^B_k` (mean gradient of the class-k logit
over the batch's class-k samples, :func:`keras_curv.curvature.class_gradients`) are
stored. After training, the top-C Hessian eigenvectors :math:`e_1..e_C` of the
trained model are computed on a probe set, and for every recorded batch:

* the Hungarian (cosine-maximising) assignment of class directions to eigenvectors,
  :func:`~keras_curv.curvature.best_assignment` of
  :func:`~keras_curv.curvature.cosine_matrix` (the paper reports a mean of about 0.36
  for a 60k-parameter CNN on CIFAR-10, against ~1e-3 for random directions);
* the rank of the combined matrix :math:`[v_1..v_C, e_1..e_C]` (eq. 18,
  :func:`~keras_curv.curvature.combined_rank`): C when the two spans coincide, 2C when
  they meet only at zero.

Writes ``appendix_c_alignment.png`` (rank per batch, assignment cosine per batch,
cosine heatmap of the trained model's class gradients vs the eigenvectors) and
``appendix_c_alignment.json``.

Full mode: ``python examples/appendix_c_alignment.py [--data-dir D]`` (a ~60k-parameter
CNN on CIFAR-10 for 50 epochs, as in the paper). Smoke: ``--smoke`` (``digits``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

import _common


def main(argv: Sequence[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], epochs=50, smoke_epochs=2)
    p.add_argument(
        "--dataset",
        default="cifar10",
        choices=["cifar10", "cifar100", "mnist", "fashion_mnist", "digits", "mnist1d"],
    )
    p.add_argument("--params", type=int, default=None, help="target size (60,000; 5,000 smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (64 smoke)")
    p.add_argument("--learning-rate", type=float, default=None, help="default 0.01 (0.05 smoke)")
    p.add_argument(
        "--max-recorded",
        type=int,
        default=200,
        help="batches whose class directions are kept (evenly spaced; each is C x params floats)",
    )
    p.add_argument("--probe-size", type=int, default=None, help="probe samples (2048; 256 smoke)")
    p.add_argument(
        "--rank-cos-tol", type=float, default=0.9, help="combined_rank: shared-angle cosine"
    )
    args = _common.parse(p, argv)
    data = _common.load_data(args, args.dataset, smoke_max_train=384, smoke_max_test=128)
    if data is None:
        return _common.EXIT_NO_DATA

    import keras
    import numpy as np

    from keras_curv.curvature import (
        HessianOperator,
        best_assignment,
        class_gradients,
        combined_rank,
        cosine_matrix,
        top_eigenpairs,
    )
    from keras_curv.models import small_cnn

    c = data.num_classes
    batch_size = min(args.batch_size or (64 if args.smoke else 128), data.num_train)
    filters = _common.small_cnn_filters(
        data.input_shape, c, args.params or (5_000 if args.smoke else 60_000)
    )
    keras.utils.set_random_seed(args.seed)
    model = small_cnn(data.input_shape, c, filters=filters)
    model.compile(
        optimizer=keras.optimizers.SGD(
            args.learning_rate or (5e-2 if args.smoke else 1e-2), momentum=0.9
        ),
        loss=_common.sparse_ce(),
        metrics=["accuracy"],
    )

    # Full batches only: one batch shape, so the class-gradient Jacobian is traced once.
    per_epoch = data.num_train // batch_size
    total = per_epoch * args.epochs
    every = max(1, math.ceil(total / args.max_recorded))
    rng = np.random.default_rng(args.seed)
    steps, directions, losses = [], [], []
    start = time.perf_counter()
    step = 0
    for _ in range(args.epochs):
        order = rng.permutation(data.num_train)
        for b in range(per_epoch):
            index = order[b * batch_size : (b + 1) * batch_size]
            xb, yb = data.x_train[index], data.y_train[index]
            if step % every == 0:
                steps.append(step)
                directions.append(class_gradients(model, xb, yb).numpy())
            losses.append(float(model.train_on_batch(xb, yb, return_dict=True)["loss"]))
            step += 1
    train_seconds = time.perf_counter() - start
    val = model.evaluate(data.x_test, data.y_test, verbose=0, return_dict=True)

    probe = min(args.probe_size or (256 if args.smoke else 2048), data.num_train)
    x_probe, y_probe = data.x_train[:probe], data.y_train[:probe]
    op = HessianOperator(model, _common.sparse_ce(), x_probe, y_probe, batch_size=512)
    eigen = top_eigenpairs(op, c, tol=1e-3, seed=args.seed)
    top = eigen.eigenvectors.T  # (C, dim) rows e_1..e_C

    cosines, ranks, matched = [], [], []
    for rows in directions:
        assignment = best_assignment(cosine_matrix(rows, top))
        cosines.append(assignment.mean_cosine)
        matched.append(assignment.cosines)
        ranks.append(combined_rank(rows, top, cos_tol=args.rank_cos_tol))
    final = class_gradients(model, x_probe, y_probe).numpy()
    final_cos = cosine_matrix(final, top)
    final_assignment = best_assignment(final_cos)
    dim = op.dim
    # E|cos| of two independent uniform directions in R^dim, for scale: sqrt(2 / (pi dim)).
    random_cosine = math.sqrt(2.0 / (math.pi * dim))

    _plot(args, steps, ranks, cosines, final_cos, final_assignment, c, random_cosine)
    path = _common.write_json(
        args,
        "appendix_c_alignment.json",
        {
            "dataset": data.name,
            "num_params": dim,
            "num_classes": c,
            "batch_size": batch_size,
            "record_every": every,
            "steps": steps,
            "ranks": ranks,
            "assignment_mean_cosine": cosines,
            "assignment_cosines": matched,
            "eigenvalues": eigen.eigenvalues,
            "eigen_converged": eigen.converged,
            "final_cosine_matrix": final_cos,
            "final_assignment_mean_cosine": final_assignment.mean_cosine,
            "random_cosine": random_cosine,
            "train_loss": losses,
            "val_loss": float(val["loss"]),
            "val_accuracy": float(val["accuracy"]),
            "train_seconds": train_seconds,
        },
    )
    tail = ranks[len(ranks) // 2 :]
    print(
        f"{dim:,}-parameter CNN on {data.name}, {step} steps (val acc {val['accuracy']:.3f}); "
        f"{len(steps)} batches recorded"
    )
    print(
        f"  Hungarian mean cosine per batch: first {cosines[0]:.3f}, last {cosines[-1]:.3f}, "
        f"mean {np.mean(cosines):.3f} (random ~{random_cosine:.1e})"
    )
    print(
        f"  combined rank (C={c}, 2C={2 * c}): first {ranks[0]}, last {ranks[-1]}, "
        f"second half mean {np.mean(tail):.1f}"
    )
    print(f"  trained model, probe class gradients vs top-C: {final_assignment.mean_cosine:.3f}")
    print(f"wrote {path} and {args.output / 'appendix_c_alignment.png'}")
    return 0


def _plot(args, steps, ranks, cosines, final_cos, assignment, c, random_cosine) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    ax = axes[0]
    ax.plot(steps, ranks, drawstyle="steps-post")
    ax.axhline(c, color="tab:green", linestyle="--", label=f"C = {c}")
    ax.axhline(2 * c, color="tab:red", linestyle="--", label=f"2C = {2 * c}")
    ax.set_ylim(c - 1, 2 * c + 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("rank [v_1..v_C, e_1..e_C]")
    ax.set_title(f"(a) rank of the combined matrix{_common.mode_label(args)}")
    ax.legend()

    ax = axes[1]
    ax.plot(steps, cosines, marker=".")
    ax.axhline(random_cosine, color="grey", linestyle=":", label="random directions")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean matched |cos|")
    ax.set_title("Hungarian assignment, per batch")
    ax.legend()

    ax = axes[2]
    image = ax.imshow(final_cos, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.scatter(assignment.cols, assignment.rows, marker="s", facecolors="none", edgecolors="w")
    ax.set_xlabel("eigenvector e_j (descending)")
    ax.set_ylabel("class k")
    ax.set_title("(b) |cos(c_k, e_j)|, trained model")
    figure.colorbar(image, ax=ax)
    _common.save_figure(args, figure, "appendix_c_alignment.png")


if __name__ == "__main__":
    sys.exit(main())
