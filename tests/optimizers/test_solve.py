"""``keras_curv.minimize``: the proofs on known problems, callbacks, errors and tracing."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

import keras_curv
from keras_curv.callbacks import HessianSpectrum
from keras_curv.optimizers import LBFGS, LevenbergMarquardt, NewtonCG, NysNewtonCG, minimize
from tests.conftest import float64_everywhere

METHODS = ["lbfgs", "newton_cg", "nys_newton_cg", "levenberg_marquardt"]


@pytest.fixture(autouse=True)
def float64():
    # The policy too: Keras fixes it at the first layer an earlier test made.
    with float64_everywhere():
        yield


def _least_squares(eigenvalues, start, seed=42):
    """``f(θ) = (1/N) ‖Xθ‖² = ½ θᵀAθ`` (a Dense layer, MSE), A = Q diag(λ) Qᵀ, from ``start``."""
    lam = np.asarray(eigenvalues, float)
    n = lam.size
    rng = np.random.RandomState(seed)
    q, _ = np.linalg.qr(rng.randn(n, n))
    x = np.sqrt(n / 2.0) * (q * np.sqrt(lam)) @ q.T
    model = keras.Sequential([keras.Input((n,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(loss="mse")
    model.set_weights([np.asarray(start, float).reshape(n, 1)])
    return model, x, np.zeros((n, 1)), (q * lam) @ q.T


# --------------------------------------------------------- known spectra


def test_lbfgs_on_the_reference_quadratic():
    """κ = 1000, n = 10, from θ = 1 (the reference text's problem).

    With an accurate line search (c2 = 0.1) L-BFGS with m = n is conjugate gradients in
    disguise: about n iterations. The default c2 = 0.9 takes the unit step almost always,
    as the reference's own script does, and needs far more (scipy's L-BFGS-B too)."""
    lam = np.logspace(0, 3, 10)
    model, x, y, a = _least_squares(lam, np.ones(10))
    result = minimize(model, x, y, method=LBFGS(c2=0.1), tolerance=1e-8, verbose=0)
    assert result.converged and result.iterations <= 11, result
    assert np.linalg.norm(model.get_weights()[0]) < 1e-8
    model, x, y, a = _least_squares(lam, np.ones(10))
    default = minimize(model, x, y, method="lbfgs", tolerance=1e-8, max_iterations=300, verbose=0)
    reference = scipy.optimize.minimize(
        lambda w: (0.5 * w @ a @ w, a @ w),
        np.ones(10),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-8, "ftol": 0.0, "maxcor": 10, "maxiter": 1000},
    )
    assert default.converged and 30 < default.iterations < 2 * reference.nit, (
        default.iterations,
        reference.nit,
    )


def test_newton_cg_takes_the_exact_newton_step_in_one_outer_iteration():
    lam = np.logspace(0, 3, 10)
    model, x, y, _ = _least_squares(lam, np.ones(10))
    solver = NewtonCG(damping=0.0, adapt_damping=False, cg_tolerance=1e-12, max_cg_iterations=20)
    result = minimize(model, x, y, method=solver, tolerance=1e-9, verbose=0)
    assert result.converged and result.iterations == 1
    # n = 10 in exact arithmetic; float64 rounding at κ = 1000 costs a few more (14).
    assert result.history["cg_iterations"][0] <= 15
    assert result.history["step_size"] == [1.0]
    np.testing.assert_allclose(model.get_weights()[0], 0.0, atol=1e-10)


def test_nys_newton_cg_needs_fewer_cg_iterations_with_r_outliers():
    rng = np.random.default_rng(0)
    lam = np.concatenate([np.logspace(3, 5, 10), np.linspace(1.0, 2.0, 190)])
    start = rng.normal(size=200)
    common = {"cg_tolerance": 1e-8, "max_cg_iterations": 400}
    counts = {}
    for key, solver in [
        ("plain", NewtonCG(damping=1e-4, adapt_damping=False, **common)),
        ("rank 10", NysNewtonCG(rank=10, mu=1e-4, seed=0, **common)),
        ("rank 15", NysNewtonCG(rank=15, mu=1e-4, seed=0, **common)),
    ]:
        model, x, y, _ = _least_squares(lam, start)
        result = minimize(model, x, y, method=solver, max_iterations=1, verbose=0)
        counts[key] = result.history["cg_iterations"][0]
        assert result.history["loss"][0] < 1e-10 * result.initial_loss
    # Measured: 32, 18 and 8. A rank-r sketch without oversampling captures the top
    # outliers well and the r-th poorly; half as many again captures all ten.
    assert counts["rank 10"] < 0.6 * counts["plain"], counts
    assert counts["rank 15"] < 0.3 * counts["plain"], counts


# -------------------------------------------------- softmax regression vs scipy


def _softmax_regression(x, y, l2):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(10, kernel_initializer="zeros",
                               kernel_regularizer=keras.regularizers.L2(l2)),
        ]
    )  # fmt: skip
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.slow
def test_every_method_reaches_scipys_optimum_on_digits():
    from sklearn.datasets import load_digits

    from tests.optimizers._full_batch_numpy import SoftmaxRegression, scipy_lbfgsb

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    l2 = 2.0**-10  # exact in float32, as Keras stores it
    reference = scipy_lbfgsb(SoftmaxRegression(x, y, 10, l2), 650)
    for method in METHODS:
        model = _softmax_regression(x, y, l2)
        result = minimize(model, x, y, method=method, max_iterations=400, tolerance=1e-8,
                          verbose=0)  # fmt: skip
        relative = (result.loss - reference.fun) / reference.fun
        assert abs(relative) < 1e-6, (method, result, relative)
        assert result.converged, (method, result)


def test_batches_give_the_same_run():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.integers(0, 10, 60)
    runs = []
    for batch_size in (None, 16):
        model = _softmax_regression(x, y, 2.0**-6)
        result = minimize(model, x, y, method="newton_cg", batch_size=batch_size,
                          max_iterations=5, verbose=0)  # fmt: skip
        runs.append((result.history["loss"], model.get_weights()[0]))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-12)
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------ the run itself


def _small(seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(40, 5)), rng.integers(0, 10, 40)
    return _softmax_regression(x, y, 2.0**-6), x, y


def test_history_logs_and_solver_state():
    model, x, y = _small()
    result = minimize(model, x, y, method="lbfgs", max_iterations=6, tolerance=0.0, verbose=0)
    keys = {"loss", "gradient_norm", "step_size", "function_evaluations", "cg_iterations",
            "hessian_vector_products", "curvature_pairs"}  # fmt: skip
    assert keys <= set(result.history) and result.iterations == 6
    losses = result.history["loss"]
    assert all(b < a for a, b in zip([result.initial_loss, *losses], losses))
    assert losses[-1] == pytest.approx(float(model.evaluate(x, y, verbose=0)), rel=1e-12)
    assert result.history["curvature_pairs"] == [1, 2, 3, 4, 5, 6]
    assert isinstance(result.solver, LBFGS) and int(result.solver.iterations) == 6
    # The state carries over: the same solver continues with its memory.
    again = minimize(model, x, y, method=result.solver, max_iterations=2, tolerance=0.0,
                     verbose=0)  # fmt: skip
    assert again.history["curvature_pairs"] == [7, 8]
    assert "converged" in repr(again)


def test_traced_once(monkeypatch):
    model, x, y = _small()
    solver = NewtonCG()
    calls = []
    original = NewtonCG.solve

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(NewtonCG, "solve", counting)
    minimize(model, x, y, method=solver, max_iterations=5, tolerance=0.0, loss_tolerance=0.0,
             verbose=0)  # fmt: skip
    assert len(calls) == 1


def test_keras_callbacks(tmp_path):
    model, x, y = _small()

    class StopAtThree(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.seen = sorted(logs)
            if epoch == 2:
                self.model.stop_training = True

    stop = StopAtThree()
    board = keras.callbacks.TensorBoard(str(tmp_path / "logs"))
    spectrum = HessianSpectrum((x, y), top_k=1, every_n_epochs=2, seed=0)
    result = minimize(
        model,
        x,
        y,
        method="nys_newton_cg",
        max_iterations=20,
        tolerance=0.0,
        callbacks=[stop, board, keras.callbacks.TerminateOnNaN(), spectrum],
        verbose=0,
    )
    assert result.iterations == 3 and "callback" in result.message and not result.converged
    assert "gradient_norm" in stop.seen and "damping" in stop.seen
    assert len(spectrum.measurements["step"]) >= 1
    assert any(p.name.startswith("events") for p in (tmp_path / "logs" / "train").iterdir())
    early = keras.callbacks.EarlyStopping(monitor="loss", min_delta=10.0, patience=1)
    model, x, y = _small()
    result = minimize(model, x, y, max_iterations=20, tolerance=0.0, callbacks=[early],
                      verbose=0)  # fmt: skip
    assert result.iterations == 2


def test_progress_bar(capsys):
    model, x, y = _small()
    minimize(model, x, y, method="levenberg_marquardt", max_iterations=3, tolerance=0.0,
             verbose=1)  # fmt: skip
    out = capsys.readouterr().out
    assert "gradient_norm" in out and "3/3" in out


def test_non_finite_trial_points_never_reach_the_weights():
    """f = −Σ log(1 − θ²): NaN outside |θ| < 1, and the first trial steps leave it."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(3, use_bias=False)])
    model.set_weights([np.array([[0.9, -0.5, 0.2]])])

    def barrier(model, x, y):
        theta = model(tf.ones((1, 1), tf.float64))
        return -tf.reduce_sum(tf.math.log(1.0 - theta**2)) + tf.reduce_sum(theta * 5.0)

    for method in ("lbfgs", "newton_cg", NysNewtonCG(rank=2, seed=0)):
        model.set_weights([np.array([[0.9, -0.5, 0.2]])])
        result = minimize(model, np.zeros((1, 1)), loss=barrier, method=method,
                          max_iterations=30, verbose=0)  # fmt: skip
        weights = model.get_weights()[0]
        assert np.all(np.isfinite(weights)) and np.all(np.abs(weights) < 1), (method, weights)
        assert result.loss < result.initial_loss


# ------------------------------------------------------------------ errors


def test_errors():
    model, x, y = _small()
    with pytest.raises(ValueError, match="method"):
        minimize(model, x, y, method="bfgs")
    with pytest.raises(ValueError, match="max_iterations"):
        minimize(model, x, y, max_iterations=0)
    with pytest.raises(ValueError, match="verbose"):
        minimize(model, x, y, verbose=3)
    with pytest.raises(ValueError, match="empty"):
        minimize(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="Gauss–Newton"):
        minimize(model, x, loss=lambda m, x, y: tf.reduce_mean(m(x) ** 2),
                 method="levenberg_marquardt")  # fmt: skip
    with pytest.raises(ValueError, match="Gauss–Newton"):
        minimize(model, x, loss=lambda m, x, y: tf.reduce_mean(m(x) ** 2),
                 method=NewtonCG(curvature="ggn"))  # fmt: skip
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="not finite at the starting weights"):
        minimize(model, bad, y)
    used = minimize(model, x, y, max_iterations=1, verbose=0).solver
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.compile(loss="mse")
    with pytest.raises(ValueError, match="fresh one"):
        minimize(other, x[:, :3], np.zeros((40, 2)), method=used)
    piecewise = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    piecewise.compile(loss="mean_absolute_error")
    with pytest.raises(ValueError, match="second derivatives"):
        minimize(piecewise, x, np.zeros((40, 1)), method="newton_cg")
    # L-BFGS needs no second derivatives.
    assert minimize(piecewise, x, np.zeros((40, 1)), max_iterations=2, verbose=0).iterations >= 1


def test_top_level_export():
    assert keras_curv.minimize is minimize and keras_curv.MinimizeHistory is not None
    assert isinstance(LevenbergMarquardt(), keras_curv.optimizers.FullBatchOptimizer)
