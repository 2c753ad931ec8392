r"""Per-class mean logit gradients (eq. 8 of the class-subspace paper).

.. math::
    c_k = \frac{1}{|D_k|} \sum_{\mu \in D_k} \nabla_\theta z^\mu_k

where :math:`D_k` are the samples of class :math:`k` and :math:`z` are the logits, or
the log-probabilities when the model ends in a softmax.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from keras_curv.curvature import _flat
from keras_curv.curvature._data import class_targets, probe_data
from keras_curv.curvature._model import stateless_outputs

_LOG_FLOOR = 1e-30


def ends_in_softmax(model: keras.Model) -> bool:
    """Whether the model's last layer applies a softmax (so its outputs are probabilities)."""
    layers = getattr(model, "layers", None) or []
    if not layers:
        return False
    last = layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return (
        activation is keras.activations.softmax or getattr(activation, "__name__", "") == "softmax"
    )


def class_scores(model: keras.Model, outputs: tf.Tensor) -> tf.Tensor:
    """The per-class scores ``z`` whose gradients define the class directions.

    Logits for a model that outputs logits; log-probabilities for one ending in a
    softmax (computed from the cached pre-softmax logits when Keras kept them, which
    is exact and stable).
    """
    logits = getattr(outputs, "_keras_logits", None)
    if logits is not None:
        return tf.nn.log_softmax(logits, axis=-1)
    if ends_in_softmax(model):
        return tf.math.log(tf.maximum(outputs, tf.cast(_LOG_FLOOR, outputs.dtype)))
    return outputs


def num_classes_of(model: keras.Model, outputs: tf.Tensor) -> int:
    """Number of classes C of a classifier's ``(batch, C)`` output.

    Raises:
        ValueError: the output is not ``(batch, C)`` with ``C >= 2``.
    """
    shape = getattr(outputs, "shape", None)
    if (
        isinstance(outputs, (list, tuple, dict))
        or shape is None
        or shape.rank != 2
        or ((shape[-1] or 0) < 2)
    ):
        raise ValueError(
            "Class gradients need a C-way classifier with one output of shape (batch, C), C >= 2; "
            f"model {model.name!r} produces {getattr(outputs, 'shape', type(outputs).__name__)}. "
            "Regression, multi-output and single-sigmoid models have no class subspace."
        )
    return int(shape[-1])


def class_gradients(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    training: bool = False,
    batch_size: int | None = None,
) -> tf.Tensor:
    r"""Per-class mean logit gradients on the given data (eq. 8).

    Row ``k`` is the mean, over the samples of class ``k``, of the gradient of the
    class-``k`` score :math:`z_k` (logit, or log-probability for a softmax output)
    with respect to the trainable variables, in the flat layout. Batches are
    accumulated exactly; the forward pass is stateless (no BatchNorm or RNG updates).

    Args:
        model: A C-way classifier with a single ``(batch, C)`` output.
        x: Inputs, or a finite ``tf.data.Dataset`` of ``(x, y[, w])``.
        y: Sparse ``(n,)`` or one-hot ``(n, C)`` labels (``None`` for a dataset).
        training: Evaluate BatchNorm/Dropout in training mode.
        batch_size: Rows per batch for array data.

    Returns:
        A ``(C, dim)`` tensor in the model's variable dtype. A class with no samples
        in the data has a zero row.

    Raises:
        ValueError: not a classifier, or labels out of range / of the wrong shape.

    Example:
        >>> grads = class_gradients(model, x_probe, y_probe)   # (10, dim)
    """
    data = probe_data(x, y, None, batch_size)
    first = data.batches[0]
    if not model.built:
        model(first.x)
    variables = list(model.trainable_variables)
    if not variables:
        raise ValueError("The model has no trainable variables.")
    dtype = variables[0].dtype
    num_classes = num_classes_of(model, model(first.x, training=False))

    @tf.function(reduce_retracing=True)
    def batch_sums(inputs, onehot):
        params = [v.value for v in variables]
        with tf.GradientTape() as tape:
            tape.watch(params)
            outputs = stateless_outputs(model, params, inputs, training)
            scores = tf.cast(class_scores(model, outputs), dtype)
            per_class = tf.reduce_sum(onehot * scores, axis=0)
        jacobian = tape.jacobian(per_class, params, experimental_use_pfor=True)
        jacobian = _flat.zeros_for_none(
            jacobian, [tf.zeros((num_classes, *p.shape), dtype) for p in params]
        )
        flat = tf.concat([tf.reshape(j, [num_classes, -1]) for j in jacobian], axis=1)
        return flat, tf.reduce_sum(onehot, axis=0)

    total, counts = None, None
    for batch in data.batches:
        onehot = class_targets(batch.y, num_classes, dtype)
        sums, batch_counts = batch_sums(batch.x, onehot)
        total = sums if total is None else total + sums
        counts = batch_counts if counts is None else counts + batch_counts
    return total / tf.maximum(counts, 1.0)[:, None]
