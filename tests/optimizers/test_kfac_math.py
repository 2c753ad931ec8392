"""Fast unit tests of K-FAC's pure functions (no fit): kfac_math and kfac_fisher."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.optimizers import kfac_fisher as kf
from keras_curv.optimizers import kfac_math as km


def _spd(n, rng, scale=1.0):
    m = rng.normal(size=(n, n))
    return scale * (m @ m.T / n + 0.1 * np.eye(n))


def _eigen(matrix, diagonal=False):
    q, values = km.eigen(tf.constant(matrix), diagonal)
    return q, values


@pytest.mark.parametrize("a_diagonal, g_diagonal", [(False, False), (True, False), (False, True)])
def test_damped_kronecker_solve_is_the_dense_inverse(a_diagonal, g_diagonal):
    rng = np.random.default_rng(0)
    a = np.diag(rng.uniform(0.1, 3, 4)) if a_diagonal else _spd(4, rng, 3.0)
    g = np.diag(rng.uniform(0.01, 0.2, 3)) if g_diagonal else _spd(3, rng, 0.05)
    v = rng.normal(size=(4, 3))
    damping = 0.3
    a_in = np.diag(a) if a_diagonal else a
    g_in = np.diag(g) if g_diagonal else g
    ea, eg = _eigen(a_in, a_diagonal), _eigen(g_in, g_diagonal)
    pi = km.pi_adjustment(ea[1], eg[1])
    np.testing.assert_allclose(pi, np.sqrt((np.trace(a) / 4) / (np.trace(g) / 3)), rtol=1e-14)
    got = km.damped_kronecker_solve(tf.constant(v), ea, eg, damping, pi).numpy()
    root = np.sqrt(damping)
    dense = np.kron(a + pi.numpy() * root * np.eye(4), g + root / pi.numpy() * np.eye(3))
    np.testing.assert_allclose(got.ravel(), np.linalg.solve(dense, v.ravel()), rtol=1e-11)
    product = km.kronecker_product(tf.constant(v), tf.constant(a_in), tf.constant(g_in),
                                   a_diagonal, g_diagonal)  # fmt: skip
    np.testing.assert_allclose(product.numpy().ravel(), np.kron(a, g) @ v.ravel(), rtol=1e-12)


def test_batched_blocks_solve_each_channel():
    rng = np.random.default_rng(1)
    a = np.stack([_spd(3, rng) for _ in range(2)])
    g = np.stack([_spd(2, rng, 0.1) for _ in range(2)])
    v = rng.normal(size=(2, 3, 2))
    ea, eg = _eigen(a), _eigen(g)
    pi = km.pi_adjustment(ea[1], eg[1])
    got = km.damped_kronecker_solve(tf.constant(v), ea, eg, 0.05, pi).numpy()
    for c in range(2):
        p, r = pi.numpy()[c], np.sqrt(0.05)
        dense = np.kron(a[c] + p * r * np.eye(3), g[c] + r / p * np.eye(2))
        np.testing.assert_allclose(got[c].ravel(), np.linalg.solve(dense, v[c].ravel()), rtol=1e-11)


def test_pi_is_one_when_a_factor_is_empty():
    assert float(km.pi_adjustment(tf.zeros([3]), tf.ones([2]))) == 1.0
    assert float(km.pi_adjustment(tf.ones([3]), tf.zeros([2]))) == 1.0


def test_weighted_ema_is_the_bias_corrected_moving_average():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(5, 3))
    decay = 0.7
    state = tf.zeros([3], tf.float64)
    raw = np.zeros(3)
    for t, value in enumerate(values, start=1):
        state = km.weighted_ema(state, tf.constant(value), decay, tf.constant(t))
        raw = decay * raw + (1 - decay) * value
        np.testing.assert_allclose(state.numpy(), raw / (1 - decay**t), rtol=1e-13)
    latest = km.weighted_ema(tf.constant(values[0]), tf.constant(values[1]), 0.0, tf.constant(9))
    np.testing.assert_array_equal(latest.numpy(), values[1])


def test_norm_constraint_scale():
    lr, dot = tf.constant(0.5, tf.float64), tf.constant(8.0, tf.float64)
    assert float(km.norm_constraint_scale(lr, dot, None)) == 1.0
    assert float(km.norm_constraint_scale(lr, dot, 100.0)) == 1.0  # η² Δᵀg = 2 ≤ 100
    np.testing.assert_allclose(float(km.norm_constraint_scale(lr, dot, 0.5)), 0.5, rtol=1e-15)


def test_levenberg_marquardt_rule():
    damping = tf.constant(1.0, tf.float64)
    ratios = {0.9: 0.5, 0.5: 1.0, 0.1: 2.0, float("nan"): 1.0, -float("inf"): 2.0}
    for ratio, expected in ratios.items():
        got = km.adapted_damping(damping, tf.constant(ratio, tf.float64), 0.5, 1e-3, None)
        assert float(got) == expected, ratio
    assert float(km.adapted_damping(damping, tf.constant(0.9, tf.float64), 0.5, 0.8, None)) == 0.8
    assert float(km.adapted_damping(damping, tf.constant(0.0, tf.float64), 0.5, 0, 1.5)) == 1.5
    predicted = tf.constant(-2.0, tf.float64)
    assert float(km.reduction_ratio(tf.constant(-1.0, tf.float64), predicted)) == 0.5
    assert float(km.reduction_ratio(tf.constant(-1.0, tf.float64), -predicted)) == -np.inf
    assert float(km.reduction_ratio(tf.constant(np.nan, tf.float64), predicted)) == -np.inf


def test_quadratic_model_change_and_velocity():
    change = km.quadratic_model_change(tf.constant(-3.0), tf.constant(2.0), tf.constant(4.0), 0.5)
    assert float(change) == -3.0 + 1.0 + 1.0
    assert float(km.velocity(tf.constant(2.0), tf.constant(1.0), 0.5)) == 2.0
    assert float(km.velocity(tf.constant(2.0), tf.constant(1.0), 0.0)) == 1.0


def test_conv_patches_order_matches_the_kernel_layout():
    """patches @ kernel.reshape(-1, out) is the convolution itself."""
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(2, 5, 6, 3)))
    kernel = tf.constant(rng.normal(size=(3, 2, 3, 4)))
    for strides, dilation, padding in [((1, 1), (1, 1), "same"), ((2, 1), (1, 1), "valid"),
                                       ((1, 1), (2, 2), "same")]:  # fmt: skip
        patches = km.conv_patches(x, (3, 2), strides, dilation, padding)
        conv = tf.nn.conv2d(x, kernel, [1, *strides, 1], padding.upper(), dilations=dilation)
        got = tf.einsum("nhwk,ko->nhwo", patches, tf.reshape(kernel, [-1, 4]))
        np.testing.assert_allclose(got.numpy(), conv.numpy(), rtol=1e-12, atol=1e-12)
    signal = tf.constant(rng.normal(size=(2, 7, 3)))
    kernel1 = tf.constant(rng.normal(size=(3, 3, 2)))
    patches = km.conv_patches(signal, (3,), (1,), (2,), "causal")
    # Causal: the signal padded on the left by dilation·(k − 1), then a valid convolution.
    padded = tf.pad(signal, [[0, 0], [4, 0], [0, 0]])
    conv = tf.nn.conv1d(padded, kernel1, 1, "VALID", dilations=2)
    got = tf.einsum("nlk,ko->nlo", patches[:, 0], tf.reshape(kernel1, [-1, 2]))
    np.testing.assert_allclose(got.numpy(), conv.numpy(), rtol=1e-12, atol=1e-12)


_GEOMETRIES = [  # (input shape, kernel, strides, dilation, padding)
    ((2, 5, 6, 3), (3, 2), (1, 1), (1, 1), "same"),
    ((2, 5, 6, 3), (3, 2), (2, 1), (1, 1), "valid"),
    ((2, 7, 6, 3), (2, 3), (2, 2), (2, 1), "same"),
    ((2, 9, 3), (3,), (1,), (2,), "causal"),
    ((2, 9, 3), (2,), (2,), (1,), "same"),
]


@pytest.mark.parametrize("shape, kernel, strides, dilation, padding", _GEOMETRIES)
def test_patches_at_are_the_conv_patches_at_those_positions(
    shape, kernel, strides, dilation, padding
):
    """Gathered from the input (also with dynamic spatial sizes) = ``conv_patches`` rows."""
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=shape))
    geometry = (kernel, strides, dilation, padding)
    every = km.conv_patches(x, *geometry)
    every = tf.reshape(every, [shape[0], -1, every.shape[-1]])
    positions = km.conv_positions(x, *geometry)
    assert positions == every.shape[1]
    indices = tf.constant(rng.integers(0, positions, size=(shape[0], 7)), tf.int32)
    expected = tf.gather(every, indices, batch_dims=1).numpy()
    np.testing.assert_array_equal(km.patches_at(x, *geometry, indices), expected)
    dynamic = tf.TensorSpec([None] * (len(shape) - 1) + [shape[-1]], tf.float64)

    @tf.function(input_signature=[dynamic, tf.TensorSpec([None, None], tf.int32)])
    def traced(x, indices):
        return km.patches_at(x, *geometry, indices), km.conv_positions(x, *geometry)

    patches, count = traced(x, indices)
    np.testing.assert_array_equal(patches, expected)
    assert int(count) == positions


def test_patch_sample_is_unbiased_and_exact_when_the_positions_fit():
    """``Σ_j w_j x_{i_j} x_{i_j}ᵀ`` over 400 draws against ``Σ_p x_p x_pᵀ`` of every position.

    With ``q`` draws with replacement the estimate's variance per entry is
    ``(P²/q) Var_p(y_p)`` (``y_p`` the entry of ``x_p x_pᵀ``); the mean of 400 draws is
    within 5 of its standard errors (fixed seeds: deterministic; a missing ``P/q`` is
    off by a factor ``P/q = 3.5``).
    """
    rng = np.random.default_rng(5)
    n, p, k, q, draws = 3, 14, 4, 4, 400
    x = rng.normal(size=(n, p, k)) + 1.0
    outer = x[..., :, None] * x[..., None, :]  # (n, p, k, k)
    exact = outer.sum(axis=1)
    estimates = []
    for seed in range(draws):
        uniforms = tf.random.stateless_uniform((n, q), (seed, 1), dtype=tf.float64)
        indices, weights = km.patch_sample(uniforms, p)
        assert weights == p / q
        # A dynamic number of positions: the same draw, one weight per index.
        same, per_index = km.patch_sample(uniforms, tf.constant(p))
        np.testing.assert_array_equal(same, indices)
        np.testing.assert_array_equal(per_index, np.full((n, q), p / q))
        chosen = np.take_along_axis(outer, indices.numpy()[..., None, None], axis=1)
        estimates.append(weights * chosen.sum(axis=1))
    error = np.abs(np.mean(estimates, axis=0) - exact)
    standard_error = np.sqrt(p**2 / q * outer.var(axis=1) / draws)
    assert np.all(error < 5 * standard_error), np.max(error / standard_error)
    # Fewer positions than draws (a dynamic spatial size): every position once.
    indices, weights = km.patch_sample(tf.fill([2, 5], 0.5), tf.constant(3))
    np.testing.assert_array_equal(indices, [[0, 1, 2, 2, 2]] * 2)
    np.testing.assert_array_equal(weights, [[1, 1, 1, 0, 0]] * 2)


def test_second_moment_with_weights_and_a_homogeneous_coordinate():
    rng = np.random.default_rng(6)
    x, w = rng.normal(size=(6, 3)), rng.uniform(0, 2, 6)
    rows = np.c_[x, np.ones(6)]
    full = (rows * w[:, None]).T @ rows
    got = km.second_moment(tf.constant(x), False, tf.constant(w), homogeneous=True)
    np.testing.assert_allclose(got, full, rtol=1e-13)
    got = km.second_moment(tf.constant(x), True, tf.constant(w), homogeneous=True)
    np.testing.assert_allclose(got, np.diag(full), rtol=1e-13)
    for diagonal in (False, True):  # one weight for every row
        got = km.second_moment(tf.constant(x), diagonal, 2.5, homogeneous=True)
        expected = 2.5 * rows.T @ rows
        np.testing.assert_allclose(got, np.diag(expected) if diagonal else expected, rtol=1e-13)
    batched = km.second_moment(tf.constant(np.stack([x, 2 * x])), False, homogeneous=True)
    np.testing.assert_allclose(batched[1], np.c_[2 * x, np.ones(6)].T @ np.c_[2 * x, np.ones(6)])


# ----------------------------------------------------------------- kfac_fisher


def _noise(z, seed=0):
    rng = np.random.default_rng(seed)

    def draw(kind):
        if kind == "sign":
            return tf.constant(rng.choice([-1.0, 1.0], size=z.shape[0]), z.dtype)
        if kind == "normal":
            return tf.constant(rng.normal(size=z.shape), z.dtype)
        return tf.constant(rng.uniform(1e-12, 1, size=z.shape), z.dtype)

    return draw


@pytest.mark.parametrize("family", ["categorical", "binary", "squared_error"])
def test_exact_columns_are_a_square_root_of_the_nll_hessian(family):
    rng = np.random.default_rng(4)
    z = tf.constant(rng.normal(size=(3, 4)))
    likelihood = kf.Likelihood(family, from_logits=True)
    columns = kf.cotangents(likelihood, "exact", z, None, tf.ones([3], tf.float64),
                            lambda kind: tf.ones([3], tf.float64)).numpy()  # fmt: skip
    assert columns.shape == (4, 3, 4)
    for n in range(3):
        gram = columns[:, n].T @ columns[:, n]
        if family == "categorical":
            p = np.exp(z[n]) / np.exp(z[n]).sum()
            hessian = np.diag(p) - np.outer(p, p)
        elif family == "binary":
            p = 1 / (1 + np.exp(-z[n].numpy()))
            hessian = np.diag(p * (1 - p))
        else:
            hessian = np.eye(4)
        np.testing.assert_allclose(gram, hessian, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("family", ["categorical", "binary", "squared_error"])
def test_sampled_cotangents_have_the_fisher_as_covariance(family):
    rng = np.random.default_rng(5)
    draws = 20000
    z = tf.constant(np.tile(rng.normal(size=(1, 3)), (draws, 1)))
    likelihood = kf.Likelihood(family, from_logits=True)
    got = kf.cotangents(likelihood, "model", z, None, tf.ones([draws], tf.float64), _noise(z))
    samples = got.numpy()[0]
    exact = kf.cotangents(likelihood, "exact", z[:1], None, tf.ones([1], tf.float64),
                          lambda kind: tf.ones([1], tf.float64)).numpy()[:, 0]  # fmt: skip
    assert np.max(np.abs(samples.mean(0))) < 5 / np.sqrt(draws) * max(1, samples.std(0).max())
    np.testing.assert_allclose(samples.T @ samples / draws, exact.T @ exact, atol=0.03)


def test_empirical_cotangents_and_scores_of_probability_outputs():
    logits = tf.constant([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], tf.float64)
    probabilities = keras.activations.softmax(logits)
    likelihood = kf.likelihood_of("sparse_categorical_crossentropy")
    assert likelihood == kf.Likelihood("categorical", sparse_labels=True)
    # Keras caches the logits on its softmax: the scores are those logits.
    z = kf.scores(likelihood, probabilities)
    np.testing.assert_allclose(z.numpy(), logits.numpy())
    plain = tf.constant(probabilities.numpy())  # no cached logits: log-probabilities
    np.testing.assert_allclose(kf.scores(likelihood, plain).numpy(),
                               tf.nn.log_softmax(logits).numpy(), rtol=1e-12)  # fmt: skip
    labels = tf.constant([2, 0])
    ones = tf.ones([2], tf.float64)
    got = kf.cotangents(likelihood, "empirical", z, labels, ones, lambda kind: ones)
    np.testing.assert_allclose(got.numpy()[0], probabilities.numpy() - np.eye(3)[[2, 0]])


def test_likelihoods_of_keras_losses_and_clear_errors():
    bce = kf.likelihood_of(keras.losses.BinaryCrossentropy(from_logits=True, reduction="sum"))
    assert bce == kf.Likelihood("binary", from_logits=True, reduction="sum")
    assert kf.likelihood_of("mse").family == "squared_error"
    one_hot = kf.likelihood_of(keras.losses.CategoricalCrossentropy())
    assert one_hot.family == "categorical" and not one_hot.sparse_labels
    for loss, match in [
        ("mae", "'other' loss"),
        (lambda y, p: tf.reduce_mean(p), "custom loss"),
        (["mse", "mse"], "one loss per output"),
        (keras.losses.CategoricalFocalCrossentropy(), "categorical_focal"),
    ]:
        with pytest.raises(ValueError, match=match) as error:
            kf.likelihood_of(loss)
        assert "SparseCategoricalCrossentropy" in str(error.value)
    with pytest.raises(ValueError, match="reduction"):
        kf.likelihood_of(keras.losses.MeanSquaredError(reduction="none"))


def test_element_weights_and_normalizer():
    z = tf.zeros([2, 3, 4], tf.float64)
    likelihood = kf.Likelihood("categorical", sparse_labels=True, ignore_class=1)
    labels = tf.constant([[0, 1, 2], [1, 1, 3]])
    weights = kf.element_weights(likelihood, z, labels, tf.constant([2.0, 0.5]))
    np.testing.assert_array_equal(weights.numpy(), [[2.0, 0.0, 2.0], [0.0, 0.0, 0.5]])
    samples = tf.constant(2.0, tf.float64)
    assert float(kf.reduction_normalizer(likelihood, z, samples, samples)) == 1 / 3
    summed = kf.Likelihood("categorical", reduction="sum")
    assert float(kf.reduction_normalizer(summed, z, samples, samples)) == 2.0
