"""The Fisher's output-side half for K-FAC: which likelihood a Keras loss is, and the
cotangents whose back-propagation gives the ``g`` of the ``G`` factors.

A supported loss is ``c · NLL`` per element, with ``NLL`` the negative log-likelihood of an
exponential family in the model's scores ``z``:

=========================  ===============================  ================  ==========
Keras loss                 distribution                     scores ``z``      ``c``
=========================  ===============================  ================  ==========
(sparse) categorical CE    categorical over the last axis   logits            1
binary CE                  independent Bernoullis           logits            1 / K
mean squared error         Gaussian, unit variance          the outputs       2 / K
=========================  ===============================  ================  ==========

(``K`` the size of the last axis: Keras averages those two losses over it.) The Fisher of
``c · NLL`` is ``c`` times the expected outer product of ``∇NLL`` under the model's own
distribution, and equals its Gauss–Newton matrix. With ``s_e = sqrt(w_e c ρ)`` per element
(``w`` the sample weight, ``ρ`` from the loss's reduction, see :func:`reduction_normalizer`),
the cotangent on ``z`` of one sample is

* ``fisher="model"``: ``s (∂NLL/∂z)(ỹ)``, ``ỹ`` drawn from the model (one draw per element);
* ``fisher="empirical"``: ``s (∂NLL/∂z)(y)`` at the true labels;
* ``fisher="exact"``: the ``K`` columns ``s L_k`` of a square root ``Σ_k L_k L_kᵀ`` of the
  NLL's Hessian in ``z`` (``K`` backward passes instead of one).

The empirical and exact cotangents carry a random sign per sample: it cancels in every
per-sample outer product, and makes sums over samples (diagonal blocks, layers called on
tensors without a batch axis) unbiased estimates of their per-sample sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal.keras_privates import softmax_logits
from keras_curv._internal.losses import loss_family

FISHERS = ("model", "empirical", "exact")
_SUPPORTED = ("categorical", "binary", "squared_error")
_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight")
_LOG_FLOOR = 1e-30


@dataclass(frozen=True)
class Likelihood:
    """The likelihood behind a supported Keras loss.

    Attributes:
        family: ``"categorical"``, ``"binary"`` or ``"squared_error"``.
        from_logits: Whether the model outputs logits (cross-entropies only).
        sparse_labels: Integer class labels (``sparse_categorical_crossentropy``).
        reduction: The loss's reduction.
        ignore_class: A sparse label whose elements carry no weight, or ``None``.
    """

    family: str
    from_logits: bool = False
    sparse_labels: bool = False
    reduction: str = "sum_over_batch_size"
    ignore_class: int | None = None


def likelihood_of(loss: Any, owner: str = "KFAC") -> Likelihood:
    """The :class:`Likelihood` of ``compile(loss=...)``.

    Raises:
        ValueError: several losses, a custom loss, or a Keras loss that is not a
            negative log-likelihood K-FAC knows; the message names what to compile with.
    """
    fix = (
        f"{owner} needs the loss's likelihood (its Fisher is an expectation under the "
        "model's predictive distribution). Compile with one of "
        "keras.losses.SparseCategoricalCrossentropy / CategoricalCrossentropy (softmax "
        "outputs or from_logits=True), BinaryCrossentropy (sigmoid outputs or "
        "from_logits=True) or MeanSquaredError (or their names)"
    )
    if isinstance(loss, (list, tuple, dict)):
        raise ValueError(f"{fix}; got one loss per output ({loss!r}): K-FAC needs a single loss.")
    family = loss_family(loss)
    if family not in _SUPPORTED:
        what = "a custom loss" if family is None else f"a {family!r} loss"
        raise ValueError(f"{fix}; got {what}: {loss!r}.")
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    config = loss.get_config() if isinstance(loss, keras.losses.Loss) else {}
    reduction = config.get("reduction", "sum_over_batch_size")
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{owner} needs a reduced loss (reduction one of {_REDUCTIONS}); got "
            f"reduction={reduction!r}."
        )
    if config.get("axis", -1) != -1:
        raise ValueError(f"{owner} needs the class axis last; got axis={config['axis']}.")
    function = getattr(loss, "fn", loss)
    return Likelihood(
        family=family,
        from_logits=bool(config.get("from_logits", False)),
        sparse_labels=function is keras.losses.sparse_categorical_crossentropy,
        reduction=reduction,
        ignore_class=config.get("ignore_class"),
    )


def _activation_input(outputs: tf.Tensor, op_type: str) -> tf.Tensor | None:
    """The logits of a probability output: cached by Keras, or the activation op's input."""
    logits = softmax_logits(outputs)
    if logits is not None:
        return logits
    op = getattr(outputs, "op", None)
    if op is not None and op.type == op_type and len(op.inputs) == 1:
        return op.inputs[0]
    return None


def scores(likelihood: Likelihood, y_pred: tf.Tensor) -> tf.Tensor:
    """The scores ``z`` of the table above, from the model's outputs.

    Logits where the model outputs them or they can be recovered from its softmax or
    sigmoid; else log-probabilities (categorical) or log-odds (binary), which give the
    same cotangents through a softmax resp. sigmoid.
    """
    y_pred = tf.convert_to_tensor(y_pred)
    if y_pred.shape.rank is None or y_pred.shape.rank < 2 or y_pred.shape[-1] is None:
        raise ValueError(
            "KFAC needs model outputs of shape (batch, ..., K) with a known K; got "
            f"{y_pred.shape}. Give the last layer a feature axis (e.g. Dense(1))."
        )
    if likelihood.family == "squared_error" or likelihood.from_logits:
        return y_pred
    if likelihood.family == "categorical":
        logits = _activation_input(y_pred, "Softmax")
        if logits is not None:
            return logits
        floor = tf.cast(_LOG_FLOOR, y_pred.dtype)
        probabilities = y_pred / tf.reduce_sum(y_pred, axis=-1, keepdims=True)
        return tf.math.log(tf.maximum(probabilities, floor))
    logits = _activation_input(y_pred, "Sigmoid")
    if logits is not None:
        return logits
    eps = tf.cast(1e-7, y_pred.dtype)
    p = tf.clip_by_value(y_pred, eps, 1 - eps)
    return tf.math.log(p) - tf.math.log1p(-p)


def loss_constant(likelihood: Likelihood, num_outputs: int) -> float:
    """``c`` of the table above."""
    if likelihood.family == "categorical":
        return 1.0
    return (1.0 if likelihood.family == "binary" else 2.0) / num_outputs


def element_weights(likelihood: Likelihood, z: tf.Tensor, y: Any, sample_weight: Any) -> tf.Tensor:
    """Per-element weights ``w_e`` (shape ``z.shape[:-1]``): sample weights, ignored labels."""
    dtype = tf.float64 if z.dtype == tf.float64 else tf.float32
    shape = tf.shape(z)[:-1]
    weights = tf.ones(shape, dtype)
    if sample_weight is not None:
        w = tf.cast(sample_weight, dtype)
        rank = z.shape.rank - 1
        while w.shape.rank > rank and w.shape[-1] == 1:
            w = tf.squeeze(w, -1)
        while w.shape.rank < rank:
            w = w[..., None]
        weights = weights * w
    if likelihood.ignore_class is not None and y is not None:
        labels = tf.reshape(tf.cast(y, tf.int64), shape)
        weights = weights * tf.cast(tf.not_equal(labels, likelihood.ignore_class), dtype)
    return weights


def reduction_normalizer(
    likelihood: Likelihood,
    z: tf.Tensor,
    samples: tf.Tensor,
    weight_sum: tf.Tensor,
) -> tf.Tensor:
    """``ρ = N / D`` for a loss ``Σ_e w_e c NLL_e / D`` on ``N`` samples.

    ``D`` is the number of elements (``sum_over_batch_size``, ``mean``), 1 (``sum``) or
    the total element weight (``mean_with_sample_weight``); ``samples`` and
    ``weight_sum`` are over the global batch.
    """
    dtype = samples.dtype
    per_sample = tf.cast(tf.reduce_prod(tf.shape(z)[1:-1]), dtype)
    if likelihood.reduction == "sum":
        return samples
    if likelihood.reduction == "mean_with_sample_weight":
        return samples / tf.maximum(weight_sum, keras.backend.epsilon())
    return 1.0 / per_sample


def _one_hot_labels(likelihood: Likelihood, z: tf.Tensor, y: Any) -> tf.Tensor:
    num = z.shape[-1]
    if likelihood.sparse_labels:
        labels = tf.reshape(tf.cast(y, tf.int32), tf.shape(z)[:-1])
        return tf.one_hot(labels, num, dtype=z.dtype)
    return tf.reshape(tf.cast(y, z.dtype), tf.shape(z))


def cotangents(
    likelihood: Likelihood,
    mode: str,
    z: tf.Tensor,
    y: Any,
    scale: tf.Tensor,
    noise: Callable[[str], tf.Tensor],
) -> tf.Tensor:
    """The cotangents on ``z``, shape ``(K', *z.shape)`` (``K' = K`` for ``"exact"``, else 1).

    Args:
        likelihood: The loss's likelihood.
        mode: ``"model"``, ``"empirical"`` or ``"exact"``.
        z: The scores.
        y: The true labels (``"empirical"``).
        scale: ``s_e`` per element, shape ``z.shape[:-1]``.
        noise: ``noise(kind)`` gives this replica's draws: ``"uniform"`` and ``"normal"``
            shaped like ``z``, ``"sign"`` (±1) of shape ``(batch,)``.

    Returns:
        A tensor in ``z``'s dtype.
    """
    compute = tf.float64 if z.dtype == tf.float64 else tf.float32
    zc = tf.cast(z, compute)
    family = likelihood.family
    if family == "categorical":
        mean = tf.nn.softmax(zc, axis=-1)
    elif family == "binary":
        mean = tf.sigmoid(zc)
    else:
        mean = zc
    if mode == "model":
        if family == "categorical":
            gumbel = -tf.math.log(-tf.math.log(tf.cast(noise("uniform"), compute)))
            draw = tf.argmax(tf.nn.log_softmax(zc, axis=-1) + gumbel, axis=-1)
            columns = (mean - tf.one_hot(draw, z.shape[-1], dtype=compute))[None]
        elif family == "binary":
            columns = (mean - tf.cast(tf.cast(noise("uniform"), compute) < mean, compute))[None]
        else:
            columns = -tf.cast(noise("normal"), compute)[None]
    else:
        if mode == "empirical":
            if family == "categorical":
                target = tf.cast(_one_hot_labels(likelihood, zc, y), compute)
            else:
                target = tf.reshape(tf.cast(y, compute), tf.shape(zc))
            columns = (mean - target)[None]
        else:
            columns = _hessian_root_columns(family, mean, z.shape[-1], compute)
        sign = tf.cast(noise("sign"), compute)
        sign = tf.reshape(sign, [-1] + [1] * (z.shape.rank - 1))
        columns = columns * sign
    scale = tf.cast(scale, compute)[None, ..., None]
    return tf.cast(columns * scale, z.dtype)


def _hessian_root_columns(family: str, mean: tf.Tensor, num: int, dtype: tf.DType) -> tf.Tensor:
    """``L_k`` with ``Σ_k L_k L_kᵀ = ∇²_z NLL``, stacked on a leading axis of size K."""
    eye = tf.eye(num, dtype=dtype)
    # Broadcast the unit vectors e_k over the elements: (K, 1, ..., 1, K).
    units = tf.reshape(eye, [num] + [1] * (mean.shape.rank - 1) + [num])
    if family == "squared_error":
        return units * tf.ones_like(mean)[None]
    if family == "binary":
        return units * tf.sqrt(mean * (1 - mean))[None]
    # Categorical: L_k = sqrt(p_k) (e_k − p).
    root = tf.sqrt(mean)
    root_k = tf.transpose(root, [mean.shape.rank - 1] + list(range(mean.shape.rank - 1)))
    return root_k[..., None] * (units - mean[None])
