"""Lanczos primitive and ``top_eigenpairs(method="lanczos")`` against dense oracles."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.curvature import (
    DenseOperator,
    HessianOperator,
    lanczos,
    top_eigenpairs,
)


def known_operator(eigenvalues, seed=0):
    """DenseOperator(Q diag(lam) Q^T) with a random orthogonal Q, in float64."""
    lam = np.asarray(eigenvalues, np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    return DenseOperator((q * lam) @ q.T), q


def assert_vectors_match(vecs, ref):
    cosines = np.abs(np.sum(vecs * ref, axis=0))
    assert np.all(cosines > 1 - 1e-6), cosines


def tiny_model_hessian():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 4))
    y = rng.integers(0, 3, size=40)
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(5, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, activation="softmax", dtype="float64"),
        ]
    )
    # A Loss instance: the string form hits a bug in resolve_loss (reported to the lead).
    return HessianOperator(model, keras.losses.SparseCategoricalCrossentropy(), x, y)


class TestLanczosPrimitive:
    def test_tridiagonal_is_projection_with_orthonormal_basis(self):
        op, _ = known_operator(np.linspace(-3.0, 7.0, 60))
        dec = lanczos(op, np.ones(60), 25, return_basis=True)
        basis = dec.basis.numpy()
        assert basis.shape == (25, 60) and dec.basis.dtype == tf.float64
        np.testing.assert_allclose(basis @ basis.T, np.eye(25), atol=1e-12)
        np.testing.assert_allclose(
            basis @ op.matrix.numpy() @ basis.T, dec.tridiagonal(), atol=1e-11
        )
        assert op.num_matvecs == 25

    def test_full_run_reproduces_spectrum(self):
        lam = np.linspace(1.0, 10.0, 30)
        op, _ = known_operator(lam)
        dec = lanczos(op, np.random.default_rng(1).standard_normal(30), 30)
        np.testing.assert_allclose(np.linalg.eigvalsh(dec.tridiagonal()), lam, rtol=1e-10)

    def test_breakdown_stops_without_restart(self):
        # The start vector lies in a 3-dimensional eigenspace: exact after 3 steps.
        op, q = known_operator([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
        dec = lanczos(op, q[:, :3].sum(axis=1), 6)
        assert dec.num_steps == 3 and dec.breakdown and dec.betas[-1] == 0.0
        np.testing.assert_allclose(np.linalg.eigvalsh(dec.tridiagonal()), [3, 4, 5], rtol=1e-12)

    def test_breakdown_restarts_with_rng(self):
        op, q = known_operator([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
        dec = lanczos(op, q[:, 2], 6, restart_rng=np.random.default_rng(0), return_basis=True)
        assert dec.num_steps == 6 and dec.num_restarts == 1 and dec.betas[0] == 0.0
        np.testing.assert_allclose(
            np.linalg.eigvalsh(dec.tridiagonal()), [0.5, 1, 2, 3, 4, 5], rtol=1e-10
        )

    def test_float32_operator_runs_recurrence_in_float64(self):
        op, _ = known_operator(np.linspace(1.0, 2.0, 20))
        op32 = DenseOperator(tf.cast(op.matrix, tf.float32))
        dec = lanczos(op32, np.ones(20), 5, return_basis=True)
        assert dec.basis.dtype == tf.float64 and dec.alphas.dtype == np.float64

    @pytest.mark.parametrize("steps", [0, 21, 2.5])
    def test_bad_num_steps(self, steps):
        op, _ = known_operator(np.ones(20))
        with pytest.raises(ValueError, match="num_steps"):
            lanczos(op, np.ones(20), steps)

    def test_bad_start_vector(self):
        op, _ = known_operator(np.ones(20))
        with pytest.raises(ValueError, match="non-zero"):
            lanczos(op, np.zeros(20), 3)
        with pytest.raises(ValueError, match="shape"):
            lanczos(op, np.ones(19), 3)


class TestLanczosEigensolver:
    def test_known_spectrum_values_and_vectors(self):
        lam = np.concatenate([[40.0, 30.0, 20.0, 15.0, 10.0], np.linspace(0.0, 5.0, 95)])
        op, q = known_operator(lam)
        result = top_eigenpairs(op, 5, seed=0)
        vals, vecs = result
        assert vals.dtype == np.float64 and vecs.shape == (100, 5)
        np.testing.assert_allclose(vals, lam[:5], rtol=1e-6)
        assert_vectors_match(vecs, q[:, :5])
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=0), 1.0, atol=1e-12)
        assert result.converged and result.method == "lanczos"
        assert result.num_matvecs == op.num_matvecs == result.num_iters
        np.testing.assert_array_less(result.residuals, 1e-6 * vals)

    def test_indefinite_returns_top_algebraic(self):
        # The largest-magnitude eigenvalue is -50, but Lanczos must return the top algebraic.
        lam = np.concatenate([[-50.0, -30.0, 8.0, 6.0, 4.0], np.linspace(-2.0, 2.0, 75)])
        op, _ = known_operator(lam, seed=2)
        vals, _ = top_eigenpairs(op, 3, seed=1)
        np.testing.assert_allclose(vals, [8.0, 6.0, 4.0], rtol=1e-6)
        vals_all = top_eigenpairs(op, 80, seed=1).eigenvalues
        np.testing.assert_allclose(vals_all, np.sort(lam)[::-1], rtol=1e-6, atol=1e-9)

    def test_repeated_and_clustered_eigenvalues(self):
        # One Krylov space holds a single direction per distinct eigenvalue, so Lanczos
        # need not find every copy of a repeated one (the block "nystrom" method does);
        # it must still return genuine, converged eigenpairs, with the top one first.
        lam = np.concatenate([[9.0, 9.0, 9.0, 9.0 - 1e-9], np.linspace(0.0, 3.0, 46)])
        op, _ = known_operator(lam, seed=4)
        result = top_eigenpairs(op, 4, seed=0)
        assert result.converged
        np.testing.assert_allclose(result.eigenvalues[0], 9.0, rtol=1e-12)
        distance = np.min(np.abs(result.eigenvalues[:, None] - lam[None, :]), axis=1)
        np.testing.assert_array_less(distance, 1e-6 * 9.0)
        a, vecs = op.matrix.numpy(), result.eigenvectors
        np.testing.assert_allclose(a @ vecs, vecs * result.eigenvalues, atol=1e-5)
        # The columns are orthonormal, even among the copies of 9.
        np.testing.assert_allclose(vecs.T @ vecs, np.eye(4), atol=1e-8)

    def test_k_equals_dim(self):
        lam = np.array([3.0, 1.0, -1.0, -2.0])
        op, _ = known_operator(lam)
        result = top_eigenpairs(op, 4, seed=0)
        np.testing.assert_allclose(result.eigenvalues, lam, rtol=1e-10)
        assert result.converged

    def test_seed_reproducible(self):
        op, _ = known_operator(np.linspace(0.0, 1.0, 50) ** 3)
        a = top_eigenpairs(op, 3, seed=7, tol=1e-3)
        b = top_eigenpairs(op, 3, seed=7, tol=1e-3)
        np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
        np.testing.assert_array_equal(a.eigenvectors, b.eigenvectors)

    def test_max_iters_caps_and_reports_non_convergence(self):
        op, _ = known_operator(np.linspace(1.0, 1.1, 200))
        result = top_eigenpairs(op, 3, max_iters=5, seed=0, tol=1e-12)
        assert result.num_matvecs == 5 and not result.converged

    def test_warm_start_uses_fewer_matvecs(self):
        lam = np.concatenate([[20.0, 18.0, 16.0, 14.0, 12.0], np.linspace(0.0, 10.0, 195)])
        op, q = known_operator(lam, seed=5)
        cold = top_eigenpairs(op, 5, seed=0)
        # A nearby operator, as after an optimizer step.
        perturbation = 1e-3 * np.random.default_rng(9).standard_normal((200, 200))
        nearby = DenseOperator(op.matrix.numpy() + perturbation + perturbation.T)
        ref = np.linalg.eigvalsh(nearby.matrix.numpy())[::-1][:5]
        cold_near = top_eigenpairs(nearby, 5, seed=1)
        warm_near = top_eigenpairs(nearby, 5, seed=1, init=cold.eigenvectors)
        np.testing.assert_allclose(warm_near.eigenvalues, ref, rtol=1e-6)
        assert warm_near.num_matvecs < cold_near.num_matvecs, (
            warm_near.num_matvecs,
            cold_near.num_matvecs,
        )

    def test_far_fewer_matvecs_than_power_iteration(self):
        lam = np.concatenate([10.0 * 0.9 ** np.arange(10), np.linspace(0.0, 3.0, 290)])
        op, _ = known_operator(lam, seed=6)
        fast = top_eigenpairs(op, 5, method="lanczos", seed=0, tol=1e-6)
        slow = top_eigenpairs(op, 5, method="power", seed=0, tol=1e-6, max_iters=1000)
        np.testing.assert_allclose(fast.eigenvalues, lam[:5], rtol=1e-6)
        np.testing.assert_allclose(slow.eigenvalues, lam[:5], rtol=1e-3)
        assert slow.num_matvecs >= 5 * fast.num_matvecs, (slow.num_matvecs, fast.num_matvecs)


class TestHessianOfKerasModel:
    def test_matches_dense_eigh(self):
        op = tiny_model_hessian()
        assert op.dtype == tf.float64 and op.dim == 43
        dense = op.to_dense()
        ref_vals, ref_vecs = np.linalg.eigh(0.5 * (dense + dense.T))
        ref_vals, ref_vecs = ref_vals[::-1], ref_vecs[:, ::-1]
        op.reset_counter()
        result = top_eigenpairs(op, 3, seed=0, tol=1e-8)
        np.testing.assert_allclose(result.eigenvalues, ref_vals[:3], rtol=1e-6)
        if np.all(np.diff(ref_vals[:4]) < -1e-3 * abs(ref_vals[0])):
            assert_vectors_match(result.eigenvectors, ref_vecs[:, :3])
        assert result.converged and result.num_matvecs < op.dim

    def test_no_retracing_per_matvec(self):
        op = tiny_model_hessian()
        op.matvec(tf.ones(op.dim, tf.float64))
        traced = op.tracing_count
        top_eigenpairs(op, 2, seed=0, tol=1e-10, max_iters=30)
        assert op.tracing_count == traced


class TestValidation:
    def setup_method(self):
        self.op, _ = known_operator(np.arange(10.0))

    def test_k_larger_than_dim(self):
        with pytest.raises(ValueError, match=r"k=11.*dim=10"):
            top_eigenpairs(self.op, 11)

    @pytest.mark.parametrize("k", [0, -1, 2.0, True])
    def test_bad_k(self, k):
        with pytest.raises(ValueError, match="`k`"):
            top_eigenpairs(self.op, k)

    def test_unknown_method(self):
        with pytest.raises(
            ValueError, match=r"`method` must be one of \('lanczos', 'nystrom', 'power'\)"
        ):
            top_eigenpairs(self.op, 2, method="arnoldi")

    @pytest.mark.parametrize(
        "init", [np.ones(9), np.ones((9, 2)), np.ones((10, 0)), np.ones((10, 2, 1))]
    )
    def test_bad_init_shape(self, init):
        with pytest.raises(ValueError, match="init"):
            top_eigenpairs(self.op, 2, init=init)

    def test_bad_init_values(self):
        with pytest.raises(ValueError, match="NaN"):
            top_eigenpairs(self.op, 2, init=np.full(10, np.nan))
        with pytest.raises(ValueError, match="all-zero"):
            top_eigenpairs(self.op, 2, init=np.zeros(10))

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"tol": 0.0},
            {"tol": -1.0},
            {"tol": float("inf")},
            {"max_iters": 0},
            {"max_iters": 3.0},
            {"oversampling": -1},
            {"oversampling": True},
        ],
    )
    def test_bad_numbers(self, kwargs):
        [name] = kwargs
        with pytest.raises(ValueError, match=f"`{name}` must be"):
            top_eigenpairs(self.op, 2, **kwargs)


def test_tridiagonal_eigh_matches_dense_eigh():
    from keras_curv.curvature.lanczos import tridiagonal, tridiagonal_eigh

    rng = np.random.default_rng(4)
    for m in (1, 2, 7, 60):
        alphas, off = rng.normal(size=m), rng.uniform(0.1, 1.0, size=m - 1)
        theta, s = tridiagonal_eigh(alphas, off)
        dense_theta, dense_s = np.linalg.eigh(tridiagonal(alphas, off))
        np.testing.assert_allclose(theta, dense_theta, atol=1e-12)
        np.testing.assert_allclose(np.abs(s), np.abs(dense_s), atol=1e-9)
