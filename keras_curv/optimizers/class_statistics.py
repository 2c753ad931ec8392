"""The batch statistics of ``ClassSubspaceNewton``, built in the train step's graph.

For one replica's :class:`~keras_curv.optimizers.batch.TrainBatch`:

* the class gradients ``c^B_k = Σ_μ w_μ y^μ_k ∇z^μ_k / Σ_μ w_μ y^μ_k``, from a vectorised
  Jacobian of the C per-class sums (:func:`jacobian_class_gradients`), or, where it is
  exact, from one forward and backward pass per class sub-batch
  (:func:`partitioned_class_gradients`);
* the batch curvature: eq. 17's spread, or the Gauss–Newton block ``K = Vᵀ G_B V``
  (:func:`gauss_newton_block`);
* the projections ``v_kᵀ g`` of the gradient on the updated directions.

:func:`replica_statistics` is a generator for
:func:`~keras_curv.optimizers.distribute.replica_sum`: each ``yield`` hands a per-replica
sum over and receives its sum over the replicas, so the statistics are those of the
global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal import flat
from keras_curv._internal.data import class_targets
from keras_curv._internal.keras_privates import flatten_layers, has_random_state, under_xla
from keras_curv._internal.model import stateless_outputs
from keras_curv.curvature.class_gradients import class_scores
from keras_curv.optimizers import class_subspace_math as csm
from keras_curv.optimizers._graph import StepGate, stacked_map
from keras_curv.optimizers.batch import TrainBatch


def can_partition(batch: TrainBatch) -> bool:
    """Whether per-class sub-batches give exactly the step's class gradients.

    True when every sample's logits depend on that sample alone and deterministically
    (no BatchNormalization, no random layers), the model has no recurrent layer, the
    inputs are known, and XLA is off (sub-batches have data-dependent shapes).

    A recurrent layer without dropout would be exact here, but each of the C sub-batches
    runs the whole recurrent loop: on an Embedding-LSTM(64) at batch 32 and C = 10 the
    Gauss–Newton step cost 7.2× SGD against 3.7× for the Jacobian path. And under
    ``update_each`` the gated sub-batch loops miscompile in TensorFlow 2.21 (the train
    function fails with "OptionalHasValue ... expected a variant tensor").
    """
    if batch.x is None or under_xla():
        return False
    for layer in flatten_layers(batch.model):
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.RNN)):
            return False
        if has_random_state(layer):
            return False
    return True


def class_gradient_path_of(model: keras.Model) -> str:
    """``"partition"`` or ``"jacobian"``: the class-gradient path ``model`` gets (graph mode)."""
    stand_in = TrainBatch(model, 0, None, None, None, tf.constant(0.0), [])
    return "partition" if can_partition(stand_in) else "jacobian"


def jacobian_class_gradients(
    handles: Sequence[Any],
    per_class: tf.Tensor,
    gate: StepGate,
    num_classes: int,
    present: tf.Tensor | None = None,
) -> list[tf.Tensor]:
    """``d per_class[k] / d theta`` for every k: one reverse pass per class, vectorised.

    Args:
        handles: What the step's forward pass read, per variable.
        per_class: ``(C,)``, the per-class sums.
        gate: Gates the work (``update_each``).
        num_classes: C.
        present: Optional boolean ``(C,)``: the classes whose sums depend on the batch.
            The other rows are exactly zero, so only the present rows are computed, at
            most ``min(C, batch)`` reverse passes instead of C (not under XLA, whose
            shapes must be static).

    Returns:
        Per variable, a ``(C, *shape)`` tensor.
    """

    def one_row(unit):
        return flat.zeros_for_none(tf.gradients(per_class, handles, grad_ys=unit), handles)

    seeds = tf.eye(num_classes, dtype=per_class.dtype)
    if present is None or under_xla():
        return [gate.exit(j) for j in stacked_map(one_row, gate.enter(seeds))]
    rows = gate.enter(tf.where(present))  # (K, 1)
    jacobian = stacked_map(one_row, tf.gather_nd(seeds, rows))
    shapes = [h.shape.as_list() for h in handles]
    # With no class present pfor's zero rows can come back misshapen: reshape first.
    return [
        gate.exit(tf.scatter_nd(rows, tf.reshape(j, [-1, *shape]), [num_classes, *shape]))
        for j, shape in zip(jacobian, shapes)
    ]


def partitioned_class_gradients(
    batch: TrainBatch,
    gate: StepGate,
    onehot: tf.Tensor,
    weights: tf.Tensor,
    safe_counts: tf.Tensor,
    num_classes: int,
    dtype: tf.DType,
) -> list[tf.Tensor]:
    """Class gradients from one stateless forward and backward pass per class sub-batch.

    ``c^B_k = ∇_θ Σ_{μ ∈ B_k} w_μ z^μ_k / n_k`` involves only the class-k samples, so
    the C sub-batches together cost about one extra forward and backward pass of the
    batch, against C backward passes of the batch for the Jacobian. Exact when
    :func:`can_partition` holds.
    """
    handles = batch.handles()
    labels = tf.argmax(gate.enter(onehot), axis=-1, output_type=tf.int32)
    # A zero row after the samples: index 0 below is sample 0, or that row when this
    # shard is empty (a replica's share of a short last batch).
    padded = tf.nest.map_structure(
        lambda t: tf.concat([t, tf.zeros(tf.concat([[1], tf.shape(t)[1:]], 0), t.dtype)], 0),
        batch.x,
    )
    rows = []
    for k in range(num_classes):
        # Pad every sub-batch with sample 0 at weight 0: a class absent from the batch
        # would otherwise give an empty forward pass, which some kernels reject (oneDNN
        # convolutions). Samples do not interact here, so the pad adds exactly 0.
        members = tf.concat([tf.where(tf.equal(labels, k))[:, 0], tf.zeros([1], tf.int64)], 0)
        member_weights = tf.concat(
            [tf.gather(weights, members[:-1]), tf.zeros([1], weights.dtype)], 0
        )
        inputs = tf.nest.map_structure(lambda t, m=members: tf.gather(t, m), padded)
        outputs = stateless_outputs(batch.model, handles, inputs, training=True)
        score = tf.cast(class_scores(batch.model, outputs), dtype)[:, k]
        total = tf.reduce_sum(member_weights * score) / safe_counts[k]
        rows.append(flat.zeros_for_none(tf.gradients(total, handles), handles))
    return [gate.exit(tf.stack(parts)) for parts in zip(*rows)]


def gauss_newton_block(
    handles: Sequence[Any],
    scores: tf.Tensor,
    dummy: tf.Tensor,
    probs: tf.Tensor,
    weights: tf.Tensor,
    size: tf.Tensor,
    directions: Sequence[tf.Tensor],
    num_classes: int,
    dtype: tf.DType,
) -> tf.Tensor:
    """``K = Vᵀ G_B V`` (C x C), with ``J v = ∂_u ⟨Jᵀu, v⟩`` (a double VJP, vectorised over k).

    ``G_B = (1/|B|) Σ_μ w_μ J_μᵀ (diag p^μ − p^μ p^μᵀ) J_μ`` is the Gauss–Newton matrix of
    softmax cross-entropy over the class scores.
    """
    # J^T u is linear in u; its u-derivative contracted with v_k is J v_k. Dense: an
    # Embedding table's J^T u is IndexedSlices, which tf.gradients cannot take.
    transposed = [
        None if t is None else tf.convert_to_tensor(t)
        for t in tf.gradients(scores, handles, grad_ys=dummy)
    ]
    pairs = [(t, d) for t, d in zip(transposed, directions) if t is not None]
    if not pairs:
        return tf.zeros((num_classes, num_classes), dtype)
    lhs = [t for t, _ in pairs]

    def jvp(direction_slices):
        (out,) = tf.gradients(
            lhs, dummy, grad_ys=[tf.cast(s, t.dtype) for s, t in zip(direction_slices, lhs)]
        )
        return tf.zeros_like(dummy) if out is None else out

    jv = tf.cast(stacked_map(jvp, [d for _, d in pairs]), dtype)  # (C, B, C)
    # (diag p - p p^T) J v_l, per sample.
    hjv = probs[None] * jv - probs[None] * tf.reduce_sum(probs[None] * jv, -1, keepdims=True)
    return tf.einsum("kbc,lbc,b->kl", jv, hjv, weights) / size


def replica_statistics(
    batch: TrainBatch,
    *,
    num_classes: int,
    dtype: tf.DType,
    curvature_mode: str,
    gate: StepGate,
    state: tuple[list[tf.Tensor], tf.Tensor, tf.Tensor],
    gamma: float,
    gradients: Callable[[TrainBatch], list[tf.Tensor]],
    gauss_newton_quotients: bool = False,
) -> Generator[Any, Any, dict]:
    """One replica's statistics; yields per-replica sums and receives replica totals.

    Args:
        batch: The replica's batch.
        num_classes: C.
        dtype: The statistics' dtype (the variables').
        curvature_mode: ``"paper"``, ``"gauss_newton"`` or ``"projected_newton"``.
        gate: Gates the refresh of the statistics (``update_each``).
        state: The stored ``(sums, curvature_sq, steps)``.
        gamma: The EMA decay.
        gradients: The replica's gradient as ``update_step`` will see it (unscaled,
            clipped), per variable.
        gauss_newton_quotients: Also return ``quotients``, the diagonal of
            ``V G_B Vᵀ`` for the step's directions (a diagnostic; computed for
            ``"paper"`` only when asked, the Gauss–Newton modes have it anyway).

    Returns:
        ``present``, the absorbed state (``sums``, ``curvature_sq``, ``steps``), the
        derived ``curvature`` and ``directions`` and ``alive``, ``projections``
        (replica-summed), ``block`` for the Gauss–Newton modes and ``quotients``.
    """
    scores = tf.cast(class_scores(batch.model, batch.y_pred), dtype)
    probs = tf.nn.softmax(scores, axis=-1)
    onehot = class_targets(batch.y, num_classes, dtype)
    if batch.sample_weight is None:
        weights = tf.ones_like(scores[:, 0])
    else:
        weights = tf.reshape(tf.cast(batch.sample_weight, dtype), [-1])
    weighted = onehot * weights[:, None]
    counts, size = yield [tf.reduce_sum(weighted, axis=0), tf.cast(tf.shape(scores)[0], dtype)]
    safe_counts = tf.where(counts > 0, counts, tf.ones_like(counts))
    handles = batch.handles()
    if can_partition(batch):
        class_grads = partitioned_class_gradients(
            batch, gate, onehot, weights, safe_counts, num_classes, dtype
        )
    else:
        per_class = tf.reduce_sum(weighted * scores, axis=0) / safe_counts
        present_here = tf.reduce_any(tf.not_equal(weighted, 0), axis=0)
        class_grads = jacobian_class_gradients(
            handles, per_class, gate, num_classes, present=present_here
        )
    class_grads = yield class_grads
    # A class whose statistics are not finite (an overflow, a NaN sample) is treated as
    # absent from this batch: its EMAs and count stay as they are.
    finite = tf.math.is_finite(csm.per_class_sq_norm(class_grads, dtype))
    present = gate.mask(tf.logical_and(counts > 0, finite))
    sums, curvature_sq, steps = state
    block = None
    if curvature_mode == "paper":
        spread = (yield tf.reduce_sum(weighted * probs * (1 - probs), axis=0)) / size
        batch_curvature = csm.eq17_curvature(spread, class_grads)
        present = tf.logical_and(present, tf.math.is_finite(batch_curvature))
    else:
        # The Gauss-Newton curvature along the *updated* directions.
        zeros = tf.zeros_like(counts)
        new_sums, _, new_steps = csm.absorb(
            sums, curvature_sq, steps, class_grads, zeros, present, gamma
        )
        directions = csm.derived(new_sums, curvature_sq, new_steps, gamma)[2]
        block = gauss_newton_block(
            handles,
            scores,
            gate.enter(tf.zeros_like(scores)),
            probs,
            weights,
            size,
            [gate.enter(d) for d in directions],
            num_classes,
            dtype,
        )
        block = yield gate.exit(block)
        batch_curvature = tf.linalg.diag_part(block)
        present = tf.logical_and(present, tf.reduce_all(tf.math.is_finite(block)))
    sums, curvature_sq, steps = csm.absorb(
        sums, curvature_sq, steps, class_grads, batch_curvature, present, gamma
    )
    _, curvature, directions, alive = csm.derived(sums, curvature_sq, steps, gamma)
    quotients = None if block is None else tf.linalg.diag_part(block)
    if gauss_newton_quotients and block is None:
        dummy = gate.enter(tf.zeros_like(scores))
        rows = [gate.enter(d) for d in directions]
        quotients = gauss_newton_block(
            handles, scores, dummy, probs, weights, size, rows, num_classes, dtype
        )
        quotients = yield gate.exit(tf.linalg.diag_part(quotients))
    projections = yield csm.per_class_dot(directions, gradients(batch), dtype)
    return {
        "present": present,
        "sums": sums,
        "curvature_sq": curvature_sq,
        "steps": steps,
        "curvature": curvature,
        "directions": directions,
        "alive": alive,
        "projections": projections,
        "block": block,
        "quotients": quotients,
    }
