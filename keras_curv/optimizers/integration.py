"""How curvature-aware optimizers get the batch inside ``compile``/``fit``.

Keras's TensorFlow train step hands an optimizer only gradients. The curvature
optimizers also need the batch: the labels, the model outputs, the loss and the
gradients *as tensors of the traced step*, so that second-order quantities
(Hessian-vector products, per-class logit gradients) are built by symbolic
differentiation of the very forward pass that produced the gradient: no second
forward pass, the same dropout masks and BatchNorm batch statistics.

This module is the only place that knows how the batch is found:

1. An explicit context, entered by :func:`curvature_step` (hand-written loops).
2. Otherwise, while Keras *traces* ``Model.train_step``, the optimizer reads the
   train step's local tensors (``y``, ``y_pred``, ``sample_weight``, ``loss``,
   ``gradients``) from the calling frame. This happens once per trace, never per
   step. It works for Sequential, Functional and subclassed models, for custom
   ``train_step`` overrides that follow the Keras guide's naming, with
   ``jit_compile``, ``steps_per_execution`` and a wrapping ``LossScaleOptimizer``
   (whose ``tf.cond`` branch cannot differentiate outer tensors: the second-order
   ops are therefore built in the train step's own graph and captured).

``tests/optimizers/test_integration.py`` pins the Keras internals relied on here,
so a Keras change fails loudly there rather than silently in training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from keras_curv._internal import flat as _flat
from keras_curv._internal.losses import as_keras_loss

_TRAIN_STEP_LOCALS = ("y", "y_pred")
_MAX_FRAMES = 40
_state = threading.local()


class CurvatureContextError(RuntimeError):
    """A curvature optimizer was driven where it cannot see the batch."""


USAGE = (
    "{name} needs the batch, not only gradients. Use it through `model.compile(optimizer=...)` "
    "and `model.fit(...)`/`train_on_batch` (not with run_eagerly=True), or in a hand-written loop "
    "call `keras_curv.optimizers.curvature_step(model, optimizer, loss, x, y)` instead of "
    "`optimizer.apply_gradients`."
)


def under_xla() -> bool:
    """Whether ops built now will be compiled by XLA (``jit_compile``)."""
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


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


@dataclass
class TrainBatch:
    """The tensors of one traced train step that curvature optimizers need.

    Attributes:
        model: The model being trained.
        y: Targets as given to the train step.
        y_pred: Model outputs of the step's forward pass.
        sample_weight: Per-sample weights, or ``None``.
        loss: The (possibly loss-scaled) scalar loss the gradients were taken of.
        gradients: The (possibly loss-scaled) gradients, aligned with ``variables``,
            or ``None`` to recompute them symbolically from ``loss``.
        variables: The model's trainable variables.
        loss_scale: Factor by which ``loss`` and ``gradients`` are scaled (1 unless a
            ``LossScaleOptimizer`` wraps the optimizer).
        x: The step's inputs (``None`` if the train step does not name them ``x``).
        replicas: ``None``, except where a ``LossScaleOptimizer`` calls the optimizer
            from threads of its own under a strategy that needs ``merge_call`` (see
            :func:`current_batch`): then every replica's batch, in replica order, whose
            statistics are summed directly in the step's graph.
        device: The device of this replica's step (with ``replicas`` only).
        replica_id: This replica's index among the variables' local copies (with
            ``replicas`` only): its tensors are differentiated with respect to this
            replica's copies of the variables.
    """

    model: keras.Model
    y: Any
    y_pred: Any
    sample_weight: Any
    loss: tf.Tensor
    gradients: list | None
    variables: list
    loss_scale: Any = 1.0
    x: Any = None
    replicas: list | None = None
    device: str | None = None
    replica_id: int | None = None

    @property
    def graph(self) -> tf.Graph:
        """The graph the step's tensors live in; second-order ops are built here."""
        return tf.convert_to_tensor(self.loss).graph

    def step_graph(self) -> contextlib.AbstractContextManager:
        """Context in which to build every per-batch statistic (probes included).

        Inside a ``LossScaleOptimizer``'s ``tf.cond`` branch, tensors of the train
        step cannot be differentiated; ops built in this context live in the step's
        graph and are captured by the branch when used there.
        """
        return self.graph.as_default()

    def _handles(self) -> list:
        handles = [getattr(v, "value", v) for v in self.variables]
        if self.replica_id is None:
            return handles
        # Outside its replica context a mirrored variable resolves to its primary copy;
        # this replica's forward pass read its own copy.
        return [
            h.values[self.replica_id] if isinstance(h, tf.distribute.DistributedValues) else h
            for h in handles
        ]

    def scaled_gradients(self) -> list[tf.Tensor]:
        """The step's gradients (times ``loss_scale``), dense, recomputed only if not kept.

        Dense because curvature code differentiates them again, and Keras hands an
        ``Embedding``'s gradient over as ``tf.IndexedSlices``.
        """
        if self.gradients is None:
            with self.graph.as_default():
                self.gradients = tf.gradients(self.loss, self._handles())
        self.gradients = _flat.zeros_for_none(self.gradients, self._handles())
        return list(self.gradients)

    def vjp(self, ys: Any, cotangents: Any) -> list[tf.Tensor]:
        """``sum_i cotangent_i . d ys_i / d theta`` for tensors of this step, per variable."""
        with self.graph.as_default():
            grads = tf.gradients(ys, self._handles(), grad_ys=cotangents)
            return _flat.zeros_for_none(grads, self._handles())

    def jacobian(self, ys: tf.Tensor) -> list[tf.Tensor]:
        """The Jacobian of a small vector ``ys`` of shape ``(C,)``: per variable ``(C, *shape)``.

        The C reverse passes are vectorised with ``tf.vectorized_map`` (pfor), or
        unrolled under XLA (see :func:`stacked_map`).
        """
        with self.graph.as_default():
            num = int(ys.shape[0])
            handles = self._handles()

            def one_row(unit):
                grads = tf.gradients(ys, handles, grad_ys=unit)
                return _flat.zeros_for_none(grads, handles)

            return stacked_map(one_row, tf.eye(num, dtype=ys.dtype))

    def hessian_vector_product(self, tangents: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """``H v`` of the *unscaled* training loss, by reverse-over-reverse.

        Call it under :meth:`step_graph`, or inside a function built there (such as
        :func:`stacked_map`'s): it builds its ops where it is called, so that it can be
        vectorised over several tangents. The products are returned in float32 at least,
        so that float16 models keep their curvature statistics finite.
        """
        grads = self.scaled_gradients()
        handles = self._handles()
        tangents = [tf.cast(t, g.dtype) for t, g in zip(tangents, grads)]
        products = _flat.zeros_for_none(tf.gradients(grads, handles, grad_ys=tangents), handles)
        dtype = tf.float64 if grads[0].dtype == tf.float64 else tf.float32
        scale = tf.cast(tf.convert_to_tensor(self.loss_scale), dtype)
        return [tf.cast(p, dtype) / scale for p in products]


def _owns(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> bool:
    compiled = getattr(model, "optimizer", None)
    return compiled is optimizer or getattr(compiled, "inner_optimizer", None) is optimizer


def _loss_scale(model: keras.Model) -> Any:
    compiled = getattr(model, "optimizer", None)
    if isinstance(compiled, keras.optimizers.LossScaleOptimizer):
        return compiled.dynamic_scale if compiled.built else compiled.initial_scale
    return 1.0


def _from_frame(optimizer, frame=None) -> TrainBatch | None:
    """The batch of the ``train_step`` frame among ``frame``'s callers (default: ours)."""
    if frame is None:
        frame = sys._getframe(2)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        local = frame.f_locals
        model = local.get("self")
        if (
            frame.f_code.co_name == "train_step"
            and isinstance(model, keras.Model)
            and all(name in local for name in _TRAIN_STEP_LOCALS)
            and _owns(model, optimizer)
        ):
            loss = local.get("loss")
            if loss is None:
                return None
            return TrainBatch(
                model=model,
                x=local.get("x"),
                y=local["y"],
                y_pred=local["y_pred"],
                sample_weight=local.get("sample_weight"),
                loss=loss,
                gradients=local.get("gradients"),
                variables=list(model.trainable_variables),
                loss_scale=_loss_scale(model),
            )
        frame = frame.f_back
    return None


def _from_replica_threads(optimizer) -> TrainBatch | None:
    """This replica's batch, with every replica's, from the replica threads' frames.

    Under a strategy that needs ``merge_call`` (``MirroredStrategy`` on CPUs, for
    example), ``LossScaleOptimizer`` calls the inner optimizer from threads started
    in a ``merge_call``, in a cross-replica ``tf.cond``. The train step's frames are
    then on the replica threads waiting in that ``merge_call``: one per replica, each
    a ``_MirroredReplicaThread`` that knows its ``replica_id_in_sync_group``, as does
    the calling thread.
    """
    current = threading.current_thread()
    replica = getattr(current, "replica_id_in_sync_group", None)
    if replica is None:
        return None
    frames = sys._current_frames()
    found = {}
    for thread in threading.enumerate():
        index = getattr(thread, "replica_id_in_sync_group", None)
        if thread is current or index is None or thread.ident not in frames:
            continue
        batch = _from_frame(optimizer, frames[thread.ident])
        if batch is not None:
            devices = getattr(thread, "devices", None) or (None,)
            local = getattr(thread, "replica_id", index)  # index among this worker's copies
            found[int(index)] = dataclasses.replace(batch, device=devices[0], replica_id=int(local))
    count = int(current.distribution.num_replicas_in_sync)
    if sorted(found) != list(range(count)):
        return None
    replicas = [found[index] for index in range(count)]
    if len({id(b.graph) for b in replicas}) != 1:
        return None
    return dataclasses.replace(replicas[int(replica)], replicas=replicas)


def current_batch(optimizer: keras.optimizers.Optimizer) -> TrainBatch:
    """The batch of the train step that is calling ``optimizer``.

    Must be called from the optimizer's ``apply`` while a step is being traced. The
    batch is found on the calling thread, or, where ``LossScaleOptimizer`` calls the
    optimizer from threads of its own (multi-replica ``mixed_float16``), on the
    replica threads: then :attr:`TrainBatch.replicas` holds every replica's batch.

    Raises:
        CurvatureContextError: eager execution, or no train step / explicit context
            is on the call stack; the message says how to use the optimizer.
    """
    stack = getattr(_state, "stack", [])
    if stack and stack[-1][0] is optimizer:
        return stack[-1][1]
    name = type(optimizer).__name__
    if tf.executing_eagerly():
        raise CurvatureContextError(
            USAGE.format(name=name) + " It was called eagerly, where the batch's tensors "
            "cannot be differentiated again."
        )
    batch = _from_frame(optimizer)
    if batch is None:
        batch = _from_replica_threads(optimizer)
    if batch is None:
        raise CurvatureContextError(USAGE.format(name=name))
    return batch


@contextlib.contextmanager
def batch_context(optimizer, batch: TrainBatch) -> Iterator[None]:
    """Makes ``batch`` the one ``optimizer`` sees while tracing inside the block."""
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append((optimizer, batch))
    try:
        yield
    finally:
        stack.pop()


_step_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def curvature_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss: Callable | keras.losses.Loss | str,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    training: bool = True,
) -> tf.Tensor:
    """One training step with a curvature optimizer, for hand-written loops.

    Runs the forward pass, the loss (plus the model's regularization losses), the
    gradients and ``optimizer``'s curvature-aware update inside a ``tf.function``
    that is traced once per model, optimizer and loss, and reused.

    Args:
        model: The model to train.
        optimizer: A keras-curv optimizer (or any Keras optimizer).
        loss: A Keras loss name or instance, or ``fn(y_true, y_pred)`` returning the
            batch-mean loss.
        x: A batch of inputs.
        y: The batch's targets.
        sample_weight: Optional per-sample weights (needs a Keras loss).
        training: Call the model in training mode.

    Returns:
        The scalar training loss of the batch (before the update).

    Example:
        >>> opt = keras_curv.AdaHessian()
        >>> for x, y in dataset:
        ...     loss = keras_curv.optimizers.curvature_step(
        ...         model, opt, "sparse_categorical_crossentropy", x, y)
    """
    per_model = _step_cache.setdefault(model, {})
    # A loss name makes a new Loss object per call: key on the name so the step is reused.
    key = (id(optimizer), loss if isinstance(loss, str) else id(loss), bool(training))
    if key not in per_model:
        resolved = as_keras_loss(loss) or loss
        per_model[key] = tf.function(_make_step(model, optimizer, resolved, training))
    if sample_weight is None:
        return per_model[key](x, y)
    return per_model[key](x, y, sample_weight)


def _make_step(model, optimizer, loss_fn, training):
    def step(x, y, sample_weight=None):
        variables = list(model.trainable_variables)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=training)
            if isinstance(loss_fn, keras.losses.Loss):
                value = loss_fn(y, y_pred, sample_weight=sample_weight)
            elif sample_weight is not None:
                raise ValueError("Sample weights need a keras.losses.Loss or a loss name.")
            else:
                value = loss_fn(y, y_pred)
            if model.losses:
                value = value + tf.add_n([tf.cast(r, value.dtype) for r in model.losses])
            scaled = optimizer.scale_loss(value)
        gradients = tape.gradient(scaled, variables)
        batch = TrainBatch(
            model=model,
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            loss=scaled,
            gradients=list(gradients),
            variables=variables,
            loss_scale=optimizer.dynamic_scale
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
            else 1.0,
        )
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        with batch_context(inner, batch):
            optimizer.apply_gradients(zip(gradients, variables))
        return value

    return step
