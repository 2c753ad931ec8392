"""``top_eigenpairs(method="nystrom")``: block subspace iteration with Rayleigh–Ritz."""

import numpy as np
import pytest

from keras_curv.curvature import DenseOperator, top_eigenpairs


def known_operator(eigenvalues, seed=0):
    """DenseOperator(Q diag(lam) Q^T) with a random orthogonal Q, in float64."""
    lam = np.asarray(eigenvalues, np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    return DenseOperator((q * lam) @ q.T), q


def test_known_psd_spectrum():
    lam = np.concatenate([[40.0, 30.0, 20.0, 15.0, 10.0], np.linspace(0.0, 4.0, 95)])
    op, q = known_operator(lam)
    result = top_eigenpairs(op, 5, method="nystrom", seed=0)
    np.testing.assert_allclose(result.eigenvalues, lam[:5], rtol=1e-6)
    cosines = np.abs(np.sum(result.eigenvectors * q[:, :5], axis=0))
    assert np.all(cosines > 1 - 1e-6), cosines
    assert result.converged and result.method == "nystrom"
    # Passes of b = k + oversampling = 15 products each; residuals are exact ones.
    assert result.num_matvecs == 15 * result.num_iters
    a, vecs = op.matrix.numpy(), result.eigenvectors
    exact = np.linalg.norm(a @ vecs - vecs * result.eigenvalues, axis=0)
    np.testing.assert_allclose(result.residuals, exact, atol=1e-12)
    np.testing.assert_array_less(exact, 1e-6 * result.eigenvalues)


def test_indefinite_returns_largest_magnitude_sorted_algebraically():
    lam = np.concatenate([[-50.0, 30.0, -20.0, 6.0], np.linspace(-2.0, 2.0, 76)])
    op, _ = known_operator(lam, seed=1)
    vals, _ = top_eigenpairs(op, 3, method="nystrom", seed=0)
    np.testing.assert_allclose(vals, [30.0, -20.0, -50.0], rtol=1e-6)


def test_repeated_eigenvalues_found_with_multiplicity():
    lam = np.concatenate([[9.0, 9.0, 9.0, 5.0], np.linspace(0.0, 2.0, 56)])
    op, _ = known_operator(lam, seed=2)
    result = top_eigenpairs(op, 4, method="nystrom", seed=0)
    np.testing.assert_allclose(result.eigenvalues, lam[:4], rtol=1e-6)
    vecs = result.eigenvectors
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(4), atol=1e-8)


def test_block_covering_whole_space_is_exact_in_one_pass():
    lam = np.array([4.0, 3.0, 2.0, 1.0, -1.0])
    op, _ = known_operator(lam)
    result = top_eigenpairs(op, 2, method="nystrom", seed=0, oversampling=10)
    np.testing.assert_allclose(result.eigenvalues, [4.0, 3.0], rtol=1e-12)
    assert result.num_iters == 1 and result.num_matvecs == 5


def test_warm_start_from_previous_eigenvectors_reduces_matvecs():
    lam = np.concatenate([[20.0, 18.0, 16.0], np.linspace(0.0, 14.0, 147)])
    op, _ = known_operator(lam, seed=3)
    cold = top_eigenpairs(op, 3, method="nystrom", seed=0, oversampling=3)
    warm = top_eigenpairs(op, 3, method="nystrom", seed=1, oversampling=3, init=cold.eigenvectors)
    np.testing.assert_allclose(warm.eigenvalues, lam[:3], rtol=1e-6)
    assert warm.num_matvecs < cold.num_matvecs, (warm.num_matvecs, cold.num_matvecs)


def test_max_iters_reports_non_convergence():
    op, _ = known_operator(np.linspace(1.0, 1.01, 100))
    result = top_eigenpairs(op, 2, method="nystrom", max_iters=2, oversampling=2, tol=1e-12, seed=0)
    assert result.num_iters == 2 and result.num_matvecs == 8 and not result.converged


def test_bad_init_shape():
    op, _ = known_operator(np.arange(10.0))
    with pytest.raises(ValueError, match=r"init.*\(10,\)"):
        top_eigenpairs(op, 2, method="nystrom", init=np.ones((5, 2)))
