"""Replica reductions and non-finite step skipping, shared by the curvature optimizers.

Two concerns that Keras's own optimizers get from ``keras.optimizers.Optimizer`` but
that the per-batch curvature statistics need by hand:

* **Distribution.** Under ``tf.distribute`` (``MirroredStrategy``,
  ``MultiWorkerMirroredStrategy``) each replica traces the train step on its shard
  of the global batch and Keras sums the gradients across replicas (the per-replica
  loss is already divided by the number of replicas, so the sum is the gradient of
  the global batch-mean loss). Statistics built from the step's tensors are
  per-replica too and must be reduced the same way before they touch the
  optimizer's state. The statistics are written as generators that ``yield`` each
  per-replica sum; :func:`replica_sum` answers with :func:`all_reduce_sum` (a no-op
  on one replica) or, where a ``LossScaleOptimizer`` calls the optimizer from its own
  threads inside a cross-replica ``tf.cond`` (no collective can run there), with
  plain sums over every replica's batch in the step graph.
* **Non-finite steps.** :func:`apply_or_skip` runs the optimizer's update only when
  a predicate holds and otherwise counts a skipped step, in a way that works in a
  replica context (``tf.cond`` directly where the strategy needs no ``merge_call``,
  else the cross-replica ``tf.cond`` that ``LossScaleOptimizer`` uses) and under XLA.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import tensorflow as tf

from keras_curv._internal.keras_privates import strategy_needs_merge_call
from keras_curv.optimizers.batch import TrainBatch


def _replica_context() -> tf.distribute.ReplicaContext | None:
    """The replica context when more than one replica is in sync, else ``None``."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def replica_sum(batch: TrainBatch, statistics: Callable[..., Generator]) -> Any:
    """Runs the generator ``statistics(batch)``, answering each ``yield`` with a replica sum.

    ``statistics`` yields (nested) per-replica tensors and receives their sums over
    the replicas in sync; its return value is returned. Normally the sums are
    :func:`all_reduce_sum`. Where every replica's batch is at hand
    (``batch.replicas``, multi-replica ``mixed_float16``: see ``current_batch``) no
    collective can run, since the caller is in a cross-replica ``tf.cond``; all
    replicas' tensors live in the same step graph, so ``statistics`` is run once per
    replica, in lockstep, and the sums are plain additions. Every replica's run then
    returns equal values (everything after a reduction derives from the sums); the
    first is returned.
    """
    if batch.replicas is None:
        generator = statistics(batch)
        try:
            value = next(generator)
            while True:
                value = generator.send(all_reduce_sum(value))
        except StopIteration as stop:
            return stop.value
    runs = [statistics(b) for b in batch.replicas]
    values = []
    for run, replica in zip(runs, batch.replicas):
        with tf.device(replica.device):
            values.append(next(run))
    while True:
        total = tf.nest.map_structure(lambda *parts: tf.add_n(list(parts)), *values)
        values, results = [], []
        for run, replica in zip(runs, batch.replicas):
            with tf.device(replica.device):
                try:
                    values.append(run.send(total))
                except StopIteration as stop:
                    results.append(stop.value)
        if results:
            if values:
                raise RuntimeError("Replica statistics yielded different numbers of sums.")
            return results[0]


_shared: dict = {}


def once_per_step(optimizer, batch: TrainBatch, build: Callable[[], Any]) -> Any:
    """``build()``, built once per traced step and optimizer even when called per replica.

    With ``batch.replicas``, ``apply`` runs once per replica, but the statistics
    (and AdaHessian's probes, whose draw advances the generator) are those of all
    replicas together: the first replica builds them, the others reuse its tensors
    (the entry is dropped once every replica has taken it).
    """
    if batch.replicas is None:
        return build()
    key = (id(optimizer), batch.replicas[0].loss.ref())
    if key not in _shared:
        _shared[key] = [build(), 0]
    entry = _shared[key]
    entry[1] += 1
    if entry[1] == len(batch.replicas):
        del _shared[key]
    return entry[0]


def mirror_copies(variable: Any) -> None:
    """Copies the value of a mirrored ``variable`` read in the step graph to every replica.

    With ``batch.replicas`` the statistics are built in the step graph from a thread
    outside any replica context, where an update of a mirrored variable (AdaHessian's
    probe generator advancing) writes one copy only. All copies were equal before, so
    copying the updated value to each keeps them equal.
    """
    handle = getattr(variable, "value", variable)
    copies = getattr(handle, "values", None)
    if not isinstance(handle, tf.distribute.DistributedValues) or len(copies) < 2:
        return
    value = tf.convert_to_tensor(handle)
    for copy in copies:
        copy.assign(value)


def all_reduce_sum(values: Any) -> Any:
    """Sum of a nested structure of tensors over the replicas in sync.

    Identity on a single replica. Must be called in a replica context (where
    ``apply`` runs inside ``model.fit``).
    """
    context = _replica_context()
    if context is None:
        return values
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


def all_finite(tensors: Sequence[Any]) -> tf.Tensor:
    """Boolean scalar: every entry of every (non-``None``) tensor is finite."""
    flags = [
        tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(t))) for t in tensors if t is not None
    ]
    if not flags:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(flags))


def all_finite_on_every_replica(
    tensors: Sequence[Any], batch: TrainBatch | None = None
) -> tf.Tensor:
    """:func:`all_finite` of per-replica ``tensors``, agreed over all replicas.

    Every replica gets the same answer, so all of them take the same branch of
    :func:`apply_or_skip` (a replica that skipped alone would desynchronise the
    mirrored weights). With ``batch.replicas`` (no collective can run, see
    :func:`replica_sum`) the answer is read off every replica's loss and (scaled)
    gradients in the step graph instead.
    """
    if batch is not None and batch.replicas is not None:
        with batch.step_graph():
            return all_finite([t for b in batch.replicas for t in (b.loss, *b.scaled_gradients())])
    local = all_finite(tensors)
    if _replica_context() is None:
        return local
    failures = all_reduce_sum(tf.cast(tf.logical_not(local), tf.float32))
    return tf.equal(failures, 0.0)


def apply_or_skip(
    predicate: tf.Tensor, apply_fn: Callable[..., Any], args: tuple, skipped: Any
) -> None:
    """``apply_fn(*args)`` when ``predicate`` holds, else ``skipped += 1``.

    Args:
        predicate: Boolean scalar, equal on every replica.
        apply_fn: The update; it may call ``merge_call`` (Keras's distributed
            ``_backend_update_step`` does), so under a strategy that needs
            ``merge_call`` the condition is evaluated in the cross-replica context and
            ``apply_fn`` runs once per replica inside its branch, exactly as Keras's
            ``LossScaleOptimizer`` does. ``args`` are per-replica values there.
        args: Positional arguments of ``apply_fn`` (nested tensors and variables).
        skipped: Integer counter variable (aggregation ``"only_first_replica"``).
    """

    def skip():
        skipped.assign_add(tf.constant(1, skipped.dtype))

    def run():
        apply_fn(*args)

    context = _replica_context()
    if context is None or not strategy_needs_merge_call():
        tf.cond(predicate, run, skip)
        return

    def cross_replica(distribution, predicate, args):
        # Equal on every replica (see all_finite_on_every_replica): take the first.
        flag = distribution.experimental_local_results(predicate)[0]

        def run_each():
            distribution.extended.call_for_each_replica(apply_fn, args=args)

        tf.cond(flag, run_each, skip)

    context.merge_call(cross_replica, args=(predicate, args))
