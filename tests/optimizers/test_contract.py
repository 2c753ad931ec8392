"""The contract: every train step hands its batch to a curvature optimizer, exactly."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_curv
from keras_curv._internal import flat, keras_privates
from keras_curv.curvature import GGNOperator, HessianOperator
from keras_curv.optimizers import (
    CurvatureContextError,
    CurvatureOptimizer,
    StepStatistics,
)


class Recorder(CurvatureOptimizer):
    """Records, per step, H·1, G·1, the loss and the loss at θ + 0.1, then does nothing."""

    def __init__(self, dim, **kwargs):
        super().__init__(learning_rate=0.0, **kwargs)
        self.hvp = tf.Variable(tf.zeros(dim, tf.float64), trainable=False)
        self.ggn = tf.Variable(tf.zeros(dim, tf.float64), trainable=False)
        self.losses = tf.Variable(tf.zeros(2, tf.float64), trainable=False)
        self.steps_seen = tf.Variable(0, trainable=False)

    def step_statistics(self, batch):
        with batch.step_graph():
            ones = [tf.ones(v.shape, v.dtype) for v in batch.variables]
            shifted = [v + 0.1 for v in batch.handles()]
            return StepStatistics(
                shared={
                    "hvp": flat.flatten(batch.hessian_vector_product(ones), tf.float64),
                    "ggn": flat.flatten(batch.gauss_newton_vector_product(ones), tf.float64),
                    "losses": tf.cast(tf.stack([batch.loss, batch.loss_at(shifted)]), tf.float64),
                }
            )

    def update_step(self, gradient, variable, learning_rate):
        self.statistics_for(variable)  # the channel works inside Keras's apply

    def finish_step(self, statistics):
        self.hvp.assign(statistics.shared["hvp"])
        self.ggn.assign(statistics.shared["ggn"])
        self.losses.assign(statistics.shared["losses"])
        self.steps_seen.assign_add(1)


def _model(kind="sequential", regularizer=None):
    keras.utils.set_random_seed(1)
    if kind == "subclassed":

        class Net(keras.Model):
            def __init__(self):
                super().__init__()
                self.hidden = keras.layers.Dense(5, activation="tanh")
                self.out = keras.layers.Dense(3)

            def call(self, inputs):
                return self.out(self.hidden(inputs))

        model = Net()
        model(np.zeros((1, 4), "float32"))
        return model
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh", kernel_regularizer=regularizer)(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


def _dim(model):
    return flat.flat_dim(model.trainable_variables)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 3, 32)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _oracles(model, x, y, weights=None):
    ones = tf.ones(_dim(model))
    hessian = HessianOperator(model, LOSS, x, y, sample_weight=weights, training=True)
    ggn = GGNOperator(model, LOSS, x, y, sample_weight=weights, training=True)
    return hessian.matvec(ones).numpy(), ggn.matvec(ones).numpy()


@pytest.mark.parametrize(
    "kind, jit_compile, steps_per_execution",
    [("sequential", False, 1), ("functional", True, 2), ("subclassed", False, 3)],
)
def test_fit_hands_over_the_exact_batch(data, kind, jit_compile, steps_per_execution):
    x, y = data
    model = _model(kind)
    optimizer = Recorder(_dim(model))
    model.compile(
        optimizer=optimizer,
        loss=LOSS,
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert int(optimizer.steps_seen.numpy()) == 2 == int(optimizer.iterations.numpy())
    hvp, ggn = _oracles(model, x, y)
    np.testing.assert_allclose(optimizer.hvp.numpy(), hvp, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(optimizer.ggn.numpy(), ggn, rtol=1e-4, atol=1e-6)


def test_loss_as_compiled_with_regularization_and_sample_weights(data):
    x, y = data
    weights = np.linspace(0.5, 1.5, 32)
    model = _model(regularizer=keras.regularizers.L2(0.1))
    optimizer = Recorder(_dim(model))
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, sample_weight=weights, batch_size=32, epochs=1, verbose=0)

    def compiled_loss(values):
        for variable, value in zip(model.trainable_variables, values):
            variable.assign(value)
        return float(model.compute_loss(x, y, model(x), weights))

    current = [v.numpy() for v in model.trainable_variables]
    expected = [compiled_loss(current), compiled_loss([v + 0.1 for v in current])]
    compiled_loss(current)
    np.testing.assert_allclose(optimizer.losses.numpy(), expected, rtol=1e-5)
    # The Gauss-Newton product keeps the regularizer's exact Hessian: 2 * 0.1 on its kernel.
    ggn = GGNOperator(model, LOSS, x, y, sample_weight=weights, training=True)
    expected_ggn = ggn.matvec(tf.ones(_dim(model))).numpy()
    expected_ggn[: 4 * 5] += 0.2
    np.testing.assert_allclose(optimizer.ggn.numpy(), expected_ggn, rtol=1e-4, atol=1e-6)


def test_guide_style_custom_train_step(data):
    x, y = data

    class Custom(keras.Model):
        def train_step(self, batch):
            inputs, targets = batch
            with tf.GradientTape() as tape:
                predictions = self(inputs, training=True)
                loss = self.compute_loss(y=targets, y_pred=predictions)
            gradients = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(gradients, self.trainable_variables)
            return {"loss": loss}

    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,))
    model = Custom(inputs, keras.layers.Dense(3)(keras.layers.Dense(5, "tanh")(inputs)))
    optimizer = Recorder(_dim(model))
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    np.testing.assert_allclose(optimizer.hvp.numpy(), _oracles(model, x, y)[0], rtol=1e-4)


def test_a_train_step_without_compute_loss_gets_a_clear_error(data):
    x, y = data

    class NoComputeLoss(keras.Model):
        def train_step(self, batch):
            inputs, targets = batch
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(LOSS(targets, self(inputs, training=True)))
            self.optimizer.apply(tape.gradient(loss, self.trainable_variables))
            return {"loss": loss}

    inputs = keras.Input((4,))
    model = NoComputeLoss(inputs, keras.layers.Dense(3)(inputs))
    model.compile(optimizer=keras_curv.AdaHessian(), loss=LOSS)
    model.optimizer.build(model.trainable_variables)
    with pytest.raises(CurvatureContextError, match="compute_loss"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)


def test_eager_use_and_run_eagerly_raise_with_the_fix(data):
    x, y = data
    model = _model()
    optimizer = Recorder(_dim(model))
    zeros = [tf.zeros_like(v) for v in model.trainable_variables]
    with pytest.raises(CurvatureContextError, match="curvature_step"):
        optimizer.apply_gradients(zip(zeros, model.trainable_variables))
    model.compile(optimizer=optimizer, loss=LOSS, run_eagerly=True)
    with pytest.raises(CurvatureContextError, match="eagerly"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)


def test_a_prebuilt_optimizer_retraces_once_and_runs_every_step(data):
    """Built before fit, the optimizer meets its model inside the first trace."""
    x, y = data
    model = _model()
    optimizer = Recorder(_dim(model))
    optimizer.build(model.trainable_variables)
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert int(optimizer.steps_seen.numpy()) == 2 == int(optimizer.iterations.numpy())
    np.testing.assert_allclose(
        optimizer.hvp.numpy(), _oracles(model, x[16:], y[16:])[0], rtol=1e-4, atol=1e-6
    )


def test_the_model_is_looked_up_once_not_per_trace(data, monkeypatch):
    x, y = data
    calls = []
    original = keras_privates.calling_models

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("keras_curv.optimizers.contract.calling_models", counting)
    model = _model()
    model.compile(optimizer=keras_curv.AdaHessian(0.01), loss=LOSS)
    # 30 samples in batches of 8: the short last batch is traced again.
    model.fit(x[:30], y[:30], batch_size=8, epochs=2, verbose=0)
    model.fit(x[:30], y[:30], batch_size=8, epochs=1, verbose=0)
    assert len(calls) == 1


def test_attach_wraps_the_instance_only():
    model, other = _model(), _model()
    keras_curv.attach(model, layer_taps=True)
    assert keras_curv.attach(model) is model  # idempotent
    assert "compute_loss" in vars(model) and "compute_loss" not in vars(other)
    assert keras.Model.compute_loss is keras.src.trainers.trainer.Trainer.compute_loss
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert all("call" in vars(layer) for layer in dense)
    assert all("call" not in vars(layer) for layer in other.layers)
    assert keras.layers.Dense.call.__qualname__ == "Dense.call"
    with pytest.raises(TypeError, match="keras.Model"):
        keras_curv.attach(keras.layers.Dense(2))


def test_curvature_step_eagerly_and_inside_a_tf_function(data):
    x, y = data
    model = _model()
    optimizer = Recorder(_dim(model))
    loss = keras_curv.curvature_step(model, optimizer, LOSS, x, y)
    np.testing.assert_allclose(float(loss), float(LOSS(y, model(x))), rtol=1e-6)
    expected = HessianOperator(model, LOSS, x, y).matvec(tf.ones(_dim(model))).numpy()
    np.testing.assert_allclose(optimizer.hvp.numpy(), expected, rtol=1e-4, atol=1e-6)

    @tf.function
    def user_step(inputs, targets):
        return keras_curv.curvature_step(model, optimizer, LOSS, inputs, targets)

    user_step(x, y)
    user_step(x, y)
    assert int(optimizer.steps_seen.numpy()) == 3


def test_class_weights_reach_the_batch_as_sample_weights(data):
    x, y = data
    model = _model()
    optimizer = Recorder(_dim(model))
    model.compile(optimizer=optimizer, loss=LOSS)
    class_weight = {0: 0.5, 1: 2.0, 2: 1.0}
    model.fit(x, y, class_weight=class_weight, batch_size=32, epochs=1, verbose=0)
    weights = np.array([class_weight[int(label)] for label in y])
    hessian = HessianOperator(model, LOSS, x, y, sample_weight=weights, training=True)
    expected = hessian.matvec(tf.ones(_dim(model))).numpy()
    np.testing.assert_allclose(optimizer.hvp.numpy(), expected, rtol=1e-4, atol=1e-6)
