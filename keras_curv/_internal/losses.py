"""Turning what users pass as a loss (or compile a model with) into a Keras loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal.numerics import exact_cast


def replica_share(value: tf.Tensor, num_replicas: int) -> tf.Tensor:
    """One replica's share of a loss averaged over its own batch: ``value / R``.

    Keras's train step (and every Keras loss with a mean reduction) divides so, so that
    the sum over the ``R`` replicas of the gradients is the gradient of the global
    batch-mean loss.
    """
    return value if num_replicas == 1 else value / exact_cast(num_replicas, value.dtype)


class PerSampleLoss(keras.losses.Loss):
    """Wraps ``fn(y_true, y_pred) -> per-sample losses`` (Keras loss functions)."""

    def __init__(self, fn: Callable, reduction: str = "sum_over_batch_size", name=None, dtype=None):
        super().__init__(
            reduction=reduction, name=name or getattr(fn, "__name__", "loss"), dtype=dtype
        )
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)

    def get_config(self):
        return {
            "reduction": self.reduction,
            "name": self.name,
            "fn": keras.saving.serialize_keras_object(self.fn),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["fn"] = keras.saving.deserialize_keras_object(config["fn"])
        return cls(**config)


def as_keras_loss(loss: Any) -> keras.losses.Loss | None:
    """A ``keras.losses.Loss`` for a loss name, a Loss, or a Keras loss function.

    Returns ``None`` for any other callable (a user function returning a scalar).
    """
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss
    if callable(loss) and getattr(loss, "__module__", "").startswith("keras"):
        return PerSampleLoss(loss)
    return None


def model_loss(model: keras.Model, loss: Any, owner: str) -> Any:
    """The loss to differentiate: ``loss`` if given, else the model's compiled loss.

    A loss *function* given to ``compile`` returns per-sample values that Keras averages,
    so it is wrapped accordingly.

    Args:
        model: The (compiled) model.
        loss: The loss the user passed, or ``None`` for the compiled one.
        owner: Who asks, for the messages (e.g. ``"HessianSpectrum"``).

    Raises:
        ValueError: no ``loss`` and the compiled loss is missing or not a single loss.
    """
    if loss is not None:
        return loss
    compiled = getattr(model, "loss", None)
    if compiled is None:
        raise ValueError(
            f"{owner} needs a loss: the model is not compiled with one. Compile the model "
            "or pass `loss=` (a Keras loss name, a keras.losses.Loss or a callable)."
        )
    if isinstance(compiled, (list, tuple, dict)):
        raise ValueError(
            f"{owner} cannot use the model's compiled loss {compiled!r} (one per output); "
            "curvature diagnostics need a single-output model and a single loss: pass `loss=`."
        )
    if isinstance(compiled, str) or isinstance(compiled, keras.losses.Loss):
        return compiled
    if as_keras_loss(compiled) is not None:
        return compiled
    if callable(compiled):
        # In the variables' dtype: a local function cannot be re-created from its config
        # with another dtype, and a float32 loss would blur a float64 model's Hessian.
        variables = model.trainable_variables
        dtype = variables[0].dtype if variables else None
        return PerSampleLoss(compiled, dtype=dtype)
    raise ValueError(f"{owner} cannot use the compiled loss {compiled!r}; pass `loss=`.")


_FAMILIES = {
    "sparse_categorical_crossentropy": "categorical",
    "categorical_crossentropy": "categorical",
    "categorical_focal_crossentropy": "categorical_focal",
    "binary_crossentropy": "binary",
    "binary_focal_crossentropy": "binary_focal",
    "mean_squared_error": "squared_error",
}
_OTHER_KERAS_LOSSES = (
    "mean_absolute_error",
    "mean_absolute_percentage_error",
    "mean_squared_logarithmic_error",
    "huber",
    "log_cosh",
    "hinge",
    "squared_hinge",
    "categorical_hinge",
    "poisson",
    "kl_divergence",
    "cosine_similarity",
    "ctc",
    "dice",
    "tversky",
    "circle",
    "categorical_generalized_cross_entropy",
)


def loss_family(loss: Any) -> str | None:
    """Which kind of Keras loss ``loss`` is: the one predicate every optimizer uses.

    Args:
        loss: What was passed to ``compile(loss=...)``: a name, a ``keras.losses.Loss``,
            a Keras loss function, or anything else.

    Returns:
        ``"categorical"`` (softmax cross-entropy over C classes, sparse or one-hot),
        ``"categorical_focal"``, ``"binary"`` (sigmoid cross-entropy), ``"binary_focal"``,
        ``"squared_error"``, ``"other"`` for any other Keras loss, and ``None`` for what
        is not a single Keras loss (a custom function or ``Loss`` subclass, several
        losses for several outputs): those are trusted, not judged.
    """
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            return None
    function = getattr(loss, "fn", loss)
    for name, family in _FAMILIES.items():
        if function is getattr(keras.losses, name, None):
            return family
    for name in _OTHER_KERAS_LOSSES:
        candidate = getattr(keras.losses, name, None)
        if candidate is not None and function is candidate:
            return "other"
    return None


# Keras losses that are piecewise linear in the model outputs: their output Hessian is
# zero wherever it exists, so Newton-type methods see no curvature from them.
_PIECEWISE_LINEAR = (
    "mean_absolute_error",
    "mean_absolute_percentage_error",
    "hinge",
    "categorical_hinge",
)


def piecewise_linear_loss(loss: Any) -> str | None:
    """The name of ``loss`` if it is a Keras loss without second derivatives, else ``None``.

    ``mean_absolute_error``, ``mean_absolute_percentage_error``, ``hinge`` and
    ``categorical_hinge`` are piecewise linear in the outputs (zero curvature almost
    everywhere); anything else, custom losses included, is trusted.
    """
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            return None
    function = getattr(loss, "fn", loss)
    for name in _PIECEWISE_LINEAR:
        if function is getattr(keras.losses, name, None):
            return name
    return None
