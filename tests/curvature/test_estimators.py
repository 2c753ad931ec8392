"""Trace and diagonal estimators against dense float64 oracles."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.curvature import (
    DenseOperator,
    DiagonalEstimate,
    HessianOperator,
    TraceEstimate,
    hutchinson_diagonal,
    hutchinson_trace,
)
from keras_curv.curvature.estimators import _rademacher

METHODS = ["hutchinson", "hutch++"]


def random_symmetric(dim, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((dim, dim))
    return (a + a.T) / 2 + np.diag(rng.uniform(1.0, 3.0, dim))


def spectrum_matrix(eigenvalues, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (q * eigenvalues) @ q.T


def hutchinson_std(a, m):
    """Exact standard deviation of the m-probe Rademacher Hutchinson estimate."""
    return np.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) / m)


def test_hutchinson_matches_exact_variance_and_shrinks_with_samples():
    a = random_symmetric(30, 0)
    op = DenseOperator(a)
    truth = np.trace(a)
    spreads = {}
    for m in (8, 128):
        estimates = np.array(
            [hutchinson_trace(op, m, seed=s, method="hutchinson").estimate for s in range(60)]
        )
        # Unbiased: the mean over seeds is within 4 of its standard errors.
        assert abs(estimates.mean() - truth) < 4 * hutchinson_std(a, m) / np.sqrt(60)
        spreads[m] = estimates.std(ddof=1)
        assert 0.7 < spreads[m] / hutchinson_std(a, m) < 1.4
    assert spreads[128] < spreads[8] / 2.5  # sqrt(16) = 4 in expectation


@pytest.mark.parametrize("method", METHODS)
def test_many_samples_lands_within_a_few_standard_errors(method):
    a = random_symmetric(40, 1)
    result = hutchinson_trace(DenseOperator(a), 600, seed=3, method=method)
    assert isinstance(result, TraceEstimate)
    assert result.num_matvecs == 600
    assert 0 < result.std_error < np.inf
    if method == "hutchinson":
        np.testing.assert_allclose(result.std_error, hutchinson_std(a, 600), rtol=0.15)
    assert abs(result.estimate - np.trace(a)) < 4 * result.std_error
    assert float(result) == result.estimate


@pytest.mark.parametrize("method", METHODS)
def test_reported_std_error_matches_spread_over_seeds(method):
    a = random_symmetric(25, 2)
    op = DenseOperator(a)
    results = [hutchinson_trace(op, 30, seed=s, method=method) for s in range(50)]
    empirical = np.std([r.estimate for r in results], ddof=1)
    reported = np.mean([r.std_error for r in results])
    assert 1 / 1.5 < empirical / reported < 1.5


@pytest.mark.parametrize("num_samples", [3, 16, 18, 31, 100])
@pytest.mark.parametrize("method", METHODS)
def test_operator_is_charged_exactly_num_samples(method, num_samples):
    op = DenseOperator(random_symmetric(12, 3))  # 100 // 3 > dim: the sketch is capped
    result = hutchinson_trace(op, num_samples, seed=0, method=method, block_size=7)
    assert op.num_matvecs == result.num_matvecs == num_samples
    op.reset_counter()
    diag = hutchinson_diagonal(op, num_samples, seed=0, block_size=7)
    assert op.num_matvecs == diag.num_matvecs == num_samples


def test_hutchpp_is_exact_below_rank_budget():
    eigenvalues = np.zeros(60)
    eigenvalues[:5] = [40.0, -7.0, 3.0, 2.5, 0.1]  # indefinite, rank 5
    a = spectrum_matrix(eigenvalues, 4)
    result = hutchinson_trace(DenseOperator(a), 18, seed=5)  # sketch of 6 > rank 5
    np.testing.assert_allclose(result.estimate, np.trace(a), atol=1e-10)
    assert result.std_error < 1e-10


def test_hutchpp_full_sketch_is_exact():
    a = random_symmetric(10, 6)
    result = hutchinson_trace(DenseOperator(a), 31, seed=0)  # sketch capped at dim = 10
    np.testing.assert_allclose(result.estimate, np.trace(a), atol=1e-10)


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    a = spectrum_matrix(100.0 * 0.7 ** np.arange(80), 7)
    op = DenseOperator(a)
    truth = np.trace(a)

    def mse(method):
        errors = [
            hutchinson_trace(op, 30, seed=s, method=method).estimate - truth for s in range(40)
        ]
        return np.mean(np.square(errors))

    plain, deflated = mse("hutchinson"), mse("hutch++")
    assert deflated < plain / 20  # measured: about 80x smaller


def test_block_size_does_not_change_results():
    op = DenseOperator(random_symmetric(20, 8))
    for method in METHODS:
        one = hutchinson_trace(op, 21, seed=9, method=method, block_size=1)
        many = hutchinson_trace(op, 21, seed=9, method=method, block_size=100)
        np.testing.assert_allclose(one.estimate, many.estimate, rtol=1e-12)
        np.testing.assert_allclose(one.std_error, many.std_error, rtol=1e-10)
    one = hutchinson_diagonal(op, 21, seed=9, block_size=1)
    many = hutchinson_diagonal(op, 21, seed=9, block_size=4)
    np.testing.assert_allclose(one.diagonal, many.diagonal, rtol=1e-12)
    np.testing.assert_allclose(one.std_error, many.std_error, rtol=1e-10)


def test_diagonal_converges_with_exact_per_entry_error():
    a = random_symmetric(15, 10)
    op = DenseOperator(a)
    truth = np.diag(a)
    # Var[(z ⊙ Az)_j] = Σ_{k≠j} A_jk²
    exact_std = np.sqrt(np.sum(a**2, axis=1) - truth**2)

    result = hutchinson_diagonal(op, 2000, seed=11)
    assert isinstance(result, DiagonalEstimate)
    assert result.diagonal.dtype == np.float64 and result.diagonal.shape == (15,)
    np.testing.assert_allclose(result.std_error, exact_std / np.sqrt(2000), rtol=0.1)
    assert np.all(np.abs(result.diagonal - truth) < 4.5 * result.std_error)

    small = [hutchinson_diagonal(op, 10, seed=s).diagonal for s in range(30)]
    big = [hutchinson_diagonal(op, 160, seed=s).diagonal for s in range(30)]
    rms_small = np.sqrt(np.mean(np.square(np.array(small) - truth)))
    rms_big = np.sqrt(np.mean(np.square(np.array(big) - truth)))
    assert rms_big < rms_small / 2.5  # sqrt(16) = 4 in expectation
    np.testing.assert_allclose(np.asarray(result), result.diagonal)


@pytest.mark.parametrize("num_samples", [1, 2, 5])
def test_diagonal_of_diagonal_matrix_is_exact(num_samples):
    d = np.random.default_rng(12).uniform(-5.0, 5.0, 50)
    result = hutchinson_diagonal(DenseOperator(np.diag(d)), num_samples, seed=13)
    np.testing.assert_allclose(result.diagonal, d, rtol=1e-14)
    if num_samples > 1:
        np.testing.assert_allclose(result.std_error, 0.0, atol=1e-12)
    else:
        assert np.all(np.isnan(result.std_error))


def test_float32_operator_reduces_in_float64():
    a = random_symmetric(30, 14)
    op = DenseOperator(a.astype(np.float32))
    trace = hutchinson_trace(op, 900, seed=0, method="hutchinson")
    diag = hutchinson_diagonal(op, 900, seed=0)
    assert isinstance(trace.estimate, float)
    assert diag.diagonal.dtype == np.float64
    assert abs(trace.estimate - np.trace(a)) < 4 * trace.std_error
    assert np.all(np.abs(diag.diagonal - np.diag(a)) < 4.5 * diag.std_error)
    # With the sketch spanning the whole space only float32 rounding is left.
    full = hutchinson_trace(op, 90, seed=0)
    np.testing.assert_allclose(full.estimate, np.trace(a), rtol=1e-5)


def test_seed_reproducibility():
    op = DenseOperator(random_symmetric(20, 15))
    for method in METHODS:
        first = hutchinson_trace(op, 12, seed=42, method=method)
        assert first == hutchinson_trace(op, 12, seed=42, method=method)
        assert first.estimate != hutchinson_trace(op, 12, seed=43, method=method).estimate
        generator = hutchinson_trace(op, 12, seed=np.random.default_rng(42), method=method)
        assert generator.estimate == first.estimate
    np.testing.assert_array_equal(
        hutchinson_diagonal(op, 12, seed=42).diagonal,
        hutchinson_diagonal(op, 12, seed=42).diagonal,
    )


def test_probes_take_both_signs_equally():
    probes = _rademacher(np.random.default_rng(0), (400, 500))
    assert set(np.unique(probes)) == {-1.0, 1.0}
    # 200 000 fair coins: the fraction of +1 has standard deviation ~0.0011.
    assert abs(np.mean(probes == 1.0) - 0.5) < 0.006
    # Columns are not constant: a sampler stuck on one sign fails here too.
    assert np.all(np.abs(probes.sum(axis=0)) < 400)


def test_all_ones_matrix_exposes_one_sided_probes():
    # zᵀ11ᵀz = (Σz)², whose mean is n for fair signs but n² if every entry were -1.
    n = 50
    result = hutchinson_trace(DenseOperator(np.ones((n, n))), 2000, seed=16, method="hutchinson")
    assert abs(result.estimate - n) < 4 * result.std_error
    assert result.estimate < 2 * n


def mean_cross_entropy(y_true, logits):
    # A plain callable keeps the whole product in float64 (Keras loss objects
    # compute in floatx unless given a dtype).
    labels = tf.cast(y_true, tf.int32)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def test_estimators_on_keras_hessian():
    keras.utils.set_random_seed(17)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(5, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    rng = np.random.default_rng(18)
    x = rng.standard_normal((40, 4))
    y = rng.integers(0, 3, 40)
    op = HessianOperator(model, mean_cross_entropy, x, y)
    assert op.dtype == tf.float64 and op.dim == 43
    dense = op.to_dense()
    np.testing.assert_allclose(dense, dense.T, atol=1e-10)

    for method in METHODS:
        result = hutchinson_trace(op, 200, seed=19, method=method)
        # std_error covers sampling only; allow float64 rounding on top of it.
        assert abs(result.estimate - np.trace(dense)) < 4 * result.std_error + 1e-12 * abs(
            np.trace(dense)
        )
    # The sketch spans the whole 43-dim space: hutch++ is then exact.
    full = hutchinson_trace(op, 129, seed=20)
    np.testing.assert_allclose(full.estimate, np.trace(dense), rtol=1e-9)

    diag = hutchinson_diagonal(op, 200, seed=21)
    assert np.all(np.abs(diag.diagonal - np.diag(dense)) < 4.5 * diag.std_error + 1e-12)
    small = hutchinson_diagonal(op, 20, seed=22).diagonal
    assert np.linalg.norm(diag.diagonal - np.diag(dense)) < np.linalg.norm(small - np.diag(dense))


@pytest.mark.parametrize("bad", [0, -2, 2.5, "10", None, True])
def test_bad_num_samples(bad):
    op = DenseOperator(np.eye(3))
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson_trace(op, bad, method="hutchinson")
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson_diagonal(op, bad)


def test_hutchpp_needs_three_samples():
    op = DenseOperator(np.eye(3))
    with pytest.raises(ValueError, match="hutch\\+\\+ needs `num_samples` >= 3"):
        hutchinson_trace(op, 2)
    assert hutchinson_trace(op, 2, method="hutchinson").estimate == 3.0


def test_single_probe_has_nan_error_bar():
    result = hutchinson_trace(DenseOperator(random_symmetric(5, 0)), 1, method="hutchinson")
    assert np.isnan(result.std_error) and np.isfinite(result.estimate)


def test_bad_method_operator_and_block_size():
    op = DenseOperator(np.eye(3))
    with pytest.raises(ValueError, match="method"):
        hutchinson_trace(op, 10, method="hutchpp")
    with pytest.raises(ValueError, match="DenseOperator"):
        hutchinson_trace(np.eye(3), 10)
    with pytest.raises(ValueError, match="DenseOperator"):
        hutchinson_diagonal(np.eye(3), 10)
    with pytest.raises(ValueError, match="block_size"):
        hutchinson_trace(op, 10, block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        hutchinson_diagonal(op, 10, block_size=1.5)


def test_trace_parts_are_block_traces_and_add_up():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((30, 30))
    a = a + a.T
    blocks = [[(0, 10)], [(10, 18), (25, 30)], [(18, 25)]]
    truth = [
        np.trace(a[np.ix_(i, i)])
        for i in ([*range(10)], [*range(10, 18), *range(25, 30)], [*range(18, 25)])
    ]
    # A sketch of all 30 directions: Hutch++ and its block traces are exact.
    exact = hutchinson_trace(DenseOperator(a), 90, seed=0, ranges=blocks)
    np.testing.assert_allclose(exact.parts, truth, rtol=1e-10, atol=1e-10)
    for method in ("hutch++", "hutchinson"):
        estimate = hutchinson_trace(DenseOperator(a), 12, seed=1, method=method, ranges=blocks)
        assert sum(estimate.parts) == pytest.approx(estimate.estimate, rel=1e-12)
        # Unbiased: the mean over many seeds approaches each block's trace.
        means = np.mean(
            [
                hutchinson_trace(DenseOperator(a), 12, seed=s, method=method, ranges=blocks).parts
                for s in range(300)
            ],
            axis=0,
        )
        np.testing.assert_allclose(means, truth, atol=1.5)
    assert hutchinson_trace(DenseOperator(a), 9, seed=0).parts is None
    with pytest.raises(ValueError, match="ranges"):
        hutchinson_trace(DenseOperator(a), 9, ranges=[[(20, 40)]])
