"""Golden check in its own process: the full-batch optimizers on 2 replicas == one device.

Logical CPU devices must be configured before TensorFlow runs any op, so
``test_full_batch.py`` runs this file with ``python``. Each case trains the same model
from the same weights on the same full batch (48 samples, 24 per replica) for 4 steps,
without a strategy and under ``MirroredStrategy`` over two logical CPUs: every line
search evaluation and curvature product is then a sum over the replicas (an
all-reduce inside the solvers' ``tf.while_loop`` bodies, or, under a
``LossScaleOptimizer``, plain sums in the step graph). Prints one JSON line.

Usage: ``python tests/optimizers/_full_batch_distributed_case.py CASE [CASE ...]``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from keras_curv.optimizers import (  # noqa: E402
    LBFGS,
    LevenbergMarquardt,
    NewtonCG,
    NysNewtonCG,
)

CASES = {
    "lbfgs": lambda: LBFGS(),
    "newton_cg_ggn": lambda: NewtonCG(curvature="ggn"),
    "nys_newton_cg": lambda: NysNewtonCG(rank=4, seed=0),
    "levenberg_marquardt": lambda: LevenbergMarquardt(),
    "lbfgs_loss_scaled": lambda: keras.optimizers.LossScaleOptimizer(LBFGS()),
    "newton_cg_loss_scaled": lambda: keras.optimizers.LossScaleOptimizer(NewtonCG()),
}


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )


def _train(strategy, name):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(48, 5)), rng.integers(0, 3, 48)
    with strategy.scope():
        model = _model()
        model.compile(
            optimizer=CASES[name](),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    model.fit(x, y, batch_size=48, epochs=4, shuffle=False, verbose=0)
    return model


def main(names):
    keras.config.set_floatx("float64")
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    report = {}
    for name in names:
        single = _train(tf.distribute.get_strategy(), name)
        double = _train(mirrored, name)
        a = [np.asarray(w, np.float64) for w in single.get_weights()]
        b = [np.asarray(w, np.float64) for w in double.get_weights()]
        start = [np.asarray(w, np.float64) for w in _model().get_weights()]
        inner = getattr(double.optimizer, "inner_optimizer", double.optimizer)
        report[name] = {
            "abs": max(float(np.max(np.abs(p - q))) for p, q in zip(a, b)),
            "moved": max(float(np.max(np.abs(p - q))) for p, q in zip(a, start)),
            "iterations": [int(np.asarray(m.optimizer.iterations.value)) for m in (single, double)],
            "batch_changes": int(np.asarray(inner.batch_changes.value)),
            "finite": all(np.all(np.isfinite(w)) for w in b),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
