"""``TrainBatch.hessian_vector_product_at`` / ``gauss_newton_vector_product_at``.

The products at other weights, by a fresh forward pass, must equal the step's own
products (pinned to dense oracles in ``test_contract.py``) at the step's weights, equal
the dense oracles at shifted weights, and work inside a ``tf.while_loop`` body, where
the step's own tensors cannot be differentiated again.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv._internal import flat
from keras_curv.curvature import GGNOperator, HessianOperator
from keras_curv.optimizers import CurvatureOptimizer, StepStatistics, curvature_step
from tests.conftest import float64_everywhere

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
SHIFT = 0.05


class Products(CurvatureOptimizer):
    """Records H·1 and G·1 four ways: step tensors, *_at the step's weights, *_at shifted
    weights, and *_at inside a while loop; then does nothing."""

    def __init__(self, dim, **kwargs):
        super().__init__(learning_rate=0.0, **kwargs)
        self.records = tf.Variable(tf.zeros((8, dim), tf.float64), trainable=False)

    def step_statistics(self, batch):
        with batch.step_graph():
            ones = [tf.ones(v.shape, v.dtype) for v in batch.variables]
            here = batch.handles()
            shifted = [h + SHIFT for h in here]

            def looped(product):
                def body(i, total):
                    return i + 1, total + flat.flatten(product(here, ones), tf.float64)

                zero = tf.zeros(flat.flat_dim(batch.variables), tf.float64)
                return tf.while_loop(lambda i, _: i < 2, body, (0, zero))[1] / 2.0

            rows = [
                batch.hessian_vector_product(ones),
                batch.hessian_vector_product_at(here, ones),
                batch.hessian_vector_product_at(shifted, ones),
                None,
                batch.gauss_newton_vector_product(ones),
                batch.gauss_newton_vector_product_at(here, ones),
                batch.gauss_newton_vector_product_at(shifted, ones),
                None,
            ]
            rows[3] = looped(batch.hessian_vector_product_at)
            rows[7] = looped(batch.gauss_newton_vector_product_at)
            stacked = tf.stack([r if i in (3, 7) else flat.flatten(r, tf.float64)
                                for i, r in enumerate(rows)])  # fmt: skip
        return StepStatistics(shared={"records": stacked})

    def update_step(self, gradient, variable, learning_rate):
        pass

    def finish_step(self, statistics):
        self.records.assign(statistics.shared["records"])


@pytest.fixture(autouse=True)
def float64():
    # Keras adds a float64 regularization loss to the compiled loss only when floatx is
    # float64 (it casts the compiled loss to floatx first).
    # The policy too: Keras fixes it at the first layer an earlier test made.
    with float64_everywhere():
        yield


def _model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,), dtype="float64")
    hidden = keras.layers.Dense(
        5, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.125), dtype="float64"
    )(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, dtype="float64")(hidden))


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(12, 4)), rng.integers(0, 3, 12)


def _dense(model, x, y, shift, gauss_newton):
    """Dense H·1 (with the L2 term) or G·1 (+ the L2 term's Hessian) at weights + shift."""
    saved = [v.numpy() for v in model.trainable_variables]
    for v in model.trainable_variables:
        v.assign(v + shift)
    try:
        kind = GGNOperator if gauss_newton else HessianOperator
        ones = tf.ones(flat.flat_dim(model.trainable_variables), tf.float64)
        product = kind(model, LOSS, x, y, training=True).matvec(ones).numpy()
        # L2(0.125) (exact in float32, as Keras stores it): Hessian 0.25 I on that kernel.
        kernel = np.zeros_like(product)
        kernel[: saved[0].size] = 0.25
        return product + kernel
    finally:
        for v, s in zip(model.trainable_variables, saved):
            v.assign(s)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_products_at_match_step_products_and_dense_oracles(jit_compile):
    x, y = _data()
    model = _model()
    optimizer = Products(flat.flat_dim(model.trainable_variables))
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=jit_compile)
    model.fit(x, y, batch_size=12, epochs=1, shuffle=False, verbose=0)
    rec = optimizer.records.numpy()
    for first in (0, 4):  # Hessian rows 0-3, GGN rows 4-7
        np.testing.assert_allclose(rec[first + 1], rec[first], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(rec[first + 3], rec[first], rtol=1e-12, atol=1e-14)
        shifted = _dense(model, x, y, SHIFT, gauss_newton=first == 4)
        np.testing.assert_allclose(rec[first + 2], shifted, rtol=1e-10, atol=1e-12)
    # The two matrices differ here (a tanh hidden layer): the test can tell them apart.
    assert np.max(np.abs(rec[0] - rec[4])) > 1e-3


def test_products_at_with_a_loss_function_in_curvature_step():
    x, y = _data()
    model = _model()
    optimizer = Products(flat.flat_dim(model.trainable_variables))
    curvature_step(model, optimizer, LOSS, x, y)
    rec = optimizer.records.numpy()
    for first in (0, 4):
        np.testing.assert_allclose(rec[first + 1], rec[first], rtol=1e-12, atol=1e-14)
        shifted = _dense(model, x, y, SHIFT, gauss_newton=first == 4)
        np.testing.assert_allclose(rec[first + 2], shifted, rtol=1e-10, atol=1e-12)


class GaussNewtonRows(CurvatureOptimizer):
    """Records G·1 from the step's tensors and by gauss_newton_vector_product_at."""

    def __init__(self, dim, **kwargs):
        super().__init__(learning_rate=0.0, **kwargs)
        self.records = tf.Variable(tf.zeros((2, dim), tf.float64), trainable=False)

    def step_statistics(self, batch):
        with batch.step_graph():
            ones = [tf.ones(v.shape, v.dtype) for v in batch.variables]
            rows = [
                batch.gauss_newton_vector_product(ones),
                batch.gauss_newton_vector_product_at(batch.handles(), ones),
            ]
            stacked = tf.stack([flat.flatten(r, tf.float64) for r in rows])
        return StepStatistics(shared={"records": stacked})

    def update_step(self, gradient, variable, learning_rate):
        pass

    def finish_step(self, statistics):
        self.records.assign(statistics.shared["records"])


@pytest.mark.slow
def test_gauss_newton_at_through_a_recurrent_layer():
    """An LSTM's while loop: forward-mode J v fails there; the double VJP does not."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(7, 3),
            keras.layers.LSTM(3),
            keras.layers.Dense(3),
        ]
    )
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 7, (6, 4)), rng.integers(0, 3, 6)
    optimizer = GaussNewtonRows(flat.flat_dim(model.trainable_variables))
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=6, epochs=1, verbose=0)
    rec = optimizer.records.numpy()
    np.testing.assert_allclose(rec[1], rec[0], rtol=1e-10, atol=1e-13)
    assert np.max(np.abs(rec[0])) > 1e-3


def test_gauss_newton_of_a_softmax_output_splits_at_its_logits():
    """Keras's cross-entropy on probabilities reads the softmax's cached logits, not the
    output: G must be the logits model's (pinned to dense oracles in test_contract.py),
    from the step's tensors and at other weights. It raised "loss does not depend on
    y_pred" before (SketchySGD refused MobileNetV2)."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(9, 4)), rng.integers(0, 3, 9)
    rows = {}
    for name, activation, from_logits in (("logits", None, True), ("softmax", "softmax", False)):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(5, "tanh"), keras.layers.Dense(3, activation)]
        )
        optimizer = GaussNewtonRows(flat.flat_dim(model.trainable_variables))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, dtype="float64")
        model.compile(optimizer=optimizer, loss=loss)
        model.fit(x, y, batch_size=9, epochs=1, verbose=0)
        rows[name] = optimizer.records.numpy()
    assert np.max(np.abs(rows["logits"][0])) > 1e-3
    np.testing.assert_allclose(rows["softmax"], rows["logits"], rtol=1e-10, atol=1e-13)
