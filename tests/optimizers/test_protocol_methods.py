"""The diagnostic protocol of AdaHessian and ClassSubspaceNewton against their own updates."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv import AdaHessian, ClassSubspaceNewton
from keras_curv.optimizers import class_subspace_math as csm

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def trained(optimizer, epochs=2):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((48, 4)), rng.integers(0, 3, 48)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(5, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    model.compile(optimizer=optimizer, loss=XENT)
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, shuffle=False)
    return model


def test_adahessian_operators_follow_its_state():
    model = trained(AdaHessian(0.05, hessian_power=0.5, seed=0))
    optimizer = model.optimizer
    v = np.concatenate([e.numpy().reshape(-1) for e in optimizer.hessian_diagonal_ema])
    tau = int(optimizer.hessian_iterations.numpy())
    rms = np.sqrt(v / (1 - 0.999**tau))
    np.testing.assert_allclose(np.diag(optimizer.curvature_model().to_dense()), rms, rtol=1e-12)
    # The update's denominator: (rms)^k + eps (adahessian_direction).
    np.testing.assert_allclose(
        optimizer.preconditioner().diagonal.numpy(), rms**0.5 + optimizer.epsilon, rtol=1e-12
    )
    assert optimizer.stability_threshold() == pytest.approx(3.8 / (0.1 * 0.05))
    assert AdaHessian(seed=0).build([keras.Variable(np.ones(2))]) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"curvature": "paper", "damping": 0.5},
        {"curvature": "paper", "inverse": "exact", "damping": 0.5},
        {"curvature": "projected_newton"},
        {"curvature": "gauss_newton", "max_inverse_curvature": 2.0},
        {"directions": "eigen", "eigen_tolerance": None},
    ],
    ids=["diagonal", "exact", "projected_newton", "gauss_newton_capped", "eigen"],
)
def test_csn_preconditioner_reproduces_its_step(kwargs):
    """d = lr P⁻¹ g, with d from the optimizer's own coefficient code at its state."""
    model = trained(ClassSubspaceNewton(0.05, **kwargs))
    optimizer = model.optimizer
    lr = float(optimizer.learning_rate.numpy())  # the float32 variable, as the step uses it
    means, curvature, directions, alive = optimizer._current()
    g = np.random.default_rng(1).standard_normal(optimizer.preconditioner().dim)
    rows = csm.flat_directions(directions, 3)
    stats = {
        "projections": tf.linalg.matvec(rows, g),
        "directions": directions,
        "curvature": curvature,
    }
    projected = kwargs.get("curvature") == "projected_newton"
    block = tf.convert_to_tensor(optimizer._subspace_curvature) if projected else None
    rate = tf.constant(lr, tf.float64)
    a = csm.coefficients(optimizer._parts(stats, block, rate), rate).numpy()
    step = lr * g + rows.numpy().T @ a
    p_inverse = optimizer.preconditioner().power(-1)
    np.testing.assert_allclose(lr * p_inverse.matvec(g).numpy(), step, rtol=1e-8, atol=1e-12)
    model_op = optimizer.curvature_model().to_dense()
    if not projected:
        v = rows.numpy().T
        np.testing.assert_allclose(model_op, v @ np.diag(curvature.numpy()) @ v.T, atol=1e-12)
    else:
        # Vᵀ M V is the stored Gauss-Newton block.
        v = rows.numpy().T
        np.testing.assert_allclose(v.T @ model_op @ v, block.numpy(), rtol=1e-6, atol=1e-10)


def test_csn_threshold_and_read_only():
    model = trained(ClassSubspaceNewton(0.1, momentum=0.9, damping=1.0))
    optimizer = model.optimizer
    before = [np.asarray(v.numpy()).copy() for v in optimizer.variables]
    optimizer.preconditioner()
    optimizer.curvature_model()
    assert optimizer.stability_threshold() == pytest.approx(3.8 / 0.1)
    for a, b in zip(before, optimizer.variables):
        np.testing.assert_array_equal(a, np.asarray(b.numpy()))
