"""One way to turn what users pass as a loss into a ``keras.losses.Loss``."""

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
