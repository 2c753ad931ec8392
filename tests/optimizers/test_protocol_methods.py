"""The diagnostic protocol of AdaHessian, ClassSubspaceNewton and Shampoo against their updates."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv import AdaHessian, ClassSubspaceNewton, Shampoo
from keras_curv._internal import flat
from keras_curv.curvature import PermutedOperator
from keras_curv.optimizers import class_subspace_math as csm
from tests.optimizers._shampoo_reference import dense_preconditioner

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


def shampoo_trained(optimizer, conv):
    """Six steps of ``optimizer`` on a tanh MLP, or on a Conv1D net (kernel (3, 2, 4))."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 5, 2) if conv else (48, 4))
    y = rng.integers(0, 3, 48)
    keras.utils.set_random_seed(0)
    layers = (
        [keras.layers.Conv1D(4, 3, activation="tanh", dtype="float64"), keras.layers.Flatten()]
        if conv
        else [keras.layers.Dense(5, activation="tanh", dtype="float64")]
    )
    model = keras.Sequential(
        [keras.Input(x.shape[1:], dtype="float64"), *layers, keras.layers.Dense(3, dtype="float64")]
    )
    model.compile(optimizer=optimizer, loss=XENT)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    return model, x, y


def one_more_step(model, x, y):
    """``(g, D)``: a batch gradient, applied, and the direction of the update step it makes,
    ``D = (m_t − β₁ m_{t−1}) / (1 − β₁)`` (β₁ = 0.9), flat."""
    optimizer, variables = model.optimizer, model.trainable_variables
    with tf.GradientTape() as tape:
        loss = XENT(y[:16], model(x[:16]))
    gradients = tape.gradient(loss, variables)
    before = [np.asarray(m).copy() for m in optimizer._momentums]
    optimizer.apply_gradients(zip(gradients, variables))
    after = [np.asarray(m) for m in optimizer._momentums]
    direction = [((a - 0.9 * b) / 0.1).reshape(-1) for a, b in zip(after, before)]
    return flat.flatten(gradients).numpy(), np.concatenate(direction)


SHAMPOO_CASES = {
    # Kernels (4, 5) and (5, 3) in blocks of 3: the first is cut along its columns too.
    "adam_blocks_on_both_axes": (False, {"grafting": "adam", "block_size": 3}),
    # The conv kernel merged into (6, 4); the (12, 3) kernel cut into row blocks of 8 and 4.
    "sgd_merged_conv": (True, {"grafting": "sgd", "block_size": 8}),
    # The conv kernel as a rank-3 (3, 2, 4) tensor, its last axis cut into 3 and 1.
    "none_rank3_conv": (True, {"grafting": "none", "block_size": 3, "merge_small_axes": False}),
    "adam_before_the_start": (False, {"grafting": "adam", "start_preconditioning_step": 50}),
}


@pytest.mark.parametrize("conv, kwargs", SHAMPOO_CASES.values(), ids=SHAMPOO_CASES.keys())
def test_shampoo_preconditioner_reproduces_its_step(conv, kwargs):
    """P D = g for the direction D = (m_t − β₁ m_{t−1}) / (1 − β₁) of one more step."""
    settings = {"beta_2": 0.9, "epsilon": 1e-8, "precondition_every": 2}
    optimizer = Shampoo(0.05, **{**settings, "start_preconditioning_step": 1, **kwargs})
    model, x, y = shampoo_trained(optimizer, conv)
    g, direction = one_more_step(model, x, y)

    state = [np.asarray(v).copy() for v in optimizer.variables]
    p = optimizer.preconditioner()
    assert optimizer.stability_threshold() == pytest.approx(3.8 / (0.1 * 0.05))
    for a, b in zip(state, optimizer.variables):
        np.testing.assert_array_equal(a, np.asarray(b))
    scale = np.linalg.norm(g)
    np.testing.assert_allclose(p.matvec(direction).numpy(), g, rtol=1e-9, atol=1e-11 * scale)
    np.testing.assert_allclose(
        p.power(-1).matvec(g).numpy(), direction, rtol=1e-9, atol=1e-11 * np.linalg.norm(direction)
    )
    # P^(-1/2) P^(-1/2) P = I, and P is the dense transcription of the state.
    z = np.random.default_rng(2).standard_normal(p.dim)
    root = p.power(-0.5)
    np.testing.assert_allclose(root.matvec(root.matvec(p.matvec(z))).numpy(), z, rtol=1e-8)
    np.testing.assert_allclose(p.to_dense(), dense_preconditioner(optimizer), rtol=1e-9, atol=1e-12)
    # One kernel in each block_size=3 case has blocks cut along a later axis.
    permuted = [b for b in p.blocks if isinstance(b, PermutedOperator)]
    assert len(permuted) == (1 if kwargs.get("block_size") == 3 else 0)


def test_shampoo_has_no_preconditioner_before_its_first_step():
    optimizer = Shampoo()
    optimizer.build([keras.Variable(np.ones((2, 3)))])
    assert optimizer.preconditioner() is None


def test_shampoo_preconditioner_under_gradient_accumulation():
    """P stays the last update's between micro-batches, and P D = g for the next updates."""
    optimizer = Shampoo(
        0.05,
        beta_2=0.9,
        block_size=3,
        precondition_every=1,
        start_preconditioning_step=1,
        gradient_accumulation_steps=2,
    )
    model, x, y = shampoo_trained(optimizer, conv=False)
    variables = model.trainable_variables
    for _ in range(2):  # update steps 4 and 5
        last = optimizer.preconditioner().to_dense()
        optimizer.apply_gradients(zip([tf.ones_like(v) for v in variables], variables))
        np.testing.assert_array_equal(optimizer.preconditioner().to_dense(), last)
        # The update preconditions the accumulated mean of the ones above and g.
        g, direction = one_more_step(model, x, y)
        mean = (g + 1) / 2
        np.testing.assert_allclose(
            optimizer.preconditioner().matvec(direction).numpy(),
            mean,
            rtol=1e-9,
            atol=1e-11 * np.linalg.norm(mean),
        )
    assert int(optimizer.iterations.numpy()) == 5
