"""Golden check run in its own process: 2-replica MirroredStrategy == one device.

The logical CPU devices must be configured before TensorFlow runs any op, which
the shared pytest process has long done; ``test_hardening.py`` runs this file with
``python``. It trains the same model from the same initial weights on the same
global batches twice: without a strategy, and under ``MirroredStrategy`` over two
logical CPUs (each replica sees half of every batch). It prints one JSON line:
per case, the largest absolute and relative weight difference, and whether each
optimizer variable holds equal values on both replicas.

Cases whose dtype is a mixed-precision policy train under that global policy
(``mixed_float16`` wraps the optimizer in a ``LossScaleOptimizer`` at compile),
both runs alike.

Usage: ``python tests/optimizers/_distributed_case.py CASE [CASE ...]``.
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

from keras_curv.optimizers import AdaHessian, ClassSubspaceNewton  # noqa: E402

# name -> (optimizer factory, dtype, use sample weights[, number of samples (48)])
CASES = {
    "adahessian_f64": (lambda: AdaHessian(0.05, seed=3), "float64", False),
    "adahessian_f32": (lambda: AdaHessian(0.05, seed=3), "float32", False),
    "adahessian_samples_update_each": (
        lambda: AdaHessian(0.05, seed=5, n_samples=2, update_each=2, weight_decay=0.01),
        "float64",
        True,
    ),
    "csn_paper_f64": (
        lambda: ClassSubspaceNewton(0.05, curvature="paper", damping=0.1),
        "float64",
        False,
    ),
    "csn_paper_f32": (
        lambda: ClassSubspaceNewton(0.05, curvature="paper", damping=0.1),
        "float32",
        False,
    ),
    "csn_gauss_newton_weighted": (
        lambda: ClassSubspaceNewton(0.05, curvature="gauss_newton", momentum=0.5, num_classes=3),
        "float64",
        True,
    ),
    # An explicit LossScaleOptimizer in full precision: the multi-replica loss-scaling
    # path (statistics summed in the step graph) without rounding noise.
    "adahessian_loss_scaled_f64": (
        lambda: keras.optimizers.LossScaleOptimizer(AdaHessian(0.05, seed=5, update_each=2)),
        "float64",
        True,
    ),
    "csn_paper_loss_scaled_f64": (
        lambda: keras.optimizers.LossScaleOptimizer(
            ClassSubspaceNewton(0.05, curvature="paper", damping=0.1)
        ),
        "float64",
        False,
    ),
    "csn_gauss_newton_loss_scaled_f64": (
        lambda: keras.optimizers.LossScaleOptimizer(
            ClassSubspaceNewton(0.05, curvature="gauss_newton", momentum=0.5, num_classes=3)
        ),
        "float64",
        True,
    ),
    "adahessian_mixed_float16": (lambda: AdaHessian(0.05, seed=3), "mixed_float16", False),
    "adahessian_mixed_bfloat16": (lambda: AdaHessian(0.05, seed=3), "mixed_bfloat16", False),
    "csn_paper_mixed_float16": (
        lambda: ClassSubspaceNewton(0.05, curvature="paper", damping=0.1),
        "mixed_float16",
        False,
    ),
    "csn_paper_mixed_bfloat16": (
        lambda: ClassSubspaceNewton(0.05, curvature="paper", damping=0.1),
        "mixed_bfloat16",
        False,
    ),
    "csn_gauss_newton_mixed_float16": (
        lambda: ClassSubspaceNewton(0.05, curvature="gauss_newton", momentum=0.5, num_classes=3),
        "mixed_float16",
        True,
    ),
    "csn_gauss_newton_mixed_bfloat16": (
        lambda: ClassSubspaceNewton(0.05, curvature="gauss_newton", momentum=0.5, num_classes=3),
        "mixed_bfloat16",
        True,
    ),
    # 49 samples: the last global batch has one sample, and the second replica none.
    "csn_paper_short_last_batch_f64": (
        lambda: ClassSubspaceNewton(0.05, curvature="paper", damping=0.1),
        "float64",
        True,
        49,
    ),
    "csn_projected_exact": (
        lambda: ClassSubspaceNewton(
            0.05, curvature="projected_newton", inverse="exact", damping=0.05, update_each=2
        ),
        "float64",
        False,
    ),
}


def _model(dtype: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="tanh", dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
        ]
    )


def _data(weighted: bool, n: int = 48):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5))
    y = rng.integers(0, 3, n)
    weights = rng.uniform(0.2, 2.0, n) if weighted else None
    return x, y, weights


def _train(strategy, name: str):
    factory, dtype, weighted, *n = CASES[name]
    x, y, weights = _data(weighted, *n)
    mixed = dtype.startswith("mixed")
    keras.mixed_precision.set_global_policy(dtype if mixed else "float32")
    try:
        with strategy.scope():
            model = _model(dtype)
            model.compile(
                optimizer=factory(),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        if dtype == "mixed_float16":
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        # 3 steps per epoch, 2 epochs; each replica gets 8 of the 16 samples of a batch.
        model.fit(x, y, sample_weight=weights, batch_size=16, epochs=2, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model


def _replicas_agree(optimizer) -> bool:
    for variable in optimizer.variables:
        inner = getattr(variable, "value", variable)
        parts = [np.asarray(v) for v in getattr(inner, "values", (inner,))]
        if any(not np.array_equal(parts[0], p) for p in parts[1:]):
            return False
    return True


def main(names):
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    report = {}
    for name in names:
        single = _train(tf.distribute.get_strategy(), name)
        double = _train(mirrored, name)
        a = [np.asarray(w, np.float64) for w in single.get_weights()]
        b = [np.asarray(w, np.float64) for w in double.get_weights()]
        report[name] = {
            "abs": max(float(np.max(np.abs(p - q))) for p, q in zip(a, b)),
            "rel": max(float(np.max(np.abs(p - q) / (np.abs(p) + 1e-3))) for p, q in zip(a, b)),
            "moved": max(float(np.max(np.abs(p - q))) for p, q in zip(a, _initial(name))),
            "iterations": [int(np.asarray(m.optimizer.iterations.value)) for m in (single, double)],
            "replicas_agree": _replicas_agree(double.optimizer),
            "finite": all(
                np.all(np.isfinite(np.asarray(v, np.float64)))
                for m in (single, double)
                for v in [*m.weights, *m.optimizer.variables]
            ),
            "num_replicas": mirrored.num_replicas_in_sync,
        }
    print(json.dumps(report))


def _initial(name):
    return [np.asarray(w, np.float64) for w in _model(CASES[name][1]).get_weights()]


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
