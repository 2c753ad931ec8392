"""Training benchmarks: time to a target accuracy, the batch-size study, lambda calibration.

Three parts, all on CPU-sized problems:

* :func:`time_to_target`: epochs and wall time until the test accuracy first reaches a
  target, per optimizer and seed, on digits (``small_cnn``) and MNIST-1D (an MLP), plus a
  1-D CNN on MNIST-1D. The optimizers are the command line's presets
  (``keras_curv.cli``) plus plain SGD and the exact-inverse calibrated CSN.
* :func:`batch_size_study`: the class-subspace paper's Fig. 2 on MNIST-1D: training loss
  per epoch of SGD and CSN (paper defaults and calibrated) for batch sizes up to the full
  batch, and the crossover epoch after which SGD's loss stays below CSN's.
* :func:`calibration`: during CSN training, the curvature :math:`\\lambda_k` the optimizer
  uses (eq. 17, or the Gauss–Newton variant) against the Gauss–Newton Rayleigh quotient
  :math:`v_k^\\top G v_k` on a probe batch (``GGNOperator``), and the assignment cosine
  between the class directions :math:`v_k` and the top-C Hessian eigenvectors.

Run them through the suite: ``python -m benchmarks --only training``.
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np
import tensorflow as tf

from keras_curv.curvature import (
    GGNOperator,
    HessianOperator,
    best_assignment,
    cosine_matrix,
    top_eigenpairs,
)
from keras_curv.data import load_dataset
from keras_curv.models import small_cnn
from keras_curv.optimizers import ClassSubspaceNewton

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def optimizers() -> dict:
    """name -> (description, learning rate, ``build(seed)``)."""
    from keras_curv.cli import _presets

    presets = _presets()

    def preset(key):
        p = presets[key]
        return (p.description, p.learning_rate, lambda seed: p.build(p.learning_rate, seed))

    return {
        "sgd": ("SGD, no momentum", 0.1, lambda seed: keras.optimizers.SGD(0.1)),
        "sgd_momentum": preset("sgd"),
        "adam": preset("adam"),
        "adahessian": preset("adahessian"),
        "csn_paper": preset("csn"),
        "csn_gn": preset("csn-gn"),
        "csn_gn_exact": (
            'ClassSubspaceNewton, curvature="gauss_newton", damping 1.0, inverse="exact"',
            0.2,
            lambda seed: ClassSubspaceNewton(
                0.2, gamma=0.9, curvature="gauss_newton", damping=1.0, inverse="exact"
            ),
        ),
    }


def mlp(input_shape, num_classes, hidden: int = 100) -> keras.Model:
    """Flatten - Dense(hidden) - Dense(hidden) - Dense(C) logits (ReLU)."""
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(num_classes),
        ],
        name="mlp",
    )


# problem -> (dataset, model builder, target test accuracy, batch size)
PROBLEMS = {
    "digits_cnn": ("digits", lambda d: small_cnn(d.input_shape, d.num_classes), 0.95, 32),
    "mnist1d_mlp": ("mnist1d", lambda d: mlp(d.input_shape, d.num_classes), 0.55, 128),
    "mnist1d_cnn": (
        "mnist1d",
        lambda d: small_cnn(d.input_shape, d.num_classes, filters=32),
        0.80,
        128,
    ),
}


class _Stop(keras.callbacks.Callback):
    """Records when the test accuracy first reaches ``target`` and stops there."""

    def __init__(self, target: float):
        super().__init__()
        self.target = target
        self.reached_epoch = None
        self.reached_seconds = None
        self.diverged = False

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not math.isfinite(float(logs.get("loss", 0.0))):
            self.diverged = True
            self.model.stop_training = True
        elif logs.get("val_accuracy", 0.0) >= self.target:
            self.reached_epoch = epoch + 1
            self.reached_seconds = time.perf_counter() - self.start
            self.model.stop_training = True


def train_once(problem: str, optimizer: str, seed: int, epochs: int) -> dict:
    """One run of ``optimizer`` on ``problem`` until the target or ``epochs``."""
    name, build, target, batch = PROBLEMS[problem]
    data = load_dataset(name, seed=0)
    keras.utils.set_random_seed(seed)
    model = build(data)
    model.compile(optimizer=optimizers()[optimizer][2](seed), loss=LOSS, metrics=["accuracy"])
    stop = _Stop(target)
    history = model.fit(
        data.x_train,
        data.y_train,
        batch_size=batch,
        epochs=epochs,
        validation_data=(data.x_test, data.y_test),
        callbacks=[stop],
        verbose=0,
    )
    accs = [float(a) for a in history.history["val_accuracy"]]
    return {
        "seed": seed,
        "reached_epoch": stop.reached_epoch,
        "reached_seconds": stop.reached_seconds,
        "diverged": stop.diverged,
        "epochs_run": len(accs),
        "best_test_accuracy": max(accs) if accs else float("nan"),
        "final_loss": float(history.history["loss"][-1]),
    }


def _summary(runs: list[dict]) -> dict:
    reached = [r for r in runs if r["reached_epoch"] is not None]
    out = {
        "reached": len(reached),
        "seeds": len(runs),
        "diverged": sum(r["diverged"] for r in runs),
        "best_test_accuracy_mean": float(np.mean([r["best_test_accuracy"] for r in runs])),
        "best_test_accuracy_std": float(np.std([r["best_test_accuracy"] for r in runs])),
    }
    for key in ("reached_epoch", "reached_seconds"):
        values = [r[key] for r in reached]
        out[f"{key}_mean"] = float(np.mean(values)) if values else None
        out[f"{key}_std"] = float(np.std(values)) if values else None
    return out


def time_to_target(
    problems=("digits_cnn", "mnist1d_mlp"),
    names=None,
    *,
    seeds: int = 3,
    epochs: int = 20,
    cnn_epochs: int = 20,
    cnn_optimizers=("adam", "csn_gn"),
    log=print,
) -> dict:
    """Epochs and seconds to each problem's target, per optimizer (mean ± std over seeds)."""
    table = optimizers()
    names = list(names or table)
    plan = [(p, n, epochs, seeds) for p in problems for n in names]
    plan += [("mnist1d_cnn", n, cnn_epochs, 1) for n in cnn_optimizers]
    out = {}
    for problem, name, budget, count in plan:
        runs = [train_once(problem, name, seed, budget) for seed in range(count)]
        summary = _summary(runs)
        entry = out.setdefault(
            problem,
            {"target": PROBLEMS[problem][2], "epochs": budget, "batch": PROBLEMS[problem][3]},
        )
        entry[name] = {"description": table[name][0], "runs": runs, **summary}
        when = (
            f"{summary['reached_epoch_mean']:.1f} epochs, {summary['reached_seconds_mean']:.1f} s"
            if summary["reached"]
            else "not reached"
        )
        log(
            f"  {problem} {name}: {summary['reached']}/{count} reached "
            f"{PROBLEMS[problem][2]:.0%} ({when}); best acc "
            f"{summary['best_test_accuracy_mean']:.3f}, diverged {summary['diverged']}"
        )
    return out


def _crossover(sgd: list[float], csn: list[float]) -> int | None:
    """First epoch (1-based) from which SGD's loss stays below CSN's; None if never.

    A non-finite CSN loss counts as above SGD's.
    """
    below = [math.isfinite(s) and (not math.isfinite(c) or s < c) for s, c in zip(sgd, csn)]
    for start in range(len(below)):
        if all(below[start:]):
            return start + 1
    return None


def batch_size_study(
    batch_sizes=(64, 256, 1000, 4000), *, epochs: int = 15, seed: int = 0, log=print
) -> dict:
    """Fig. 2 of the paper on MNIST-1D (MLP): training loss per epoch across batch sizes.

    SGD and the paper's CSN use the paper's Fig. 2 setting (lr 1e-2, momentum 0.9 as in
    its Appendix D); the calibrated CSN uses the ``csn-gn`` preset.
    """
    data = load_dataset("mnist1d", seed=0)
    variants = {
        "sgd": lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
        "csn_paper": lambda: ClassSubspaceNewton(1e-2, gamma=0.9, momentum=0.9),
        "csn_gn": lambda: ClassSubspaceNewton(
            0.2, gamma=0.9, curvature="gauss_newton", damping=1.0
        ),
    }
    out = {"epochs": epochs, "learning_rate": 1e-2, "model": "mnist1d_mlp", "runs": {}}
    for batch in batch_sizes:
        batch = min(batch, len(data.x_train))
        losses = {}
        for name, make in variants.items():

            def fit(make=make, batch=batch):
                keras.utils.set_random_seed(seed)
                model = mlp(data.input_shape, data.num_classes)
                model.compile(optimizer=make(), loss=LOSS)
                return model.fit(
                    data.x_train, data.y_train, batch_size=batch, epochs=epochs, verbose=0
                )

            losses[name] = [float(v) for v in fit().history["loss"]]
        row = {
            "loss": losses,
            "crossover_paper": _crossover(losses["sgd"], losses["csn_paper"]),
            "crossover_gn": _crossover(losses["sgd"], losses["csn_gn"]),
        }
        out["runs"][str(batch)] = row
        log(
            f"  batch {batch}: final loss SGD {losses['sgd'][-1]:.3f}, CSN paper "
            f"{losses['csn_paper'][-1]:.3g}, CSN GN {losses['csn_gn'][-1]:.3f}; crossover "
            f"(SGD below for good from epoch) paper {row['crossover_paper']}, "
            f"GN {row['crossover_gn']}"
        )
    return out


class _Calibration(keras.callbacks.Callback):
    """Every ``every`` steps: lambda_k, v_k^T G v_k on the probe, and the assignment cosine."""

    def __init__(self, probe, every: int):
        super().__init__()
        self.probe = probe
        self.every = every
        self.rows = []
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every and self.step != 1:
            return
        opt = self.model.optimizer
        row = {"step": self.step, "loss": float((logs or {}).get("loss", float("nan")))}
        lam = opt.curvature.numpy().astype(np.float64)
        directions = opt.class_directions()
        row["lambda"] = lam.tolist()
        if not (np.all(np.isfinite(lam)) and bool(tf.reduce_all(tf.math.is_finite(directions)))):
            row["finite"] = False
            self.rows.append(row)
            return
        row["finite"] = True
        x, y = self.probe
        ggn = GGNOperator(self.model, LOSS, x, y)
        gv = ggn.matmat(tf.transpose(tf.cast(directions, ggn.dtype))).numpy()
        quotient = np.sum(directions.numpy().T.astype(np.float64) * gv, axis=0)
        row["gn_quotient"] = quotient.tolist()
        try:
            hessian = HessianOperator(self.model, LOSS, x, y)
            _, vecs = top_eigenpairs(hessian, len(lam), tol=1e-3, seed=0)
            row["assignment_cosine"] = best_assignment(
                cosine_matrix(directions.numpy(), np.asarray(vecs).T)
            ).mean_cosine
        except ValueError:
            row["assignment_cosine"] = float("nan")
        self.rows.append(row)


def calibration(
    variants=("csn_paper", "csn_gn"),
    *,
    epochs: int = 2,
    every: int = 5,
    probe: int = 256,
    seed: int = 0,
    log=print,
) -> dict:
    """lambda_k against the Gauss–Newton quotient over training, on digits with ``small_cnn``."""
    data = load_dataset("digits", seed=0)
    table = optimizers()
    out = {"problem": "digits_cnn", "probe": probe, "every": every, "runs": {}}
    for name in variants:

        def fit(name=name):
            keras.utils.set_random_seed(seed)
            model = small_cnn(data.input_shape, data.num_classes)
            model.compile(optimizer=table[name][2](seed), loss=LOSS)
            callback = _Calibration((data.x_test[:probe], data.y_test[:probe]), every)
            model.fit(
                data.x_train,
                data.y_train,
                batch_size=32,
                epochs=epochs,
                verbose=0,
                callbacks=[callback],
            )
            return callback.rows

        rows = fit()
        out["runs"][name] = rows
        ratios = [
            np.median(np.asarray(r["lambda"]) / np.asarray(r["gn_quotient"]))
            for r in rows
            if r["finite"]
        ]
        log(
            f"  calibration {name}: {len(rows)} records, median lambda/GN quotient "
            f"first {ratios[0] if ratios else float('nan'):.3g}, last "
            f"{ratios[-1] if ratios else float('nan'):.3g}, non-finite records "
            f"{sum(not r['finite'] for r in rows)}"
        )
    return out
