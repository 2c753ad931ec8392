"""Turning what users pass as a loss (or compile a model with) into a Keras loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras


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
