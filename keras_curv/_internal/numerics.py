"""Dtype rules shared by the optimizers and the engine."""

from __future__ import annotations

from typing import Any

import tensorflow as tf


def exact_cast(value: Any, dtype: Any) -> tf.Tensor:
    """``value`` as a tensor of ``dtype``, without a detour through float32.

    ``tf.cast(0.9, tf.float64)`` (and ``keras.ops.cast``) first makes a float32 constant
    of a Python number, so float64 models would compute with ``0.8999999762``; a Python
    number here becomes a constant of ``dtype`` directly.
    """
    if isinstance(value, (tf.Tensor, tf.Variable)) or hasattr(value, "value"):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype=dtype)


def curvature_dtype(dtype: Any) -> tf.DType:
    """The dtype curvature statistics use: float64 stays float64, narrower becomes float32."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32
