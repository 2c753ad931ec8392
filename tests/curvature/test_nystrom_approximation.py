"""The randomized Nyström approximation, its preconditioner and Nyström PCG."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from keras_curv.curvature import DenseOperator, top_eigenpairs
from keras_curv.curvature.nystrom import (
    PreconditionedOperator,
    nystrom_approximation,
    nystrom_inverse,
    randomized_nystrom,
)
from keras_curv.optimizers import full_batch_math as fbm
from tests.optimizers import _full_batch_numpy as ref


def _spd(eigenvalues, seed=0):
    lam = np.asarray(eigenvalues, np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    return (q * lam) @ q.T


def _sketch(a, rank, seed=1):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((a.shape[0], rank)))
    return q, a @ q


def test_matches_the_numpy_transcription():
    a = _spd(np.logspace(-2, 2, 40))
    q, y = _sketch(a, 8)
    u, lam = nystrom_approximation(tf.constant(q), tf.constant(y))
    u_ref, lam_ref = ref.nystrom(q, y)
    np.testing.assert_allclose(lam.numpy(), lam_ref, rtol=1e-10)
    np.testing.assert_allclose(
        (u.numpy() * lam.numpy()) @ u.numpy().T, (u_ref * lam_ref) @ u_ref.T, atol=1e-10
    )
    np.testing.assert_allclose(u.numpy().T @ u.numpy(), np.eye(8), atol=1e-12)
    assert np.all(np.diff(lam.numpy()) <= 0)


def test_exact_for_a_matrix_of_rank_r_and_below_a_in_general():
    rng = np.random.default_rng(2)
    factor = rng.standard_normal((30, 5))
    low_rank = factor @ factor.T
    q, y = _sketch(low_rank, 5)
    u, lam = (t.numpy() for t in nystrom_approximation(tf.constant(q), tf.constant(y)))
    np.testing.assert_allclose((u * lam) @ u.T, low_rank, atol=1e-9 * np.abs(low_rank).max())
    a = _spd(np.logspace(0, 3, 30))
    q, y = _sketch(a, 6)
    u, lam = (t.numpy() for t in nystrom_approximation(tf.constant(q), tf.constant(y)))
    # Â ⪯ A (Tropp et al.): A − Â is positive semi-definite.
    assert np.linalg.eigvalsh(a - (u * lam) @ u.T).min() >= -1e-9 * lam[0]


def test_indefinite_matrices_give_a_finite_non_negative_approximation():
    a = _spd(np.concatenate([[50.0, 20.0, -30.0], np.linspace(-1, 1, 27)]))
    q, y = _sketch(a, 6)
    u, lam = (t.numpy() for t in nystrom_approximation(tf.constant(q), tf.constant(y)))
    assert np.all(np.isfinite(u)) and np.all(np.isfinite(lam)) and np.all(lam >= 0)
    # Bounded by A's spectral radius (up to the shift): no blow-up from a singular core.
    assert lam.max() <= 3 * np.abs(np.linalg.eigvalsh(a)).max()
    u_ref, lam_ref = ref.nystrom(q, y)
    np.testing.assert_allclose(lam, lam_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_preconditioner_matches_the_dense_formula(power):
    a = _spd(np.logspace(0, 3, 20))
    q, y = _sketch(a, 5)
    u, lam = ref.nystrom(q, y)
    mu = 1e-2
    dense = ref.nystrom_preconditioner_inverse(u, lam, mu)
    if power == 0.5:
        w, v = np.linalg.eigh(dense)
        dense = (v * np.sqrt(w)) @ v.T
    r = np.random.default_rng(3).standard_normal(20)
    got = nystrom_inverse(tf.constant(u), tf.constant(lam), mu, tf.constant(r), power=power)
    np.testing.assert_allclose(got.numpy(), dense @ r, rtol=1e-10)


def _outliers(r=10, n=200, seed=0):
    """r eigenvalues in [1e3, 1e5], the bulk in [1, 2]."""
    return _spd(np.concatenate([np.logspace(3, 5, r), np.linspace(1.0, 2.0, n - r)]), seed)


def test_randomized_nystrom_and_preconditioned_spectrum():
    a = _outliers()
    op = DenseOperator(a)
    approx = randomized_nystrom(op, 10, seed=0)
    assert approx.num_matvecs == 10 and tuple(approx.eigenvectors.shape) == (200, 10)
    top = np.sort(np.linalg.eigvalsh(a))[::-1][:10]
    # Rank r without oversampling: the leading values well, all from below (Â ⪯ A).
    np.testing.assert_allclose(approx.eigenvalues.numpy()[:5], top[:5], rtol=0.05)
    assert np.all(approx.eigenvalues.numpy() <= top * (1 + 1e-9))
    preconditioned = PreconditionedOperator(op, approx, mu=1e-4)
    spectrum = np.linalg.eigvalsh(preconditioned.to_dense())
    # The 10 outliers collapse: κ from 1e5 to about λ̂_r / λ_bulk.
    assert spectrum.max() / spectrum.min() < 0.05 * np.linalg.cond(a)
    lanczos_top = top_eigenpairs(preconditioned, 1, seed=0).eigenvalues[0]
    assert lanczos_top == pytest.approx(spectrum.max(), rel=1e-6)


def test_nystrom_pcg_needs_far_fewer_iterations_than_cg_with_r_outliers():
    a = _outliers()
    b = np.random.default_rng(4).standard_normal(200)
    mu = 1e-4
    system = lambda v: tf.linalg.matvec(tf.constant(a), v) + mu * v  # noqa: E731
    plain = fbm.conjugate_gradient(system, tf.constant(b), tolerance=1e-8, max_iterations=500)
    approx = randomized_nystrom(DenseOperator(a), 10, seed=0)
    preconditioned = fbm.conjugate_gradient(
        system,
        tf.constant(b),
        tolerance=1e-8,
        max_iterations=500,
        preconditioner=approx.preconditioner(mu),
    )
    x = np.linalg.solve(a + mu * np.eye(200), b)
    for result in (plain, preconditioned):
        assert np.linalg.norm(result.solution.numpy() - x) <= 1e-6 * np.linalg.norm(x)
    assert int(preconditioned.iterations) * 2 < int(plain.iterations), (
        int(preconditioned.iterations),
        int(plain.iterations),
    )


def test_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        randomized_nystrom(DenseOperator(np.eye(3)), 4)
    with pytest.raises(ValueError, match="rank"):
        randomized_nystrom(DenseOperator(np.eye(3)), 0)
