"""Training benchmarks: time to a target accuracy, the batch-size study, lambda calibration.

Four parts, all on CPU-sized problems:

* :func:`reference_check`: the MNIST-1D models (logistic regression, the 40-100-100-10
  MLP, the reference 1-D CNN) trained with the dataset authors' recipe (Adam, lr 1e-2,
  batch 100, 6000 steps), against their published test accuracies (~32 %, ~68 %, ~94 %).
* :func:`time_to_target`: epochs and wall time until the test accuracy first reaches a
  target, per optimizer and seed, on digits (``small_cnn``) and on MNIST-1D (logistic
  regression, MLP; the 1-D CNN with fewer optimizers). The optimizers are the command
  line's presets (``keras_curv.cli``) plus plain SGD and the exact-inverse calibrated CSN.
* :func:`batch_size_study`: the class-subspace paper's Fig. 2 on MNIST-1D: training loss
  per epoch of SGD and CSN (paper defaults and calibrated) for batch sizes up to the full
  batch, the crossover epoch after which SGD's loss stays below CSN's, and the crossover
  batch size from which CSN's final loss beats SGD's.
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


def logreg(input_shape, num_classes) -> keras.Model:
    """Multinomial logistic regression: Flatten - Dense(C) logits."""
    return keras.Sequential(
        [keras.Input(input_shape), keras.layers.Flatten(), keras.layers.Dense(num_classes)],
        name="logreg",
    )


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


def conv1d(input_shape, num_classes, channels: int = 25) -> keras.Model:
    """The MNIST-1D reference 1-D CNN: three ReLU convolutions, stride 2, then Dense(C).

    Kernel sizes 5, 3, 3, each convolution padded by one sample on both sides, so a
    length-40 signal shrinks to 19, 10 and 5 positions (125 features for 25 channels).
    """
    layers = [keras.Input(input_shape)]
    for kernel in (5, 3, 3):
        layers += [
            keras.layers.ZeroPadding1D(1),
            keras.layers.Conv1D(channels, kernel, strides=2, activation="relu"),
        ]
    layers += [keras.layers.Flatten(), keras.layers.Dense(num_classes)]
    return keras.Sequential(layers, name="conv1d")


# problem -> (dataset, model builder, target test accuracy, batch size)
PROBLEMS = {
    "digits_cnn": ("digits", lambda d: small_cnn(d.input_shape, d.num_classes), 0.95, 32),
    "mnist1d_logreg": ("mnist1d", lambda d: logreg(d.input_shape, d.num_classes), 0.28, 100),
    "mnist1d_mlp": ("mnist1d", lambda d: mlp(d.input_shape, d.num_classes), 0.60, 100),
    "mnist1d_cnn": ("mnist1d", lambda d: conv1d(d.input_shape, d.num_classes), 0.85, 100),
}

# Test accuracies published with MNIST-1D (default generator arguments: 4000 train /
# 1000 test; Adam, lr 1e-2, batch 100, 6000 steps).
PUBLISHED = {"mnist1d_logreg": 0.32, "mnist1d_mlp": 0.68, "mnist1d_cnn": 0.94}


def _fit_with_test(model, data, batch: int, epochs: int, callbacks=()):
    """``model.fit`` on the training split, scored on the test split after every epoch.

    Returns the history, the test accuracy per epoch and the wall time of the fit.
    """
    start = time.perf_counter()
    history = model.fit(
        data.x_train,
        data.y_train,
        batch_size=batch,
        epochs=epochs,
        validation_data=(data.x_test, data.y_test),
        callbacks=list(callbacks),
        verbose=0,
    )
    seconds = time.perf_counter() - start
    return history, [float(a) for a in history.history["val_accuracy"]], seconds


def reference_check(
    problems=tuple(PUBLISHED), *, steps: int = 6000, batch: int = 100, seed: int = 0, log=print
) -> dict:
    """Trains each MNIST-1D model as the dataset's authors did and compares with ``PUBLISHED``.

    Adam with learning rate 1e-2 for ``steps`` steps of ``batch`` samples; the test
    accuracy is recorded after every epoch. Reports the final and the best test accuracy.
    """
    data = load_dataset("mnist1d", seed=0)
    epochs = max(1, round(steps * batch / len(data.x_train)))
    out = {"steps": steps, "batch": batch, "epochs": epochs, "learning_rate": 1e-2, "rows": {}}
    for problem in problems:
        keras.utils.set_random_seed(seed)
        model = PROBLEMS[problem][1](data)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS, metrics=["accuracy"])
        _, accs, seconds = _fit_with_test(model, data, batch, epochs)
        row = {
            "published": PUBLISHED.get(problem),
            "final_test_accuracy": accs[-1],
            "best_test_accuracy": max(accs),
            "test_accuracy": accs,
            "params": model.count_params(),
            "seconds": seconds,
        }
        out["rows"][problem] = row
        log(
            f"  reference {problem} ({row['params']} params): Adam final {accs[-1]:.3f}, "
            f"best {max(accs):.3f}, published {_pct(row['published'])} "
            f"({row['seconds']:.0f} s)"
        )
    return out


def _pct(value) -> str:
    return "–" if value is None else f"{value:.0%}"


# A cross-entropy this large (initially log C, about 2.3) means the run has diverged.
DIVERGED_LOSS = 1e4


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

    def on_train_batch_end(self, batch, logs=None):
        # A diverged run stops at once: its remaining epochs would add up to half a minute
        # per run to the suite. The optimizers skip non-finite steps, so a diverged loss
        # can also stay finite but huge.
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss) or loss > DIVERGED_LOSS:
            self.diverged = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        loss = float(logs.get("loss", 0.0))
        if self.diverged or not math.isfinite(loss) or loss > DIVERGED_LOSS:
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
    history, accs, seconds = _fit_with_test(model, data, batch, epochs, [stop])
    return {
        "seed": seed,
        "reached_epoch": stop.reached_epoch,
        "reached_seconds": stop.reached_seconds,
        "diverged": stop.diverged,
        "epochs_run": len(accs),
        "seconds": seconds,
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
    problems=("digits_cnn", "mnist1d_logreg", "mnist1d_mlp"),
    names=None,
    *,
    seeds: int = 3,
    epochs: int | dict = 20,
    cnn_epochs: int = 20,
    cnn_optimizers=("sgd_momentum", "adam", "csn_gn"),
    cnn_seeds: int = 3,
    log=print,
) -> dict:
    """Epochs and seconds to each problem's target, per optimizer (mean ± std over seeds).

    Every optimizer of ``names`` (default: all of :func:`optimizers`) runs ``seeds`` times
    on each of ``problems``, for at most ``epochs`` epochs (an int, or a dict problem ->
    epochs); the MNIST-1D CNN runs only ``cnn_optimizers``, ``cnn_seeds`` times each.
    """
    table = optimizers()
    names = list(names or table)

    def budget(problem):
        return epochs.get(problem, 20) if isinstance(epochs, dict) else epochs

    plan = [(p, n, budget(p), seeds) for p in problems for n in names]
    plan += [("mnist1d_cnn", n, cnn_epochs, cnn_seeds) for n in cnn_optimizers]
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
    for name in ("csn_paper", "csn_gn"):
        out[f"batch_crossover_{name}"] = _batch_crossover(out["runs"], name)
    log(
        "  smallest batch from which CSN's final loss beats SGD's at every larger batch: "
        f"paper {out['batch_crossover_csn_paper']}, GN {out['batch_crossover_csn_gn']}"
    )
    return out


def _batch_crossover(runs: dict, name: str) -> int | None:
    """Smallest batch size from which ``name``'s final loss is below SGD's at every larger one.

    ``runs`` maps batch size (as a string) to rows with final losses; None if CSN does not
    beat SGD even at the largest batch.
    """
    batches = sorted(runs, key=int)
    ahead = [
        math.isfinite(runs[b]["loss"][name][-1])
        and runs[b]["loss"][name][-1] < runs[b]["loss"]["sgd"][-1]
        for b in batches
    ]
    crossover = None
    for batch, good in zip(reversed(batches), reversed(ahead)):
        if not good:
            break
        crossover = int(batch)
    return crossover


def _median_ratio(row: dict) -> float:
    """Median over k of lambda_k / (v_k^T G v_k), over the k with a positive quotient."""
    lam, quotient = np.asarray(row["lambda"]), np.asarray(row["gn_quotient"])
    keep = quotient > 0
    return float(np.median(lam[keep] / quotient[keep])) if keep.any() else float("nan")


class _Calibration(keras.callbacks.Callback):
    """lambda_k, v_k^T G v_k on the probe and the assignment cosine, step by step.

    Records every one of the first ``dense`` steps (where the paper's variant blows up),
    then every ``every`` steps. After the first non-finite record only every ``every``-th
    step is kept, since nothing changes any more.
    """

    def __init__(self, probe, every: int, dense: int = 0):
        super().__init__()
        self.probe = probe
        self.every = every
        self.dense = dense
        self.rows = []
        self.step = 0

    def _due(self) -> bool:
        broken = any(not r["finite"] for r in self.rows)
        if self.step <= self.dense and not broken:
            return True
        return self.step == 1 or self.step % self.every == 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if not self._due():
            return
        opt = self.model.optimizer
        row = {"step": self.step, "loss": float((logs or {}).get("loss", float("nan")))}
        lam = opt.class_curvatures.numpy().astype(np.float64)
        directions = opt.class_directions()
        row["lambda"] = lam.tolist()
        finite = np.all(np.isfinite(lam)) and math.isfinite(row["loss"])
        if not (finite and bool(tf.reduce_all(tf.math.is_finite(directions)))):
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
    dense: int = 20,
    probe: int = 256,
    seed: int = 0,
    log=print,
) -> dict:
    """lambda_k against the Gauss–Newton quotient over training, on digits with ``small_cnn``.

    Every one of the first ``dense`` steps is recorded, then every ``every`` steps.
    """
    data = load_dataset("digits", seed=0)
    table = optimizers()
    out = {"problem": "digits_cnn", "probe": probe, "every": every, "dense": dense, "runs": {}}
    for name in variants:

        def fit(name=name):
            keras.utils.set_random_seed(seed)
            model = small_cnn(data.input_shape, data.num_classes)
            model.compile(optimizer=table[name][2](seed), loss=LOSS)
            callback = _Calibration((data.x_test[:probe], data.y_test[:probe]), every, dense)
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
        ratios = [_median_ratio(r) for r in rows if r["finite"]]
        log(
            f"  calibration {name}: {len(rows)} records, median lambda/GN quotient "
            f"first {ratios[0] if ratios else float('nan'):.3g}, last "
            f"{ratios[-1] if ratios else float('nan'):.3g}, non-finite records "
            f"{sum(not r['finite'] for r in rows)}"
        )
    return out
