"""How a curvature optimizer gets the :class:`~keras_curv.optimizers.batch.TrainBatch` of its step.

Every Keras train step, and every guide-style custom ``train_step``, calls the public
override point ``model.compute_loss(x, y, y_pred, sample_weight, training)``.
:func:`attach` wraps that method **on the model instance** (never on a Keras class)
with a recorder that keeps the call's tensors, keyed by the graph being traced and the
replica; when the optimizer's ``apply`` runs in the same trace, :func:`current_batch`
takes the record of its own graph and replica. With ``layer_taps=True`` the supported
layers' ``call`` is wrapped the same way, to record their inputs and pre-activation
outputs. Recording happens while tracing only: the compiled step is unchanged.

The model is found once, at the optimizer's first contact with it: by
:func:`attach` if the user called it, else among the callers' ``self``
(:func:`~keras_curv._internal.keras_privates.calling_models`). Without a distribution
strategy Keras builds the optimizer inside the first trace of the train step, after
``compute_loss`` has run; that trace has no record. The optimizer then attaches and
makes ``tf.function`` trace the step again (a ``tf.function`` that creates variables
on its first call is retraced before it runs, and Keras's optimizer creates its own
there), so every graph that executes was traced with the recorder in place.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal.keras_privates import (
    calling_models,
    flatten_layers,
    spans_several_workers,
    strategy_needs_merge_call,
    work_around_multi_worker_fit,
)
from keras_curv._internal.losses import as_keras_loss, replica_share
from keras_curv._internal.model import recording_is_paused
from keras_curv._internal.optimizer import unwrap, wrapper_chain
from keras_curv.optimizers.batch import LayerCall, TrainBatch

# Layers whose inputs and (pre-activation) outputs are recorded with ``layer_taps=True``.
TAPPED_LAYERS = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.Embedding,
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
)
_STORE = "_keras_curv_steps"  # attribute of a traced graph holding its records


class CurvatureContextError(RuntimeError):
    """A curvature optimizer was driven where it cannot see the batch."""


USAGE = (
    "{name} needs the batch, not only gradients. Use it through `model.compile(optimizer=...)` "
    "and `model.fit(...)`/`train_on_batch` (not with run_eagerly=True); in a custom "
    "`train_step`, compute the loss with `self.compute_loss(x, y, y_pred, sample_weight)`; "
    "in a hand-written loop call `keras_curv.curvature_step(model, optimizer, loss, x, y)` "
    "instead of `optimizer.apply_gradients`."
)

LOSS_SCALING_ON_WORKERS = (
    "{name} cannot run inside a LossScaleOptimizer (mixed_float16) on a "
    "MultiWorkerMirroredStrategy over several workers: Keras calls it in a cross-replica "
    "tf.cond where no collective can run, and the other workers' statistics are out of "
    "reach. Use 'mixed_bfloat16' (no loss scaling) or float32 on several workers, or "
    "mixed_float16 on one machine."
)


@dataclass
class _Record:
    """One ``compute_loss`` call of a traced train step."""

    x: Any
    y: Any
    y_pred: Any
    sample_weight: Any
    loss: tf.Tensor
    layer_calls: tuple[LayerCall, ...]
    taps: bool
    device: str | None


@dataclass
class _Steps:
    """What one replica of one model recorded in one graph."""

    records: list[_Record] = field(default_factory=list)
    pending_calls: list[LayerCall] = field(default_factory=list)
    model_inputs: Any = None


def _replica() -> tuple[int, int]:
    """``(replica id in the sync group, replicas in sync)`` of the current context."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0, tf.distribute.get_strategy().num_replicas_in_sync
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    return int(replica or 0), int(context.num_replicas_in_sync)


def _canonical_device(device: str) -> str | None:
    return tf.DeviceSpec.from_string(device).to_string() if device else None


def _steps_of(graph: tf.Graph, model: keras.Model, replica: int) -> _Steps:
    # Kept on the graph itself, so the records live exactly as long as the trace.
    store = getattr(graph, _STORE, None)
    if store is None:
        store = {}
        setattr(graph, _STORE, store)
    return store.setdefault((id(model), replica), _Steps())


def _recording_graph() -> tf.Graph | None:
    if tf.executing_eagerly() or recording_is_paused():
        return None
    return tf.compat.v1.get_default_graph()


class _Recorder:
    """The wrappers installed on one model instance."""

    def __init__(self, model: keras.Model):
        self.model_ref = weakref.ref(model)
        self.taps = False
        self.attached_during: tf.Graph | None = None
        original = model.compute_loss

        def compute_loss(*args: Any, **kwargs: Any) -> Any:
            loss = original(*args, **kwargs)
            self._record(args, kwargs, loss)
            return loss

        compute_loss.__wrapped__ = original
        compute_loss.__doc__ = original.__doc__
        # object.__setattr__: a plain instance attribute, invisible to Keras's tracking.
        object.__setattr__(model, "compute_loss", compute_loss)

        original_call = model.call

        def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            # The inputs of the forward pass, for train steps that call compute_loss
            # without x (the Keras guide's does).
            graph = _recording_graph()
            if graph is not None:
                _steps_of(graph, model, _replica()[0]).model_inputs = inputs
            return original_call(inputs, *args, **kwargs)

        call.__wrapped__ = original_call
        object.__setattr__(model, "call", call)

    def _record(self, args: tuple, kwargs: dict, loss: Any) -> None:
        graph = _recording_graph()
        model = self.model_ref()
        if graph is None or model is None or loss is None:
            return
        names = ("x", "y", "y_pred", "sample_weight", "training")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        if not bound.get("training", True):
            return
        replica, _ = _replica()
        steps = _steps_of(graph, model, replica)
        loss = tf.convert_to_tensor(loss)
        x = bound.get("x")
        steps.records.append(
            _Record(
                x=steps.model_inputs if x is None else x,
                y=bound.get("y"),
                y_pred=bound.get("y_pred"),
                sample_weight=bound.get("sample_weight"),
                loss=loss,
                layer_calls=tuple(steps.pending_calls),
                taps=self.taps,
                device=_canonical_device(loss.device),
            )
        )
        steps.pending_calls = []
        steps.model_inputs = None

    def install_taps(self, model: keras.Model) -> None:
        if self.taps:
            return
        self.taps = True
        for layer in flatten_layers(model):
            if isinstance(layer, TAPPED_LAYERS):
                _tap(layer, model)


def _tap(layer: keras.layers.Layer, model: keras.Model) -> None:
    """Wraps ``layer.call`` to record its input and pre-activation output.

    Dense, convolution and depthwise layers apply ``self.activation`` last; the wrapper
    runs the layer's own ``call`` with the activation removed and applies it after
    recording, so that the output recorded is ``s = a W + b``.
    """
    original = layer.call
    model_ref = weakref.ref(model)

    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        graph = _recording_graph()
        activation = getattr(layer, "activation", None)
        if graph is None:
            return original(inputs, *args, **kwargs)
        if activation is not None:
            object.__setattr__(layer, "activation", None)
            try:
                outputs = original(inputs, *args, **kwargs)
            finally:
                object.__setattr__(layer, "activation", activation)
        else:
            outputs = original(inputs, *args, **kwargs)
        model = model_ref()
        if model is not None and isinstance(outputs, tf.Tensor):
            replica, _ = _replica()
            call_record = LayerCall(layer, tf.convert_to_tensor(inputs), outputs)
            _steps_of(graph, model, replica).pending_calls.append(call_record)
        return outputs if activation is None else activation(outputs)

    call.__wrapped__ = original
    object.__setattr__(layer, "call", call)


_recorders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_optimizers(model: keras.Model) -> list:
    """The compiled optimizer and every one it wraps (loss scaling, ``Lookahead``)."""
    compiled = getattr(model, "optimizer", None)
    return [] if compiled is None else wrapper_chain(compiled)


def _owns(model: keras.Model, optimizer: Any) -> bool:
    return any(o is optimizer for o in _compiled_optimizers(model))


def attach(model: keras.Model, *, layer_taps: bool = False) -> keras.Model:
    """Lets keras-curv's optimizers see the train steps of ``model``.

    Plain ``model.compile(optimizer=keras_curv.X())`` + ``model.fit`` does this by
    itself; call it for anything unusual (a model whose optimizer is first used inside
    an already traced function, a custom training loop that calls
    ``model.compute_loss``) and, before ``fit``, for a model trained under a
    ``MultiWorkerMirroredStrategy`` over several workers: it also installs the
    instance-level workaround for Keras's multi-worker ``fit`` (keras-team/keras#20585,
    ``docs/hardening.md``), which plain Keras optimizers may use too. Idempotent.

    Args:
        model: The model; only this instance's ``compute_loss``, ``call``,
            ``train_step``, ``test_step`` and ``_maybe_symbolic_build`` (and, with
            ``layer_taps``, the supported layers' ``call``) are wrapped.
        layer_taps: Also record the inputs and pre-activation outputs of its Dense,
            Conv1D/2D, DepthwiseConv1D/2D, Embedding and normalization layers.

    Returns:
        ``model``.

    Example:
        >>> keras_curv.attach(model)
        >>> model.compile(optimizer=keras_curv.AdaHessian(), loss="mse")
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"attach() needs a keras.Model; got {type(model).__name__}.")
    recorder = _recorders.get(model)
    if recorder is None:
        recorder = _recorders[model] = _Recorder(model)
        # Keras's fit fails on several workers, whatever the optimizer (keras#20585).
        work_around_multi_worker_fit(model)
    if layer_taps:
        recorder.install_taps(model)
    for optimizer in _compiled_optimizers(model):
        _owners[optimizer] = weakref.ref(model)
    return model


def model_of(optimizer: keras.optimizers.Optimizer) -> keras.Model | None:
    """The model ``optimizer`` trains, attached on first contact; ``None`` if not found.

    Looks at the attached models first, then (once) among the callers.
    """
    ref = _owners.get(optimizer)
    model = None if ref is None else ref()
    if model is not None and _owns(model, optimizer):
        return model
    for candidate in list(_recorders.keys()):
        if _owns(candidate, optimizer):
            _owners[optimizer] = weakref.ref(candidate)
            return candidate
    for candidate in calling_models():
        if _owns(candidate, optimizer):
            attach(candidate)
            if not tf.executing_eagerly():
                _recorders[candidate].attached_during = tf.compat.v1.get_default_graph()
            return candidate
    return None


def _enclosing_graphs() -> Iterator[tf.Graph]:
    """The current graph and the graphs it is nested in (cond branches, loop bodies...)."""
    graph = tf.compat.v1.get_default_graph()
    while graph is not None:
        yield graph
        graph = getattr(graph, "outer_graph", None)


def _attached_in_this_trace(recorder: _Recorder) -> bool:
    return any(graph is recorder.attached_during for graph in _enclosing_graphs())


def _find_record(model: keras.Model, replica: int) -> tuple[tf.Graph, _Steps] | None:
    for graph in _enclosing_graphs():
        steps = getattr(graph, _STORE, {}).get((id(model), replica))
        if steps is not None and steps.records:
            return graph, steps
    return None


class _Explicit(threading.local):
    def __init__(self) -> None:
        self.stack: list = []


_explicit = _Explicit()


@contextlib.contextmanager
def batch_context(optimizer: keras.optimizers.Optimizer, batch: TrainBatch) -> Iterator[None]:
    """Makes ``batch`` the one ``optimizer`` sees while tracing inside the block."""
    _explicit.stack.append((optimizer, batch))
    try:
        yield
    finally:
        _explicit.stack.pop()


def _loss_scale(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> Any:
    for wrapper in wrapper_chain(getattr(model, "optimizer", None)):
        if isinstance(wrapper, keras.optimizers.LossScaleOptimizer):
            return wrapper.dynamic_scale if wrapper.built else wrapper.initial_scale
    factor = getattr(optimizer, "loss_scale_factor", None)
    return 1.0 if factor is None else factor


def current_batch(
    optimizer: keras.optimizers.Optimizer,
    gradients: list | None = None,
    *,
    layer_taps: bool = False,
) -> TrainBatch | None:
    """The batch of the train step that is calling ``optimizer.apply``.

    Args:
        optimizer: The (inner) optimizer whose ``apply`` is running.
        gradients: The gradients ``apply`` received, kept when they are tensors of the
            step's graph (differentiable again), else recomputed on demand.
        layer_taps: The optimizer needs :attr:`TrainBatch.layer_calls`.

    Returns:
        The batch; or ``None`` in a first trace that ran before the recorder was in place,
        which ``tf.function`` traces again before running it (see the module docstring):
        the caller must then build no update.

    Raises:
        CurvatureContextError: eager execution; no model owns ``optimizer``; or the
            train step did not call ``model.compute_loss``. The message says what to do.
    """
    name = type(optimizer).__name__
    for owner, batch in reversed(_explicit.stack):
        if owner is optimizer:
            return batch
    if tf.executing_eagerly():
        raise CurvatureContextError(
            USAGE.format(name=name) + " It was called eagerly, where the batch's tensors "
            "cannot be differentiated again."
        )
    model = model_of(optimizer)
    if model is None:
        raise CurvatureContextError(USAGE.format(name=name))
    recorder = _recorders[model]
    if layer_taps and not recorder.taps:
        recorder.install_taps(model)
        recorder.attached_during = tf.compat.v1.get_default_graph()
    replica, num_replicas = _replica()
    found = _find_record(model, replica)
    if found is None or (layer_taps and not found[1].records[-1].taps):
        if _attached_in_this_trace(recorder):
            _request_retrace(optimizer, name)
            return None
        raise CurvatureContextError(
            USAGE.format(name=name) + " The train step of model "
            f"{model.name!r} did not call `model.compute_loss(...)` before `apply_gradients`."
        )
    graph, steps = found
    record = steps.records[-1]
    batch = _batch_from(record, model, optimizer, gradients, graph, replica, num_replicas)
    current_graph = tf.compat.v1.get_default_graph()
    if num_replicas > 1 and current_graph is not graph and strategy_needs_merge_call():
        # A LossScaleOptimizer's cross-replica tf.cond: no collective can run here, but
        # every replica's record is in the step graph (of this worker only).
        if spans_several_workers(tf.distribute.get_strategy()):
            raise CurvatureContextError(LOSS_SCALING_ON_WORKERS.format(name=name))
        batch.replicas = _every_replica(model, optimizer, graph, num_replicas)
        batch.device = batch.replicas[replica].device
    return batch


def _batch_from(record, model, optimizer, gradients, graph, replica, num_replicas) -> TrainBatch:
    kept = None
    if gradients is not None and all(
        g is None or getattr(g, "graph", None) is graph for g in gradients
    ):
        kept = list(gradients)
    return TrainBatch(
        model=model,
        x=record.x,
        y=record.y,
        y_pred=record.y_pred,
        sample_weight=record.sample_weight,
        loss=record.loss,
        variables=list(model.trainable_variables),
        loss_scale=_loss_scale(model, optimizer),
        scaled_gradient_tensors=kept,
        replica_id=replica,
        num_replicas=num_replicas,
        layer_calls=record.layer_calls,
        device=record.device,
    )


def every_replica(optimizer: keras.optimizers.Optimizer, batch: TrainBatch) -> list[TrainBatch]:
    """Every replica's batch of ``batch``'s step, each with :attr:`TrainBatch.replicas` set.

    For statistics built once, in a cross-replica context, from all replicas' tensors:
    inside a ``merge_call`` of a strategy that needs one (``MirroredStrategy`` over local
    devices), where no collective can run in a ``tf.while_loop`` body (a line search's),
    every replica's record is in the step graph and sums over replicas are plain
    additions (:func:`~keras_curv.optimizers.replica_sum` then does them).
    """
    return _every_replica(batch.model, optimizer, batch.graph, batch.num_replicas)


def _every_replica(model, optimizer, graph, num_replicas) -> list[TrainBatch]:
    batches = []
    store = getattr(graph, _STORE)
    for replica in range(num_replicas):
        steps = store.get((id(model), replica))
        if steps is None or not steps.records:
            raise CurvatureContextError(
                f"{type(optimizer).__name__}: replica {replica} recorded no train step."
            )
        batches.append(
            _batch_from(steps.records[-1], model, optimizer, None, graph, replica, num_replicas)
        )
    for batch in batches:
        batch.replicas = batches
    return batches


def _request_retrace(optimizer: keras.optimizers.Optimizer, name: str) -> None:
    """Makes ``tf.function`` discard the trace in progress and trace the step again.

    A ``tf.function`` that creates a variable on its first call traces itself again
    before running (TensorFlow's documented variable-creation rule); creating one
    here guarantees that, also when Keras's optimizer was built before the step.
    """
    try:
        marker = tf.Variable(0, trainable=False, name="keras_curv_retrace")
    except ValueError as error:
        raise CurvatureContextError(
            f"{name} met its model inside a train function that was already traced "
            "without keras-curv. Call `keras_curv.attach(model)` before the first "
            "`fit`, or compile the model again."
        ) from error
    markers = optimizer.__dict__.setdefault("_keras_curv_retrace_markers", [])
    markers.append(marker)


# ------------------------------------------------------------ hand-written loops

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
    gradients and ``optimizer``'s curvature-aware update. Called eagerly it runs them in
    a ``tf.function`` traced once per model, optimizer and loss, and reused; called
    inside a ``tf.function`` (for example in ``strategy.run``) it adds them to that one.
    Under a strategy, ``loss`` is still the mean over the replica's own batch: like
    Keras's ``fit``, the step divides it (and the regularization losses) by the number
    of replicas, so that the summed gradients are those of the global batch mean.

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
        The scalar training loss of the batch (before the update); in ``strategy.run``,
        this replica's share of it (``strategy.reduce("SUM", ...)`` gives the global).

    Example:
        >>> opt = keras_curv.AdaHessian()
        >>> for x, y in dataset:
        ...     loss = keras_curv.curvature_step(
        ...         model, opt, "sparse_categorical_crossentropy", x, y)
    """
    resolved = as_keras_loss(loss) or loss
    inner = unwrap(optimizer)
    if getattr(inner, "uses_layer_taps", False):
        attach(model, layer_taps=True)
    if tf.inside_function():
        return _step(model, optimizer, resolved, training, x, y, sample_weight)
    per_model = _step_cache.setdefault(model, {})
    # A loss name makes a new Loss object per call: key on the name so the step is reused.
    key = (id(optimizer), loss if isinstance(loss, str) else id(loss), bool(training))
    if key not in per_model:

        def step(x, y, sample_weight=None):
            return _step(model, optimizer, resolved, training, x, y, sample_weight)

        per_model[key] = tf.function(step)
    if sample_weight is None:
        return per_model[key](x, y)
    return per_model[key](x, y, sample_weight)


def _step(model, optimizer, loss_fn, training, x, y, sample_weight):
    variables = list(model.trainable_variables)
    replica, num_replicas = _replica()
    if isinstance(loss_fn, keras.losses.Loss):

        def data_loss(y, y_pred, sample_weight):
            return loss_fn(y, y_pred, sample_weight=sample_weight)

    elif sample_weight is not None:
        raise ValueError("Sample weights need a keras.losses.Loss or a loss name.")
    else:
        # Keras's mean losses divide by the replicas in sync themselves; a batch mean
        # from a plain function gets the same share.
        def data_loss(y, y_pred, sample_weight):
            return replica_share(loss_fn(y, y_pred), num_replicas)

    with tf.GradientTape() as tape:
        y_pred = model(x, training=training)
        # The tapped layers of this forward pass (none unless the optimizer asked).
        steps = _steps_of(tf.compat.v1.get_default_graph(), model, replica)
        layer_calls, steps.pending_calls = tuple(steps.pending_calls), []
        value = data_loss(y, y_pred, sample_weight)
        if model.losses:
            regularization = tf.add_n([tf.cast(r, value.dtype) for r in model.losses])
            value = value + replica_share(regularization, num_replicas)
        scaled = optimizer.scale_loss(value)
    gradients = tape.gradient(scaled, variables)
    inner = unwrap(optimizer)
    batch = TrainBatch(
        model=model,
        x=x,
        y=y,
        y_pred=y_pred,
        sample_weight=sample_weight,
        loss=value,
        variables=variables,
        loss_scale=_loss_scale_of(optimizer),
        scaled_gradient_tensors=list(gradients),
        replica_id=replica,
        num_replicas=num_replicas,
        layer_calls=layer_calls,
        loss_function=data_loss,
    )
    with batch_context(inner, batch):
        optimizer.apply_gradients(zip(gradients, variables))
    return value


def _loss_scale_of(optimizer: keras.optimizers.Optimizer) -> Any:
    for wrapper in wrapper_chain(optimizer):
        if isinstance(wrapper, keras.optimizers.LossScaleOptimizer):
            return wrapper.dynamic_scale
    factor = getattr(unwrap(optimizer), "loss_scale_factor", None)
    return 1.0 if factor is None else factor
