"""Sophia against Adam: step cost, and training with tuned learning rates.

Run: ``python -m benchmarks.sophia [--quick]``. Prints the numbers and writes
``benchmarks/results/sophia.json`` (``docs/sophia.md`` records them).

* :func:`step_cost`: Sophia-H and Sophia-G step time over Adam's at ``update_every`` 1
  and 10, the compiled train steps called interleaved in one process (median over
  rounds of the per-round ratio), on the digits MLP (64-64-10, batch 32) and on the cost
  benchmark's small CNN (28x28x1, batch 128).
* :func:`digits_mlp`: the digits MLP for ``epochs`` epochs at every learning rate of a
  log-spaced grid (DeepOBS protocol), then the best rate of each optimizer (lowest final
  training loss) rerun with several seeds: final training loss and test accuracy.
* :func:`time_to_target`: epochs and seconds until the test accuracy first reaches the
  target of the training benchmarks' problems (digits CNN, MNIST-1D MLP and CNN), each
  optimizer at its best rate on the grid (fewest epochs to the target, one seed), then
  rerun with several seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import optimizer_cost, training  # noqa: E402
from keras_curv import Sophia, models  # noqa: E402
from keras_curv.data import load_dataset  # noqa: E402

OPTIMIZERS = {
    "adam": lambda lr, seed: keras.optimizers.Adam(lr),
    "sophia_h": lambda lr, seed: Sophia(lr, seed=seed),
    "sophia_g": lambda lr, seed: Sophia(lr, estimator="gauss_newton_bartlett", seed=seed),
}
GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


# ------------------------------------------------------------------ step cost


def _stepper(build, make_optimizer, x, y, batch: int):
    """One compiled train step of a fresh model (traced and warmed up), as a callable."""
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(optimizer=make_optimizer(), loss=training.LOSS)
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)  # traces
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)
    iterator = iter(batches.repeat())
    function = model.make_train_function() or model.train_function
    return lambda: function(iterator)


def interleaved_ratios(steppers: dict, *, steps: int, rounds: int) -> dict:
    """Per variant: median over rounds of (its time for ``steps`` steps) / Adam's.

    Every round times each variant once, one after the other (starting with a different
    one each round), so that load from other processes hits neighbours alike; the median
    over rounds discards the disturbed ones.
    The train function is called directly (no ``fit`` overhead per epoch).
    """
    times = {name: [] for name in steppers}
    names = list(steppers)
    for round_ in range(rounds):
        # A different variant goes first in each round (the first one pays for waking up).
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            step = steppers[name]
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - start) / steps)
    adam = np.asarray(times["adam"])
    return {
        "adam_ms_per_step": 1e3 * float(np.median(adam)),
        "ratio_to_adam": {
            name: float(np.median(np.asarray(t) / adam))
            for name, t in times.items()
            if name != "adam"
        },
    }


def step_cost(*, steps: int = 20, rounds: int = 15, log=print) -> dict:
    """Sophia's step time over Adam's, per model, estimator and ``update_every``."""
    problems = {
        "digits_mlp": (lambda: models.mlp((8, 8, 1), 10), (8, 8, 1), 32),
        "small_cnn": (optimizer_cost.small_cnn, (28, 28, 1), 128),
    }
    out = {}
    for problem, (build, shape, batch) in problems.items():
        rng = np.random.RandomState(0)
        x = rng.rand(batch * 10, *shape).astype("float32")
        y = rng.randint(0, 10, batch * 10)
        variants = {
            "adam": lambda: keras.optimizers.Adam(1e-3),
            # For scale: Sophia's default weight decay on Adam.
            "adamw": lambda: keras.optimizers.AdamW(1e-3, weight_decay=0.1),
        }
        for estimator, short in (("hutchinson", "h"), ("gauss_newton_bartlett", "g")):
            for every in (1, 10):
                variants[f"sophia_{short}_every_{every}"] = lambda e=estimator, k=every: Sophia(
                    1e-3, estimator=e, update_every=k, seed=0
                )
        steppers = {name: _stepper(build, make, x, y, batch) for name, make in variants.items()}
        out[problem] = {
            "batch_size": batch,
            "steps_per_round": steps,
            "rounds": rounds,
            **interleaved_ratios(steppers, steps=steps, rounds=rounds),
        }
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in out[problem]["ratio_to_adam"].items())
        log(
            f"  step cost {problem} (Adam {out[problem]['adam_ms_per_step']:.2f} ms/step): {ratios}"
        )
    return out


# ------------------------------------------------------------------ training


def _fit(problem: str, optimizer: str, lr: float, seed: int, epochs: int, target=None) -> dict:
    """One run; with ``target``, stops when the test accuracy first reaches it."""
    dataset, build, _, batch = training.PROBLEMS[problem]
    data = load_dataset(dataset, seed=0)
    keras.utils.set_random_seed(seed)
    model = build(data)
    model.compile(
        optimizer=OPTIMIZERS[optimizer](lr, seed), loss=training.LOSS, metrics=["accuracy"]
    )
    stop = training._Stop(target if target is not None else 2.0)
    history, accs, seconds = training._fit_with_test(model, data, batch, epochs, [stop])
    loss = float(history.history["loss"][-1])
    return {
        "learning_rate": lr,
        "seed": seed,
        "final_loss": loss if np.isfinite(loss) else float("inf"),
        "final_test_accuracy": accs[-1] if accs else float("nan"),
        "best_test_accuracy": max(accs) if accs else float("nan"),
        "reached_epoch": stop.reached_epoch,
        "reached_seconds": stop.reached_seconds,
        "diverged": stop.diverged,
        "epochs_run": len(accs),
        "seconds": seconds,
    }


def _grid(problem, optimizer, grid, epochs, target, log) -> list[dict]:
    rows = [_fit(problem, optimizer, lr, 0, epochs, target) for lr in grid]
    summary = ", ".join(
        f"{r['learning_rate']:g}: loss {r['final_loss']:.3g} acc {r['best_test_accuracy']:.3f}"
        + (f" @{r['reached_epoch']}" if r["reached_epoch"] else "")
        for r in rows
    )
    log(f"  grid {problem} {optimizer}: {summary}")
    return rows


def digits_mlp(*, grid=GRID, epochs: int = 20, seeds: int = 3, log=print) -> dict:
    """Final training loss and test accuracy of the digits MLP, tuned rate, several seeds."""
    training.PROBLEMS.setdefault(
        "digits_mlp",
        ("digits", lambda d: models.mlp(d.input_shape, d.num_classes), 0.95, 32),
    )
    out = {"epochs": epochs, "grid": list(grid), "batch": 32}
    for name in OPTIMIZERS:
        rows = _grid("digits_mlp", name, grid, epochs, None, log)
        best = min(rows, key=lambda r: r["final_loss"])["learning_rate"]
        runs = [_fit("digits_mlp", name, best, seed, epochs) for seed in range(seeds)]
        out[name] = {
            "grid": rows,
            "best_learning_rate": best,
            "runs": runs,
            **{
                f"{key}_{stat}": float(getattr(np, stat)([r[key] for r in runs]))
                for key in ("final_loss", "final_test_accuracy", "best_test_accuracy")
                for stat in ("mean", "std")
            },
        }
        entry = out[name]
        log(
            f"  digits MLP {name} at lr {best:g} ({seeds} seeds): final loss "
            f"{entry['final_loss_mean']:.4f} ± {entry['final_loss_std']:.4f}, test accuracy "
            f"{entry['final_test_accuracy_mean']:.3f} ± {entry['final_test_accuracy_std']:.3f} "
            f"(best epoch {entry['best_test_accuracy_mean']:.3f})"
        )
    return out


def _fastest(rows: list[dict]) -> float:
    reached = [r for r in rows if r["reached_epoch"] is not None]
    if reached:
        return min(reached, key=lambda r: (r["reached_epoch"], -r["best_test_accuracy"]))[
            "learning_rate"
        ]
    return max(rows, key=lambda r: r["best_test_accuracy"])["learning_rate"]


def time_to_target(
    problems=("digits_cnn", "mnist1d_mlp", "mnist1d_cnn"),
    *,
    grid=GRID,
    epochs: int = 20,
    seeds: int = 3,
    log=print,
) -> dict:
    """Epochs and seconds to each problem's target at each optimizer's tuned rate."""
    out = {}
    for problem in problems:
        target = training.PROBLEMS[problem][2]
        entry = out[problem] = {"target": target, "epochs": epochs, "grid": list(grid)}
        for name in OPTIMIZERS:
            rows = _grid(problem, name, grid, epochs, target, log)
            best = _fastest(rows)
            runs = [rows[list(grid).index(best)]] + [
                _fit(problem, name, best, seed, epochs, target) for seed in range(1, seeds)
            ]
            summary = training._summary(runs)
            entry[name] = {"grid": rows, "best_learning_rate": best, "runs": runs, **summary}
            when = (
                f"{summary['reached_epoch_mean']:.1f} ± {summary['reached_epoch_std']:.1f} "
                f"epochs, {summary['reached_seconds_mean']:.1f} s"
                if summary["reached"]
                else "not reached"
            )
            log(
                f"  {problem} {name} at lr {best:g}: {summary['reached']}/{seeds} reached "
                f"{target:.0%} ({when}); best accuracy {summary['best_test_accuracy_mean']:.3f}"
            )
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one seed, short runs")
    parser.add_argument("--only", choices=("cost", "digits_mlp", "time_to_target"), action="append")
    args = parser.parse_args(argv)
    parts = args.only or ["cost", "digits_mlp", "time_to_target"]
    quick = args.quick
    report = {"machine": _machine(), "quick": quick}
    if "cost" in parts:
        report["step_cost"] = step_cost(steps=10 if quick else 20, rounds=5 if quick else 15)
    if "digits_mlp" in parts:
        report["digits_mlp"] = digits_mlp(epochs=3 if quick else 20, seeds=1 if quick else 3)
    if "time_to_target" in parts:
        report["time_to_target"] = time_to_target(
            ("digits_cnn",) if quick else ("digits_cnn", "mnist1d_mlp", "mnist1d_cnn"),
            epochs=3 if quick else 20,
            seeds=1 if quick else 3,
        )
    path = optimizer_cost.RESULTS / ("sophia_quick.json" if quick else "sophia.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.only and path.exists():  # keep the parts not rerun
        report = {**json.loads(path.read_text()), **report}
    path.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
