"""Cost of one Hessian-vector product relative to one gradient, on a small CNN.

Run from the repository root::

    python -m benchmarks.hvp_cost [--repeats 30] [--inputs random28|digits]

Everything is measured in one process, on the same model and the same batch:

* ``grad``: one ``tf.function``-compiled tape gradient of the batch loss (the cost
  unit, what a training step spends on differentiation);
* ``hvp_operator``: ``HessianOperator(...).matvec(v)``, the public path, including
  flattening and the Python wrapper (forward-over-back);
* ``hvp_fwd_over_back``: the same forward-over-back product as a bare ``tf.function``;
* ``hvp_back_over_back``: reverse-over-reverse, nested tapes with the vector fed as
  ``output_gradients`` of the outer tape.

Each timing is the median of ``--repeats`` calls after warm-up, the cases
interleaved round-robin so that background load hits them alike; results go to
stdout as a table and to ``benchmarks/results/hvp_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_curv._internal import flat as _flat  # noqa: E402
from keras_curv.curvature import HessianOperator  # noqa: E402

TARGET_RATIO = 2.5
RESULTS = Path(__file__).resolve().parent / "results" / "hvp_cost.json"


def build_cnn(input_shape: tuple[int, ...], num_classes: int, seed: int) -> keras.Model:
    """Conv(16, 3x3) - Conv(32, 3x3) - MaxPool(2) - Flatten - Dense(C), logits out."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(num_classes),
        ]
    )


def make_batch(kind: str, batch: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    if kind == "digits":
        from keras_curv.data import load_dataset

        data = load_dataset("digits", seed=seed)
        return data.x_train[:batch], data.y_train[:batch]
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, num_classes, size=batch).astype(np.int32)
    return x, y


def interleaved_timings(cases: dict, repeats: int, warmup: int, seed: int) -> dict:
    """Wall times of every case, measured round-robin in a shuffled order per round.

    Interleaving exposes all cases to the same background load, so their ratios stay
    meaningful on a shared machine even when absolute times drift. Each case must
    block until its result exists.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    rng = np.random.default_rng(seed)
    names = list(cases)
    samples = {name: [] for name in names}
    for _ in range(repeats):
        for i in rng.permutation(len(names)):
            start = time.perf_counter()
            cases[names[i]]()
            samples[names[i]].append(time.perf_counter() - start)
    return samples


def measure(model, loss, x_np, y_np, *, repeats: int, warmup: int, seed: int) -> dict:
    """Times a gradient and three Hessian-vector products of ``loss`` on one batch.

    Args:
        model: A built or buildable Keras model (its weights are not changed).
        loss: A Keras loss object.
        x_np: The batch inputs (NumPy).
        y_np: The batch labels (NumPy).
        repeats: Timed calls per case (interleaved, see :func:`interleaved_timings`).
        warmup: Untimed calls per case first (tracing).
        seed: Seed of the product's vector and of the interleaving order.

    Returns:
        ``{"num_params", "timings"}``; ``timings[case]`` has ``median_s``, ``min_s``,
        ``max_s``, ``ratio_to_grad`` (of medians) and ``min_ratio_to_grad``.

    Raises:
        RuntimeError: the three products disagree (the timings would be meaningless).
    """
    x, y = tf.constant(x_np), tf.constant(y_np)
    op = HessianOperator(model, loss, x_np, y_np, batch_size=len(x_np))
    params = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def batch_loss(values):
        logits, _ = model.stateless_call(values, non_trainable, x, training=False)
        return loss(y, logits)

    @tf.function
    def grad_fn():
        with tf.GradientTape() as tape:
            tape.watch(params)
            value = batch_loss(params)
        return tape.gradient(value, params)

    @tf.function
    def fwd_over_back(tangents):
        with tf.autodiff.ForwardAccumulator(params, tangents) as acc:
            with tf.GradientTape() as tape:
                tape.watch(params)
                value = batch_loss(params)
            grads = tape.gradient(value, params)
        return acc.jvp(grads)

    @tf.function
    def back_over_back(tangents):
        with tf.GradientTape() as outer:
            outer.watch(params)
            with tf.GradientTape() as inner:
                inner.watch(params)
                value = batch_loss(params)
            grads = inner.gradient(value, params)
        return outer.gradient(grads, params, output_gradients=tangents)

    v = tf.constant(np.random.default_rng(seed + 1).standard_normal(op.dim), op.dtype)
    tangents = _flat.unflatten(v, op.shapes)

    # The three HVPs must agree before their timings mean anything.
    reference = op.matvec(v).numpy()
    for other in (fwd_over_back(tangents), back_over_back(tangents)):
        flat = _flat.flatten(other).numpy()
        if not np.allclose(flat, reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max()):
            raise RuntimeError("The HVP variants disagree; the benchmark would be meaningless.")

    cases = {
        "grad": lambda: [t.numpy() for t in grad_fn()],
        "hvp_operator": lambda: op.matvec(v).numpy(),
        "hvp_fwd_over_back": lambda: [t.numpy() for t in fwd_over_back(tangents)],
        "hvp_back_over_back": lambda: [t.numpy() for t in back_over_back(tangents)],
    }
    samples = interleaved_timings(cases, repeats, warmup, seed)
    timings = {
        name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)}
        for name, t in samples.items()
    }
    for entry in timings.values():
        entry["ratio_to_grad"] = entry["median_s"] / timings["grad"]["median_s"]
        entry["min_ratio_to_grad"] = entry["min_s"] / timings["grad"]["min_s"]
    return {"num_params": op.dim, "timings": timings}


def run(inputs: str, batch: int, repeats: int, warmup: int, seed: int) -> dict:
    num_classes = 10
    x_np, y_np = make_batch(inputs, batch, num_classes, seed)
    model = build_cnn(x_np.shape[1:], num_classes, seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    measured = measure(model, loss, x_np, y_np, repeats=repeats, warmup=warmup, seed=seed)
    timings = measured["timings"]
    return {
        "inputs": inputs,
        "input_shape": list(x_np.shape[1:]),
        "batch": batch,
        "num_classes": num_classes,
        "num_params": measured["num_params"],
        "repeats": repeats,
        "warmup": warmup,
        "timings": timings,
        "target_ratio": TARGET_RATIO,
        "operator_meets_target": timings["hvp_operator"]["ratio_to_grad"] <= TARGET_RATIO,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "machine": machine_info(),
    }


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def print_table(result: dict) -> None:
    machine = result["machine"]
    device = ", ".join(machine["gpus"]) or f"CPU only ({machine['cpu_count']} cores)"
    print(
        f"HVP cost on a small CNN: inputs {result['inputs']} {tuple(result['input_shape'])}, "
        f"batch {result['batch']}, C={result['num_classes']}, {result['num_params']} params"
    )
    print(f"device: {device}; TF {machine['tensorflow']}; median of {result['repeats']} runs")
    print(f"{'case':<22}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'x grad':>9}{'min x':>8}")
    for name, t in result["timings"].items():
        print(
            f"{name:<22}{1e3 * t['median_s']:>11.2f}{1e3 * t['min_s']:>9.2f}"
            f"{1e3 * t['max_s']:>9.2f}{t['ratio_to_grad']:>9.2f}{t['min_ratio_to_grad']:>8.2f}"
        )
    print("x grad: ratio of medians; min x: ratio of fastest runs (least background noise)")
    verdict = "meets" if result["operator_meets_target"] else "MISSES"
    target = result["target_ratio"]
    print(f"HessianOperator.matvec {verdict} the target of <= {target}x a gradient.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", choices=["random28", "digits"], default="random28")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args.inputs, args.batch, args.repeats, args.warmup, args.seed)
    print_table(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
