"""K-FAC benchmarks: step cost relative to SGD, tuned convergence, time to a tuned baseline.

Run: ``PYTHONPATH=. python -m benchmarks.kfac [--quick] [--sections cost convergence target]``.
Prints a summary and writes ``benchmarks/results/kfac.json``; ``docs/kfac.md`` quotes it.

* ``cost``: seconds per step of ``KFAC()`` at its default update periods over SGD's (and
  Adam's), amortized over epochs of 20 steps (two eigendecompositions each), the fastest
  of several interleaved epochs after a warm-up epoch (tracing), on the small CNN of
  :mod:`benchmarks.optimizer_cost` (also with every patch in the convolutions' input
  factors, ``max_patches_per_example=None``) and the digits MLP 64-64-10 tanh, batch 128;
  wall clock and this process's CPU time.
* ``convergence``: the digits MLP 64-64-10 tanh, batch 128, 24 steps: the training loss
  at the end of each optimizer's best learning rate on a log-spaced grid.
* ``target``: per problem (digits CNN, MNIST-1D MLP and CNN, a deep autoencoder on
  digits), each optimizer's best learning rate on a grid; the target is 1.1 x the best
  training loss a tuned baseline (Adam, SGD-momentum) reaches in ``epochs`` epochs, and
  each optimizer reports the epochs and the seconds (epochs x its steady seconds per
  epoch, tracing excluded) it needs to reach it.
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

from benchmarks.optimizer_cost import compiled, small_cnn, step_times  # noqa: E402
from keras_curv import models  # noqa: E402
from keras_curv.data import load_dataset  # noqa: E402
from keras_curv.optimizers import KFAC  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def grid(low: float, high: float, per_decade: int = 2) -> list[float]:
    """Log-spaced learning rates from ``10**low`` to ``10**high``."""
    count = int(round((high - low) * per_decade)) + 1
    return [float(f"{v:.3g}") for v in np.logspace(low, high, count)]


OPTIMIZERS: dict[str, Callable[[float], keras.optimizers.Optimizer]] = {
    "sgd_momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
    "adam": lambda lr: keras.optimizers.Adam(lr),
    "kfac": lambda lr: KFAC(lr, seed=0),
}
GRIDS = {"sgd_momentum": grid(-2, 0.5), "adam": grid(-3.5, -1), "kfac": grid(-1.5, 0.5)}
QUICK_GRIDS = {"sgd_momentum": grid(-1.5, -0.5), "adam": grid(-3, -2), "kfac": grid(-1, 0)}


def digits_mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return models.mlp((8, 8, 1), 10, activation="tanh")


def autoencoder(seed: int = 0) -> keras.Model:
    """64-128-64-16-64-128-64 tanh, linear output: a scaled-down Hinton-Salakhutdinov net."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((64,))]
    layers += [keras.layers.Dense(w, activation="tanh") for w in (128, 64, 16, 64, 128)]
    return keras.Sequential([*layers, keras.layers.Dense(64)], name="autoencoder")


# ------------------------------------------------------------------------ cost


def run_cost(steps: int = 20, repeats: int = 5) -> dict:
    """Seconds per step and ratios to SGD and Adam of ``KFAC()`` at its defaults."""
    rng = np.random.RandomState(0)
    problems = {
        "small_cnn": (small_cnn, rng.rand(128 * steps, 28, 28, 1).astype("float32")),
        "digits_mlp_tanh": (digits_mlp, rng.rand(128 * steps, 8, 8, 1).astype("float32")),
    }
    out = {}
    for name, (build, x) in problems.items():
        y = rng.randint(0, 10, len(x))
        variants = {
            "sgd": lambda: keras.optimizers.SGD(0.01, momentum=0.9),
            "adam": lambda: keras.optimizers.Adam(1e-3),
            "kfac": lambda: KFAC(),
            "kfac_curvature_every_5": lambda: KFAC(curvature_update_every=5),
        }
        if name == "small_cnn":
            variants["kfac_every_patch"] = lambda: KFAC(max_patches_per_example=None)
        fitted = {
            k: compiled(build, make, x, y, batch_size=128, jit_compile=False)
            for k, make in variants.items()
        }
        cpu: dict = {}
        seconds = step_times(fitted, x, y, batch_size=128, repeats=repeats, cpu=cpu)
        out[name] = {
            "s_per_step": seconds,
            "cpu_s_per_step": cpu,
            **{f"{k}_over_sgd": seconds[k] / seconds["sgd"] for k in variants if k != "sgd"},
            "kfac_over_adam": seconds["kfac"] / seconds["adam"],
            "cpu_kfac_over_sgd": cpu["kfac"] / cpu["sgd"],
            "cpu_kfac_over_adam": cpu["kfac"] / cpu["adam"],
        }
    return {"batch_size": 128, "steps_per_epoch": steps, "repeats": repeats, "problems": out}


# ----------------------------------------------------------------- convergence


def run_convergence(grids: dict, steps: int = 24, seeds: int = 1) -> dict:
    """Final training loss of the digits MLP after ``steps`` steps, per optimizer and lr."""
    data = load_dataset("digits", seed=0)
    x, y = data.x_train, data.y_train
    batch = 128
    rows = {}
    for name, lrs in grids.items():
        rows[name] = {}
        for lr in lrs:
            finals = []
            for seed in range(seeds):
                model = digits_mlp(seed)
                model.compile(optimizer=OPTIMIZERS[name](lr), loss=SCCE)
                order = np.random.default_rng(seed).permutation(len(x))
                idx = np.resize(order, steps * batch)  # exactly `steps` full batches
                model.fit(x[idx], y[idx], batch_size=batch, epochs=1, shuffle=False, verbose=0)
                loss = float(model.evaluate(x, y, batch_size=512, verbose=0))
                finals.append(loss if np.isfinite(loss) else float("inf"))
            rows[name][str(lr)] = float(np.mean(finals))
    best = {name: min(r.items(), key=lambda kv: kv[1]) for name, r in rows.items()}
    return {
        "model": "mlp 64-64-10 tanh on digits",
        "batch_size": batch,
        "steps": steps,
        "seeds": seeds,
        "final_loss": rows,
        "best": {name: {"lr": float(lr), "loss": loss} for name, (lr, loss) in best.items()},
    }


# --------------------------------------------------------------------- target


class _EpochClock(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def _problems() -> dict:
    digits = load_dataset("digits", seed=0)
    mnist1d = load_dataset("mnist1d", seed=0)
    flat = digits.x_train.reshape(len(digits.x_train), -1)
    return {
        "digits_cnn": (lambda: models.small_cnn((8, 8, 1), 10), digits.x_train, digits.y_train,
                       SCCE),
        "mnist1d_mlp": (lambda: models.mlp((40, 1), 10), mnist1d.x_train, mnist1d.y_train, SCCE),
        "mnist1d_cnn": (lambda: models.small_cnn((40, 1), 10), mnist1d.x_train,
                        mnist1d.y_train, SCCE),
        "digits_autoencoder": (lambda: autoencoder(), flat, flat, "mse"),
    }  # fmt: skip


def _curve(problem, name: str, lr: float, epochs: int, seed: int) -> dict:
    build, x, y, loss = problem
    keras.utils.set_random_seed(seed)
    model = build()
    model.compile(optimizer=OPTIMIZERS[name](lr), loss=loss)
    clock = _EpochClock()
    history = model.fit(x, y, batch_size=128, epochs=epochs, verbose=0, callbacks=[clock])
    losses = [v if np.isfinite(v) else float("inf") for v in history.history["loss"]]
    steady = float(np.median(clock.seconds[1:])) if epochs > 1 else clock.seconds[0]
    return {"loss": losses, "s_per_epoch": steady}


def run_target(grids: dict, epochs: int = 10, seeds: int = 1) -> dict:
    """Epochs and seconds each tuned optimizer needs to reach 1.1 x the best baseline's loss."""
    out = {}
    for problem_name, problem in _problems().items():
        curves = {
            name: {
                str(lr): [_curve(problem, name, lr, epochs, s) for s in range(seeds)] for lr in lrs
            }
            for name, lrs in grids.items()
        }
        mean = {
            name: {lr: np.mean([c["loss"] for c in runs], axis=0) for lr, runs in by_lr.items()}
            for name, by_lr in curves.items()
        }
        baseline = min(
            float(np.min(c)) for name in ("adam", "sgd_momentum") for c in mean[name].values()
        )
        target = 1.1 * baseline
        rows = {}
        for name, by_lr in mean.items():
            best = None
            for lr, curve in by_lr.items():
                hit = np.flatnonzero(curve <= target)
                epochs_needed = int(hit[0]) + 1 if hit.size else None
                per_epoch = float(np.mean([c["s_per_epoch"] for c in curves[name][lr]]))
                key = (epochs_needed is None, epochs_needed or 0, float(curve[-1]))
                if best is None or key < best[0]:
                    best = (key, lr, epochs_needed, per_epoch, float(curve[-1]))
            _, lr, epochs_needed, per_epoch, final = best
            rows[name] = {
                "lr": float(lr),
                "epochs_to_target": epochs_needed,
                "seconds_to_target": None if epochs_needed is None else epochs_needed * per_epoch,
                "s_per_epoch": per_epoch,
                "final_loss": final,
            }
        out[problem_name] = {"target_loss": target, "optimizers": rows}
    return {"epochs": epochs, "seeds": seeds, "batch_size": 128, "problems": out}


# ----------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grids, few repeats")
    parser.add_argument("--sections", nargs="+", default=["cost", "convergence", "target"],
                        choices=["cost", "convergence", "target"])  # fmt: skip
    parser.add_argument(
        "--grid",
        choices=["full", "small"],
        default=None,
        help="learning-rate grids (default: small with --quick, else full)",
    )
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the target section")
    parser.add_argument("--out", default=str(RESULTS / "kfac.json"))
    args = parser.parse_args(argv)
    small = args.grid == "small" or (args.grid is None and args.quick)
    grids = QUICK_GRIDS if small else GRIDS
    report: dict = {
        "machine": f"{platform.platform()}, {os.cpu_count()} CPU cores",
        "devices": [d.device_type for d in tf.config.list_physical_devices()],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "quick": args.quick,
        "grids": grids,
    }
    if "cost" in args.sections:
        report["cost"] = run_cost(steps=10 if args.quick else 20, repeats=2 if args.quick else 5)
        for name, row in report["cost"]["problems"].items():
            every_patch = row.get("kfac_every_patch_over_sgd")
            extra = "" if every_patch is None else f", every patch / SGD {every_patch:.2f}"
            print(f"cost {name}: KFAC/SGD {row['kfac_over_sgd']:.2f} "
                  f"(CPU {row['cpu_kfac_over_sgd']:.2f}), KFAC/Adam {row['kfac_over_adam']:.2f} "
                  f"(CPU {row['cpu_kfac_over_adam']:.2f}), curvature every 5 / SGD "
                  f"{row['kfac_curvature_every_5_over_sgd']:.2f}{extra}")  # fmt: skip
    if "convergence" in args.sections:
        report["convergence"] = run_convergence(grids, seeds=args.seeds)
        for name, row in report["convergence"]["best"].items():
            print(f"convergence {name}: best lr {row['lr']:g} -> loss {row['loss']:.4f}")
    if "target" in args.sections:
        epochs = 2 if args.quick else args.epochs
        report["target"] = run_target(grids, epochs=epochs, seeds=args.seeds)
        for problem, entry in report["target"]["problems"].items():
            for name, row in entry["optimizers"].items():
                print(f"target {problem} ({entry['target_loss']:.4f}) {name}: "
                      f"lr {row['lr']:g}, epochs {row['epochs_to_target']}, "
                      f"s {row['seconds_to_target']}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
