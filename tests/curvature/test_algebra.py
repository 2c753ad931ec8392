"""The operator algebra (sums, scalings, products, restriction, scipy) against dense matrices."""

import numpy as np
import pytest
import scipy.sparse.linalg
import tensorflow as tf

from keras_curv._internal.flat import variable_ranges
from keras_curv.curvature import (
    DenseOperator,
    DiagonalOperator,
    HessianOperator,
    IdentityOperator,
    KroneckerOperator,
    top_eigenpairs,
)
from tests.callbacks.conftest import dense_spectrum, tiny_data, tiny_model


def sym(n, seed):
    a = np.random.default_rng(seed).standard_normal((n, n))
    return a + a.T


def test_sum_scale_difference_and_products():
    a, b = sym(5, 0), sym(5, 1)
    A, B = DenseOperator(a), DenseOperator(b)
    np.testing.assert_allclose((A + B).to_dense(), a + b)
    np.testing.assert_allclose((A - 2.0 * B).to_dense(), a - 2 * b)
    np.testing.assert_allclose((-A).to_dense(), -a)
    np.testing.assert_allclose((A @ B).to_dense(), a @ b, rtol=1e-12)
    v = np.arange(5.0)
    np.testing.assert_allclose((A @ v).numpy(), a @ v)
    assert not (A @ B).symmetric and (B @ A @ B).symmetric and (A + B).symmetric
    damped = A + 0.5 * IdentityOperator(5, dtype=tf.float64)
    np.testing.assert_allclose(damped.to_dense(), a + 0.5 * np.eye(5))
    with pytest.raises(TypeError, match="IdentityOperator"):
        A + 1.0
    with pytest.raises(ValueError, match="one dimension"):
        A + DenseOperator(np.eye(3))


def test_composites_compute_in_the_widest_dtype_and_count_parts():
    a = DenseOperator(np.eye(3, dtype=np.float32))
    b = DenseOperator(np.eye(3))
    total = a + b
    assert total.dtype == tf.float64
    total.matvec(np.ones(3))
    assert a.num_matvecs == 1 and b.num_matvecs == 1 and total.num_matvecs == 1


def test_preconditioned_operator_matches_the_dense_congruence():
    h = sym(6, 2)
    d = np.linspace(0.5, 3.0, 6)
    root = DiagonalOperator(d).power(-0.5)
    op = root @ DenseOperator(h) @ root
    dense = np.diag(d**-0.5) @ h @ np.diag(d**-0.5)
    np.testing.assert_allclose(op.to_dense(), dense, rtol=1e-12)
    top = top_eigenpairs(op, 2, tol=1e-10, seed=0).eigenvalues
    np.testing.assert_allclose(top, np.sort(np.linalg.eigvalsh(dense))[::-1][:2], rtol=1e-8)
    # λ(P^-1/2 H P^-1/2) = λ(P^-1 H): the same eigenvalues as the non-symmetric product.
    np.testing.assert_allclose(
        np.sort(np.linalg.eigvals(np.diag(1 / d) @ h).real)[::-1][:2], top, rtol=1e-8
    )


def test_kronecker_preconditioned_operator_matches_the_dense_congruence():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 2))
    g = rng.standard_normal((3, 3))
    a, g = a @ a.T + np.eye(2), g @ g.T + np.eye(3)
    h = sym(6, 4)
    root = KroneckerOperator([a, g]).power(-0.5)
    op = root @ DenseOperator(h) @ root
    values, vectors = np.linalg.eigh(np.kron(a, g))
    dense_root = (vectors * values**-0.5) @ vectors.T
    np.testing.assert_allclose(op.to_dense(), dense_root @ h @ dense_root, rtol=1e-8, atol=1e-10)


def test_to_scipy_runs_scipy_solvers():
    h = sym(8, 5)
    op = DenseOperator(h).to_scipy()
    top = scipy.sparse.linalg.eigsh(op, k=1, which="LA")[0][0]
    assert top == pytest.approx(np.linalg.eigvalsh(h)[-1], rel=1e-8)
    np.testing.assert_allclose(op.matmat(np.eye(8)), h)
    product = (DenseOperator(h) @ DenseOperator(sym(8, 6))).to_scipy()
    with pytest.raises(NotImplementedError):
        product.rmatvec(np.ones(8))


def test_restriction_is_the_principal_block_of_the_dense_matrix():
    h = sym(7, 7)
    ranges = [(0, 2), (4, 6)]
    idx = [0, 1, 4, 5]
    block = DenseOperator(h).restrict(ranges)
    np.testing.assert_allclose(block.to_dense(), h[np.ix_(idx, idx)])
    with pytest.raises(ValueError, match="overlap"):
        DenseOperator(h).restrict([(0, 3), (2, 4)])
    with pytest.raises(ValueError, match="does not lie"):
        DenseOperator(h).restrict([(5, 9)])


def test_block_hessians_are_slices_of_the_dense_hessian():
    import keras

    x, y = tiny_data()
    model = tiny_model()
    _, _, h = dense_spectrum(model, x, y)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    full = HessianOperator(model, loss, x, y)
    for layer in model.layers:
        block = layer.trainable_variables
        ranges = variable_ranges(model.trainable_variables, block)
        idx = np.concatenate([np.arange(a, b) for a, b in ranges])
        expected = h[np.ix_(idx, idx)]
        restricted = HessianOperator(model, loss, x, y, variables=block)
        np.testing.assert_allclose(restricted.to_dense(), expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(full.restrict(ranges).to_dense(), expected, atol=1e-12)
    with pytest.raises(ValueError, match="not among them"):
        HessianOperator(model, loss, x, y, variables=[keras.Variable(np.ones(2))])
