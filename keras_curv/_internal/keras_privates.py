"""Every Keras and TensorFlow private that keras-curv relies on, in one place.

Each function here wraps one private (or one undocumented convention) and says why it
is needed. ``tests/test_keras_privates.py`` pins every one of them against the
installed Keras and TensorFlow, so that an upgrade that moves one fails there, loudly,
instead of silently in training. Nothing outside this module touches a Keras or
TensorFlow private.
"""

from __future__ import annotations

import itertools
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf
from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell
from tensorflow.python.distribute import cross_device_ops
from tensorflow.python.ops import control_flow_util

# How many callers :func:`calling_models` looks through (see there).
_DISCOVERY_DEPTH = 32


def under_xla() -> bool:
    """Whether ops built now will be compiled by XLA (``jit_compile``).

    TensorFlow has no public way to ask; XLA drops ``Switch``/``Merge`` and assertions,
    so the optimizers need to know.
    """
    graph = tf.compat.v1.get_default_graph()
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


def strategy_needs_merge_call() -> bool:
    """Whether the current strategy's replicas must rendezvous through ``merge_call``.

    ``MirroredStrategy`` over several local devices does; Keras's ``LossScaleOptimizer``
    then calls the inner optimizer inside a cross-replica ``tf.cond``, where no collective
    can run. Keras reads the same ``tf.__internal__`` flag for the same decision.
    """
    return not tf.__internal__.distribute.strategy_supports_no_merge_call()


def maybe_merge_call(fn: Any, *args: Any) -> Any:
    """``fn(strategy, *args)`` in the cross-replica context where the strategy needs it.

    How Keras's TensorFlow optimizer updates variables (``_backend_update_step``,
    ``_apply_weight_decay``): through ``merge_call`` under a strategy that needs one,
    directly otherwise; ``fn`` then updates each variable with
    ``strategy.extended.update``. ``tf.__internal__`` has the only public spelling.
    """
    strategy = tf.distribute.get_strategy()
    return tf.__internal__.distribute.interim.maybe_merge_call(fn, strategy, *args)


def flatten_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of ``model``, nested ones included (Keras's ``_flatten_layers``)."""
    return list(model._flatten_layers(include_self=False))


def call_takes_training(model: keras.Model) -> bool:
    """Whether ``model.call`` accepts ``training`` (Keras records it at construction)."""
    return bool(getattr(model, "_call_has_training_arg", True))


def has_random_state(layer: keras.layers.Layer) -> bool:
    """Whether ``layer`` draws random numbers in its forward pass (Dropout, noise...).

    A layer that owns a ``SeedGenerator`` draws, except Keras's RNN cells (LSTM, GRU,
    SimpleRNN: ``DropoutRNNCell``), which own one whether or not they draw and draw only
    with ``dropout`` or ``recurrent_dropout`` above 0.
    """
    if not getattr(layer, "_seed_generators", ()):
        return False
    if isinstance(layer, DropoutRNNCell):
        return layer.dropout > 0 or layer.recurrent_dropout > 0
    return True


def softmax_logits(outputs: Any) -> tf.Tensor | None:
    """The pre-softmax logits Keras caches on a softmax output, or ``None``.

    Keras's ``softmax`` activation keeps them (``_keras_logits``) so that cross-entropy
    on probabilities is computed stably; the class scores use them the same way.
    """
    return getattr(outputs, "_keras_logits", None)


def with_softmax_logits(probabilities: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """``probabilities`` carrying ``logits`` as a softmax output does (see :func:`softmax_logits`).

    Keras's cross-entropies on probabilities then read ``logits``.
    """
    probabilities._keras_logits = logits
    return probabilities


def run_before(op: tf.Operation, guard: tf.Operation) -> bool:
    """Makes ``guard`` a control input of ``op`` (already built); False where unsupported.

    Used to run the label check before the loss that already reads the labels, so that
    the check's message, not the loss kernel's, is what the user sees.
    """
    add_control_input = getattr(op, "_add_control_input", None)
    if add_control_input is None:
        return False
    add_control_input(guard)
    return True


def track_optimizer_variable(optimizer: keras.optimizers.Optimizer, variable: Any) -> None:
    """Adds a variable created outside ``add_variable`` (an RNG state) to the optimizer's.

    So that it is saved, restored and mirrored like the optimizer's own state.
    """
    optimizer._track_variable(variable)


def clipped_gradients(optimizer: keras.optimizers.Optimizer, gradients: list) -> list:
    """``gradients`` clipped as the optimizer's ``clipnorm``/``clipvalue``/``global_clipnorm`` do.

    A curvature optimizer that projects the gradient before Keras's per-variable updates
    must project the gradient those updates will see.
    """
    return list(optimizer._clip_gradients(gradients))


def stateless_seed(seed: Any) -> tf.Tensor:
    """The ``int32`` seed pair ``keras.random`` hands to ``tf.random.stateless_*`` ops.

    ``SeedGenerator.next()`` returns its ``int64`` state; Keras's TensorFlow backend
    (``_cast_seed``) maps it into ``int32`` by ``floormod(seed, 2**31 - 2)``. Drawing
    with this seed gives exactly the numbers of ``keras.random.*(..., seed=generator)``,
    while letting the draw be gated on the steps that use it.
    """
    seed = tf.convert_to_tensor(seed)
    if seed.dtype == tf.int32:
        return seed
    return tf.cast(tf.math.floormod(seed, tf.cast(tf.int32.max - 1, seed.dtype)), tf.int32)


def variable_index(optimizer: keras.optimizers.Optimizer, variable: Any) -> int:
    """The position of a trainable ``variable`` in the optimizer's list.

    Keras's own optimizers use this private in their ``update_step`` to find slots.
    """
    return optimizer._get_variable_index(variable)


# Keras's optimizer slots, by optimizer class: ``{slot: attribute}``. Keras keeps them in
# private lists, one entry per trainable variable (found with ``variable_index``).
_SLOTS = {
    "adam": {"velocity": "_velocities", "velocity_hat": "_velocity_hats"},
    "rmsprop": {"velocity": "_velocities", "average_gradient": "_average_gradients"},
}


def optimizer_slots(optimizer: keras.optimizers.Optimizer, kind: str, slot: str) -> list | None:
    """Keras's per-variable slot variables of an Adam(W) or RMSprop optimizer, or ``None``.

    ``kind`` is ``"adam"`` or ``"rmsprop"``; ``slot`` one of ``velocity``,
    ``velocity_hat`` (Adam with ``amsgrad``), ``average_gradient`` (RMSprop with
    ``centered``). Read-only use: the preconditioned sharpness of the diagnostic callbacks
    is computed from them.
    """
    value = getattr(optimizer, _SLOTS[kind][slot], None)
    return list(value) if value else None


def applied_steps(optimizer: keras.optimizers.Optimizer) -> Any:
    """The optimizer's raw step counter: one per applied ``apply`` call (a variable).

    ``optimizer.iterations`` is this counter divided by ``gradient_accumulation_steps``
    when accumulation is on; ``SkippedSteps`` needs one count per batch that updated.
    A step skipped by a ``LossScaleOptimizer`` or a keras-curv optimizer leaves it as is.
    """
    return optimizer._iterations


def calling_models(start_depth: int = 2) -> Iterator[keras.Model]:
    """The ``keras.Model`` instances among the receivers (``self``) of the callers.

    Keras never tells an optimizer which model it trains. A curvature optimizer needs
    to know once, before its first train step is traced for real; Keras calls it from
    the model's own methods (``_symbolic_build``, ``train_step``, ``compile_from_config``),
    so the model is the ``self`` of a caller. Only ``self`` is read, never another
    local, and only at the optimizer's first contact with a model, never per trace.
    ``keras_curv.attach(model)`` makes this unnecessary.
    """
    frame = sys._getframe(start_depth)
    for _ in range(_DISCOVERY_DEPTH):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.Model):
            yield owner
        frame = frame.f_back


# ---------------------------------------------------------------- collective keys
# Collective keys no other strategy in the process shares (a TensorFlow bug's workaround).
#
# Every ``tf.distribute.MirroredStrategy`` numbers its collectives from the same start:
# group key ``1 + MirroredStrategy._collective_key_base`` (0 outside TensorFlow's own
# tests), instance keys from 100 up, one new instance key per collective per call of a
# ``tf.function``. The runtime remembers the shape of every (group, instance) pair for
# the life of the process, and cannot be told to forget it. A second strategy in the
# same process therefore reuses the first one's keys, and its first collective whose
# shape differs fails with ``Shape mismatch in the collective instance 100 ... expected
# shape [a] but another member in the group expected shape [b]``: plain Keras alike, as
# soon as two models of different sizes are trained under two strategies
# (tensorflow/tensorflow#62790). TensorFlow's own tests avoid it by raising
# ``_collective_key_base`` before each strategy is made (``strategy_combinations.py``);
# keras-curv does not make the strategy, so it does the same afterwards.

# Fresh group keys come from far above those TensorFlow hands out (1, 2, ... and, in its
# tests, steps of 100000), spaced by more than the one group a MirroredStrategy's keys
# allocate; int32 keys leave room for 2**20 strategies.
_GROUP_KEY_BASE = 1 << 30
_GROUP_KEY_STRIDE = 1 << 10
_next_base = itertools.count(_GROUP_KEY_BASE, _GROUP_KEY_STRIDE)
_rekeyed: weakref.WeakSet = weakref.WeakSet()
_lock = threading.Lock()


def use_fresh_collective_keys(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Gives ``strategy``'s collectives a group key that no other strategy uses.

    Touches four privates of ``MirroredExtended`` (``tensorflow/python/distribute/
    mirrored_strategy.py``): ``_collective_key_base`` (the offset TensorFlow's tests
    raise), ``_make_collective_ops_with_fallbacks`` (which builds the
    ``CollectiveAllReduce`` and its ``CollectiveKeys`` from that offset, exactly as the
    constructor did), and ``_collective_ops`` / ``_cross_device_ops``, which it
    replaces (the latter only where it was the same object, i.e. the user passed no
    ``cross_device_ops``). The old ``CollectiveAllReduce`` is left intact, so a
    function already traced with it keeps consistent keys. Call it eagerly, under
    the strategy's scope, before the train function is traced (``Optimizer.build``
    inside ``fit``); once per strategy, later calls are no-ops.

    Args:
        strategy: The strategy; the current one when ``None``.

    Returns:
        Whether the keys were replaced: ``False`` for any strategy but a
        ``MirroredStrategy`` whose collectives are ``CollectiveAllReduce`` (multi-worker
        strategies need keys every worker agrees on), inside a ``tf.function``, and
        for a strategy already re-keyed.
    """
    strategy = strategy or tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MirroredStrategy) or tf.inside_function():
        return False
    extended = strategy.extended
    with _lock:
        if extended in _rekeyed:
            return False
        _rekeyed.add(extended)
        collective = extended._collective_ops
        if not isinstance(collective, cross_device_ops.CollectiveAllReduce):
            return False
        shared = extended._cross_device_ops is collective
        extended._collective_key_base = next(_next_base)
        extended._collective_ops = extended._make_collective_ops_with_fallbacks()
        if shared:
            extended._cross_device_ops = extended._collective_ops
    return True


# ------------------------------------------------------------ multi-worker fit
# Keras 3's ``fit``/``evaluate`` fail under a ``MultiWorkerMirroredStrategy`` that spans
# several workers, whatever the optimizer (keras-team/keras#20585, open in Keras 3.15):
#
# 1. ``TensorFlowTrainer._maybe_symbolic_build`` takes the first batch of the
#    distributed dataset, to build the model from its shapes, and averages it over the
#    replicas with ``strategy.reduce("MEAN", batch, axis=None)``. A multi-worker
#    strategy reduces through ``CollectiveAllReduce.reduce``, which takes one tensor,
#    not the nested ``(x, y, sample_weight)``: "Attempt to convert a value
#    (PerReplica...) to a Tensor".
# 2. ``reduce_per_replica`` averages the step's logs over the replicas with
#    ``strategy.reduce("MEAN", v, axis=0)`` when the strategy is multi-worker.
#    ``axis=0`` averages along each replica's first axis as well, which a scalar loss
#    does not have: "Invalid reduction dimension 0 for input with 0 dimensions".
#
# The workarounds live on the model instance (``keras_curv.attach`` installs them),
# never on Keras's classes, and change nothing unless the model's strategy spans
# several workers. ``tests/optimizers/test_multi_worker.py`` checks that plain Keras
# still fails without them: when it stops failing, they can go.

_MULTI_WORKER = "_keras_curv_multi_worker"  # marks an installed wrapper


def spans_several_workers(strategy: tf.distribute.Strategy) -> bool:
    """Whether ``strategy`` is a ``MultiWorkerMirroredStrategy`` over several workers.

    The test Keras itself uses to pick its multi-worker reductions
    (``_collective_all_reduce_multi_worker``); ``_in_multi_worker_mode`` is private.
    """
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def _install(model: keras.Model, name: str, wrapper: Any) -> None:
    if getattr(model.__dict__.get(name), _MULTI_WORKER, False):
        return
    wrapper.__wrapped__ = getattr(model, name)
    setattr(wrapper, _MULTI_WORKER, True)
    # object.__setattr__: a plain instance attribute, invisible to Keras's tracking.
    object.__setattr__(model, name, wrapper)


def build_from_a_local_batch(model: keras.Model) -> None:
    """Workaround 1: ``_maybe_symbolic_build`` takes this worker's first batch as it is.

    Keras reads only the batch's shapes and dtypes, which the local batch has. The
    original then builds from it (``data_batch=``, no reduction).
    """
    original = model._maybe_symbolic_build

    def _maybe_symbolic_build(iterator: Any = None, data_batch: Any = None) -> Any:
        strategy = model.distribute_strategy
        if iterator is None or not spans_several_workers(strategy):
            return original(iterator=iterator, data_batch=data_batch)
        # Keras's epoch iterators yield (first step, last step, data iterator).
        for _, _, data in iterator:
            batch = next(data)
            break
        else:
            return original(iterator=iterator, data_batch=data_batch)

        def local(value: Any) -> Any:
            return value if value is None else strategy.experimental_local_results(value)[0]

        return original(data_batch=tf.nest.map_structure(local, batch))

    _install(model, "_maybe_symbolic_build", _maybe_symbolic_build)


def logs_with_a_replica_axis(model: keras.Model) -> None:
    """Workaround 2: the train and test steps' logs get a leading axis of length 1.

    ``strategy.reduce("MEAN", v, axis=0)`` then averages over that axis and the
    replicas only: the mean over replicas of each log, in its own shape, which is
    what Keras gives on one worker.
    """

    def with_replica_axis(step: Any) -> Any:
        def wrapped(data: Any) -> Any:
            logs = step(data)
            if not spans_several_workers(model.distribute_strategy):
                return logs
            return tf.nest.map_structure(
                lambda v: tf.expand_dims(v, 0) if isinstance(v, tf.Tensor) else v, logs
            )

        return wrapped

    _install(model, "train_step", with_replica_axis(model.train_step))
    _install(model, "test_step", with_replica_axis(model.test_step))


def work_around_multi_worker_fit(model: keras.Model) -> None:
    """Installs both workarounds on ``model`` (idempotent); see the comment above."""
    build_from_a_local_batch(model)
    logs_with_a_replica_axis(model)
