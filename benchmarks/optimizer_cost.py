"""Step-time cost of keras-curv optimizers relative to Adam, measured in one process.

Run: ``PYTHONPATH=. python -m benchmarks.optimizer_cost [--repeats 7] [--steps 20]``.
Prints the ratios and writes ``benchmarks/results/optimizer_cost.json``. The optimizers
train the same model in one process, interleaved; each figure is the fastest of
``--repeats`` epochs of ``--steps`` steps after a warm-up epoch (tracing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def small_cnn(seed: int = 0) -> keras.Model:
    """Conv2D(16, 3) - Conv2D(32, 3) - Flatten - Dense(10) on 28x28x1 inputs."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


def compiled(make_model, make_optimizer, x, y, *, batch_size: int, jit_compile) -> keras.Model:
    """A fresh model compiled with a fresh optimizer, after one untimed warm-up epoch (tracing)."""
    model = make_model()
    model.compile(
        optimizer=make_optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return model


def step_times(
    models: dict, x, y, *, batch_size: int, repeats: int, cpu: dict | None = None
) -> dict:
    """Fastest epoch of each compiled model over ``repeats`` rounds, in seconds per step.

    The models are interleaved in every round so that load from other processes on the
    machine hits them alike; the fastest epoch is the one least disturbed by it. A
    ``cpu`` dict receives the least CPU time of this process per step (all threads), which
    other processes' load disturbs less than the wall clock.
    """
    steps = -(-len(x) // batch_size)
    best = {name: float("inf") for name in models}
    least_cpu = {name: float("inf") for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
            least_cpu[name] = min(least_cpu[name], (time.process_time() - start_cpu) / steps)
    if cpu is not None:
        cpu.update(least_cpu)
    return best


def run_adahessian(
    update_each=(1, 2, 5),
    *,
    batch_size: int = 128,
    steps: int = 20,
    repeats: int = 7,
    jit_compile: bool = False,
) -> dict:
    """AdaHessian / Adam step-time ratios on :func:`small_cnn`, batch ``batch_size``, C = 10.

    Returns:
        A dict with the Adam step time, and per ``update_each`` the AdaHessian step
        time and its ratio to Adam.
    """
    from keras_curv.optimizers import AdaHessian

    rng = np.random.RandomState(0)
    x = rng.rand(batch_size * steps, 28, 28, 1).astype("float32")
    y = rng.randint(0, 10, batch_size * steps)
    variants = {"adam": lambda: keras.optimizers.Adam(1e-3)}
    for k in update_each:
        variants[str(k)] = lambda k=k: AdaHessian(1e-3, update_each=k)
    models = {
        name: compiled(small_cnn, make, x, y, batch_size=batch_size, jit_compile=jit_compile)
        for name, make in variants.items()
    }
    seconds = step_times(models, x, y, batch_size=batch_size, repeats=repeats)
    adam = seconds.pop("adam")
    result = {
        "model": "Conv2D(16,3)-Conv2D(32,3)-Flatten-Dense(10), 28x28x1",
        "batch_size": batch_size,
        "jit_compile": jit_compile,
        "adam_s_per_step": adam,
        "adahessian": {},
    }
    for k, value in seconds.items():
        result["adahessian"][k] = {"s_per_step": value, "ratio_to_adam": value / adam}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--jit", action="store_true", help="also time with jit_compile=True")
    args = parser.parse_args(argv)
    report = {
        "machine": platform.platform(),
        "devices": [d.device_type for d in tf.config.list_physical_devices()],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "adahessian": [run_adahessian(steps=args.steps, repeats=args.repeats)],
    }
    if args.jit:
        report["adahessian"].append(
            run_adahessian(steps=args.steps, repeats=args.repeats, jit_compile=True)
        )
    for entry in report["adahessian"]:
        print(f"AdaHessian / Adam (jit_compile={entry['jit_compile']}), "
              f"Adam {1e3 * entry['adam_s_per_step']:.1f} ms/step:")  # fmt: skip
        for k, row in entry["adahessian"].items():
            print(f"  update_each={k}: {1e3 * row['s_per_step']:.1f} ms/step, "
                  f"ratio {row['ratio_to_adam']:.2f}")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optimizer_cost.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
