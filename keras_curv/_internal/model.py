"""The one stateless forward pass used by every curvature computation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf


def stateless_outputs(
    model: keras.Model, trainable_values: Sequence[tf.Tensor], x: Any, training: bool
) -> Any:
    """Model outputs as a pure function of the trainable values.

    Non-trainable state (BatchNorm moving statistics, random seed states) is read
    but never written, so diagnostics cannot change training.
    """
    non_trainable = [v.value for v in model.non_trainable_variables]
    kwargs = {"training": training} if getattr(model, "_call_has_training_arg", True) else {}
    outputs, _ = model.stateless_call(trainable_values, non_trainable, x, **kwargs)
    return outputs
