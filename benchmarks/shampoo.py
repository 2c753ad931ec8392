"""Shampoo benchmarks: a Kronecker-structured quadratic, step cost, time to target.

Run: ``python -m benchmarks.shampoo [--quick] [--only quadratic,cost,training]``. Writes
``benchmarks/results/shampoo.json`` (``shampoo_quick.json`` with ``--quick``; sections
not run keep their last results) and prints the numbers recorded in ``docs/shampoo.md``.

* :func:`quadratic`: ``f(W) = ½ tr((W − W*)ᵀ A (W − W*) B)``, whose Hessian is ``B ⊗ A``
  (``B = Σₓ``, ``A = MMᵀ``, each of condition 100 with random eigenvectors: the product
  has condition 1e4 and is not axis-aligned, so a diagonal method cannot capture it).
  Best-of-grid loss after 40 full-gradient steps of Adam and Shampoo over a log-spaced
  learning-rate grid and ``beta_1`` in {0, 0.5, 0.9}.
* :func:`step_cost`: seconds per step of Shampoo against Adam (and SGD) on
  ``keras_curv.models.small_cnn`` on digits, fitted in one process, interleaved: fastest
  epochs, and medians of paired wall-time and CPU-time ratios.
* :func:`time_to_target`: epochs and seconds to the target test accuracy of
  ``benchmarks.training.PROBLEMS`` (digits CNN, MNIST-1D MLP and CNN), Shampoo against
  Adam and SGD-momentum, each tuned on a log-spaced learning-rate grid (seed 0, DeepOBS
  protocol), the best rate rerun with ``seeds`` seeds.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_curv.optimizers import Shampoo  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# ------------------------------------------------------------------ the quadratic


def kronecker_quadratic(m: int = 16, n: int = 12, condition: float = 100.0, seed: int = 0):
    """``(A, B, W*)``: SPD ``A`` (m × m) and ``B`` (n × n), eigenvalues log-spaced over
    ``[1, condition]`` with random eigenvectors, and a target ``W*`` of scale 10."""
    rng = np.random.default_rng(seed)

    def spd(k):
        q, _ = np.linalg.qr(rng.normal(size=(k, k)))
        return (q * np.logspace(0, np.log10(condition), k)) @ q.T

    return spd(m), spd(n), 10.0 * rng.normal(size=(m, n))


def _quadratic_losses(make_optimizer, learning_rates, steps: int, problem) -> list[float]:
    """Final loss per learning rate; one optimizer (one trace), reset between rates."""
    a, b, target = (tf.constant(t) for t in problem)
    w = tf.Variable(tf.zeros_like(target))
    optimizer = make_optimizer()

    def loss():
        error = w - target
        return 0.5 * tf.reduce_sum(error * (a @ error @ b))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value = loss()
        optimizer.apply_gradients([(tape.gradient(value, w), w)])

    optimizer.build([w])
    initial = [v.numpy() for v in optimizer.variables]
    losses = []
    for rate in learning_rates:
        w.assign(tf.zeros_like(target))
        for variable, value in zip(optimizer.variables, initial):
            variable.assign(value)
        optimizer.learning_rate = rate
        for _ in range(steps):
            step()
        final = float(loss())
        losses.append(final if math.isfinite(final) else math.inf)
    return losses


QUADRATIC_RATES = tuple(float(r) for r in np.logspace(-2, 2, 17))
QUADRATIC_OPTIMIZERS = {
    "adam": lambda beta_1: keras.optimizers.Adam(1.0, beta_1=beta_1),
    "shampoo": lambda beta_1: Shampoo(1.0, beta_1=beta_1),
    "shampoo_every_step": lambda beta_1: Shampoo(
        1.0, beta_1=beta_1, precondition_every=1, start_preconditioning_step=1
    ),
}


def quadratic(
    *,
    steps: int = 40,
    learning_rates=QUADRATIC_RATES,
    beta_1s=(0.0, 0.5, 0.7, 0.9),
    names=tuple(QUADRATIC_OPTIMIZERS),
    log=print,
) -> dict:
    """Best-of-grid loss after ``steps`` steps on :func:`kronecker_quadratic`, per optimizer.

    ``shampoo`` is at its default schedule (roots every 10 steps from step 10);
    ``shampoo_every_step`` recomputes them every step from step 1.
    """
    problem = kronecker_quadratic()
    a, b, target = problem
    out = {
        "steps": steps,
        "initial_loss": float(0.5 * np.sum(target * (a @ target @ b))),
        "hessian_condition": float(np.linalg.cond(np.kron(b, a))),
        "learning_rates": [float(r) for r in learning_rates],
        "rows": {},
    }
    for name in names:
        row = {"grid": {}}
        for beta_1 in beta_1s:
            make = functools.partial(QUADRATIC_OPTIMIZERS[name], beta_1)
            losses = _quadratic_losses(make, learning_rates, steps, problem)
            row["grid"][str(beta_1)] = losses
            best = int(np.argmin(losses))
            if losses[best] < row.get("best_loss", math.inf):
                row.update(
                    best_loss=losses[best], best_learning_rate=float(learning_rates[best]),
                    best_beta_1=beta_1,
                )  # fmt: skip
        out["rows"][name] = row
        log(f"  quadratic {name}: best loss {row['best_loss']:.3g} (lr "
            f"{row['best_learning_rate']:.3g}, beta_1 {row['best_beta_1']}) from "
            f"{out['initial_loss']:.3g}")  # fmt: skip
    return out


# ------------------------------------------------------------------ step cost


def step_cost(
    precondition_every=(1, 10, 100),
    *,
    batch_size: int = 32,
    repeats: int = 15,
    max_train: int | None = None,
    log=print,
) -> dict:
    """Seconds per step on ``small_cnn`` on digits: Adam, SGD and Shampoo, interleaved.

    Every round fits one epoch of each model, in an order rotated from round to round.
    Reported: the fastest epoch's seconds per step and its ratio to Adam's fastest, and
    the medians over rounds of the wall-time and the CPU-time (all threads of this
    process) ratios to Adam's epoch of the same round. On a machine shared with other
    load the CPU-time ratio is the steadiest.
    """
    from benchmarks.optimizer_cost import compiled
    from keras_curv.data import load_dataset
    from keras_curv.models import small_cnn

    data = load_dataset("digits", max_train=max_train)

    def model():
        keras.utils.set_random_seed(0)
        return small_cnn(data.input_shape, data.num_classes)

    variants = {
        "adam": lambda: keras.optimizers.Adam(1e-3),
        "sgd": lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
    }
    for k in precondition_every:
        variants[f"shampoo_every_{k}"] = lambda k=k: Shampoo(1e-3, precondition_every=k)
    models, first_epoch = {}, {}
    for name, make in variants.items():
        start = time.perf_counter()
        models[name] = compiled(model, make, data.x_train, data.y_train, batch_size=batch_size,
                                jit_compile=False)  # fmt: skip
        first_epoch[name] = time.perf_counter() - start
    names = list(models)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            models[name].fit(data.x_train, data.y_train, batch_size=batch_size, epochs=1,
                             shuffle=False, verbose=0)  # fmt: skip
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    steps = -(-len(data.x_train) // batch_size)
    fastest = {name: min(times) / steps for name, times in wall.items()}

    def median_ratios(times):
        adam = np.array(times["adam"])
        return {n: float(np.median(np.array(t) / adam)) for n, t in times.items()}

    out = {
        "model": "keras_curv.models.small_cnn((8, 8, 1), 10), digits",
        "batch_size": batch_size,
        "steps_per_epoch": steps,
        "repeats": repeats,
        "s_per_step": fastest,
        # Fastest epoch over Adam's fastest: the epochs least disturbed by other load.
        "ratio_to_adam": {name: value / fastest["adam"] for name, value in fastest.items()},
        "median_wall_ratio_to_adam": median_ratios(wall),
        # CPU seconds of this process (all its threads): what a step costs, whatever the load.
        "median_cpu_ratio_to_adam": median_ratios(cpu),
        # The first epoch's excess over a steady one: tracing (and building the state).
        "trace_seconds": {name: first_epoch[name] - steps * fastest[name] for name in names},
    }
    for key, label in (("ratio_to_adam", "fastest-epoch"), ("median_cpu_ratio_to_adam", "CPU")):
        ratios = ", ".join(f"{name} {ratio:.2f}" for name, ratio in out[key].items())
        log(f"  step cost, {label} ratio to Adam ({1e3 * fastest['adam']:.2f} ms/step): {ratios}")
    return out


# ------------------------------------------------------------------ time to target

# Half-decade grids; Shampoo and Adam share one (grafting gives Shampoo Adam's step size).
ADAPTIVE_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
TRAINING_OPTIMIZERS = {
    "shampoo": (lambda lr: Shampoo(lr), ADAPTIVE_GRID),
    "adam": (lambda lr: keras.optimizers.Adam(lr), ADAPTIVE_GRID),
    "sgd_momentum": (
        lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
        (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    ),
}
PROBLEM_EPOCHS = {"digits_cnn": 20, "mnist1d_mlp": 30, "mnist1d_cnn": 30}


def _train(problem: str, make, learning_rate: float, seed: int, epochs: int) -> dict:
    from benchmarks.training import LOSS, PROBLEMS, _fit_with_test, _Stop
    from keras_curv.data import load_dataset

    name, build, target, batch = PROBLEMS[problem]
    data = load_dataset(name, seed=0)
    keras.utils.set_random_seed(seed)
    model = build(data)
    model.compile(optimizer=make(learning_rate), loss=LOSS, metrics=["accuracy"])
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


def _rank(run: dict) -> tuple:
    """Tuning order: reached the target sooner, then a higher best test accuracy."""
    epoch = run["reached_epoch"] if run["reached_epoch"] is not None else math.inf
    return (epoch, -run["best_test_accuracy"])


def time_to_target(
    problems=tuple(PROBLEM_EPOCHS),
    names=tuple(TRAINING_OPTIMIZERS),
    *,
    seeds: int = 3,
    epochs: dict | None = None,
    grids: dict | None = None,
    log=print,
) -> dict:
    """Per problem and optimizer: the lr grid (seed 0), then the best rate over ``seeds``."""
    from benchmarks.training import PROBLEMS, _summary

    epochs = {**PROBLEM_EPOCHS, **(epochs or {})}
    out = {}
    for problem in problems:
        entry = out.setdefault(problem, {"target": PROBLEMS[problem][2], "epochs": epochs[problem]})
        for name in names:
            make, default_grid = TRAINING_OPTIMIZERS[name]
            grid = (grids or {}).get(name, default_grid)
            tuning = {str(lr): _train(problem, make, lr, 0, epochs[problem]) for lr in grid}
            best = min(tuning, key=lambda lr: _rank(tuning[lr]))
            runs = [tuning[best]] + [
                _train(problem, make, float(best), seed, epochs[problem])
                for seed in range(1, seeds)
            ]
            summary = _summary(runs)
            entry[name] = {"learning_rate": float(best), "grid": tuning, "runs": runs, **summary}
            when = (
                f"{summary['reached_epoch_mean']:.1f} epochs, "
                f"{summary['reached_seconds_mean']:.1f} s"
                if summary["reached"]
                else "not reached"
            )
            log(f"  {problem} {name} (lr {float(best):g}): {summary['reached']}/{seeds} "
                f"reached {entry['target']:.0%} ({when}); best acc "
                f"{summary['best_test_accuracy_mean']:.3f}")  # fmt: skip
    return out


# ------------------------------------------------------------------ main

SECTIONS = ("quadratic", "cost", "training")
QUICK = {
    "quadratic": dict(learning_rates=QUADRATIC_RATES[::2], beta_1s=(0.0, 0.5, 0.9)),
    "cost": dict(precondition_every=(10,), repeats=5),
    "training": dict(problems=("digits_cnn",), seeds=1, epochs={"digits_cnn": 8},
                     grids={"shampoo": (3e-3, 1e-2), "adam": (1e-3, 3e-3),
                            "sgd_momentum": (1e-2, 3e-2)}),
}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grids, one seed")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    options = QUICK if args.quick else {}
    path = RESULTS / ("shampoo_quick.json" if args.quick else "shampoo.json")
    # --only reruns some sections: the others keep their last measurement.
    report = json.loads(path.read_text()) if path.is_file() else {}
    report |= {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "devices": [d.device_type for d in tf.config.list_physical_devices()],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "mode": "quick" if args.quick else "default",
    }
    functions = {"quadratic": quadratic, "cost": step_cost, "training": time_to_target}
    for section in sections:
        start = time.perf_counter()
        report[section] = functions[section](**options.get(section, {}))
        report[section]["wall_seconds"] = time.perf_counter() - start
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))  # after each section: long runs
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
