"""The pure pieces of the full-batch solvers against NumPy transcriptions and known answers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

from keras_curv.optimizers import full_batch_math as fbm
from tests.optimizers import _full_batch_numpy as ref


def _quadratic(eigenvalues, seed=0):
    lam = np.asarray(eigenvalues, np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    return (q * lam) @ q.T


def _t(a):
    return tf.constant(a, tf.float64)


# ------------------------------------------------------------------- two-loop


def _buffers(s_hist, y_hist, memory, n):
    """Circular buffers holding the pairs in insertion order, as push_curvature_pair does."""
    s = tf.zeros((memory, n), tf.float64)
    y = tf.zeros((memory, n), tf.float64)
    count, newest = tf.constant(0), tf.constant(-1)
    for si, yi in zip(s_hist, y_hist):
        s, y, count, newest, accepted = fbm.push_curvature_pair(s, y, count, newest, _t(si), _t(yi))
        assert bool(accepted)
    return s, y, count, newest


@pytest.mark.parametrize("pairs, memory", [(0, 4), (3, 4), (4, 4), (7, 4)])
def test_two_loop_matches_the_reference_recursion(pairs, memory):
    rng = np.random.default_rng(pairs)
    n = 6
    a = _quadratic(np.linspace(1.0, 20.0, n))
    s_hist = [rng.standard_normal(n) for _ in range(pairs)]
    y_hist = [a @ s for s in s_hist]  # positive curvature: all accepted
    g = rng.standard_normal(n)
    s, y, count, newest = _buffers(s_hist, y_hist, memory, n)
    got = fbm.two_loop_direction(_t(g), s, y, count, newest).numpy()
    expected = -ref.two_loop(
        g, s_hist[-memory:] if pairs else [], y_hist[-memory:] if pairs else []
    )
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert int(count) == min(pairs, memory)


def test_two_loop_with_n_conjugate_pairs_of_a_quadratic_is_the_newton_step():
    # Hereditary property: with A-conjugate steps (here A's eigenvectors), H = A⁻¹.
    n = 5
    a = _quadratic([1.0, 3.0, 10.0, 30.0, 100.0])
    basis = np.linalg.eigh(a)[1].T
    s, y, count, newest = _buffers(list(basis), [a @ e for e in basis], n, n)
    g = np.arange(1.0, n + 1)
    direction = fbm.two_loop_direction(_t(g), s, y, count, newest).numpy()
    np.testing.assert_allclose(direction, -np.linalg.solve(a, g), rtol=1e-10)


def test_pairs_without_positive_curvature_are_skipped():
    s = tf.zeros((3, 2), tf.float64)
    for pair in [([1.0, 0.0], [-1.0, 0.0]), ([1.0, 0.0], [0.0, 1.0]), ([np.nan, 0.0], [1.0, 0.0])]:
        out = fbm.push_curvature_pair(s, s, 0, -1, _t(pair[0]), _t(pair[1]))
        assert not bool(out[4]) and int(out[2]) == 0
        np.testing.assert_array_equal(out[0].numpy(), 0.0)
    out = fbm.push_curvature_pair(s, s, 0, -1, _t([1.0, 0.0]), _t([2.0, 0.0]))
    assert bool(out[4]) and int(out[2]) == 1 and int(out[3]) == 0


# ------------------------------------------------------------- line searches


def test_cubic_minimizer_is_exact_on_a_cubic():
    # f(t) = (t - 1)^3 / 3 - 4 (t - 1) + 2 has its local minimum at t = 3.
    f = lambda t: (t - 1) ** 3 / 3 - 4 * (t - 1) + 2
    df = lambda t: (t - 1) ** 2 - 4
    got = fbm.cubic_minimizer(*map(_t, (0.5, f(0.5), df(0.5), 4.0, f(4.0), df(4.0), 0.0, 10.0)))
    assert float(got) == pytest.approx(3.0, rel=1e-12)
    # A cubic without a local minimiser (e1² < f'1 f'2): the midpoint.
    got = fbm.cubic_minimizer(*map(_t, (0.0, 0.0, 1.0, 1.0, 0.5, 1.0, 0.0, 1.0)))
    assert float(got) == pytest.approx(0.5)


def _rosenbrock(w):
    x, y = w
    f = (1 - x) ** 2 + 100 * (y - x * x) ** 2
    return f, np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


CASES = [
    ("rosenbrock from (-1.2, 1) along -g, t0 = 1", _rosenbrock, [-1.2, 1.0], None, 1.0),
    ("rosenbrock, tiny t0 (extrapolation)", _rosenbrock, [-1.2, 1.0], None, 1e-6),
    ("rosenbrock, Newton-like direction", _rosenbrock, [0.5, 0.5], [0.4, 0.1], 1.0),
    ("exp(t) + quadratic", lambda w: (np.exp(w[0]) + w[1] ** 2 + w[0] ** 2,
                                       np.array([np.exp(w[0]) + 2 * w[0], 2 * w[1]])),
     [2.0, -3.0], None, 1.0),
]  # fmt: skip


@pytest.mark.parametrize("name, fg, w0, d0, t0", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("c2", [0.9, 0.1])
def test_strong_wolfe_matches_numpy_and_satisfies_the_conditions(name, fg, w0, d0, t0, c2):
    w0 = np.asarray(w0, float)
    f0, g0 = fg(w0)
    d = -g0 if d0 is None else np.asarray(d0, float)
    assert g0 @ d < 0

    def evaluate(t):
        f, g = fg(w0 + float(t) * d)
        return _t(f), _t(g)

    got = fbm.strong_wolfe(evaluate, _t(f0), _t(g0), _t(d), _t(t0), c2=c2)
    t, f, g, evals = ref.strong_wolfe(lambda t: fg(w0 + t * d), f0, g0, d, t0, c2=c2)
    assert float(got.step) == pytest.approx(t, rel=1e-12)
    assert int(got.evaluations) == evals
    np.testing.assert_allclose(got.gradient.numpy(), g, rtol=1e-12)
    assert bool(got.satisfied)
    f_t, g_t = fg(w0 + t * d)
    assert f_t <= f0 + 1e-4 * t * (g0 @ d)
    assert abs(g_t @ d) <= c2 * abs(g0 @ d)
    # scipy's (Moré–Thuente) search accepts a point of the same kind.
    alpha = scipy.optimize.line_search(lambda w: fg(w)[0], lambda w: fg(w)[1], w0, d, c2=c2)[0]
    assert alpha is not None and alpha > 0


def test_strong_wolfe_treats_non_finite_losses_as_infinite():
    def evaluate(t):
        t = float(t)
        if t > 0.5:
            return _t(np.nan), _t([np.nan])
        return _t((t - 0.3) ** 2), _t([2 * (t - 0.3)])

    got = fbm.strong_wolfe(evaluate, _t(0.09), _t([-0.6]), _t([1.0]), _t(1.0))
    assert 0.0 < float(got.step) <= 0.5 and np.isfinite(float(got.loss))
    assert float(got.loss) < 0.09


def test_strong_wolfe_returns_zero_without_a_decrease():
    # An ascent direction mislabelled as descent: no point decreases the loss.
    got = fbm.strong_wolfe(
        lambda t: (_t(1.0 + float(t)), _t([1.0])), _t(1.0), _t([-1.0]), _t([1.0]), _t(1.0)
    )
    assert float(got.step) == 0.0 and float(got.loss) == 1.0 and not bool(got.satisfied)


def test_backtracking():
    phi = lambda t: _t((float(t) - 0.1) ** 2)
    t, f, evals, ok = fbm.backtracking(phi, _t(0.01), _t(-0.2), _t(1.0))
    assert bool(ok) and float(t) == 0.125 and int(evals) == 4
    assert (float(t), float(f)) == ref.backtracking(lambda t: (t - 0.1) ** 2, 0.01, -0.2, 1.0)
    t, f, evals, ok = fbm.backtracking(lambda t: _t(np.nan), _t(1.0), _t(-1.0), _t(1.0))
    assert not bool(ok) and float(t) == 0.0 and float(f) == 1.0 and int(evals) == 20


# ------------------------------------------------------------------------- CG


def test_cg_reaches_the_newton_step_of_the_reference_problem_in_n_iterations():
    # second-order-optimization-from-scratch.txt: 5-D, eigenvalues 1..200, theta = 1..5.
    rng = np.random.RandomState(42)
    q, _ = np.linalg.qr(rng.randn(5, 5))
    a = q @ np.diag([1.0, 5.0, 20.0, 50.0, 200.0]) @ q.T
    b = -(a @ np.arange(1.0, 6.0))
    got = fbm.conjugate_gradient(
        lambda v: tf.linalg.matvec(_t(a), v), _t(b), tolerance=1e-15, max_iterations=5
    )
    x = np.linalg.solve(a, b)
    # Exact in n steps in exact arithmetic; in float64 the error grows like cond(A)^2 * eps
    # (200^2 * 2.2e-16 = 9e-12): one run measured 1.05e-11, the threads' summation order
    # in the matvec decides which side of 1e-11 it lands.
    np.testing.assert_allclose(got.solution.numpy(), x, rtol=1e-10)
    assert int(got.iterations) == 5 and not bool(got.negative_curvature)
    assert float(got.curvature) == pytest.approx(x @ a @ x, rel=1e-10)
    expected, iterations, _ = ref.pcg(lambda v: a @ v, b, 1e-15, 5)
    # Both at rounding level from the exact solution (different summation orders).
    np.testing.assert_allclose(got.solution.numpy(), expected, rtol=1e-10)


def test_cg_on_kappa_1000_needs_n_iterations_plus_rounding():
    """n = 10, κ = 1000: exact after n steps in exact arithmetic; float64 loses
    orthogonality, so n steps give 1e-5 and n + 2 steps 1e-10 (measured)."""
    a = _quadratic(np.logspace(0, 3, 10))
    b = np.arange(1.0, 11.0)
    x = np.linalg.solve(a, b)
    for steps, error in [(10, 1e-4), (12, 1e-9)]:
        got = fbm.conjugate_gradient(
            lambda v: tf.linalg.matvec(_t(a), v), _t(b), tolerance=1e-15, max_iterations=steps
        )
        assert np.linalg.norm(got.solution.numpy() - x) <= error * np.linalg.norm(x)


def test_warm_started_preconditioned_cg_matches_numpy():
    rng = np.random.default_rng(1)
    a = _quadratic(np.logspace(0, 4, 30), seed=2)
    b, x0 = rng.standard_normal(30), rng.standard_normal(30)
    m_inv = np.diag(1.0 / np.diag(a))  # Jacobi
    got = fbm.conjugate_gradient(
        lambda v: tf.linalg.matvec(_t(a), v),
        _t(b),
        tolerance=1e-6,
        max_iterations=8,
        initial=_t(x0),
        preconditioner=lambda r: tf.linalg.matvec(_t(m_inv), r),
    )
    x, iterations, _ = ref.pcg(lambda v: a @ v, b, 1e-6, 8, x0=x0, precondition=lambda r: m_inv @ r)
    np.testing.assert_allclose(got.solution.numpy(), x, rtol=1e-10)
    assert int(got.iterations) == iterations == 8 and int(got.matvecs) == 9


def test_cg_stops_on_negative_curvature_with_the_last_iterate():
    a = np.diag([2.0, 1.0, -1.0])
    b = np.array([1.0, 1.0, 1.0])
    got = fbm.conjugate_gradient(
        lambda v: tf.linalg.matvec(_t(a), v), _t(b), tolerance=1e-12, max_iterations=10
    )
    x, iterations, negative = ref.pcg(lambda v: a @ v, b, 1e-12, 10)
    assert negative and bool(got.negative_curvature)
    assert int(got.iterations) == iterations
    np.testing.assert_allclose(got.solution.numpy(), x, rtol=1e-12)
    # Non-positive curvature along the very first direction: x₀ (zeros) comes back.
    first = fbm.conjugate_gradient(lambda v: -v, _t(b), tolerance=1e-6, max_iterations=5)
    assert bool(first.negative_curvature) and int(first.iterations) == 0
    np.testing.assert_array_equal(first.solution.numpy(), 0.0)


# -------------------------------------------------------------------- damping


def test_damping_rules():
    lam = _t(1.0)
    rules = [(0.1, 1.5), (0.5, 1.0), (0.9, 2.0 / 3.0)]
    for rho, factor in rules:
        got = fbm.martens_damping(lam, _t(rho), minimum=1e-8, maximum=1e8)
        assert float(got) == pytest.approx(factor, rel=1e-15)
        assert float(got) == pytest.approx(ref.martens(1.0, rho, 1e-8, 1e8), rel=1e-15)
    assert float(fbm.martens_damping(lam, _t(0.0), minimum=0.0, maximum=1.2)) == 1.2
    new, growth = fbm.nielsen_damping(lam, _t(2.0), _t(0.75), True, minimum=0, maximum=1e9)
    assert float(new) == pytest.approx(1 - 0.5**3) and float(growth) == 2.0
    new, growth = fbm.nielsen_damping(lam, _t(4.0), _t(-1.0), False, minimum=0, maximum=1e9)
    assert float(new) == 4.0 and float(growth) == 8.0
    assert float(fbm.reduction_ratio(_t(1.0), _t(0.5), _t(-1.0), _t(1.0))) == pytest.approx(1.0)
    assert float(fbm.reduction_ratio(_t(1.0), _t(0.5), _t(1.0), _t(1.0))) == 0.0
