"""Replica reduction and non-finite step skipping shared by the curvature optimizers.

Two concerns that Keras's own optimizers get from ``keras.optimizers.Optimizer`` but
that the per-batch curvature statistics need by hand:

* **Distribution.** Under ``tf.distribute`` (``MirroredStrategy``,
  ``MultiWorkerMirroredStrategy``) each replica traces the train step on its shard
  of the global batch and Keras sums the gradients across replicas (the per-replica
  loss is already divided by the number of replicas, so the sum is the gradient of
  the global batch-mean loss). Statistics built from the step's tensors are
  per-replica too and must be reduced the same way before they touch the
  optimizer's state; :func:`all_reduce_sum` does that (a no-op on one replica).
* **Non-finite steps.** :func:`apply_or_skip` runs the optimizer's update only when
  a predicate holds and otherwise counts a skipped step, in a way that works in a
  replica context (``tf.cond`` directly where the strategy needs no ``merge_call``,
  else the cross-replica ``tf.cond`` that ``LossScaleOptimizer`` uses) and under XLA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from keras_curv.optimizers import integration


def _replica_context() -> tf.distribute.ReplicaContext | None:
    """The replica context when more than one replica is in sync, else ``None``."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def num_replicas() -> int:
    """Number of replicas in sync (1 without a distribution strategy)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def current_batch(optimizer) -> integration.TrainBatch:
    """:func:`integration.current_batch`, with the multi-replica mixed-precision case named.

    Under a strategy that needs ``merge_call`` (``MirroredStrategy`` on CPUs, for
    example), ``LossScaleOptimizer`` calls the inner optimizer from threads of its
    own, where the train step's frame cannot be found.
    """
    try:
        return integration.current_batch(optimizer)
    except integration.CurvatureContextError as error:
        if num_replicas() > 1 and not tf.executing_eagerly():
            raise integration.CurvatureContextError(
                f"{error} Under a multi-replica distribution strategy, {type(optimizer).__name__}"
                " cannot be wrapped in a LossScaleOptimizer (mixed_float16) yet: train in "
                "float32 there (mixed precision works on a single replica)."
            ) from error
        raise


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


def all_finite_on_every_replica(tensors: Sequence[Any]) -> tf.Tensor:
    """:func:`all_finite` of per-replica ``tensors``, agreed over all replicas.

    Every replica gets the same answer, so all of them take the same branch of
    :func:`apply_or_skip` (a replica that skipped alone would desynchronise the
    mirrored weights).
    """
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
    if context is None or tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(predicate, run, skip)
        return

    def cross_replica(distribution, predicate, args):
        # Equal on every replica (see all_finite_on_every_replica): take the first.
        flag = distribution.experimental_local_results(predicate)[0]

        def run_each():
            distribution.extended.call_for_each_replica(apply_fn, args=args)

        tf.cond(flag, run_each, skip)

    context.merge_call(cross_replica, args=(predicate, args))
