"""Several ``MirroredStrategy`` objects in one process, each training a new model.

Run in its own process by ``test_strategies_in_one_process.py``: the two logical CPUs
must be configured before TensorFlow runs any op. Each step of a sequence makes a new
strategy over ``/cpu:0`` and ``/cpu:1``, a new model of its own width (so the gradient
all-reduce has a new shape) and trains it for one epoch of 2 steps. It prints one JSON
line: per step, the loss, how far the weights moved, whether they are finite and
equal on both replicas, or the error that stopped the sequence.

Usage: ``python tests/optimizers/_strategies_case.py SEQUENCE`` (a key of ``SEQUENCES``).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from keras_curv.optimizers import AdaHessian, ClassSubspaceNewton  # noqa: E402

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adahessian": lambda: AdaHessian(0.05, seed=1),
    "csn": lambda: ClassSubspaceNewton(0.05, curvature="paper"),
}
# name -> [(optimizer, hidden width), ...], one new strategy and model per entry.
SEQUENCES = {
    "sgd_then_adahessian": [("sgd", 3), ("adahessian", 12)],
    "curvature_then_adam": [("adahessian", 3), ("csn", 12), ("adam", 7)],
    # Keras alone (tensorflow/tensorflow#62790): the second fit fails.
    "sgd_then_adam": [("sgd", 3), ("adam", 12)],
}


def _replicas_agree(model: keras.Model) -> bool:
    for variable in model.weights:
        parts = [np.asarray(v) for v in variable.value.values]
        if any(not np.array_equal(parts[0], p) for p in parts[1:]):
            return False
    return True


def _fit(optimizer: str, width: int) -> dict:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(width)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 3, 32)
    with strategy.scope():
        keras.utils.set_random_seed(width)
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(width, activation="tanh"), keras.layers.Dense(3)]
        )
        model.compile(
            optimizer=OPTIMIZERS[optimizer](),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    before = model.get_weights()
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    after = model.get_weights()
    return {
        "optimizer": optimizer,
        "loss": float(history.history["loss"][-1]),
        "moved": max(float(np.max(np.abs(a - b))) for a, b in zip(after, before)),
        "finite": all(bool(np.all(np.isfinite(w))) for w in after),
        "replicas_agree": _replicas_agree(model),
        "iterations": int(np.asarray(model.optimizer.iterations.value)),
    }


def main(name: str) -> None:
    steps = []
    for optimizer, width in SEQUENCES[name]:
        try:
            steps.append(_fit(optimizer, width))
        except tf.errors.OpError as error:
            steps.append({"optimizer": optimizer, "error": error.message[-2000:]})
            break
    print(json.dumps(steps))


if __name__ == "__main__":
    main(sys.argv[1])
