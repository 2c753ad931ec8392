"""The pure functions of SketchySGD, OSGM and Lookahead against dense NumPy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

from keras_curv.optimizers import sketchy_math as skm
from keras_curv.optimizers.lookahead import lookahead_slow_weights
from keras_curv.optimizers.osgm import osgm_hypergradient, osgm_scale
from keras_curv.optimizers.sketchy_sgd import refresh_due


def _factor(dim=30, rank=4, seed=0):
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((dim, rank)))[0]
    lam = np.sort(rng.uniform(1.0, 50.0, rank))[::-1]
    return u, lam, 0.3


def _dense_preconditioner(u, lam, rho):
    return (u * lam) @ u.T + rho * np.eye(u.shape[0])


@pytest.mark.parametrize("power", [-1.0, -0.5, 0.5])
def test_shifted_power_is_the_dense_matrix_power(power):
    u, lam, rho = _factor()
    v = np.random.default_rng(1).standard_normal(u.shape[0])
    got = skm.shifted_power(tf.constant(u), tf.constant(lam), rho, tf.constant(v), power)
    dense = scipy.linalg.fractional_matrix_power(_dense_preconditioner(u, lam, rho), power)
    np.testing.assert_allclose(got.numpy(), np.real(dense) @ v, rtol=1e-11, atol=1e-12)


def test_sketchy_direction_is_the_woodbury_solve_per_variable():
    u, lam, rho = _factor(dim=12, rank=3)
    g = np.random.default_rng(2).standard_normal(12)
    shapes, sizes = [(2, 3), (6,)], [6, 6]
    coefficients = skm.inverse_weights(tf.constant(lam), rho) * tf.constant(u.T @ g)
    pieces = np.split(g, np.cumsum(sizes)[:-1])
    rows = np.split(u.T, np.cumsum(sizes)[:-1], axis=1)
    got = [
        skm.sketchy_direction(
            tf.constant(p.reshape(s)), tf.constant(r.reshape(3, *s)), coefficients, rho
        ).numpy()
        for p, r, s in zip(pieces, rows, shapes)
    ]
    expected = np.linalg.solve(_dense_preconditioner(u, lam, rho), g)
    np.testing.assert_allclose(np.concatenate([x.ravel() for x in got]), expected, rtol=1e-12)


def test_split_spectrum_takes_the_largest_eigenvalue_not_kept_and_floors_it():
    vals = tf.constant([9.0, 5.0, 2.0, 0.5], tf.float64)
    vecs = tf.eye(4, dtype=tf.float64)
    kept, basis, rho = skm.split_spectrum(vals, vecs, 2)
    np.testing.assert_array_equal(kept.numpy(), [9.0, 5.0])
    assert basis.shape == (4, 2) and float(rho) == 2.0
    assert float(skm.split_spectrum(vals, vecs, 2, rho=1e-3)[2]) == 1e-3
    zero = tf.constant([4.0, 1.0, 0.0], tf.float64)
    assert float(skm.split_spectrum(zero, tf.eye(3, dtype=tf.float64), 2)[2]) == 4.0 * skm.RHO_FLOOR


def test_power_iteration_steps_converge_to_the_preconditioned_lambda_max():
    u, lam, rho = _factor(dim=20, rank=3, seed=3)
    rng = np.random.default_rng(4)
    h = rng.standard_normal((20, 20))
    h = h @ h.T / 5
    pre = np.real(scipy.linalg.fractional_matrix_power(_dense_preconditioner(u, lam, rho), -0.5))
    exact = np.linalg.eigvalsh(pre @ h @ pre)
    u_, lam_ = tf.constant(u), tf.constant(lam)
    vector = skm.unit(tf.constant(rng.standard_normal(20)))
    estimates = []
    for _ in range(200):
        tangent = skm.shifted_power(u_, lam_, rho, vector, -0.5)
        estimate, vector = skm.power_iteration_step(
            u_, lam_, rho, vector, tf.linalg.matvec(tf.constant(h), tangent)
        )
        estimates.append(float(estimate))
    assert all(e <= exact[-1] * (1 + 1e-12) for e in estimates)  # Rayleigh quotients
    np.testing.assert_allclose(estimates[-1], exact[-1], rtol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(vector.numpy()), 1.0, rtol=1e-12)


def test_refresh_schedule_doubles_up_to_update_every():
    due = [int(t) for t in range(30) if bool(refresh_due(tf.constant(t), 10))]
    assert due == [0, 1, 2, 4, 8, 10, 20]
    assert [int(t) for t in range(5) if bool(refresh_due(tf.constant(t), 1))] == list(range(5))


def test_osgm_hypergradient_and_adagrad_step():
    g = np.array([1.0, -2.0, 0.5])
    previous = np.array([2.0, 1.0, -1.0])
    h = osgm_hypergradient(tf.constant(g), tf.constant(previous), tf.constant(4.0, tf.float64))
    np.testing.assert_allclose(h.numpy(), g * previous / 4.0, rtol=1e-15)
    scale, accumulator = np.array([0.1, 0.2, 0.0]), np.array([1.0, 0.0, 0.0])
    new_scale, new_accumulator = osgm_scale(
        tf.constant(scale), tf.constant(accumulator), h, 0.05, 0.25, 1e-12
    )
    v = accumulator + h.numpy() ** 2
    expected = np.clip(scale + 0.05 * h.numpy() / (np.sqrt(v) + 1e-12), 0.0, 0.25)
    np.testing.assert_allclose(new_accumulator.numpy(), v, rtol=1e-15)
    np.testing.assert_allclose(new_scale.numpy(), expected, rtol=1e-14)
    assert new_scale.numpy()[2] == 0.0  # clipped at the lower bound: P stays non-negative
    # A zero previous loss is floored, not divided by.
    assert np.all(np.isfinite(osgm_hypergradient(tf.constant(g), tf.constant(previous), 0.0)))


def test_lookahead_slow_weights():
    fast, slow = np.array([1.0, 3.0]), np.array([0.0, 1.0])
    got = lookahead_slow_weights(tf.constant(fast), tf.constant(slow), 0.25)
    np.testing.assert_allclose(got.numpy(), [0.25, 1.5], rtol=1e-15)
