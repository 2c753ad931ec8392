"""The top-C eigenpairs of the batch curvature for ``ClassSubspaceNewton(directions="eigen")``.

Passes of block subspace iteration with Rayleigh–Ritz at each statistics refresh, warm
started from the stored block, so that the iteration continues from step to step while
the curvature drifts (the top eigenspace changes slowly during training):

```
Q = orth(stored block)                Y = A_B Q          (C products, vectorised)
Q A_B Qᵀ = S Θ Sᵀ                     U = Sᵀ Q           θ = Θ   (exact Rayleigh quotients)
stored block ← orth(Sᵀ Y)             (the next iterate)
```

``A_B`` is the batch Gauss–Newton matrix (``"gauss_newton"``) or the batch Hessian
(``"hessian"``). The step preconditions with ``U`` (orthonormal) and ``θ``. The
convergence rate per refresh is ``|λ_{C+1} / λ_C|``, fast where the top C eigenvalues
stand out of the bulk, as they do for classifiers.

:func:`replica_statistics` is a generator for
:func:`~keras_curv.optimizers.distribute.replica_sum`: products and projections are
summed over the replicas, so the eigenpairs are those of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import tensorflow as tf

from keras_curv.optimizers import class_subspace_math as csm
from keras_curv.optimizers._graph import StepGate, stacked_map
from keras_curv.optimizers.batch import TrainBatch

OPERATORS = ("gauss_newton", "hessian")


def operator_products(
    batch: TrainBatch, operator: str, rows: Sequence[tf.Tensor], dtype: tf.DType
) -> list[tf.Tensor]:
    """``A_B q_k`` for every row ``q_k`` of ``(C, *shape)`` tensors, vectorised over k."""
    product = (
        batch.gauss_newton_vector_product
        if operator == "gauss_newton"
        else batch.hessian_vector_product
    )
    products = stacked_map(lambda tangents: product(list(tangents)), list(rows))
    return [tf.cast(p, dtype) for p in products]


def replica_statistics(
    batch: TrainBatch,
    *,
    operator: str,
    dtype: tf.DType,
    gate: StepGate,
    iterations: int,
    state: tuple[list[tf.Tensor], list[tf.Tensor], tf.Tensor, tf.Tensor],
    gradients: Callable[[TrainBatch], list[tf.Tensor]],
) -> Generator[Any, Any, dict]:
    """One replica's eigen statistics; yields per-replica sums and receives replica totals.

    Args:
        batch: The replica's batch.
        operator: ``"gauss_newton"`` or ``"hessian"``.
        dtype: The statistics' dtype.
        gate: Gates the refresh (``update_each``); on skipped steps the stored
            directions and curvatures are used.
        iterations: Subspace-iteration passes per refresh (C products each).
        state: The stored ``(block, directions, curvature, residual)``.
        gradients: The replica's gradient as ``update_step`` will see it, per variable.

    Returns:
        ``refreshed`` (boolean scalar), ``basis`` (the next block), ``directions`` (the
        Ritz vectors U), ``curvature`` (θ), ``residual`` (the relative residuals
        ``‖A u_k − θ_k u_k‖ / |θ_k|`` on the refresh's batch), ``alive`` and
        ``projections`` ``U g``.
    """
    stored_basis, stored_directions, stored_curvature, stored_residual = state
    next_basis, _ = csm.orthonormal_rows(stored_basis, dtype)
    for _ in range(iterations):
        basis = next_basis
        products = operator_products(batch, operator, [gate.enter(q) for q in basis], dtype)
        products = yield [gate.exit(p) for p in products]
        theta, ritz, ritz_products = csm.rayleigh_ritz(basis, products, dtype)
        next_basis, _ = csm.orthonormal_rows(ritz_products, dtype)
    refreshed = tf.constant(True) if gate.predicate is None else gate.predicate
    finite = tf.reduce_all(tf.math.is_finite(theta))
    refreshed = tf.logical_and(refreshed, finite)
    directions = [tf.where(refreshed, u, s) for u, s in zip(ritz, stored_directions)]
    curvature = tf.where(refreshed, theta, stored_curvature)
    # U is orthonormal, so ||A u - theta u||^2 = ||A u||^2 - theta^2 (no extra product).
    residual_sq = tf.maximum(csm.per_class_sq_norm(ritz_products, dtype) - theta**2, 0.0)
    residual = tf.math.divide_no_nan(tf.sqrt(residual_sq), tf.abs(theta))
    residual = tf.where(refreshed, residual, stored_residual)
    # Keep the iterate when this block lost rank (a zero product block): orth(Y) is 0.
    keep = tf.logical_and(refreshed, tf.reduce_any(csm.per_class_sq_norm(next_basis, dtype) > 0))
    next_basis = [tf.where(keep, q, s) for q, s in zip(next_basis, stored_basis)]
    alive = csm.per_class_sq_norm(directions, dtype) > 0.5
    projections = yield csm.per_class_dot(directions, gradients(batch), dtype)
    return {
        "refreshed": refreshed,
        "basis": next_basis,
        "directions": directions,
        "curvature": curvature,
        "residual": residual,
        "alive": alive,
        "projections": projections,
    }
