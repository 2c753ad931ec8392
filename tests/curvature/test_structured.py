"""Structured operators against dense NumPy/SciPy oracles: products, powers, errors."""

import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

from keras_curv.curvature import (
    BlockDiagonalOperator,
    DiagonalOperator,
    IdentityOperator,
    KroneckerOperator,
    LowRankPlusDiagonal,
    PermutedOperator,
)


def spd(n, seed):
    a = np.random.default_rng(seed).standard_normal((n, n))
    return a @ a.T + 0.5 * np.eye(n)


def dense_power(matrix, p):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * values**p) @ vectors.T


def test_diagonal_products_and_powers():
    d = np.array([4.0, 1.0, 0.25])
    op = DiagonalOperator(d)
    v = np.array([1.0, -2.0, 3.0])
    np.testing.assert_allclose(op.matvec(v).numpy(), d * v)
    np.testing.assert_allclose(op.power(-0.5).to_dense(), np.diag(d**-0.5))
    np.testing.assert_allclose(op.matmat(np.eye(3)).numpy(), np.diag(d))
    with pytest.raises(ValueError, match="singular"):
        DiagonalOperator([1.0, 0.0]).power(-1)
    with pytest.raises(ValueError, match="not real"):
        DiagonalOperator([1.0, -1.0]).power(0.5)
    with pytest.raises(ValueError, match="NaN or infinite"):
        DiagonalOperator([1.0, np.nan])


def test_kronecker_acts_on_the_row_major_layout_of_a_matrix():
    a, g = spd(3, 0), spd(4, 1)
    op = KroneckerOperator([a, g])
    w = np.random.default_rng(2).standard_normal((3, 4))
    # (A ⊗ G) vec(W) = vec(A W G) for the row-major vec of keras_curv's flat layout.
    np.testing.assert_allclose(op.matvec(w.reshape(-1)).numpy(), (a @ w @ g).reshape(-1))
    np.testing.assert_allclose(op.to_dense(), np.kron(a, g), rtol=1e-12)
    block = np.random.default_rng(3).standard_normal((12, 5))
    np.testing.assert_allclose(op.matmat(block).numpy(), np.kron(a, g) @ block, rtol=1e-10)


def test_kronecker_power_matches_the_dense_fractional_power():
    factors = [spd(2, 4), spd(3, 5), spd(2, 6)]
    op = KroneckerOperator(factors)
    dense = np.kron(np.kron(factors[0], factors[1]), factors[2])
    for p in (-0.5, 0.25, -1.0):
        np.testing.assert_allclose(
            op.power(p).to_dense(), scipy.linalg.fractional_matrix_power(dense, p).real, rtol=1e-8
        )


@pytest.mark.parametrize("core", [np.array([2.0, -0.3, 1.0]), "matrix"])
def test_low_rank_plus_identity_power(core):
    rng = np.random.default_rng(7)
    basis = rng.standard_normal((10, 3))  # not orthonormal
    if isinstance(core, str):
        c = rng.standard_normal((3, 3))
        core = 0.1 * (c + c.T)
    dense_core = np.diag(core) if core.ndim == 1 else core
    op = LowRankPlusDiagonal(basis, core, 1.5)
    dense = 1.5 * np.eye(10) + basis @ dense_core @ basis.T
    np.testing.assert_allclose(op.to_dense(), dense, rtol=1e-12, atol=1e-12)
    if np.linalg.eigvalsh(dense).min() > 0:
        for p in (-0.5, -1.0, 0.5):
            np.testing.assert_allclose(
                op.power(p).to_dense(), dense_power(dense, p), rtol=1e-8, atol=1e-10
            )


def test_low_rank_power_errors_and_pure_low_rank():
    basis = np.eye(4)[:, :2]
    pure = LowRankPlusDiagonal(basis, [4.0, 9.0])
    np.testing.assert_allclose(pure.power(0.5).to_dense(), np.diag([2.0, 3.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="singular"):
        pure.power(-0.5)
    with pytest.raises(ValueError, match="scalar diagonal"):
        LowRankPlusDiagonal(basis, [1.0, 1.0], np.ones(4)).power(0.5)
    with pytest.raises(ValueError, match=r"\(2,\) or \(2, 2\)"):
        LowRankPlusDiagonal(basis, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="not real"):
        LowRankPlusDiagonal(basis, [-3.0, 1.0], 1.0).power(-0.5)


def test_block_diagonal_and_identity():
    a = spd(3, 8)
    op = BlockDiagonalOperator([DiagonalOperator([2.0, 8.0]), KroneckerOperator([a])])
    dense = scipy.linalg.block_diag(np.diag([2.0, 8.0]), a)
    np.testing.assert_allclose(op.to_dense(), dense, rtol=1e-6)
    np.testing.assert_allclose(op.power(-0.5).to_dense(), dense_power(dense, -0.5), rtol=1e-5)
    eye = IdentityOperator(3, 4.0, tf.float64)
    np.testing.assert_allclose(eye.power(-0.5).to_dense(), 0.5 * np.eye(3))


def test_permuted_block_diagonal_is_the_dense_congruence():
    """Column blocks of a row-major (2, 3) matrix: entries {0, 3} and {1, 2, 4, 5}."""
    a, b = spd(2, 9), spd(4, 10)
    order = [0, 3, 1, 2, 4, 5]
    blocks = BlockDiagonalOperator([KroneckerOperator([a]), KroneckerOperator([b])])
    op = PermutedOperator(blocks, order)
    dense = np.zeros((6, 6))
    dense[np.ix_(order, order)] = scipy.linalg.block_diag(a, b)
    np.testing.assert_allclose(op.to_dense(), dense, rtol=1e-12)
    root = dense_power(dense, -0.5)
    np.testing.assert_allclose(op.power(-0.5).to_dense(), root, rtol=1e-10, atol=1e-12)
    assert op.symmetric
    with pytest.raises(ValueError, match="permutation of range"):
        PermutedOperator(KroneckerOperator([a]), [0, 0])


def test_closed_form_top_eigenpairs():
    d = DiagonalOperator([1.0, 5.0, 3.0])
    values, vectors = d.top_eigenpairs(2)
    np.testing.assert_allclose(values, [5.0, 3.0])
    np.testing.assert_array_equal(vectors, np.eye(3)[:, [1, 2]])
    basis = np.random.default_rng(9).standard_normal((8, 2))
    op = LowRankPlusDiagonal(basis, [2.0, 0.5], 0.25)
    dense = op.to_dense()
    values, vectors = op.top_eigenpairs(2)
    np.testing.assert_allclose(values, np.sort(np.linalg.eigvalsh(dense))[::-1][:2], rtol=1e-10)
    np.testing.assert_allclose(dense @ vectors, vectors * values, atol=1e-10)
