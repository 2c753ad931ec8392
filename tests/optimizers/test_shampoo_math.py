"""Shampoo's math as pure functions, against dense linear algebra (fast: no fit)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

from keras_curv.optimizers.shampoo_math import (
    adam_grafting,
    axis_statistics,
    block_shapes,
    block_sizes,
    graft,
    inverse_root,
    merge_blocks,
    momentum,
    precondition,
    preconditioner_shape,
    split_blocks,
    update_statistics,
)


def _spd(n, condition, rng, dtype=np.float64):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return ((q * np.logspace(0, -np.log10(condition), n)) @ q.T).astype(dtype)


@pytest.mark.parametrize(
    "shape, block_size, merge, expected",
    [
        ((7,), 1024, True, None),
        ((), 1024, True, None),
        ((64, 10), 1024, True, (64, 10)),
        ((64, 10), 4, True, (64, 10)),  # matrices are blocked, never merged
        ((3, 3, 1, 8), 1024, True, (9, 8)),
        ((3, 3, 16, 32), 1024, True, (144, 32)),
        ((3, 3, 256, 256), 1024, True, (9, 256, 256)),  # as Distributed Shampoo
        ((5, 8, 16), 1024, True, (40, 16)),  # Conv1D (kw, in, out)
        ((3, 3, 16, 32), 1024, False, (3, 3, 16, 32)),
        ((1, 1, 1, 16), 1024, True, (1, 16)),
    ],
)
def test_preconditioner_shape(shape, block_size, merge, expected):
    assert preconditioner_shape(shape, block_size, merge) == expected


def test_blocks_split_and_merge_back():
    assert block_sizes(10, 4) == [4, 4, 2] and block_sizes(8, 4) == [4, 4]
    assert block_shapes((5, 3), 4) == [(4, 3), (1, 3)]
    tensor = tf.reshape(tf.range(5 * 6 * 3, dtype=tf.float64), (5, 6, 3))
    parts = split_blocks(tensor, 4)
    assert [tuple(p.shape) for p in parts] == block_shapes((5, 6, 3), 4)
    # Row-major block order: the second block is rows 0-3, columns 4-5.
    np.testing.assert_array_equal(parts[1], tensor.numpy()[:4, 4:, :])
    np.testing.assert_array_equal(merge_blocks(parts, (5, 6, 3), 4), tensor)


def test_axis_statistics_are_the_mode_unfoldings_gram_matrices():
    rng = np.random.default_rng(0)
    block = rng.normal(size=(3, 4, 5))
    for k, statistic in enumerate(axis_statistics(tf.constant(block))):
        unfolded = np.moveaxis(block, k, 0).reshape(block.shape[k], -1)
        np.testing.assert_allclose(statistic, unfolded @ unfolded.T, rtol=1e-13)
    matrix = rng.normal(size=(4, 6))
    left, right = axis_statistics(tf.constant(matrix))
    np.testing.assert_allclose(left, matrix @ matrix.T, rtol=1e-13)
    np.testing.assert_allclose(right, matrix.T @ matrix, rtol=1e-13)
    old = [np.eye(4), np.ones((6, 6))]
    new = update_statistics(old, tf.constant(matrix), 0.9)
    np.testing.assert_allclose(new[0], 0.9 * old[0] + 0.1 * matrix @ matrix.T, rtol=1e-14)
    np.testing.assert_allclose(new[1], 0.9 * old[1] + 0.1 * matrix.T @ matrix, rtol=1e-14)


def test_precondition_is_the_kronecker_product():
    """``vec(G ×₁ R₁ ×₂ R₂ ×₃ R₃) = (R₁ ⊗ R₂ ⊗ R₃) vec(G)`` (row-major vec, symmetric R)."""
    rng = np.random.default_rng(1)
    block = rng.normal(size=(2, 3, 4))
    roots = [_spd(n, 10.0, rng) for n in block.shape]
    out = precondition(tf.constant(block), roots).numpy()
    kron = np.kron(np.kron(roots[0], roots[1]), roots[2])
    np.testing.assert_allclose(out.ravel(), kron @ block.ravel(), rtol=1e-12)
    matrix = rng.normal(size=(3, 5))
    left, right = _spd(3, 10.0, rng), _spd(5, 10.0, rng)
    np.testing.assert_allclose(
        precondition(tf.constant(matrix), [left, right]), left @ matrix @ right, rtol=1e-12
    )


@pytest.mark.parametrize("exponent", [2, 4, 6])
def test_inverse_root_against_scipy(exponent):
    rng = np.random.default_rng(2)
    statistic = _spd(6, 1e3, rng) * 7.0
    epsilon = 1e-6
    got = inverse_root(statistic, exponent, epsilon, correction=0.5).numpy()
    regularised = statistic / 0.5 + epsilon * np.linalg.eigvalsh(statistic / 0.5).max() * np.eye(6)
    expected = scipy.linalg.fractional_matrix_power(regularised, -1.0 / exponent)
    np.testing.assert_allclose(got, np.real(expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: np.zeros((5, 5)),
        lambda rng: np.outer(*(2 * [rng.normal(size=5)])),  # rank one
        lambda rng: 1e-30 * _spd(5, 1e3, rng),
        lambda rng: 1e30 * _spd(5, 1e3, rng),
        lambda rng: _spd(5, 1e20, rng),  # eigenvalues below float32 rounding, some < 0
    ],
    ids=["zero", "rank_one", "tiny", "huge", "ill_conditioned"],
)
def test_inverse_root_is_finite_and_bounded_in_float32(make):
    rng = np.random.default_rng(3)
    statistic = make(rng).astype(np.float32)
    epsilon = 1e-12
    root = inverse_root(tf.constant(statistic), 4, epsilon).numpy()
    assert root.dtype == np.float32 and np.all(np.isfinite(root))
    largest = max(float(np.linalg.eigvalsh(statistic.astype(np.float64)).max()), 0.0) or 1.0
    # Its eigenvalues lie in [(1 + ε)^(−1/4), ε^(−1/4)] λ_max^(−1/4), up to float32 rounding.
    values = np.linalg.eigvalsh(root.astype(np.float64)) * largest**0.25
    assert values.min() > 0.99 * (1 + epsilon) ** -0.25
    assert values.max() < 1.01 * epsilon**-0.25


def test_graft_takes_the_reference_norm():
    rng = np.random.default_rng(4)
    direction, ref = tf.constant(rng.normal(size=(3, 4))), tf.constant(rng.normal(size=(3, 4)))
    grafted = graft(direction, ref).numpy()
    np.testing.assert_allclose(np.linalg.norm(grafted), np.linalg.norm(ref), rtol=1e-14)
    np.testing.assert_allclose(
        grafted / np.linalg.norm(grafted), direction / np.linalg.norm(direction)
    )
    np.testing.assert_array_equal(
        graft(tf.zeros((2, 2), tf.float64), ref[:2, :2]), np.zeros((2, 2))
    )


def test_adam_grafting_and_momentum_against_numpy():
    rng = np.random.default_rng(5)
    g, v, m = rng.normal(size=4), rng.uniform(0.1, 1.0, 4), rng.normal(size=4)
    direction, new_v = adam_grafting(tf.constant(g), v, 3, 0.999, 1e-8)
    expected_v = 0.999 * v + 0.001 * g**2
    np.testing.assert_allclose(new_v, expected_v, rtol=1e-15)
    expected = g / (np.sqrt(expected_v / (1 - 0.999**3)) + 1e-8)
    np.testing.assert_allclose(direction, expected, rtol=1e-14)
    update, new_m = momentum(tf.constant(m), tf.constant(g), 3, 0.9)
    np.testing.assert_allclose(new_m, 0.9 * m + 0.1 * g, rtol=1e-15)
    np.testing.assert_allclose(update, (0.9 * m + 0.1 * g) / (1 - 0.9**3), rtol=1e-14)
