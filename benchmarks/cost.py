"""Cost ratios across model sizes and class counts, for the benchmark suite.

For each model (an MLP, ``small_cnn`` and a narrow ``resnet9``) and each class count C,
on synthetic 28x28x1 inputs, one process measures:

* ``hvp``: ``HessianOperator.matvec`` over one gradient (:func:`benchmarks.hvp_cost.measure`);
* ``adahessian``: an ``AdaHessian`` step over an ``Adam`` step, and ``csn`` /
  ``csn_gauss_newton``: a ``ClassSubspaceNewton`` step (``curvature="paper"`` /
  ``"gauss_newton"``) over an ``SGD`` step (:func:`benchmarks.optimizer_cost.step_times`,
  graph mode, fastest interleaved epoch);
* ``callbacks``: one warm measurement of ``HessianSpectrum`` + ``SubspaceAlignment``
  (``every_n_epochs=1``, ``top_k = C``) on a probe of one batch, in SGD steps
  (:func:`benchmarks.callback_overhead.run`).

Run it through the suite: ``python -m benchmarks --only cost``.
"""

from __future__ import annotations

import statistics
import types

import keras
import numpy as np

from benchmarks import callback_overhead, hvp_cost, optimizer_cost
from keras_curv.models import resnet9, small_cnn
from keras_curv.optimizers import AdaHessian, ClassSubspaceNewton

INPUT_SHAPE = (28, 28, 1)


def mlp(input_shape, num_classes, hidden: int = 64) -> keras.Model:
    """Flatten - Dense(hidden, relu) - Dense(C) logits."""
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(num_classes),
        ],
        name="mlp",
    )


MODELS = {
    "mlp": lambda c: mlp(INPUT_SHAPE, c),
    "small_cnn": lambda c: small_cnn(INPUT_SHAPE, c),
    "resnet9_w4": lambda c: resnet9(INPUT_SHAPE, c, width=4),
    "resnet9_w8": lambda c: resnet9(INPUT_SHAPE, c, width=8),
}


def _builder(name: str, num_classes: int, seed: int = 0):
    def build():
        keras.utils.set_random_seed(seed)
        return MODELS[name](num_classes)

    return build


def measure_one(
    name: str,
    num_classes: int,
    *,
    batch: int,
    steps: int,
    repeats: int,
    callback_epochs: int,
    callback_max_classes: int = 100,
) -> dict:
    """All cost ratios of one (model, C) pair; see the module docstring.

    The callbacks are measured only for ``C <= callback_max_classes`` (their Lanczos
    solves for ``top_k = C`` eigenpairs, which dominates at large C); NaN otherwise.
    """
    rng = np.random.default_rng(0)
    n = batch * steps
    x = rng.random((n, *INPUT_SHAPE), dtype=np.float32)
    y = (np.arange(n) % num_classes).astype(np.int32)
    rng.shuffle(y)
    build = _builder(name, num_classes)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    hvp = hvp_cost.measure(
        build(), loss, x[:batch], y[:batch], repeats=max(3, 2 * repeats), warmup=2, seed=0
    )
    variants = {
        "sgd": lambda: keras.optimizers.SGD(0.01),
        "adam": lambda: keras.optimizers.Adam(1e-3),
        "adahessian": lambda: AdaHessian(1e-3),
        "csn": lambda: ClassSubspaceNewton(0.01),
        "csn_gauss_newton": lambda: ClassSubspaceNewton(
            0.01, curvature="gauss_newton", damping=1.0
        ),
    }
    models = {
        key: optimizer_cost.compiled(build, make, x, y, batch_size=batch, jit_compile=False)
        for key, make in variants.items()
    }
    seconds = optimizer_cost.step_times(models, x, y, batch_size=batch, repeats=repeats)
    row = {
        "model": name,
        "num_classes": num_classes,
        "num_params": hvp["num_params"],
        "batch": batch,
        "grad_s": hvp["timings"]["grad"]["median_s"],
        "hvp_over_grad": hvp["timings"]["hvp_operator"]["ratio_to_grad"],
        "seconds_per_step": seconds,
        "adahessian_over_adam": seconds["adahessian"] / seconds["adam"],
        "csn_over_sgd": seconds["csn"] / seconds["sgd"],
        "csn_gauss_newton_over_sgd": seconds["csn_gauss_newton"] / seconds["sgd"],
    }

    nan = float("nan")
    if num_classes > callback_max_classes:
        return {**row, "callback_measurement_s": nan, "callback_first_measurement_s": nan,
                "callback_measurement_over_sgd_step": nan, "callback_hvps": None,
                "callback_measurements": 0}  # fmt: skip
    data = types.SimpleNamespace(
        x_train=x,
        y_train=y,
        x_test=x[:batch],
        y_test=y[:batch],
        input_shape=INPUT_SHAPE,
        num_classes=num_classes,
    )
    run = callback_overhead.run(
        data,
        callback_epochs,
        batch,
        True,
        0,
        "every-epoch",
        make_model=build,
        batch_size=batch,
    )
    # The first measurement pays the tracing; the warm ones are the recurring cost.
    warm = [
        a + b
        for a, b in zip(
            run["HessianSpectrum_durations"][1:], run["SubspaceAlignment_durations"][1:]
        )
    ]
    per_measurement = statistics.median(warm) if warm else float("nan")
    first = run["HessianSpectrum_durations"][0] + run["SubspaceAlignment_durations"][0]
    return {
        **row,
        "callback_measurement_s": per_measurement,
        "callback_first_measurement_s": first,
        "callback_measurement_over_sgd_step": per_measurement / seconds["sgd"],
        "callback_hvps": run["hessian_vector_products"],
        "callback_measurements": run["HessianSpectrum_measurements"],
    }


def budget_overhead(epochs: int, repeats: int = 1) -> dict:
    """Overhead of both callbacks on their default budget schedule (digits, ``small_cnn``)."""
    from keras_curv.data import load_dataset

    data = load_dataset("digits")
    runs = {"plain": [], "callbacks": []}
    for repeat in range(repeats):
        for key in runs:
            runs[key].append(
                callback_overhead.run(data, epochs, 256, key == "callbacks", repeat, "budget")
            )
    plain = min(r["seconds"] for r in runs["plain"])
    # Fastest of ``repeats`` interleaved fits each, so load spikes inflate neither side.
    best = min(runs["callbacks"], key=lambda r: r["seconds"])
    return {
        "epochs": epochs,
        "repeats": repeats,
        "plain_s": plain,
        "callbacks_s": best["seconds"],
        "overhead": best["seconds"] / plain - 1.0,
        "measurements": best["HessianSpectrum_measurements"],
        "target": callback_overhead.TARGET_OVERHEAD,
    }


def run(
    models=("mlp", "small_cnn", "resnet9_w4"),
    classes=(10, 100),
    *,
    batch: int = 64,
    steps: int = 6,
    repeats: int = 3,
    callback_epochs: int = 2,
    callback_max_classes: int = 100,
    budget_epochs: int = 20,
    skip=(),
    log=print,
) -> dict:
    """The cost section of the suite: one row per (model, C), plus the budget schedule.

    ``skip`` lists (model, C) pairs left out (the default mode skips the slowest one).
    """
    rows = []
    skip = {(name, int(c)) for name, c in skip}
    for name in models:
        for c in classes:
            if (name, c) in skip:
                continue
            row = measure_one(
                name,
                c,
                batch=batch,
                steps=steps,
                repeats=repeats,
                callback_epochs=callback_epochs,
                callback_max_classes=callback_max_classes,
            )
            log(
                f"  cost {name} C={c} ({row['num_params']} params): "
                f"HVP {row['hvp_over_grad']:.2f}x "
                f"grad, AdaHessian {row['adahessian_over_adam']:.2f}x Adam, CSN "
                f"{row['csn_over_sgd']:.2f}x SGD (GN {row['csn_gauss_newton_over_sgd']:.2f}x), "
                f"callbacks {row['callback_measurement_s']:.2f} s/measurement"
            )
            rows.append(row)
    # A fit of a few seconds varies by ~25% run to run on a shared CPU, more than the
    # overhead being measured: take the fastest of several interleaved fits of each kind.
    budget = budget_overhead(budget_epochs, repeats=max(repeats, 3))
    log(
        f"  budget schedule, {budget_epochs} epochs: overhead {100 * budget['overhead']:.1f}%, "
        f"{budget['measurements']} measurements"
    )
    return {
        "input_shape": list(INPUT_SHAPE),
        "rows": rows,
        "budget_schedule": budget,
        "skipped": sorted(skip),
    }
