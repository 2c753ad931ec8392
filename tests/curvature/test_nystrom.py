"""``top_eigenpairs(method="nystrom")`` (block subspace iteration with Rayleigh–Ritz) and
``nystrom_factors`` (the one-pass randomized Nyström approximation)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_curv.curvature import DenseOperator, nystrom_factors, top_eigenpairs


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


# ------------------------------------------------------------------- nystrom_factors


def _test_matrix(dim, size, seed=0):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, size)))[0]


@pytest.mark.parametrize(
    "spectrum",
    [
        np.concatenate([np.geomspace(100.0, 1.0, 8), np.full(92, 0.01)]),
        np.concatenate([np.geomspace(5.0, 1.0, 6), np.zeros(54)]),  # rank 6 < sketch 12
    ],
    ids=["spiked", "low_rank"],
)
def test_nystrom_factors_equal_the_dense_formula(spectrum):
    op, _ = known_operator(spectrum)
    a = op.matrix.numpy()
    omega = _test_matrix(a.shape[0], 12)
    y = a @ omega
    vals, vecs = (t.numpy() for t in nystrom_factors(tf.constant(omega), tf.constant(y)))
    dense = y @ np.linalg.pinv(omega.T @ y, rcond=1e-12) @ y.T  # Y (ΩᵀY)⁺ Yᵀ
    np.testing.assert_allclose((vecs * vals) @ vecs.T, dense, atol=1e-10 * spectrum.max())
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(12), atol=1e-10)
    assert np.all(np.diff(vals) <= 0) and np.all(vals >= 0)
    # Â ⪯ A: the approximation never exceeds the operator in any direction.
    assert np.linalg.eigvalsh(a - dense).min() > -1e-9 * spectrum.max()


def test_nystrom_factors_recover_a_low_rank_operator_exactly():
    spectrum = np.concatenate([[9.0, 4.0, 2.0], np.zeros(37)])
    op, q = known_operator(spectrum)
    omega = _test_matrix(40, 5, seed=1)
    vals, vecs = nystrom_factors(tf.constant(omega), op.matmat(tf.constant(omega)))
    np.testing.assert_allclose(vals.numpy()[:3], spectrum[:3], rtol=1e-10)
    np.testing.assert_allclose(vals.numpy()[3:], 0.0, atol=1e-10)
    cosines = np.abs(np.sum(vecs.numpy()[:, :3] * q[:, :3], axis=0))
    np.testing.assert_allclose(cosines, 1.0, atol=1e-10)


def test_nystrom_factors_of_an_indefinite_operator_keep_its_positive_part():
    spectrum = np.array([6.0, 3.0, -4.0, -1.0, 0.5, 0.2])
    op, _ = known_operator(spectrum, seed=4)
    omega = _test_matrix(6, 6, seed=2)  # the whole space: the core is Ωᵀ A Ω, indefinite
    vals, _ = nystrom_factors(tf.constant(omega), op.matmat(tf.constant(omega)))
    assert np.all(np.isfinite(vals.numpy())) and np.all(vals.numpy() >= 0)
    np.testing.assert_allclose(vals.numpy()[:2], [6.0, 3.0], rtol=1e-10)


def test_nystrom_factors_in_float32_under_xla():
    op, _ = known_operator(np.concatenate([np.geomspace(50.0, 1.0, 5), np.full(45, 0.1)]))
    omega = _test_matrix(50, 8)
    y = op.matrix.numpy() @ omega
    exact = nystrom_factors(tf.constant(omega), tf.constant(y))[0].numpy()
    compiled = tf.function(nystrom_factors, jit_compile=True)
    vals, _ = compiled(tf.constant(omega, tf.float32), tf.constant(y, tf.float32))
    assert vals.dtype == tf.float32
    np.testing.assert_allclose(vals.numpy(), exact, rtol=1e-4, atol=1e-4)
