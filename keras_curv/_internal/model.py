"""The one stateless forward pass used by every curvature computation."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal.keras_privates import call_takes_training

_local = threading.local()


@contextlib.contextmanager
def recording_paused() -> Iterator[None]:
    """Within the block, keras-curv's train-step recorders ignore model and layer calls.

    keras-curv's own forward passes (a trial point of a line search, a class sub-batch)
    run in the train step's graph too; they must not be mistaken for the step's.
    """
    depth = getattr(_local, "paused", 0)
    _local.paused = depth + 1
    try:
        yield
    finally:
        _local.paused = depth


def recording_is_paused() -> bool:
    """Whether :func:`recording_paused` is active on this thread."""
    return getattr(_local, "paused", 0) > 0


def stateless_outputs(
    model: keras.Model,
    trainable_values: Sequence[tf.Tensor],
    x: Any,
    training: bool,
    *,
    return_losses: bool = False,
) -> Any:
    """Model outputs as a pure function of the trainable values.

    Non-trainable state (BatchNorm moving statistics, random seed states) is read
    but never written, so diagnostics cannot change training.

    Args:
        model: The model.
        trainable_values: One tensor per trainable variable.
        x: The inputs.
        training: Call the model in training mode.
        return_losses: Also return the model's losses (regularization included) at
            ``trainable_values``.

    Returns:
        The outputs, or ``(outputs, losses)``.
    """
    non_trainable = [v.value for v in model.non_trainable_variables]
    kwargs = {"training": training} if call_takes_training(model) else {}
    with recording_paused():
        result = model.stateless_call(
            trainable_values, non_trainable, x, return_losses=return_losses, **kwargs
        )
    if return_losses:
        return result[0], result[2]
    return result[0]


def output_shapes(model: keras.Model) -> Any:
    """The shapes of ``model``'s outputs (a nest like its outputs), or ``None`` if unknown.

    Known for a Functional or Sequential model with inputs, and for any model that has
    been called (its build input shape is then traced through it symbolically).
    """
    outputs = getattr(model, "outputs", None)
    if outputs:
        return tf.nest.map_structure(lambda t: tuple(t.shape), outputs)
    config = model.get_build_config() if model.built else None
    shapes = (config or {}).get("input_shape")
    if shapes is None:
        return None

    try:
        specs = keras.tree.map_shape_structure(
            lambda shape: keras.KerasTensor((None, *tuple(shape)[1:])), shapes
        )
        with recording_paused():
            result = model.compute_output_spec(specs)
    except Exception:  # noqa: BLE001 - a model that cannot be traced symbolically
        return None
    return tf.nest.map_structure(lambda t: tuple(t.shape), result)
