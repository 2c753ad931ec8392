"""``FullBatchObjective``: values, gradients and products over a data set, exactly accumulated."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.curvature import spectral_density
from keras_curv.optimizers import FullBatchObjective
from tests.conftest import float64_everywhere
from tests.curvature.helpers import dense_ggn, dense_hessian

L2 = 0.125


@pytest.fixture(autouse=True)
def float64():
    # The policy too: Keras fixes it at the first layer an earlier test made.
    with float64_everywhere():
        yield


def _data(n=30):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)), rng.integers(0, 3, n)


def _model(batchnorm=False, dropout=False):
    keras.utils.set_random_seed(2)
    layers = [
        keras.Input((4,)),
        keras.layers.Dense(5, activation="tanh", kernel_regularizer=keras.regularizers.L2(L2)),
    ]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    if dropout:
        layers.append(keras.layers.Dropout(0.5))
    layers.append(keras.layers.Dense(3))
    model = keras.Sequential(layers)  # fmt: skip
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _mean_loss(y):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return lambda out: loss(y, out)


def _l2_hessian(model):
    """The regularizer's Hessian: 2·L2 on the first kernel."""
    diag = np.zeros(sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    diag[: int(np.prod(model.trainable_variables[0].shape))] = 2 * L2
    return np.diag(diag)


@pytest.mark.parametrize("batch_size", [None, 7])
def test_values_gradients_and_products_match_dense_oracles(batch_size):
    x, y = _data()
    model = _model()
    objective = FullBatchObjective(model, x, y, batch_size=batch_size)
    assert len(objective.data.batches) == (1 if batch_size is None else 5)
    w = objective.weights()
    f, g = objective.value_and_gradient(w)
    assert float(f) == pytest.approx(float(model.evaluate(x, y, verbose=0)), rel=1e-12)
    hessian = dense_hessian(model, _mean_loss(y), x) + _l2_hessian(model)
    ggn = dense_ggn(model, _mean_loss(y), x) + _l2_hessian(model)
    v = np.random.default_rng(1).normal(size=objective.dim)
    hv = objective.hessian_vector_product(w, tf.constant(v)).numpy()
    gv = objective.gauss_newton_vector_product(w, tf.constant(v)).numpy()
    np.testing.assert_allclose(hv, hessian @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gv, ggn @ v, rtol=1e-10, atol=1e-12)
    # The gradient is that of the compiled loss at these weights (finite differences).
    eps = 1e-6
    for i in (0, objective.dim - 1):
        e = np.zeros(objective.dim)
        e[i] = eps
        slope = (objective.value(w + e) - objective.value(w - e)) / (2 * eps)
        assert float(slope) == pytest.approx(float(g[i]), rel=1e-6, abs=1e-9)
    assert float(objective.value(w)) == pytest.approx(float(f), rel=1e-14)


def test_exact_accumulation_with_sample_weights_and_a_dataset():
    x, y = _data()
    weights = np.linspace(0.2, 2.0, len(y))
    model = _model()
    whole = FullBatchObjective(model, x, y, sample_weight=weights)
    split = FullBatchObjective(model, x, y, sample_weight=weights, batch_size=4)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(11)
    streamed = FullBatchObjective(model, dataset)
    w = whole.weights()
    reference = whole.value_and_gradient(w)
    for other in (split, streamed):
        f, g = other.value_and_gradient(w)
        assert float(f) == pytest.approx(float(reference[0]), rel=1e-13)
        np.testing.assert_allclose(g.numpy(), reference[1].numpy(), rtol=1e-12, atol=1e-15)


def test_inference_mode_by_default_and_training_mode_on_request():
    x, y = _data()
    model = _model(batchnorm=True)
    inference = FullBatchObjective(model, x, y)
    training = FullBatchObjective(model, x, y, training=True)
    w = inference.weights()
    expected = float(model.evaluate(x, y, verbose=0))
    assert float(inference.value(w)) == pytest.approx(expected, rel=1e-12)
    # Batch statistics instead of the (initial) moving ones: another loss.
    assert abs(float(training.value(w)) - expected) > 1e-3
    # Nothing was written: the moving statistics are untouched.
    assert np.all(model.layers[1].moving_mean.numpy() == 0.0)


def test_stochastic_layers_are_refused_in_training_mode_only():
    x, y = _data()
    model = _model(dropout=True)
    with pytest.raises(ValueError, match="dropout.*training=False|training=False"):
        FullBatchObjective(model, x, y, training=True)
    objective = FullBatchObjective(model, x, y)
    w = objective.weights()
    assert float(objective.value(w)) == float(objective.value(w))  # deterministic


def test_an_lstm_without_dropout_is_deterministic_in_training_mode():
    """Its cell owns a random generator but draws only with dropout."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, size=(12, 4)), rng.integers(0, 3, 12)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,), dtype="int32"), keras.layers.Embedding(6, 3), keras.layers.LSTM(4),
         keras.layers.Dense(3)]
    )  # fmt: skip
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    objective = FullBatchObjective(model, x, y, training=True)
    w = objective.weights()
    assert float(objective.value(w)) == float(objective.value(w))
    noisy = keras.Sequential(
        [keras.Input((4,), dtype="int32"), keras.layers.Embedding(6, 3),
         keras.layers.LSTM(4, dropout=0.3), keras.layers.Dense(3)]
    )  # fmt: skip
    noisy.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="training=False"):
        FullBatchObjective(noisy, x, y, training=True)


def test_a_loss_of_the_model_and_inputs():
    """loss(model, x, y) with derivatives with respect to the inputs (a PINN's form)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(1)]
    )
    t = np.linspace(0.0, 1.0, 9)[:, None]

    def residual(model, t, _):
        t = tf.convert_to_tensor(t)
        with tf.GradientTape() as tape:
            tape.watch(t)
            u = model(t)
        du = tape.gradient(u, t)
        u0 = model(tf.zeros((1, 1), t.dtype))
        return tf.reduce_mean((du + u) ** 2) + tf.reduce_mean((u0 - 1.0) ** 2)

    objective = FullBatchObjective(model, t, loss=residual)
    w = objective.weights()
    f, g = objective.value_and_gradient(w)
    assert float(f) == pytest.approx(float(residual(model, t, None)), rel=1e-12)
    v = tf.constant(np.random.default_rng(0).normal(size=objective.dim))
    eps = 1e-6
    fd = objective.value_and_gradient(w + eps * v)[1] - objective.value_and_gradient(w - eps * v)[1]
    fd = fd / (2 * eps)
    hv = objective.hessian_vector_product(w, v)
    np.testing.assert_allclose(hv.numpy(), fd.numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="Gauss–Newton"):
        objective.gauss_newton_vector_product(w, v)
    density = spectral_density(objective.operator(), num_steps=8, num_probes=2, seed=0)
    assert np.all(np.isfinite(density.density)) and density.num_matvecs == 16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x": np.zeros((0, 4)), "y": np.zeros(0)}, "empty"),
        ({"loss": "mse"}, "callable"),
        ({"loss": lambda m, x, y: 0.0 * tf.reduce_sum(x)}, "does not depend"),
        ({"loss": lambda m, x, y: m(x)}, "scalar"),
        ({"sample_weight": np.ones(30), "loss": lambda m, x, y: tf.reduce_mean(m(x))}, "weight"),
    ],
)
def test_bad_inputs(kwargs, match):
    x, y = _data()
    model = _model()
    arguments = {"x": x, "y": y, **kwargs}
    with pytest.raises(ValueError, match=match):
        objective = FullBatchObjective(model, **arguments)
        objective.value_and_gradient(objective.weights())


def test_an_uncompiled_model_needs_a_loss():
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="compiled loss"):
        FullBatchObjective(model, x, y)


def test_residuals_give_the_gauss_newton_matrix_of_least_squares():
    """loss = ‖r‖², G = 2 JᵀJ (J from a dense jacobian), for a nonlinear residual."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    t = np.linspace(0.0, 1.0, 7)[:, None]

    def residuals(model, t, _):
        t = tf.convert_to_tensor(t)
        with tf.GradientTape() as tape:
            tape.watch(t)
            u = model(t)
        r = (tape.gradient(u, t) + u) / np.sqrt(7.0)
        return tf.concat([tf.reshape(r, [-1]), tf.reshape(model(t[:1]) - 1.0, [-1])], 0)

    objective = FullBatchObjective(model, t, residuals=residuals)
    w = objective.weights()
    r = residuals(model, t, None)
    assert float(objective.value(w)) == pytest.approx(float(tf.reduce_sum(r**2)), rel=1e-12)
    values = [tf.convert_to_tensor(v.value) for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(values)
        with keras.StatelessScope(state_mapping=list(zip(model.trainable_variables, values))):
            r = residuals(model, t, None)
    jac = np.concatenate(
        [np.reshape(j, (r.shape[0], -1)) for j in tape.jacobian(r, values)], axis=1
    )
    v = np.random.default_rng(2).normal(size=objective.dim)
    gv = objective.gauss_newton_vector_product(w, tf.constant(v)).numpy()
    np.testing.assert_allclose(gv, 2 * jac.T @ (jac @ v), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        FullBatchObjective(model, t, loss=lambda m, x, y: 0.0, residuals=residuals)
