"""``top_eigenpairs(method="power")``: deflated power iteration (the PyHessian baseline)."""

import numpy as np
import pytest

from keras_curv.curvature import DenseOperator, top_eigenpairs


def known_operator(eigenvalues, seed=0):
    """DenseOperator(Q diag(lam) Q^T) with a random orthogonal Q, in float64."""
    lam = np.asarray(eigenvalues, np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    return DenseOperator((q * lam) @ q.T), q


def test_well_separated_spectrum():
    lam = np.concatenate([[100.0, 50.0, 25.0], np.linspace(0.0, 5.0, 47)])
    op, q = known_operator(lam)
    result = top_eigenpairs(op, 3, method="power", seed=0, tol=1e-10, max_iters=500)
    np.testing.assert_allclose(result.eigenvalues, lam[:3], rtol=1e-6)
    cosines = np.abs(np.sum(result.eigenvectors * q[:, :3], axis=0))
    assert np.all(cosines > 1 - 1e-6), cosines
    assert result.converged and result.num_matvecs == result.num_iters
    a, vecs = op.matrix.numpy(), result.eigenvectors
    exact = np.linalg.norm(a @ vecs - vecs * result.eigenvalues, axis=0)
    np.testing.assert_allclose(result.residuals, exact, rtol=1e-6, atol=1e-9)


def test_converges_to_largest_magnitude():
    lam = np.concatenate([[-40.0, 10.0], np.linspace(-1.0, 1.0, 38)])
    op, _ = known_operator(lam, seed=1)
    vals, _ = top_eigenpairs(op, 2, method="power", seed=0, tol=1e-10, max_iters=500)
    np.testing.assert_allclose(vals, [10.0, -40.0], rtol=1e-6)


def test_max_iters_is_per_eigenvalue_and_non_convergence_reported():
    op, _ = known_operator(np.linspace(1.0, 1.001, 60))
    result = top_eigenpairs(op, 3, method="power", seed=0, tol=1e-14, max_iters=7)
    assert result.num_matvecs == 21 and not result.converged


def test_warm_start_from_exact_vectors_converges_at_once():
    lam = np.concatenate([[9.0, 8.5, 8.0], np.linspace(0.0, 7.9, 57)])
    op, q = known_operator(lam, seed=2)
    cold = top_eigenpairs(op, 3, method="power", seed=0, tol=1e-8, max_iters=1000)
    warm = top_eigenpairs(op, 3, method="power", seed=0, tol=1e-8, init=q[:, :3])
    np.testing.assert_allclose(warm.eigenvalues, lam[:3], rtol=1e-10)
    # Two products per eigenvalue: one Rayleigh quotient, one to see it does not change.
    assert warm.num_matvecs == 6 < cold.num_matvecs


def test_repeated_eigenvalues_do_not_crash():
    lam = np.concatenate([[7.0, 7.0, 7.0], np.linspace(0.0, 1.0, 27)])
    op, _ = known_operator(lam, seed=3)
    result = top_eigenpairs(op, 3, method="power", seed=0, tol=1e-10, max_iters=300)
    np.testing.assert_allclose(result.eigenvalues, 7.0, rtol=1e-6)
    vecs = result.eigenvectors
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(3), atol=1e-8)


def test_bad_max_iters():
    op, _ = known_operator(np.arange(10.0))
    with pytest.raises(ValueError, match="max_iters"):
        top_eigenpairs(op, 2, method="power", max_iters=-3)
