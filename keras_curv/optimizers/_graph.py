"""Graph-building tools for statistics built inside a traced train step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from keras_curv._internal.keras_privates import under_xla

__all__ = ["StepGate", "refresh_gate", "stacked_map", "under_xla"]


def stacked_map(fn: Callable, elems: Any) -> Any:
    """``tf.vectorized_map(fn, elems)`` for an ``fn`` that differentiates tensors of the step.

    Under XLA, ``vectorized_map`` runs ``fn`` inside a nested function where gradients
    stop at the captured forward tensors and silently come back as ``None``. There the
    rows are unrolled instead, and XLA compiles them together.
    """
    if not under_xla():
        return tf.vectorized_map(fn, elems)
    flat = tf.nest.flatten(elems)
    rows = [
        fn(tf.nest.pack_sequence_as(elems, [e[i] for e in flat])) for i in range(flat[0].shape[0])
    ]
    return tf.nest.map_structure(lambda *parts: tf.stack(parts), *rows)


class StepGate:
    """Runs per-batch statistics only on the steps where ``predicate`` holds.

    ``tf.cond`` cannot be used: its branches are separate functions, in which the
    step's tensors cannot be differentiated again. Instead the inputs of the
    statistics pass through a ``Switch`` (:meth:`enter`): on skipped steps they are
    dead tensors, so none of the ops that depend on them execute, and a ``Merge``
    (:meth:`exit`) yields zeros. XLA compiles no ``Switch``: under ``jit_compile`` the
    statistics run at every step and :meth:`exit` masks them to zeros on skipped steps.

    Args:
        predicate: Boolean scalar tensor, or ``None`` for "every step" (no gating).
    """

    def __init__(self, predicate: tf.Tensor | None):
        self.predicate = predicate
        if predicate is None:
            self.mode = "none"
        else:
            self.mode = "mask" if under_xla() else "switch"

    @property
    def skips_work(self) -> bool:
        """Whether skipped steps really skip the gated ops (not so under XLA)."""
        return self.mode == "switch"

    def enter(self, tensor: tf.Tensor) -> tf.Tensor:
        """``tensor`` on live steps, a dead tensor on skipped steps."""
        if self.mode != "switch":
            return tensor
        return tf.raw_ops.Switch(data=tensor, pred=self.predicate)[1]

    def exit(self, tensor: tf.Tensor) -> tf.Tensor:
        """``tensor`` on live steps, zeros on skipped steps."""
        if self.mode == "none":
            return tensor
        if self.mode == "mask":
            return tf.where(self.predicate, tensor, tf.zeros_like(tensor))
        skipped = tf.raw_ops.Switch(data=tf.zeros(tensor.shape, tensor.dtype), pred=self.predicate)
        merged = tf.raw_ops.Merge(inputs=[skipped[0], tensor])[0]
        merged.set_shape(tensor.shape)
        return merged

    def mask(self, flags: tf.Tensor) -> tf.Tensor:
        """Boolean ``flags`` that are all false on skipped steps."""
        if self.mode == "none":
            return flags
        return tf.logical_and(flags, self.predicate)


def refresh_gate(iterations: Any, every: int, *, start: int = 0) -> tuple[tf.Tensor, StepGate]:
    """Whether this step refreshes a curvature statistic, and the :class:`StepGate` for it.

    A step refreshes when ``iterations % every == 0`` and ``iterations >= start``
    (``iterations`` counts the steps before this one).

    Returns:
        ``(predicate, gate)``: a boolean scalar, and a gate that skips the gated work on
        the other steps (no gating at all when every step refreshes).
    """
    if every == 1 and start == 0:
        return tf.constant(True), StepGate(None)
    iteration = tf.cast(tf.convert_to_tensor(iterations), tf.int64)
    predicate = tf.equal(tf.math.floormod(iteration, every), 0)
    if start > 0:
        predicate = tf.logical_and(predicate, iteration >= start)
    return predicate, StepGate(predicate)
