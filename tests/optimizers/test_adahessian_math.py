"""AdaHessian's update rule as pure functions, against NumPy (fast: no fit)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_curv
from keras_curv.optimizers.adahessian import (
    AdaHessian,
    adahessian_direction,
    adahessian_moments,
    hutchinson_diagonal,
    spatial_average,
)
from tests.conftest import float64_everywhere


def _numpy_step(g, m, v, d, t, tau, lr, b1, b2, eps, k, cap=None):
    """The authors' rule (NOTES.md), one variable, one Hessian step; ``cap`` clips it."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * d**2
    denom = (np.sqrt(v) / np.sqrt(1 - b2**tau)) ** k + eps
    direction = (m / (1 - b1**t)) / denom
    if cap is not None:
        direction = np.clip(direction, -cap, cap)
    return m, v, -lr * direction


@pytest.mark.parametrize("k, cap", [(1.0, None), (0.5, None), (1.0, 0.3), (0.5, 0.3)])
def test_moments_and_direction_equal_the_published_rule(k, cap):
    rng = np.random.default_rng(0)
    g, m, v = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.1, 1.0, 5)
    d = np.abs(rng.normal(size=5))
    new_m, new_v = adahessian_moments(g, m, v, d, True, 0.9, 0.999)
    direction = adahessian_direction(new_m, new_v, 7, 4, 0.9, 0.999, 1e-4, k, cap)
    em, ev, step = _numpy_step(g, m, v, d, 7, 4, 0.15, 0.9, 0.999, 1e-4, k, cap)
    np.testing.assert_allclose(new_m, em, rtol=1e-15)
    np.testing.assert_allclose(new_v, ev, rtol=1e-15)
    np.testing.assert_allclose(-0.15 * np.asarray(direction), step, rtol=1e-14)
    unclipped = _numpy_step(g, m, v, d, 7, 4, 0.15, 0.9, 0.999, 1e-4, k)[2]
    # The cases with a cap clip some entries and leave others alone.
    assert cap is None or 0 < np.sum(np.abs(unclipped) > 0.15 * cap) < 5


def test_v_is_left_alone_when_not_refreshed():
    m, v = np.ones(3), np.full(3, 0.5)
    _, same = adahessian_moments(np.zeros(3), m, v, np.full(3, 9.0), False, 0.9, 0.999)
    np.testing.assert_array_equal(same, v)


def test_hutchinson_and_spatial_average():
    z = [tf.constant([1.0, -1.0, 1.0])]
    hz = [tf.constant([2.0, 3.0, -4.0])]
    np.testing.assert_array_equal(hutchinson_diagonal(z, hz)[0], [2.0, -3.0, -4.0])
    kernel = tf.reshape(tf.range(2 * 3 * 1 * 2, dtype=tf.float32), (2, 3, 1, 2))
    averaged = spatial_average(kernel).numpy()
    np.testing.assert_allclose(averaged[..., 0], np.full((2, 3, 1), kernel.numpy()[..., 0].mean()))
    bias = tf.constant([1.0, 2.0])
    assert spatial_average(bias) is bias


def _orthogonal_least_squares(n=16, d=4, seed=0):
    """An orthogonal design: the Hessian is diagonal, so z ⊙ Hz = diag(H) exactly."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, d)))
    x = q * np.array([1.0, 2.0, 0.5, 3.0]) * np.sqrt(n)
    y = rng.normal(size=(n, 1))
    return x, y


@pytest.mark.parametrize("cap", [None, 1.0, 0.05])
def test_float64_full_batch_golden_to_1e12(cap):
    """25 full-batch steps in float64 floatx agree with NumPy to float64 precision."""
    x, y = _orthogonal_least_squares()
    with float64_everywhere():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
        w = model.get_weights()[0].copy()
        model.compile(optimizer=AdaHessian(0.1, step_cap=cap, seed=1), loss="mse")
        model.fit(x, y, batch_size=len(x), epochs=25, shuffle=False, verbose=0)
    hessian = np.diag(2.0 * x.T @ x / len(x))[:, None]
    m, v = np.zeros_like(w), np.zeros_like(w)
    clipped = 0
    for t in range(1, 26):
        g = 2.0 * x.T @ (x @ w - y) / len(x)
        args = (g, m, v, np.abs(hessian), t, t, 0.1, 0.9, 0.999, 1e-4, 1.0)
        m, v, step = _numpy_step(*args, cap)
        clipped += int(np.any(step != _numpy_step(*args)[2]))
        w = w + step
    np.testing.assert_allclose(model.get_weights()[0], w, rtol=1e-12, atol=1e-14)
    assert cap is None or clipped > 0  # each cap is active on some steps


def test_one_curvature_step_on_plain_variables_and_config_round_trip():
    """Like Keras's adam_test: one step, its numbers, and the serialization round trip."""
    x, y = _orthogonal_least_squares(n=8)
    model = keras.Sequential(
        [keras.Input((4,), dtype="float64"), keras.layers.Dense(1, use_bias=False, dtype="float64")]
    )
    w = np.array([[0.5], [-0.25], [1.0], [0.0]])
    model.set_weights([w])
    optimizer = AdaHessian(0.2, step_cap=None, seed=3)
    loss = keras.losses.MeanSquaredError(dtype="float64")
    keras_curv.curvature_step(model, optimizer, loss, x, y)
    g = 2.0 * x.T @ (x @ w - y) / len(x)
    d = np.abs(np.diag(2.0 * x.T @ x / len(x)))[:, None]
    lr32 = float(np.float32(0.2))  # floatx is float32: Keras keeps lr in a float32 variable
    _, _, step = _numpy_step(g, 0 * g, 0 * g, d, 1, 1, lr32, 0.9, 0.999, 1e-4, 1.0)
    np.testing.assert_allclose(model.get_weights()[0], w + step, rtol=1e-12)
    config = optimizer.get_config()
    clone = AdaHessian.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(clone))
    assert isinstance(restored, AdaHessian) and restored.seed == 3


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"beta_1": 1.0}, "beta_1"),
        ({"beta_2": -0.1}, "beta_2"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"hessian_power": 0.0}, "hessian_power"),
        ({"step_cap": 0.0}, "step_cap"),
        ({"step_cap": float("inf")}, "step_cap"),
        ({"n_samples": 2.0}, "n_samples"),
        ({"update_each": True}, "update_each"),
        ({"seed": 1.5}, "seed"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaHessian(**kwargs)
