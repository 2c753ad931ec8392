"""``ClassSubspaceNewton(directions="eigen")``: Newton in the top-C eigenspace of the batch
curvature, against a NumPy transcription and against dense eigenvectors."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.curvature.operators import GGNOperator, HessianOperator
from keras_curv.optimizers import ClassSubspaceNewton, curvature_step
from tests.optimizers.test_class_subspace_newton import (
    C,
    D,
    _data,
    _linear_model,
    _logit_jacobians,
    _softmax,
    _theta,
)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")


def _orth(rows):
    q, _ = np.linalg.qr(rows.T)
    return q.T


def numpy_eigen(theta, block, batches, *, lr, damping, iterations, tolerance, momentum=0.0):
    """Subspace iteration + Rayleigh-Ritz on the dense batch GGN, then the diagonal step.

    For the linear softmax model the GGN is the Hessian. The Ritz pairs, the next span
    and the step do not depend on the orthonormal basis chosen, so QR stands in for the
    optimizer's eigendecomposition of the Gram matrix.
    """
    buf = np.zeros_like(theta)
    for x, y in batches:
        W, b = theta[: D * C].reshape(D, C), theta[D * C :]
        p = _softmax(x @ W + b)
        jl = _logit_jacobians(x)
        G = sum(jl[m].T @ (np.diag(p[m]) - np.outer(p[m], p[m])) @ jl[m] for m in range(len(y)))
        G /= len(y)
        g = np.einsum("bk,bkd->d", p - np.eye(C)[y], jl) / len(y)
        q = _orth(block)
        for _ in range(iterations):
            values, vectors = np.linalg.eigh(q @ G @ q.T)
            order = np.argsort(-np.abs(values), kind="stable")
            ritz_values, rotation = values[order], vectors[:, order].T
            u, products = rotation @ q, rotation @ q @ G
            q = _orth(products)
        block = q
        residual = np.sqrt(np.maximum((products**2).sum(1) - ritz_values**2, 0))
        residual /= np.abs(ritz_values)
        projections = u @ g
        usable = residual <= tolerance
        a = np.where(usable, projections / (np.abs(ritz_values) + damping) - lr * projections, 0)
        buf = momentum * buf + lr * g + a @ u
        theta = theta - buf
    return theta, ritz_values, u, residual


@pytest.mark.parametrize("operator", ["gauss_newton", "hessian"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"damping": 0.3, "eigen_iterations": 1, "eigen_tolerance": None},
        {
            "damping": 0.0,
            "eigen_iterations": 3,
            "eigen_tolerance": 0.2,
            "momentum": 0.5,
            "momentum_on": "step",
        },
    ],
    ids=["damped-1-pass", "newton-3-passes-gated"],
)
def test_eigen_step_against_numpy(operator, kwargs):
    x, y = _data()
    model = _linear_model()
    theta0 = _theta(model)
    optimizer = ClassSubspaceNewton(
        0.1, directions="eigen", curvature=operator, num_classes=C, seed=7, **kwargs
    )
    optimizer.build(model.trainable_variables)
    start = np.concatenate([np.reshape(v.numpy(), (C, -1)) for v in optimizer._eigen_basis], axis=1)
    batches = [(x[i : i + 12], y[i : i + 12]) for i in (0, 12, 0)]
    for xb, yb in batches:
        curvature_step(model, optimizer, LOSS, tf.constant(xb), tf.constant(yb))
    expected, ritz_values, u, residual = numpy_eigen(
        theta0,
        start,
        batches,
        lr=float(np.float32(0.1)),
        damping=kwargs["damping"],
        iterations=kwargs["eigen_iterations"],
        tolerance=np.inf if kwargs["eigen_tolerance"] is None else kwargs["eigen_tolerance"],
        momentum=kwargs.get("momentum", 0.0),
    )
    np.testing.assert_allclose(_theta(model), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(optimizer.class_curvatures.numpy(), ritz_values, rtol=1e-8)
    directions = optimizer.class_directions().numpy()
    np.testing.assert_allclose(np.abs(np.sum(directions * u, axis=1)), 1.0, rtol=1e-8)
    summary = optimizer.curvature_summary()
    np.testing.assert_allclose(summary["eigen_residual"], residual, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(summary["max_direction_cosine"], 0.0, atol=1e-9)
    np.testing.assert_array_equal(optimizer.class_counts.numpy(), [3.0] * C)


@pytest.mark.parametrize("operator", ["gauss_newton", "hessian"])
def test_eigen_directions_converge_to_the_dense_top_eigenvectors(operator):
    """A tanh MLP (Hessian != GGN), full batch, weights all but frozen: after 40 refreshes
    of 2 passes the optimizer's directions are the dense operator's top-C eigenvectors (80
    passes of subspace iteration; the slowest pair converges at lambda_4 / lambda_3 = 0.84
    a pass)."""
    x, y = _data(n=48)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((D,), dtype="float64"),
            keras.layers.Dense(5, activation="tanh", dtype="float64"),
            keras.layers.Dense(C, dtype="float64"),
        ]
    )
    # A tiny rate and a huge damping: every step moves the weights by ~1e-12.
    optimizer = ClassSubspaceNewton(
        1e-12,
        directions="eigen",
        curvature=operator,
        damping=1e12,
        eigen_iterations=2,
        eigen_tolerance=None,
    )
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=48, epochs=40, shuffle=False, verbose=0)
    dense = (GGNOperator if operator == "gauss_newton" else HessianOperator)(model, LOSS, x, y)
    values, vectors = np.linalg.eigh(np.asarray(dense.to_dense()))
    order = np.argsort(-np.abs(values))[:C]
    np.testing.assert_allclose(optimizer.class_curvatures.numpy(), values[order], rtol=1e-7)
    cosines = np.abs(optimizer.class_directions().numpy() @ vectors[:, order])
    np.testing.assert_allclose(cosines, np.eye(C), atol=1e-5)
    assert np.all(optimizer.curvature_summary()["eigen_residual"].numpy() < 1e-4)


def test_an_unconverged_block_takes_the_sgd_step():
    """With a tolerance no Ritz pair meets, every step is SGD's (the random start block)."""
    x, y = _data()
    model = _linear_model()
    reference = _linear_model()
    optimizer = ClassSubspaceNewton(
        0.1, directions="eigen", damping=0.0, eigen_tolerance=1e-12, seed=1
    )
    sgd = keras.optimizers.SGD(0.1)
    for start in (0, 12):
        xb, yb = tf.constant(x[start : start + 12]), tf.constant(y[start : start + 12])
        curvature_step(model, optimizer, LOSS, xb, yb)
        curvature_step(reference, sgd, LOSS, xb, yb)
    np.testing.assert_allclose(_theta(model), _theta(reference), rtol=1e-12, atol=1e-14)
    assert np.all(optimizer.curvature_summary()["eigen_residual"].numpy() > 1e-12)


def test_eigen_config_round_trip_and_state_resume(tmp_path):
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = (data.data[:120] / 16.0).astype("float32"), data.target[:120]

    def compiled():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((64,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(10)]
        )
        model.compile(
            optimizer=ClassSubspaceNewton(
                0.1, directions="eigen", momentum=0.5, momentum_on="complement", seed=3
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    straight = compiled()
    straight.fit(x, y, batch_size=40, epochs=2, shuffle=False, verbose=0)
    first = compiled()
    first.fit(x, y, batch_size=40, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "eigen.keras")
    first.save(path)
    resumed = keras.models.load_model(path)
    config = resumed.optimizer.get_config()
    assert config == first.optimizer.get_config()
    assert config["directions"] == "eigen" and config["curvature"] == "gauss_newton"
    resumed.fit(x, y, batch_size=40, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="class_directions"):
        _ = resumed.optimizer.class_means


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"directions": "hessian"}, "directions"),
        ({"directions": "eigen", "curvature": "paper"}, "does not go with"),
        ({"curvature": "hessian"}, "does not go with"),
        ({"directions": "eigen", "eigen_iterations": 0}, "eigen_iterations"),
        ({"directions": "eigen", "eigen_tolerance": 0.0}, "eigen_tolerance"),
        ({"momentum_on": "newton"}, "momentum_on"),
        ({"diagnostics": 1}, "diagnostics"),
    ],
)
def test_bad_eigen_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassSubspaceNewton(**kwargs)
