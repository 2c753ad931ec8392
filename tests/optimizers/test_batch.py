"""TrainBatch's layer taps: the inputs and output-gradients of the step's own forward pass."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.optimizers import CurvatureOptimizer, StepStatistics, TrainBatch


def _rebuilt_gradients(tap, batch: TrainBatch) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """(from the tap, true) gradient pairs of the tapped layer's weights."""
    layer, a, s, g = tap.layer, tap.inputs, tap.outputs, tap.output_gradient
    grads = dict(zip([id(v) for v in batch.variables], batch.gradients()))
    if isinstance(layer, keras.layers.Dense):
        a2 = tf.reshape(a, [-1, a.shape[-1]])
        g2 = tf.reshape(g, [-1, g.shape[-1]])
        pairs = [(tf.matmul(a2, g2, transpose_a=True), grads[id(layer.kernel)])]
        if layer.bias is not None:
            pairs.append((tf.reduce_sum(g2, 0), grads[id(layer.bias)]))
        return pairs
    if isinstance(layer, keras.layers.Embedding):
        ids = tf.reshape(tf.cast(a, tf.int32), [-1])
        rows = tf.reshape(g, [-1, g.shape[-1]])
        table = tf.math.unsorted_segment_sum(rows, ids, layer.input_dim)
        return [(table, grads[id(layer.embeddings)])]
    if isinstance(layer, keras.layers.LayerNormalization):
        normalized = (s - layer.beta) / layer.gamma
        axes = list(range(len(s.shape) - 1))
        return [
            (tf.reduce_sum(normalized * g, axes), grads[id(layer.gamma)]),
            (tf.reduce_sum(g, axes), grads[id(layer.beta)]),
        ]
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        patches = tf.image.extract_patches(
            a, [1, kh, kw, 1], [1, *layer.strides, 1], [1, 1, 1, 1], layer.padding.upper()
        )
        p2 = tf.reshape(patches, [-1, patches.shape[-1]])
        g2 = tf.reshape(g, [-1, g.shape[-1]])
        kernel = tf.reshape(tf.matmul(p2, g2, transpose_a=True), [kh, kw, a.shape[-1], -1])
        return [(kernel, grads[id(layer.kernel)]), (tf.reduce_sum(g2, 0), grads[id(layer.bias)])]
    raise AssertionError(f"untested layer {layer.name}")


class TapChecker(CurvatureOptimizer):
    """Records the largest mismatch between tap-rebuilt and true weight gradients."""

    uses_layer_taps = True

    def __init__(self, **kwargs):
        super().__init__(learning_rate=0.0, **kwargs)
        self.error = tf.Variable(np.inf, dtype=tf.float64, trainable=False)
        self.scale = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.tapped = []

    def step_statistics(self, batch):
        with batch.step_graph():
            taps = batch.layer_taps()
            self.tapped = [tap.layer.name for tap in taps]
            pairs = [pair for tap in taps for pair in _rebuilt_gradients(tap, batch)]
            error = tf.reduce_max(
                [tf.reduce_max(tf.abs(tf.cast(x - y, tf.float64))) for x, y in pairs]
            )
            scale = tf.reduce_max([tf.reduce_max(tf.abs(tf.cast(y, tf.float64))) for _, y in pairs])
        return StepStatistics(shared={"error": error, "scale": scale})

    def update_step(self, gradient, variable, learning_rate):
        pass

    def finish_step(self, statistics):
        self.error.assign(statistics.shared["error"])
        self.scale.assign(statistics.shared["scale"])


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit(model, x, y, jit=False, loss=LOSS):
    optimizer = TapChecker()
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit)
    model.fit(x, y, batch_size=len(y), epochs=1, verbose=0)
    return optimizer


@pytest.mark.parametrize("jit", [False, True])
def test_dense_taps_rebuild_the_weight_gradients(jit):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 5)).astype("float32"), rng.integers(0, 3, 16)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="relu", name="hidden"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ]
    )
    optimizer = _fit(model, x, y, jit, loss="sparse_categorical_crossentropy")
    assert optimizer.tapped == ["hidden", "out"]
    assert float(optimizer.scale.numpy()) > 1e-3
    assert float(optimizer.error.numpy()) < 1e-6
    # The activations still run: the trained model's outputs are probabilities.
    np.testing.assert_allclose(model.predict(x, verbose=0).sum(-1), 1.0, rtol=1e-5)


def test_embedding_conv_and_layer_norm_taps():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 12, size=(8, 6))
    labels = rng.integers(0, 2, 8)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(12, 4, name="embed")(inputs)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.Reshape((6, 4, 1))(h)
    h = keras.layers.Conv2D(3, (2, 2), activation="tanh", name="conv")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(h))
    optimizer = _fit(model, tokens, labels)
    assert optimizer.tapped == ["embed", "norm", "conv", "out"]
    assert float(optimizer.error.numpy()) < 1e-5 * max(1.0, float(optimizer.scale.numpy()))


def test_a_layer_called_twice_is_tapped_twice():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 4)).astype("float32"), rng.integers(0, 4, 8)
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(4, name="out")(shared(shared(inputs))))

    class Count(TapChecker):
        def step_statistics(self, batch):
            self.tapped = [call.layer.name for call in batch.layer_calls]
            return StepStatistics()

        def finish_step(self, statistics):
            pass

    counter = Count()
    model.compile(optimizer=counter, loss=LOSS)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert counter.tapped == ["shared", "shared", "out"]


class GradientsOfChecker(TapChecker):
    """Records the largest gap between gradients_of(3 loss) and 3 * gradients()."""

    uses_layer_taps = False

    def step_statistics(self, batch):
        with batch.step_graph():
            other = batch.gradients_of(3.0 * batch.loss)
            pairs = list(zip(other, [3.0 * g for g in batch.gradients()]))
            error = tf.reduce_max([tf.reduce_max(tf.abs(a - b)) for a, b in pairs])
            scale = tf.reduce_max([tf.reduce_max(tf.abs(b)) for _, b in pairs])
        shared = {"error": tf.cast(error, tf.float64), "scale": tf.cast(scale, tf.float64)}
        return StepStatistics(shared=shared)


@pytest.mark.parametrize("loss_scaled", [False, True])
def test_gradients_of_another_scalar_is_loss_scaled_and_unscaled(loss_scaled):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(16, 5)).astype("float32"), rng.integers(0, 3, 16)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(3)])  # fmt: skip
    checker = GradientsOfChecker()
    optimizer = keras.optimizers.LossScaleOptimizer(checker) if loss_scaled else checker
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert float(checker.scale.numpy()) > 1e-3
    assert float(checker.error.numpy()) < 1e-6 * float(checker.scale.numpy())
