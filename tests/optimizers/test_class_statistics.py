"""Which class-gradient path ClassSubspaceNewton takes for a model (fast: no fit)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv import models
from keras_curv.optimizers._graph import StepGate
from keras_curv.optimizers.class_statistics import class_gradient_path_of, jacobian_class_gradients


def test_class_gradient_path_of():
    # Per-sample logits independent of the rest of the batch: per-class sub-batches.
    assert class_gradient_path_of(models.mlp((8, 8, 1), 10)) == "partition"
    # BatchNormalization couples the samples, Dropout draws random numbers: the Jacobian.
    assert class_gradient_path_of(models.batchnorm_resnet((16, 16, 3), 10)) == "jacobian"
    dropout = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dropout(0.1), keras.layers.Dense(3)]
    )
    assert class_gradient_path_of(dropout) == "jacobian"


def _class_jacobian(model, x, labels, *, compact, predicate=None):
    """The Jacobian path's class rows on a batch, with or without skipping absent classes."""
    num_classes = model.output_shape[-1]

    @tf.function
    def rows():
        scores = model(x, training=True)
        weighted = (
            tf.one_hot(labels, num_classes, dtype=scores.dtype)
            * np.linspace(0.5, 2.0, len(labels))[:, None]
        )
        per_class = tf.reduce_sum(weighted * scores, axis=0)
        present = tf.reduce_any(tf.not_equal(weighted, 0), axis=0) if compact else None
        gate = StepGate(None if predicate is None else tf.constant(predicate))
        handles = [v.value for v in model.trainable_variables]
        return jacobian_class_gradients(handles, per_class, gate, num_classes, present=present)

    return [r.numpy() for r in rows()]


@pytest.mark.parametrize(
    "labels", [[0, 1, 2, 0, 1, 2, 0], [4, 4, 4, 4, 4, 4, 4], [5, 4, 3, 2, 1, 0, 1]]
)
def test_absent_classes_are_skipped_exactly(labels):
    """Only present classes' rows are computed; they equal the full Jacobian, the rest are 0."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="float64"),
            keras.layers.Dense(4, dtype="float64"),
            keras.layers.BatchNormalization(dtype="float64"),
            keras.layers.Activation("tanh", dtype="float64"),
            keras.layers.Dense(6, dtype="float64"),
        ]
    )
    x = np.random.default_rng(0).normal(size=(len(labels), 5))
    compact = _class_jacobian(model, x, labels, compact=True)
    full = _class_jacobian(model, x, labels, compact=False)
    # Independent oracle: the per-class sums' Jacobian by GradientTape, in eager mode.
    with tf.GradientTape() as tape:
        scores = model(x, training=True)
        weighted = tf.one_hot(labels, 6, dtype=scores.dtype) * np.linspace(0.5, 2.0, 7)[:, None]
        per_class = tf.reduce_sum(weighted * scores, axis=0)
    oracle = tape.jacobian(per_class, model.trainable_variables)
    absent = [k for k in range(6) if k not in labels]
    for c, f, o in zip(compact, full, oracle):
        assert c.shape == f.shape == tuple(o.shape)
        np.testing.assert_allclose(c, o.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(c, f)
        assert not np.any(c[absent])
    skipped = _class_jacobian(model, x, labels, compact=True, predicate=False)
    assert all(not np.any(s) for s in skipped)


def test_no_class_present_gives_zero_rows_of_the_right_shape():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    x = np.zeros((2, 3), "float32")

    @tf.function
    def rows():
        per_class = tf.reduce_sum(model(x), axis=0) * 0.0
        handles = [v.value for v in model.trainable_variables]
        return jacobian_class_gradients(
            handles, per_class, StepGate(None), 4, present=tf.zeros([4], tf.bool)
        )

    assert [tuple(r.shape) for r in rows()] == [(4, 3, 4), (4, 4)]
