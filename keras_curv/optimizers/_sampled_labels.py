"""Losses on labels sampled from the model's own predictive distribution.

For a loss that is a negative log-likelihood of the outputs, the gradient ``ĝ`` of the
loss on labels ``ŷ`` drawn from the model's predictive distribution satisfies
Bartlett's identity ``E_ŷ[ĝ ĝᵀ] = Jᵀ (∇²_z ℓ) J``: the Gauss–Newton matrix. Sophia-G
(Gauss–Newton–Bartlett) and the sampled Fisher of K-FAC rest on it.

:func:`bartlett_loss` builds, for the compiled loss ``L = κ Σ_e w_e ℓ_e`` (``e`` runs
over the loss elements: samples, or tokens of sequence outputs; ``κ`` is Keras's
reduction), the scalar

```
L̂ = √(κ / c) · Σ_e √w_e · ℓ_e(ŷ_e, z_e)
```

where ``ℓ_e = c · (negative log-likelihood)`` for each supported family (``c = 1`` for
softmax cross-entropy, ``1/k`` for sigmoid cross-entropy averaged over ``k`` outputs,
``2/k`` for the mean squared error over ``k`` outputs, a unit Gaussian likelihood).
Then ``E_ŷ[∇L̂ ⊙ ∇L̂] = diag(G)``, the Gauss–Newton diagonal of ``L`` itself. With
``w = 1`` and ``κ = 1/N`` this is ``N·ĝ⊙ĝ`` for ``ĝ`` the gradient of the mean
sampled loss: the official SophiaG estimate, its batch-size factor included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_curv._internal.keras_privates import softmax_logits
from keras_curv._internal.losses import loss_family
from keras_curv._internal.numerics import open_uniform

SUPPORTED = {
    "categorical": "softmax cross-entropy (sparse or one-hot labels)",
    "binary": "sigmoid cross-entropy",
    "squared_error": "the mean squared error (a unit-variance Gaussian likelihood)",
}
_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight")


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample labels for one compiled loss.

    Attributes:
        family: ``"categorical"``, ``"binary"`` or ``"squared_error"``.
        from_logits: Whether the model outputs logits (else probabilities).
        reduction: Keras's reduction of the per-element losses.
    """

    family: str
    from_logits: bool
    reduction: str


def sampling_spec(loss: Any, owner: str, fix: str) -> SamplingSpec:
    """The :class:`SamplingSpec` of the loss a model was compiled with.

    Args:
        loss: What was passed to ``compile(loss=...)``.
        owner: Who asks, for the message.
        fix: What the user can do instead, for the message.

    Raises:
        ValueError: a loss that is not one of :data:`SUPPORTED`, or an unsupported
            reduction.
    """
    family = loss_family(loss)
    if family not in SUPPORTED:
        supported = ", ".join(SUPPORTED.values())
        raise ValueError(
            f"{owner} samples labels from the model's predictive distribution, which it "
            f"can do for a single Keras loss that is {supported}; the model is compiled "
            f"with loss={_describe(loss)}. {fix}"
        )
    if isinstance(loss, str):
        return SamplingSpec(family, False, "sum_over_batch_size")
    config = loss.get_config() if isinstance(loss, keras.losses.Loss) else {}
    reduction = config.get("reduction", "sum_over_batch_size") or "none"
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{owner} needs a loss reduced to a scalar (one of {_REDUCTIONS}); the compiled "
            f"loss has reduction={reduction!r}. {fix}"
        )
    return SamplingSpec(family, bool(config.get("from_logits", False)), reduction)


def prepare(spec: SamplingSpec, outputs: Any, dtype: tf.DType) -> tuple[SamplingSpec, tf.Tensor]:
    """The outputs to sample from and differentiate, in ``dtype``, and their spec.

    Probabilities that Keras computed from logits (a softmax or sigmoid activation keeps
    them) are replaced by those logits, which is exact and stable, also after a cast.

    Raises:
        ValueError: several outputs, or an output of rank < 2.
    """
    if isinstance(outputs, (list, tuple, dict)) or getattr(outputs, "shape", None) is None:
        raise ValueError(
            "Sampling labels needs a model with a single output; this one returns "
            f"{type(outputs).__name__}."
        )
    if outputs.shape.rank is None or outputs.shape.rank < 2:
        raise ValueError(
            "Sampling labels needs outputs of shape (batch, ..., k); the model outputs shape "
            f"{outputs.shape}. Give the last layer an explicit output axis (e.g. Dense(1))."
        )
    logits = None if spec.from_logits else softmax_logits(outputs)
    if logits is not None:
        spec = SamplingSpec(spec.family, True, spec.reduction)
        outputs = logits
    return spec, tf.cast(outputs, dtype)


def _describe(loss: Any) -> str:
    if isinstance(loss, keras.losses.Loss):
        return f"{type(loss).__name__}({loss.name!r})"
    if callable(loss) and hasattr(loss, "__name__"):
        return f"function {loss.__name__}"
    return repr(loss)


def element_count(outputs: tf.Tensor) -> tf.Tensor:
    """The number of loss elements of ``outputs`` (all axes but the last), as a float."""
    return tf.cast(tf.reduce_prod(tf.shape(outputs)[:-1]), outputs.dtype)


_LEVELS = 2**31 - 1  # values of the random integers behind each uniform


def _open_uniform(shape: tf.Tensor, seed: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    # From random integers: XLA draws the same integers as the graph does from a seed,
    # but not the same floats.
    bits = tf.random.stateless_uniform(shape, seed=seed, minval=0, maxval=_LEVELS, dtype=tf.int32)
    return open_uniform(bits, _LEVELS, dtype)


def noise_for(spec: SamplingSpec, shape: tf.Tensor, seed: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """The random numbers one draw of labels needs, shaped like the outputs.

    Uniform in ``(0, 1)`` for the cross-entropies (Gumbel-max resp. Bernoulli
    thresholds), standard normal (Box–Muller) for the squared error; the same numbers
    with and without ``jit_compile``.
    """
    if spec.family != "squared_error":
        return _open_uniform(shape, seed, dtype)
    u = _open_uniform(tf.concat([[2], shape], 0), seed, dtype)
    return tf.sqrt(-2.0 * tf.math.log(u[0])) * tf.cos(2.0 * np.pi * u[1])


def _log_probabilities(spec: SamplingSpec, outputs: tf.Tensor) -> tf.Tensor:
    if spec.from_logits:
        return tf.nn.log_softmax(outputs, axis=-1)
    return tf.math.log(tf.maximum(outputs, tf.cast(1e-30, outputs.dtype)))


def _probabilities(spec: SamplingSpec, outputs: tf.Tensor) -> tf.Tensor:
    return tf.sigmoid(outputs) if spec.from_logits else outputs


def sample_labels(spec: SamplingSpec, outputs: tf.Tensor, noise: tf.Tensor) -> tf.Tensor:
    """Labels drawn from the model's predictive distribution at ``outputs``.

    Integer classes (Gumbel-max over the last axis), 0/1 targets (Bernoulli), or
    ``outputs + noise`` (unit Gaussian); the draws carry no gradient.
    """
    outputs = tf.stop_gradient(outputs)
    if spec.family == "categorical":
        gumbel = -tf.math.log(-tf.math.log(noise))
        return tf.argmax(_log_probabilities(spec, outputs) + gumbel, axis=-1, output_type=tf.int32)
    if spec.family == "binary":
        return tf.cast(noise < _probabilities(spec, outputs), outputs.dtype)
    return outputs + noise


def _elements(spec: SamplingSpec, labels: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
    """``ℓ_e``: the per-element loss of the family (Keras's own functions)."""
    if spec.family == "categorical":
        return keras.losses.sparse_categorical_crossentropy(
            labels, outputs, from_logits=spec.from_logits
        )
    if spec.family == "binary":
        return keras.losses.binary_crossentropy(labels, outputs, from_logits=spec.from_logits)
    return tf.reduce_mean(tf.square(labels - outputs), axis=-1)


def _scale(spec: SamplingSpec, outputs: tf.Tensor) -> tf.Tensor:
    """``c``: the per-element loss over the negative log-likelihood."""
    if spec.family == "categorical":
        return tf.ones([], outputs.dtype)
    k = tf.cast(tf.shape(outputs)[-1], outputs.dtype)
    return (1.0 if spec.family == "binary" else 2.0) / k


def _broadcast_weights(weights: tf.Tensor, elements: tf.Tensor) -> tf.Tensor:
    """Sample weights shaped like the per-element losses (Keras's squeeze-or-expand rule)."""
    weights = tf.cast(weights, elements.dtype)
    while weights.shape.rank > elements.shape.rank and weights.shape[-1] == 1:
        weights = tf.squeeze(weights, -1)
    while weights.shape.rank < elements.shape.rank:
        weights = weights[..., None]
    return tf.broadcast_to(weights, tf.shape(elements))


def bartlett_loss(
    spec: SamplingSpec,
    outputs: tf.Tensor,
    labels: tf.Tensor,
    sample_weight: tf.Tensor | None,
    normaliser: tf.Tensor,
) -> tf.Tensor:
    """``L̂ = √(κ/c) Σ_e √w_e ℓ_e(ŷ_e, z_e)`` with ``κ = 1/normaliser`` (module docstring).

    Args:
        spec: The compiled loss's :class:`SamplingSpec`.
        outputs: The model outputs ``z`` (differentiable), in the statistics' dtype.
        labels: :func:`sample_labels` of ``outputs``.
        sample_weight: The step's sample weights, or ``None``. Negative weights count
            as 0 (they have no Gauss–Newton matrix).
        normaliser: ``1/κ``: the global number of elements, the global sum of weights
            (``"mean_with_sample_weight"``) or 1 (``"sum"``).

    Returns:
        A scalar whose gradient ``ĝ`` has ``E[ĝ ⊙ ĝ] = diag(G)``.
    """
    elements = _elements(spec, labels, outputs)
    if sample_weight is not None:
        weights = _broadcast_weights(sample_weight, elements)
        elements = tf.sqrt(tf.maximum(weights, tf.zeros_like(weights))) * elements
    scale = tf.sqrt(1.0 / (tf.cast(normaliser, outputs.dtype) * _scale(spec, outputs)))
    return scale * tf.reduce_sum(elements)
