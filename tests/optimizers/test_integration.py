"""The compile/fit integration, and the Keras internals it relies on (fail loudly if they move)."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

from keras_curv.curvature import HessianOperator
from keras_curv.optimizers import CurvatureContextError, curvature_step, integration


class HVPRecorder(keras.optimizers.SGD):
    """Records H·1 of the training loss, as seen through the integration, then steps."""

    def apply(self, grads, trainable_variables=None):
        batch = integration.current_batch(self)
        with batch.step_graph():
            ones = [tf.ones(v.shape, v.dtype) for v in batch.variables]
            product = batch.hessian_vector_product(ones)
            flat = tf.concat([tf.reshape(tf.cast(p, tf.float64), [-1]) for p in product], 0)
        self.recorded.assign(flat)
        return super().apply(grads, trainable_variables)


def make_model(dtype="float32", final_dtype="float32"):
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="tanh", dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
            keras.layers.Activation("softmax", dtype=final_dtype),
        ]
    )


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 3, 32)


def recorder_for(model):
    optimizer = HVPRecorder(learning_rate=0.0)
    dim = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    optimizer.recorded = tf.Variable(tf.zeros(dim, tf.float64), trainable=False)
    return optimizer


def oracle(model, x, y):
    op = HessianOperator(model, "sparse_categorical_crossentropy", x, y)
    return op.matvec(tf.ones(op.dim)).numpy()


def test_keras_train_step_still_has_the_locals_we_read():
    names = TensorFlowTrainer.train_step.__code__.co_varnames
    for local in ("self", "y", "y_pred", "sample_weight", "loss", "gradients"):
        assert local in names, f"Keras's train_step no longer has a local named {local!r}"
    source = inspect.getsource(TensorFlowTrainer.train_step)
    assert "self.optimizer.apply_gradients" in source
    assert "self.optimizer.scale_loss(loss)" in source


def test_mirrored_replica_threads_still_expose_what_we_read():
    """Multi-replica loss scaling finds the batch on the waiting replica threads."""
    from tensorflow.python.distribute import mirrored_run

    source = inspect.getsource(mirrored_run._MirroredReplicaThread.__init__)
    for attribute in ("replica_id_in_sync_group", "replica_id", "devices", "distribution"):
        assert f"self.{attribute} = " in source, f"replica threads lost .{attribute}"
    # LossScaleOptimizer runs the inner optimizer per replica inside a merge_call.
    lso = inspect.getsource(keras.optimizers.LossScaleOptimizer._tf_apply)
    assert "merge_call" in lso and "call_for_each_replica" in lso


@pytest.mark.parametrize("jit_compile, steps_per_execution", [(False, 1), (True, 2)])
def test_fit_sees_the_exact_batch_hessian(data, jit_compile, steps_per_execution):
    x, y = data
    model = make_model()
    optimizer = recorder_for(model)
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        optimizer.recorded.numpy(), oracle(model, x, y), rtol=1e-4, atol=1e-6
    )


def test_functional_and_subclassed_models(data):
    x, y = data

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(5, activation="tanh")
            self.out = keras.layers.Dense(3, activation="softmax")

        def call(self, inputs):
            return self.out(self.hidden(inputs))

    inputs = keras.Input((4,))
    functional = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    for model in (functional, Subclassed()):
        model(x[:1])
        optimizer = recorder_for(model)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        np.testing.assert_allclose(
            optimizer.recorded.numpy(), oracle(model, x, y), rtol=1e-4, atol=1e-6
        )


def test_mixed_precision_loss_scale_optimizer(data):
    x, y = data
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_model(dtype=None)
        optimizer = recorder_for(model)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    recorded = optimizer.recorded.numpy()
    assert np.all(np.isfinite(recorded))
    reference = make_model()
    reference.set_weights(model.get_weights())
    np.testing.assert_allclose(recorded, oracle(reference, x, y), rtol=0.05, atol=5e-3)


def test_explicit_curvature_step(data):
    x, y = data
    model = make_model()
    optimizer = recorder_for(model)
    loss = curvature_step(model, optimizer, "sparse_categorical_crossentropy", x, y)
    expected = keras.losses.SparseCategoricalCrossentropy()(y, model(x))
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    np.testing.assert_allclose(
        optimizer.recorded.numpy(), oracle(model, x, y), rtol=1e-4, atol=1e-6
    )


def test_used_without_a_batch_raises_usage_error(data):
    x, y = data
    model = make_model()
    optimizer = recorder_for(model)
    zeros = [tf.zeros_like(v) for v in model.trainable_variables]
    with pytest.raises(CurvatureContextError, match="curvature_step"):
        optimizer.apply_gradients(zip(zeros, model.trainable_variables))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", run_eagerly=True)
    with pytest.raises(CurvatureContextError, match="eagerly"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)


class JacobianRecorder(keras.optimizers.SGD):
    """Records the Jacobian of the batch's summed outputs, as built by the integration."""

    def apply(self, grads, trainable_variables=None):
        batch = integration.current_batch(self)
        with batch.step_graph():
            summed = tf.reduce_sum(tf.cast(batch.y_pred, tf.float64), axis=0)  # (C,)
            rows = batch.jacobian(summed)
            flat = tf.concat([tf.reshape(tf.cast(r, tf.float64), [3, -1]) for r in rows], 1)
        self.recorded.assign(flat)
        return super().apply(grads, trainable_variables)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_jacobian_is_exact_with_and_without_xla(data, jit_compile):
    x, y = data
    model = make_model()
    optimizer = JacobianRecorder(learning_rate=0.0)
    dim = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    optimizer.recorded = tf.Variable(tf.zeros((3, dim), tf.float64), trainable=False)
    model.compile(
        optimizer=optimizer, loss="sparse_categorical_crossentropy", jit_compile=jit_compile
    )
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    with tf.GradientTape() as tape:
        summed = tf.reduce_sum(model(x), axis=0)
    expected = tape.jacobian(summed, model.trainable_variables)
    expected = np.concatenate([e.numpy().reshape(3, -1) for e in expected], axis=1)
    recorded = optimizer.recorded.numpy()
    assert np.abs(recorded).max() > 1e-3  # XLA once made these silently zero
    np.testing.assert_allclose(recorded, expected, rtol=1e-4, atol=1e-6)


def test_step_gate_skips_or_masks():
    predicate = tf.Variable(False)

    @tf.function(jit_compile=False)
    def gated():
        gate = integration.StepGate(tf.convert_to_tensor(predicate))
        return gate.exit(gate.enter(tf.constant([1.0, 2.0])) * 3.0)

    np.testing.assert_array_equal(gated().numpy(), [0.0, 0.0])
    predicate.assign(True)
    np.testing.assert_array_equal(gated().numpy(), [3.0, 6.0])
