"""Property tests: random small architectures train with both optimizers and stay finite;
the Hessian operator equals the dense Hessian and is symmetric on random small models.

Why the training property holds by design (so it is a true property, not a hope):

* ``AdaHessian`` divides by ``sqrt(v_hat) + epsilon >= epsilon > 0``, so a finite
  gradient gives a finite step;
* ``ClassSubspaceNewton`` with ``damping = 1`` has ``lambda_k + damping >= 1`` (the paper
  and Gauss-Newton curvatures are non-negative), so ``|1/lambda_k| <= 1`` and
  ``|a_k| <= (1 + lr) |v_k^T g|``: a finite gradient gives a finite step, whatever the
  curvature estimate.

A couple of steps from a standard initialisation have finite gradients, so the weights
and every optimizer variable stay finite. Examples are derandomised for CI stability.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from keras_curv.curvature import HessianOperator
from keras_curv.optimizers import AdaHessian, ClassSubspaceNewton
from tests.curvature.helpers import dense_hessian

_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}

_OPTIMIZERS = {
    "adahessian": lambda: AdaHessian(0.05, seed=0),
    "csn_paper": lambda: ClassSubspaceNewton(0.1, curvature="paper", damping=1.0),
    "csn_gauss_newton": lambda: ClassSubspaceNewton(0.1, curvature="gauss_newton", damping=1.0),
}

_INPUTS = ("dense", "conv1d", "conv2d", "embedding")


@st.composite
def architectures(draw):
    return {
        "inputs": draw(st.sampled_from(_INPUTS)),
        "width": draw(st.integers(1, 4)),
        "batch_norm": draw(st.booleans()),
        "dropout": draw(st.booleans()),
        "classes": draw(st.integers(2, 4)),
        "activation": draw(st.sampled_from(["tanh", "relu", "sigmoid"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _model_and_data(spec, dtype, n=12):
    rng = np.random.default_rng(spec["seed"])
    keras.utils.set_random_seed(spec["seed"])
    width, act = spec["width"], spec["activation"]
    kind = spec["inputs"]
    if kind == "embedding":
        x = rng.integers(0, 7, size=(n, 5))
        layers = [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(7, 3, dtype=dtype),
            keras.layers.Conv1D(width, 2, activation=act, dtype=dtype),
            keras.layers.GlobalAveragePooling1D(dtype=dtype),
        ]
    elif kind == "conv1d":
        x = rng.normal(size=(n, 6, 2))
        layers = [
            keras.Input((6, 2), dtype=dtype),
            keras.layers.Conv1D(width, 3, activation=act, dtype=dtype),
            keras.layers.Flatten(dtype=dtype),
        ]
    elif kind == "conv2d":
        x = rng.normal(size=(n, 4, 4, 1))
        layers = [
            keras.Input((4, 4, 1), dtype=dtype),
            keras.layers.Conv2D(width, 2, activation=act, dtype=dtype),
            keras.layers.Flatten(dtype=dtype),
        ]
    else:
        x = rng.normal(size=(n, 3))
        layers = [
            keras.Input((3,), dtype=dtype),
            keras.layers.Dense(width, activation=act, dtype=dtype),
        ]
    if spec["batch_norm"]:
        layers.append(keras.layers.BatchNormalization(dtype=dtype))
    if spec["dropout"]:
        layers.append(keras.layers.Dropout(0.25, dtype=dtype))
    layers.append(keras.layers.Dense(spec["classes"], dtype=dtype))
    y = rng.integers(0, spec["classes"], n)
    if kind != "embedding":
        x = x.astype(dtype)
    return keras.Sequential(layers), x, y


def _assert_finite(model):
    for w in model.weights:
        assert np.all(np.isfinite(np.asarray(w.numpy(), np.float64))), w.path
    for v in model.optimizer.variables:
        assert np.all(np.isfinite(np.asarray(v, np.float64))), v.path


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(_OPTIMIZERS))
@settings(max_examples=1, **_SETTINGS)
@given(spec=architectures())
@example(
    spec={
        "inputs": "conv2d",
        "width": 3,
        "batch_norm": True,
        "dropout": True,
        "classes": 3,
        "activation": "relu",
        "seed": 1,
    }
)
@example(
    spec={
        "inputs": "embedding",
        "width": 2,
        "batch_norm": False,
        "dropout": True,
        "classes": 2,
        "activation": "tanh",
        "seed": 2,
    }
)
def test_random_architectures_train_and_stay_finite(name, dtype, spec):
    model, x, y = _model_and_data(spec, dtype)
    weights = [w.numpy().copy() for w in model.trainable_weights]
    model.compile(
        optimizer=_OPTIMIZERS[name](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=6, epochs=1, shuffle=False, verbose=0)
    opt = model.optimizer
    # Two steps were taken (none skipped), and they moved the weights.
    assert int(opt.iterations) == 2
    assert int(opt.skipped_steps) == 0
    assert any(
        not np.array_equal(before, after.numpy())
        for before, after in zip(weights, model.trainable_weights)
    )
    _assert_finite(model)


# ------------------------------------------------------------------ curvature engine


@st.composite
def dense_models(draw):
    depth = draw(st.integers(1, 2))
    return {
        "features": draw(st.integers(1, 3)),
        "hidden": [draw(st.integers(1, 3)) for _ in range(depth - 1)],
        "outputs": draw(st.integers(1, 3)),
        "activation": draw(st.sampled_from(["tanh", "sigmoid", "softplus"])),
        "loss": draw(st.sampled_from(["xent", "mse"])),
        "samples": draw(st.integers(1, 6)),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=6, **_SETTINGS)
@given(spec=dense_models())
def test_hessian_operator_matches_dense_hessian_and_is_symmetric(spec):
    rng = np.random.default_rng(spec["seed"])
    keras.utils.set_random_seed(spec["seed"])
    layers = [keras.Input((spec["features"],), dtype="float64")]
    for width in spec["hidden"]:
        layers.append(keras.layers.Dense(width, activation=spec["activation"], dtype="float64"))
    outputs = spec["outputs"] if spec["loss"] == "mse" else max(spec["outputs"], 2)
    layers.append(keras.layers.Dense(outputs, dtype="float64"))
    model = keras.Sequential(layers)
    n = spec["samples"]
    x = rng.normal(size=(n, spec["features"]))
    if spec["loss"] == "xent":
        y = rng.integers(0, outputs, n)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        def oracle_loss(out):
            return tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True)
            )
    else:
        y = rng.normal(size=(n, outputs))

        def oracle_loss(out):
            return tf.reduce_mean(tf.square(out - y))

        loss = keras.losses.MeanSquaredError()
    op = HessianOperator(model, loss, x, y, batch_size=4)
    h = dense_hessian(model, oracle_loss, tf.constant(x))
    u = rng.normal(size=op.dim)
    v = rng.normal(size=op.dim)
    hu = op.matvec(tf.constant(u)).numpy()
    hv = op.matvec(tf.constant(v)).numpy()
    scale = np.abs(h).max() * np.linalg.norm(u) + 1e-12
    np.testing.assert_allclose(hu, h @ u, rtol=1e-10, atol=1e-10 * scale)
    np.testing.assert_allclose(hv, h @ v, rtol=1e-10, atol=1e-10 * scale)
    np.testing.assert_allclose(u @ hv, v @ hu, rtol=1e-10, atol=1e-10 * scale * np.linalg.norm(v))
