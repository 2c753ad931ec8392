"""SketchySGD, OSGM and Lookahead against tuned and untuned SGD/Adam (issue [5/8]).

Run: ``PYTHONPATH=. python -m benchmarks.sketchy_sgd [--quick]``. Writes
``benchmarks/results/sketchy_sgd.json``. Workloads (the PROMISE showcase in kind, plus
one network):

- ``spiked_least_squares``: 8192 × 200, 10 covariance eigenvalues over a flat bulk
  (condition 1e4), MSE, 10 epochs of batch 256.
- ``logistic``: ℓ2-regularised (1e-3) logistic regression on the same ill-conditioned
  features, labels from a noisy linear rule.
- ``ridge_random_features``: ridge (1e-3) on 400 random Fourier features of the same
  features.
- ``mnist1d_mlp``: MNIST-1D, the 40-100-100-10 reference MLP, 10 epochs of batch 128.

Every optimizer starts from the same weights and sees the same unshuffled batches. The
baselines get Keras's defaults and the best of a log-spaced learning-rate grid (best
final training loss); SketchySGD runs at its defaults only. Each row has the final
training loss, the epochs and seconds to the workload's target (``None``: never), and
for the network the test accuracy. ``step_cost`` is the fastest epoch's time per step
on the MLP, as a ratio to SGD's and Adam's, interleaved in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_curv import OSGM, Lookahead, SketchySGD  # noqa: E402
from keras_curv.data import load_dataset, spiked_regression  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GRIDS = {
    "sgd": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
    "adam": [1e-3, 1e-2, 1e-1, 1.0],
    "osgm": [1e-5, 1e-4, 3e-4, 1e-3],
}
L2 = 1e-3


class _Trace(keras.callbacks.Callback):
    """Training loss and wall time at the end of every epoch."""

    def __init__(self, evaluate: Callable[[keras.Model], float]):
        super().__init__()
        self.evaluate, self.rows = evaluate, []

    def on_train_begin(self, logs=None):
        self.elapsed = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.elapsed += time.perf_counter() - self.start  # the evaluation is not timed
        self.rows.append((epoch + 1, self.elapsed, self.evaluate(self.model)))


def _convex_problems(quick: bool) -> dict:
    n = 2048 if quick else 8192
    x, y = spiked_regression(n, 200)
    rng = np.random.default_rng(1)
    margin = (x @ rng.standard_normal(200)) / np.sqrt(200 * 10.0)
    labels = (margin + 0.5 * rng.standard_normal(n) > 0).astype(np.float32)[:, None]
    frequencies = rng.standard_normal((200, 400)) / np.sqrt(np.mean(np.sum(x**2, 1)))
    phases = rng.uniform(0, 2 * np.pi, 400)
    features = (np.sqrt(2.0) * np.cos(x @ frequencies + phases)).astype(np.float32)
    return {
        "spiked_least_squares": (x, y, "mse", None),
        "logistic": (x, labels, keras.losses.BinaryCrossentropy(from_logits=True), L2),
        "ridge_random_features": (features, y / np.std(y), "mse", L2),
    }


def _optimum(x, y, loss, l2) -> float:
    """The convex problem's minimum in float64 (normal equations, or L-BFGS for logistic)."""
    import scipy.optimize

    x64 = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
    y64 = y[:, 0].astype(np.float64)
    penalty = np.ones(x64.shape[1])
    penalty[-1] = 0.0  # the bias is not regularised (Keras's kernel_regularizer)
    if loss == "mse":
        gram = x64.T @ x64 / len(x) + (l2 or 0.0) * np.diag(penalty)
        w = np.linalg.lstsq(gram, x64.T @ y64 / len(x), rcond=None)[0]
        return float(np.mean((x64 @ w - y64) ** 2) + (l2 or 0.0) * np.sum(penalty * w**2))

    def objective(w):
        z = x64 @ w
        value = np.mean(np.logaddexp(0, z) - y64 * z) + l2 * np.sum(penalty * w**2)
        grad = x64.T @ (1 / (1 + np.exp(-z)) - y64) / len(x) + 2 * l2 * penalty * w
        return value, grad

    options = {"maxiter": 5000, "gtol": 1e-12}
    start = np.zeros(x64.shape[1])
    result = scipy.optimize.minimize(objective, start, jac=True, method="L-BFGS-B", options=options)
    return float(result.fun)


def _run(model_fn, optimizer, x, y, loss, *, epochs, batch_size, test=None, seed=0) -> dict:
    keras.utils.set_random_seed(seed)
    model = model_fn()
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"] if test else None)

    def evaluate(m):
        value = m.evaluate(x, y, batch_size=4096, verbose=0)
        return float(value[0] if isinstance(value, list) else value)

    trace = _Trace(evaluate)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[trace])  # fmt: skip
    losses = [row[2] for row in trace.rows]
    row = {
        "final_loss": losses[-1] if np.isfinite(losses[-1]) else None,
        "losses": [v if np.isfinite(v) else None for v in losses],
        "seconds": trace.rows[-1][1],
        "_trace": trace.rows,
    }
    if test is not None:
        row["test_accuracy"] = float(model.evaluate(*test, batch_size=4096, verbose=0)[1])
    return row


def _to_target(row: dict, target: float) -> dict:
    hit = next(((e, s) for e, s, v in row.pop("_trace") if np.isfinite(v) and v <= target), None)
    row["epochs_to_target"], row["seconds_to_target"] = hit if hit else (None, None)
    return row


def _best(rows: dict) -> tuple:
    finite = {lr: r for lr, r in rows.items() if r["final_loss"] is not None}
    if not finite:
        return None, None
    lr = min(finite, key=lambda k: finite[k]["final_loss"])
    return lr, finite[lr]


def _compare(model_fn, x, y, loss, *, epochs, batch_size, target, test=None, osgm=True):
    def run(optimizer):
        row = _run(model_fn, optimizer, x, y, loss, epochs=epochs, batch_size=batch_size,
                   test=test)  # fmt: skip
        return _to_target(row, target)

    table = {
        "sketchysgd_default": run(SketchySGD()),
        "sgd_default": run(keras.optimizers.SGD()),
        "adam_default": run(keras.optimizers.Adam()),
    }
    for name, make in (("sgd", keras.optimizers.SGD), ("adam", keras.optimizers.Adam)) + (
        (("osgm", lambda lr: OSGM(lr, max_scale=1e-3)),) if osgm else ()
    ):
        grid = {lr: run(make(lr)) for lr in GRIDS[name]}
        lr, best = _best(grid)
        table[f"{name}_tuned"] = {"learning_rate": lr, **(best or {})}
        table[f"{name}_grid"] = {str(k): v["final_loss"] for k, v in grid.items()}
    lr = table["adam_tuned"]["learning_rate"]
    if lr is not None:
        table["lookahead_adam_tuned"] = {
            "learning_rate": lr,
            **run(Lookahead(keras.optimizers.Adam(lr))),
        }
    return table


def linear(input_dim: int, l2: float | None) -> Callable[[], keras.Model]:
    """A linear model started at zero, as PROMISE starts its GLMs.

    From Keras's Glorot start the spiked features (variance up to 1e3) give logits of
    about ±10: a saturated logistic loss whose Gauss–Newton curvature is near zero, on
    which every curvature-scaled step overshoots (docs/sketchy_sgd.md).
    """
    regularizer = keras.regularizers.L2(l2) if l2 else None
    dense = keras.layers.Dense(1, kernel_initializer="zeros", kernel_regularizer=regularizer)
    return lambda: keras.Sequential(
        [keras.Input((input_dim,)), dense.from_config(dense.get_config())]
    )


def mnist1d_mlp() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((40,)),
            keras.layers.Dense(100, activation="relu"),
            keras.layers.Dense(100, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def step_cost(x, y, *, batch_size=128, repeats=5) -> dict:
    """Fastest epoch's seconds per step of SketchySGD, OSGM, SGD and Adam, interleaved."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    makers = {
        "sgd": keras.optimizers.SGD,
        "adam": keras.optimizers.Adam,
        "sketchysgd": SketchySGD,
        "sketchysgd_update_every_1": lambda: SketchySGD(update_every=1),
        "osgm": lambda: OSGM(1e-4),
        "lookahead_adam": lambda: Lookahead(keras.optimizers.Adam()),
    }
    models = {}
    for name, make in makers.items():
        keras.utils.set_random_seed(0)
        models[name] = mnist1d_mlp()
        models[name].compile(optimizer=make(), loss=loss)
        models[name].fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    steps = -(-len(x) // batch_size)
    best = {name: float("inf") for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return {
        "seconds_per_step": best,
        "ratio_to_sgd": {k: v / best["sgd"] for k, v in best.items()},
        "ratio_to_adam": {k: v / best["adam"] for k, v in best.items()},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer epochs")
    parser.add_argument("--output", default=str(RESULTS / "sketchy_sgd.json"))
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else 10
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (no GPU), "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}",
        "quick": args.quick,
        "workloads": {},
    }
    for name, (x, y, loss, l2) in _convex_problems(args.quick).items():
        optimum = _optimum(x, y, loss, l2)
        target = optimum + 0.01 * max(optimum, 1e-3) + (0.01 if loss == "mse" else 0.005)
        started = time.perf_counter()
        table = _compare(linear(x.shape[1], l2), x, y, loss, epochs=epochs, batch_size=256,
                         target=target)  # fmt: skip
        report["workloads"][name] = {"optimum": optimum, "target": target, **table}
        _write(report, args.output)  # after each workload: a long run keeps what it measured
        print(name, f"optimum {optimum:.4g}", f"({time.perf_counter() - started:.0f} s)")
        for key, row in table.items():
            if "final_loss" in row:
                print(f"  {key:24s} final {row['final_loss']}  to target {row['epochs_to_target']}")
    data = load_dataset("mnist1d", max_train=1024 if args.quick else None)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    table = _compare(mnist1d_mlp, data.x_train, data.y_train, loss, epochs=epochs,
                     batch_size=128, target=0.5, test=(data.x_test, data.y_test),
                     osgm=not args.quick)  # fmt: skip
    report["workloads"]["mnist1d_mlp"] = {"target": 0.5, **table}
    _write(report, args.output)
    for key, row in table.items():
        if "final_loss" in row:
            print(f"  mnist1d {key:24s} loss {row['final_loss']} acc {row.get('test_accuracy')}")
    report["step_cost"] = step_cost(data.x_train[:2048], data.y_train[:2048],
                                    repeats=2 if args.quick else 5)  # fmt: skip
    print(json.dumps(report["step_cost"]["ratio_to_sgd"], indent=1))
    _write(report, args.output)
    return report


def _write(report: dict, output: str) -> None:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
