r"""Per-class mean logit gradients (eq. 8 of the class-subspace paper).

.. math::
    c_k = \frac{1}{|D_k|} \sum_{\mu \in D_k} \nabla_\theta z^\mu_k

where :math:`D_k` are the samples of class :math:`k` and :math:`z` are the logits, or
the log-probabilities when the model ends in a softmax.
"""

from __future__ import annotations

import weakref
from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal import flat as _flat
from keras_curv._internal.data import class_targets, probe_data
from keras_curv._internal.keras_privates import softmax_logits
from keras_curv._internal.model import stateless_outputs

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
    logits = softmax_logits(outputs)
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


class ClassGradients:
    r"""Per-class mean logit gradients of one model, with the per-batch function traced once.

    Computes the same :math:`c_k` as :func:`class_gradients` (which uses one of these per
    model and ``training`` flag). The per-batch Jacobian of the class-summed scores,

    .. math::
        S_{k\cdot} = \nabla_\theta \sum_{\mu \in B} [y^\mu = k]\, z^\mu_k ,

    is a ``tf.function`` built at construction and reused by every call: it reads the
    variables' current values, so it follows training without being traced again (tracing
    a vectorised Jacobian costs far more than evaluating it). Only a new batch shape can
    add a trace, and ``reduce_retracing`` makes that a shape-generic one.

    The model is held by a weak reference, so an instance cached for a model does not
    keep the model alive.

    Args:
        model: A built C-way classifier with a single ``(batch, C)`` output.
        training: Evaluate BatchNorm/Dropout in training mode (statelessly).

    Raises:
        ValueError: the model has no trainable variables.

    Example:
        >>> grads = ClassGradients(model)
        >>> rows = grads(x_probe, y_probe)          # (C, dim); later calls reuse the trace
        >>> grads.tracing_count
        1
    """

    def __init__(self, model: keras.Model, *, training: bool = False):
        variables = list(model.trainable_variables)
        if not variables:
            raise ValueError("The model has no trainable variables.")
        self.variables = variables
        self.training = bool(training)
        self.dtype = variables[0].dtype
        self._model = weakref.ref(model)
        training = self.training
        dtype = self.dtype
        model_ref = self._model

        @tf.function(reduce_retracing=True)
        def batch_sums(inputs, onehot):
            num_classes = onehot.shape[-1]
            params = [v.value for v in variables]
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(params)
                outputs = stateless_outputs(model_ref(), params, inputs, training)
                scores = tf.cast(class_scores(model_ref(), outputs), dtype)
                per_class = tf.reduce_sum(onehot * scores, axis=0)

            def row(selector):
                # One row of the Jacobian, densified inside the vectorised loop: an
                # Embedding's IndexedSlices would otherwise be densified by pfor, which
                # logs a warning at every trace.
                grads = tape.gradient(per_class, params, output_gradients=selector)
                return _flat.flatten(_flat.zeros_for_none(grads, params))

            flat = tf.vectorized_map(row, tf.eye(num_classes, dtype=per_class.dtype))
            return flat, tf.reduce_sum(onehot, axis=0)

        self._batch_sums = batch_sums
        self._num_classes: int | None = None

    @property
    def tracing_count(self) -> int:
        """How often the per-batch Jacobian was traced (stays constant across calls)."""
        return self._batch_sums.experimental_get_tracing_count()

    def num_classes(self, first_x: Any) -> int:
        """C, from the model's output on ``first_x`` (checked once, then remembered)."""
        if self._num_classes is None:
            model = self._model()
            self._num_classes = num_classes_of(model, model(first_x, training=False))
        return self._num_classes

    def __call__(
        self, x: Any, y: Any = None, *, batch_size: int | None = None, data: Any = None
    ) -> tf.Tensor:
        """``(C, dim)`` per-class mean logit gradients on ``x, y`` (or on prepared ``data``).

        Args:
            x: Inputs, or a finite ``tf.data.Dataset`` of ``(x, y[, w])``.
            y: Sparse ``(n,)`` or one-hot ``(n, C)`` labels (``None`` for a dataset).
            batch_size: Rows per batch for array data.
            data: Already prepared :class:`~keras_curv._internal.data.ProbeData`; when
                given, ``x``, ``y`` and ``batch_size`` are ignored (the callbacks pass
                their validated probe set, so nothing is re-sliced per call).

        Returns:
            A ``(C, dim)`` tensor in the variables' dtype; a class absent from the data
            has a zero row.
        """
        if data is None:
            data = probe_data(x, y, None, batch_size)
        num_classes = self.num_classes(data.batches[0].x)
        total, counts = None, None
        for batch in data.batches:
            onehot = class_targets(batch.y, num_classes, self.dtype)
            sums, batch_counts = self._batch_sums(batch.x, onehot)
            total = sums if total is None else total + sums
            counts = batch_counts if counts is None else counts + batch_counts
        return total / tf.maximum(counts, 1.0)[:, None]


# One traced ClassGradients per (model, training); weak keys, so models can be collected.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def class_gradients_for(model: keras.Model, training: bool = False) -> ClassGradients:
    """The cached :class:`ClassGradients` of ``model`` (rebuilt if its variables changed)."""
    per_model = _CACHE.setdefault(model, {})
    cached = per_model.get(bool(training))
    variables = model.trainable_variables
    if (
        cached is None
        or len(cached.variables) != len(variables)
        or any(a is not b for a, b in zip(cached.variables, variables))
    ):
        cached = ClassGradients(model, training=training)
        per_model[bool(training)] = cached
    return cached


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

    The traced per-batch Jacobian is cached per ``(model, training)`` (see
    :class:`ClassGradients`), so repeated calls, e.g. once per epoch from a callback,
    do not trace again; they still see the current weights.

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
    if not model.built:
        model(data.batches[0].x)
    return class_gradients_for(model, training)(None, data=data)
