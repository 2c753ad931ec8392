"""KFAC on a 2-replica MirroredStrategy == one device, run in a fresh process.

Logical CPU devices must be configured before TensorFlow runs an op, which the pytest
process has long done; ``test_kfac_distributed.py`` runs this file with ``python``. Each
case trains the same model from the same weights on the same global batches without a
strategy and on two logical CPUs (each replica gets half of every batch) and prints one
JSON line: per case the largest weight difference, how far the weights moved, and
whether the optimizer state is equal on both replicas.

Usage: ``python tests/optimizers/_kfac_distributed_case.py CASE [CASE ...]``.
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

from keras_curv.optimizers import KFAC  # noqa: E402

_EVERY = {"curvature_update_every": 2, "inverse_update_every": 3, "adapt_damping": True,
          "damping_adaptation_every": 2}  # fmt: skip

# name -> (optimizer factory, dtype policy, model kind, sample weights)
CASES = {
    # Sampled labels: every sample must get the same draw on one device and on two.
    "model_f64": (lambda: KFAC(0.1, seed=3), "float64", "mlp", False),
    "empirical_weighted_f64": (
        lambda: KFAC(0.1, fisher="empirical", momentum=0.5, weight_decay=0.01),
        "float64",
        "mlp",
        True,
    ),
    "exact_every_option_f64": (lambda: KFAC(0.1, fisher="exact", **_EVERY), "float64", "mlp", True),
    "conv_norm_f64": (lambda: KFAC(0.1, seed=1, **_EVERY), "float64", "conv", False),
    # 2 of the convolutions' 5 resp. 4 patches per example: drawn per sample, as labels.
    "conv_patch_sample_f64": (
        lambda: KFAC(0.1, seed=1, max_patches_per_example=2),
        "float64",
        "conv",
        False,
    ),
    # The multi-replica loss-scaling path (statistics summed in the step graph), exact.
    "loss_scaled_f64": (
        lambda: keras.optimizers.LossScaleOptimizer(KFAC(0.1, seed=3, **_EVERY)),
        "float64",
        "mlp",
        True,
    ),
    "model_f32": (lambda: KFAC(0.1, seed=3), "float32", "mlp", False),
    "mixed_float16": (lambda: KFAC(0.1, seed=3), "mixed_float16", "mlp", False),
    "mixed_bfloat16": (lambda: KFAC(0.1, seed=3), "mixed_bfloat16", "mlp", False),
}


def _model(dtype: str, kind: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    layer_dtype = None if dtype.startswith("mixed") else dtype
    if kind == "mlp":
        return keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(6, activation="tanh", dtype=layer_dtype),
                keras.layers.Dense(3, dtype=layer_dtype),
            ]
        )
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Reshape((5, 1)),
            keras.layers.Conv1D(3, 2, padding="causal", activation="tanh", dtype=layer_dtype),
            keras.layers.DepthwiseConv1D(2, dtype=layer_dtype),
            keras.layers.LayerNormalization(dtype=layer_dtype),
            keras.layers.Flatten(),
            keras.layers.Dense(3, dtype=layer_dtype),
        ]
    )


def _data(weighted: bool, n: int = 48):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5))
    y = rng.integers(0, 3, n)
    weights = rng.uniform(0.2, 2.0, n) if weighted else None
    return x, y, weights


def _train(strategy, name: str):
    factory, dtype, kind, weighted = CASES[name]
    x, y, weights = _data(weighted)
    mixed = dtype.startswith("mixed")
    keras.mixed_precision.set_global_policy(dtype if mixed else "float32")
    try:
        with strategy.scope():
            model = _model(dtype, kind)
            model.compile(
                optimizer=factory(),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
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
        initial = [np.asarray(w, np.float64) for w in _model(*CASES[name][1:3]).get_weights()]
        inner = getattr(double.optimizer, "inner_optimizer", double.optimizer)
        report[name] = {
            "abs": max(float(np.max(np.abs(p - q))) for p, q in zip(a, b)),
            "moved": max(float(np.max(np.abs(p - q))) for p, q in zip(a, initial)),
            "iterations": [int(np.asarray(m.optimizer.iterations.value)) for m in (single, double)],
            "curvature_updates": int(np.asarray(inner.curvature_updates.value)),
            "replicas_agree": _replicas_agree(double.optimizer),
            "finite": all(
                np.all(np.isfinite(np.asarray(v, np.float64)))
                for m in (single, double)
                for v in [*m.weights, *m.optimizer.variables]
            ),
            "num_replicas": mirrored.num_replicas_in_sync,
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
