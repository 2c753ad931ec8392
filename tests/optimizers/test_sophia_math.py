"""Sophia's update rule and its two estimators as pure functions (fast: no fit)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.optimizers import _sampled_labels as sl
from keras_curv.optimizers.sophia import (
    clipped_fraction,
    debiased_hessian,
    sophia_direction,
    sophia_moments,
)
from tests.curvature.helpers import dense_ggn, flat_params, unflat


def test_moments_and_direction_equal_the_authors_rule():
    rng = np.random.default_rng(0)
    g, m, h, e = (rng.normal(size=6) for _ in range(4))
    new_m, new_h = sophia_moments(g, m, h, e, True, 0.965, 0.99)
    np.testing.assert_allclose(new_m, 0.965 * m + 0.035 * g, rtol=1e-15)
    np.testing.assert_allclose(new_h, 0.99 * h + 0.01 * e, rtol=1e-15)
    _, same = sophia_moments(g, m, h, e, False, 0.965, 0.99)
    np.testing.assert_array_equal(same, h)  # a step without an estimate keeps h
    rho, eps = 0.04, 1e-12
    expected = np.sign(new_m) * np.minimum(np.abs(new_m) / (rho * np.maximum(new_h, 0) + eps), 1)
    np.testing.assert_allclose(sophia_direction(new_m, new_h, rho, eps), expected, rtol=1e-15)


def test_debiased_hessian_is_the_weighted_mean_of_the_estimates():
    rng = np.random.default_rng(1)
    estimates = rng.normal(size=(3, 5))
    h = np.zeros(5)
    for e in estimates:
        _, h = sophia_moments(np.zeros(5), np.zeros(5), h, e, True, 0.9, 0.99)
    weights = 0.99 ** np.arange(2, -1, -1)  # the newest estimate weighs most
    mean = weights @ estimates / weights.sum()
    np.testing.assert_allclose(debiased_hessian(h, 3, 0.99), mean, rtol=1e-12)
    _, first = sophia_moments(np.zeros(5), np.zeros(5), np.zeros(5), estimates[0], True, 0.9, 0.99)
    np.testing.assert_allclose(debiased_hessian(first, 1, 0.99), estimates[0], rtol=1e-12)
    np.testing.assert_array_equal(debiased_hessian(np.zeros(5), 0, 0.99), np.zeros(5))


def test_direction_regimes():
    m = np.array([0.5, -0.5, 0.01, -0.01, 0.3, 0.0])
    h = np.array([0.0, 0.0, 1.0, 1.0, -2.0, 1.0])
    got = np.asarray(sophia_direction(m, h, 0.04, 1e-12))
    # No curvature, or negative curvature: a full sign step. Large curvature: m / (ρ h).
    np.testing.assert_allclose(got, [1.0, -1.0, 0.25, -0.25, 1.0, 0.0], rtol=1e-10)
    fraction = clipped_fraction([tf.constant(m)], [tf.constant(h)], 0.04, 1e-12)
    assert fraction.dtype == tf.float32
    assert float(fraction) == pytest.approx(3 / 6)
    split = clipped_fraction([tf.constant(m[:2]), tf.constant(m[2:])], [h[:2], h[2:]], 0.04, 1e-12)
    assert float(split) == pytest.approx(3 / 6)


# ------------------------------------------------ the Gauss–Newton–Bartlett estimate

_FAMILIES = {
    # name -> (compiled loss, output activation, outputs k, loss on logits for the GGN)
    "softmax_logits": (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        None,
        3,
        lambda y, z, w: keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, z, w),
    ),
    "softmax_probabilities": (
        "sparse_categorical_crossentropy",
        "softmax",
        3,
        lambda y, z, w: keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, z, w),
    ),
    "sigmoid_logits": (
        keras.losses.BinaryCrossentropy(from_logits=True),
        None,
        2,
        lambda y, z, w: keras.losses.BinaryCrossentropy(from_logits=True)(y, z, w),
    ),
    "sigmoid_probabilities": (
        "binary_crossentropy",
        "sigmoid",
        2,
        lambda y, z, w: keras.losses.BinaryCrossentropy(from_logits=True)(y, z, w),
    ),
    "squared_error": ("mse", None, 2, lambda y, z, w: keras.losses.MeanSquaredError()(y, z, w)),
}


def _estimates(model, loss, activation, x, weights, draws: int) -> np.ndarray:
    """``∇L̂ ⊙ ∇L̂`` (flat) for ``draws`` independent label draws, through the module."""
    spec = sl.sampling_spec(loss, "test", "")
    theta = flat_params(model)

    def one(seed):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            z, _ = model.stateless_call(unflat(model, theta), [], x)
            outputs = z if activation is None else keras.activations.get(activation)(z)
            spec_r, outputs = sl.prepare(spec, outputs, tf.float64)
            noise = sl.noise_for(spec_r, tf.shape(outputs), seed, tf.float64)
            labels = sl.sample_labels(spec_r, outputs, noise)
            count = sl.element_count(outputs)
            value = sl.bartlett_loss(spec_r, outputs, labels, weights, count)
        return tape.gradient(value, theta) ** 2

    seeds = tf.stack([tf.range(draws), tf.fill([draws], 7)], axis=1)
    all_draws = tf.function(lambda: tf.map_fn(one, seeds, fn_output_signature=tf.float64))
    return all_draws().numpy()


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_bartlett_estimate_is_unbiased_for_the_ggn_diagonal(family):
    loss, activation, k, on_logits = _FAMILIES[family]
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(6, 3)))
    weights = tf.constant(rng.uniform(0.2, 2.0, 6))
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(k, dtype="float64"),
        ]
    )
    y = tf.zeros((6,), tf.int32) if "softmax" in family else tf.zeros((6, k), tf.float64)
    # The GGN of the compiled (weighted, batch-mean) loss, split at the logits: it does
    # not depend on the labels for these losses.
    target = np.diag(dense_ggn(model, lambda z: on_logits(y, z, weights), x))
    draws = 3000
    samples = _estimates(model, loss, activation, x, weights, draws)
    mean = samples.mean(0)
    stderr = samples.std(0) / np.sqrt(draws)
    assert np.all(np.abs(mean - target) <= 5 * stderr + 1e-12), (mean - target) / stderr
    # Not trivially close: single draws scatter far more than their mean's error does
    # (about sqrt(draws) ≈ 55 times more for an unbiased estimate).
    spread = np.mean(np.linalg.norm(samples - target, axis=1))
    assert np.linalg.norm(mean - target) < 0.1 * spread


def test_sequence_outputs_count_every_token():
    """(batch, T, C) outputs: N = batch·T loss elements, as SophiaG's bs counts tokens."""
    rng = np.random.default_rng(4)
    logits = tf.constant(rng.normal(size=(2, 5, 3)))
    spec = sl.sampling_spec(keras.losses.SparseCategoricalCrossentropy(from_logits=True), "", "")
    assert float(sl.element_count(logits)) == 10.0
    noise = sl.noise_for(spec, tf.shape(logits), tf.constant([1, 2]), tf.float64)
    labels = sl.sample_labels(spec, logits, noise)
    assert labels.shape == (2, 5)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        value = sl.bartlett_loss(spec, logits, labels, tf.constant([1.0, 4.0], tf.float64), 10.0)
    cotangent = tape.gradient(value, logits).numpy()
    p = tf.nn.softmax(logits).numpy()
    onehot = np.eye(3)[labels.numpy()]
    # d L̂ / d z = sqrt(w / N) (p − onehot(ŷ)), per token, the weight of its sample.
    expected = np.sqrt(np.array([1.0, 4.0])[:, None, None] / 10.0) * (p - onehot)
    np.testing.assert_allclose(cotangent, expected, rtol=1e-12)


def test_gumbel_max_draws_follow_the_predictive_distribution():
    probabilities = np.array([[0.7, 0.2, 0.1]])
    logits = tf.constant(np.log(probabilities).repeat(20000, 0))
    spec = sl.SamplingSpec("categorical", True, "sum_over_batch_size")
    noise = sl.noise_for(spec, tf.shape(logits), tf.constant([5, 0]), tf.float64)
    counts = np.bincount(sl.sample_labels(spec, logits, noise).numpy(), minlength=3) / 20000
    np.testing.assert_allclose(counts, probabilities[0], atol=0.015)


@pytest.mark.parametrize(
    "loss, match",
    [
        ("mae", "'mae'"),
        (keras.losses.CategoricalFocalCrossentropy(), "categorical_focal_crossentropy"),
        (lambda y, p: tf.reduce_mean(p), "function <lambda>"),
        (["mse", "mse"], "mse"),
    ],
    ids=["mae", "focal", "custom", "multi_output"],
)
def test_losses_that_cannot_be_sampled_are_refused(loss, match):
    with pytest.raises(ValueError, match=match) as error:
        sl.sampling_spec(loss, "Sophia", "Use the Hutchinson estimator.")
    assert "Use the Hutchinson estimator." in str(error.value)


def test_spec_reads_logits_and_reduction():
    spec = sl.sampling_spec(keras.losses.BinaryCrossentropy(from_logits=True), "", "")
    assert spec == sl.SamplingSpec("binary", True, "sum_over_batch_size")
    assert sl.sampling_spec("sparse_categorical_crossentropy", "", "").from_logits is False
    summed = keras.losses.MeanSquaredError(reduction="sum")
    assert sl.sampling_spec(summed, "", "").reduction == "sum"
    with pytest.raises(ValueError, match="reduction"):
        sl.sampling_spec(keras.losses.MeanSquaredError(reduction=None), "", "")
