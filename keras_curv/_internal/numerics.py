"""Dtype rules shared by the optimizers and the engine."""

from __future__ import annotations

from typing import Any

import numpy as np
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


def open_uniform(integers: tf.Tensor, levels: int, dtype: Any) -> tf.Tensor:
    """``(k + 1/2) / levels`` for random integers ``k ∈ [0, levels)``, strictly inside ``(0, 1)``.

    Uniforms are made from integers because XLA draws the same integers as the graph
    kernels from a seed, but not the same floats. In float32 the top ``levels / 2²⁵``
    integers of ``levels ≈ 2³⁰`` round to exactly 1 (and the normal quantile of 1 is
    ``inf``): those become the largest float below 1, every other value is unchanged.
    """
    dtype = tf.as_dtype(dtype)
    below_one = exact_cast(1 - float(np.finfo(dtype.as_numpy_dtype).epsneg), dtype)
    uniform = (tf.cast(integers, dtype) + 0.5) / exact_cast(levels, dtype)
    return tf.minimum(uniform, below_one)
