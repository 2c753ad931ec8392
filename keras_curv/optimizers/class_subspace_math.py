"""The math of ``ClassSubspaceNewton`` as pure functions of tensors (class-subspace paper).

State per class k: the EMA sum m_k of the batch class gradients, the EMA s_k of the
squared batch curvatures and the number t_k of updates the class received. Eq. 16–17
with per-class bias correction:

```
c_k = m_k / (1 − γ^t_k)        λ_k = sqrt(s_k / (1 − γ^t_k))        v_k = c_k / |c_k|
```

and the step (eq. 15, or one of its options) ``d = η g + Σ_k a_k v_k``.

Tensors that live per trainable variable are lists with one ``(C, *shape)`` tensor per
variable; norms and dot products run over all variables together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

# Relative eigenvalue cut-off of the C x C pseudo-inverses (Gram and curvature matrices).
PINV_RTOL = 1e-10


def expand(vector: tf.Tensor, rank: int) -> tf.Tensor:
    """``(C,)`` -> ``(C, 1, ..., 1)`` with ``rank`` trailing ones, to broadcast over a variable."""
    return tf.reshape(vector, [-1] + [1] * rank)


def per_class_sq_norm(tensors: Sequence[tf.Tensor], dtype: tf.DType) -> tf.Tensor:
    """``Σ_variables |t[k]|²`` for ``(C, *shape)`` tensors -> ``(C,)``."""
    return tf.add_n(
        [
            tf.reduce_sum(tf.reshape(tf.cast(t, dtype) ** 2, [tf.shape(t)[0], -1]), 1)
            for t in tensors
        ]
    )


def per_class_dot(
    left: Sequence[tf.Tensor], right: Sequence[tf.Tensor], dtype: tf.DType
) -> tf.Tensor:
    """``Σ_variables <left[k], right>`` for ``(C, *shape)`` and ``shape`` tensors -> ``(C,)``."""
    return tf.add_n(
        [
            tf.linalg.matvec(
                tf.reshape(tf.cast(a, dtype), [tf.shape(a)[0], -1]),
                tf.reshape(tf.cast(b, dtype), [-1]),
            )
            for a, b in zip(left, right)
        ]
    )


def symmetric_eigh(matrix: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``eigh`` of the symmetric part of a small matrix, non-finite entries read as zeros.

    ``eigh`` raises on non-finite input, which would stop training; a step whose
    statistics overflowed is skipped elsewhere anyway.
    """
    matrix = tf.where(tf.math.is_finite(matrix), matrix, tf.zeros_like(matrix))
    return tf.linalg.eigh(0.5 * (matrix + tf.transpose(matrix)))


def sym_pinv(matrix: tf.Tensor, rtol: float = PINV_RTOL) -> tf.Tensor:
    """Pseudo-inverse of a small symmetric PSD matrix, by eigendecomposition (XLA-friendly).

    Non-finite entries are treated as zeros and the matrix is symmetrised first
    (:func:`symmetric_eigh`).
    """
    values, vectors = symmetric_eigh(matrix)
    cutoff = tf.reduce_max(tf.abs(values)) * tf.constant(rtol, matrix.dtype)
    keep = tf.abs(values) > cutoff
    inverse = tf.where(keep, 1.0 / tf.where(keep, values, tf.ones_like(values)), 0.0)
    return tf.matmul(vectors * inverse[None, :], vectors, transpose_b=True)


def absorb(
    sums: Sequence[tf.Tensor],
    curvature_sq: tf.Tensor,
    steps: tf.Tensor,
    class_gradients: Sequence[tf.Tensor],
    curvature: tf.Tensor,
    present: tf.Tensor,
    gamma: float,
) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
    """The EMA state after one batch, for the classes ``present`` in it only.

    ```
    m_k ← γ m_k + (1 − γ) c^B_k        s_k ← γ s_k + (1 − γ) (λ^B_k)²        t_k ← t_k + 1
    ```

    Args:
        sums: m_k per variable, ``(C, *shape)``.
        curvature_sq: s_k, ``(C,)``.
        steps: t_k, ``(C,)``.
        class_gradients: c^B_k per variable.
        curvature: λ^B_k, ``(C,)``.
        present: Boolean ``(C,)``.
        gamma: γ.

    Returns:
        ``(sums, curvature_sq, steps)`` after the batch.
    """
    dtype = curvature_sq.dtype
    decay = tf.constant(gamma, dtype)
    new_sums = [
        tf.where(
            expand(present, len(m.shape) - 1),
            tf.cast(decay, m.dtype) * m + tf.cast(1 - decay, m.dtype) * tf.cast(cb, m.dtype),
            m,
        )
        for m, cb in zip(sums, class_gradients)
    ]
    new_sq = tf.where(present, decay * curvature_sq + (1 - decay) * curvature**2, curvature_sq)
    return new_sums, new_sq, steps + tf.cast(present, steps.dtype)


def derived(
    sums: Sequence[tf.Tensor], curvature_sq: tf.Tensor, steps: tf.Tensor, gamma: float
) -> tuple[list[tf.Tensor], tf.Tensor, list[tf.Tensor], tf.Tensor]:
    """Bias-corrected c_k, λ_k, unit directions v_k, and which v_k are non-zero.

    A class never seen (t_k = 0) has c_k = v_k = 0 and λ_k = 1.

    Returns:
        ``(means, curvature, directions, alive)``: per-variable means and directions,
        ``(C,)`` curvature and boolean ``(C,)``.
    """
    dtype = curvature_sq.dtype
    seen = steps > 0
    correction = tf.where(seen, 1 - tf.constant(gamma, dtype) ** steps, tf.ones_like(steps))
    means = [m / tf.cast(expand(correction, len(m.shape) - 1), m.dtype) for m in sums]
    curvature = tf.where(seen, tf.sqrt(curvature_sq / correction), tf.ones_like(steps))
    norms = tf.sqrt(per_class_sq_norm(means, dtype))
    inverse_norm = tf.where(norms > 0, 1.0 / tf.where(norms > 0, norms, 1.0), 0.0)
    directions = [c * tf.cast(expand(inverse_norm, len(c.shape) - 1), c.dtype) for c in means]
    return means, curvature, directions, norms > 0


def eq17_curvature(spread: tf.Tensor, class_gradients: Sequence[tf.Tensor]) -> tf.Tensor:
    """Eq. 17: ``λ^B_k = (1/|B|) Σ_μ w_μ y^μ_k p^μ_k (1 − p^μ_k) · |c^B_k|²``.

    Args:
        spread: ``(1/|B|) Σ_μ w_μ y^μ_k p^μ_k (1 − p^μ_k)``, ``(C,)``.
        class_gradients: c^B_k per variable.
    """
    return spread * per_class_sq_norm(class_gradients, spread.dtype)


def effective_curvature(
    curvature: tf.Tensor, damping: tf.Tensor, max_inverse_curvature: float | None
) -> tf.Tensor:
    """``λ_k + δ``, floored at ``1 / max_inverse_curvature`` when given."""
    curvature = curvature + tf.cast(damping, curvature.dtype)
    if max_inverse_curvature is not None:
        floor = tf.constant(1.0 / max_inverse_curvature, curvature.dtype)
        curvature = tf.maximum(curvature, floor)
    return curvature


def diagonal_parts(curvature: tf.Tensor, projections: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Eq. 13–15 split in two: Newton ``n_k = v_kᵀg / λ_k`` and projection ``b_k = v_kᵀg``.

    The step is ``d = η g + Σ_k (n_k − η b_k) v_k``: the Newton part ``Σ_k n_k v_k`` and
    the complement (SGD) part ``η (g − Σ_k b_k v_k)`` (``curvature`` already damped).
    """
    return projections / curvature, projections


def exact_parts(
    gram: tf.Tensor, curvature: tf.Tensor, projections: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """``inverse="exact"``: ``n = (S Λ S)⁺ Vᵀ g`` and ``b = S⁺ Vᵀ g`` with ``S = VᵀV``.

    The Newton part ``(V Λ Vᵀ)⁺ g = V n`` and the exact projection
    ``(I − V S⁺ Vᵀ) g = g − V b`` of the SGD part, reduced to C x C matrices.
    """
    newton = sym_pinv(tf.matmul(gram * curvature[None, :], gram))
    return tf.linalg.matvec(newton, projections), tf.linalg.matvec(sym_pinv(gram), projections)


def projected_newton_parts(
    gram: tf.Tensor, block: tf.Tensor, damping: tf.Tensor, projections: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """``"projected_newton"``: ``n = (K + δS)⁺ Vᵀ g`` with ``K = Vᵀ G V``, ``b = S⁺ Vᵀ g``.

    ``δS = δ VᵀV`` is the proximal term ``δ‖Vn‖²`` of the step ``Vn`` in parameter space,
    so that with ``δ = 1/η`` the step along the class directions is never longer than
    the SGD step ``η P_V g``, however correlated the directions (with ``δI`` instead, C
    nearly equal directions would step up to C times further). Both are computed in the
    orthonormal basis ``W = V Q Λ^{-1/2}`` of their span (``S = Q Λ Qᵀ``, eigenvalues
    below :func:`span_cutoff` dropped), where ``WᵀGW + δI`` is well conditioned.
    """
    newton, projection = projected_newton_matrices(gram, block, damping)
    return tf.linalg.matvec(newton, projections), tf.linalg.matvec(projection, projections)


def projected_newton_matrices(
    gram: tf.Tensor, block: tf.Tensor, damping: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """``((K + δS)⁺, S⁺)`` on the span of the directions (C x C): ``n = (K + δS)⁺ Vᵀg``."""
    values, vectors = symmetric_eigh(gram)
    keep = values > span_cutoff(values)
    basis = vectors * tf.where(keep, tf.math.rsqrt(tf.where(keep, values, 1.0)), 0.0)[None, :]
    eye = tf.eye(tf.shape(block)[0], dtype=block.dtype)
    inner = tf.matmul(basis, tf.matmul(block, basis), transpose_a=True)
    inner = inner + tf.cast(damping, block.dtype) * eye
    newton = tf.matmul(basis, tf.matmul(sym_pinv(inner), basis, transpose_b=True))
    return newton, tf.matmul(basis, basis, transpose_b=True)


def span_cutoff(gram_eigenvalues: tf.Tensor) -> tf.Tensor:
    """Gram eigenvalues at most this are rounding noise: ``C · 10 ε · λ_max``."""
    dtype = gram_eigenvalues.dtype
    size = tf.cast(tf.size(gram_eigenvalues), dtype)
    return (
        size
        * tf.constant(10.0 * np.finfo(dtype.as_numpy_dtype).eps, dtype)
        * tf.reduce_max(tf.abs(gram_eigenvalues))
    )


def coefficients(parts: tuple[tf.Tensor, tf.Tensor], learning_rate: tf.Tensor) -> tf.Tensor:
    """``a = n − η b``: the coefficients of the whole step ``d = η g + Σ_k a_k v_k``."""
    newton, projection = parts
    return newton - learning_rate * projection


def diagonal_coefficients(
    curvature: tf.Tensor, projections: tf.Tensor, learning_rate: tf.Tensor
) -> tf.Tensor:
    """Eq. 15: ``a_k = (1/λ_k − η) v_kᵀ g`` (``curvature`` already damped)."""
    return coefficients(diagonal_parts(curvature, projections), learning_rate)


def flat_directions(directions: Sequence[tf.Tensor], num_classes: int) -> tf.Tensor:
    """The directions as a ``(C, dim)`` matrix (row k is v_k)."""
    dtype = directions[0].dtype
    return tf.concat([tf.reshape(tf.cast(d, dtype), [num_classes, -1]) for d in directions], 1)


def direction_overlap(gram: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """How far unit directions are from orthonormal, from their Gram matrix ``S = VᵀV``.

    Returns:
        ``(max_cosine, min_complement_eigenvalue)``: the largest ``|cos(v_i, v_j)|``,
        i ≠ j, and the smallest eigenvalue ``1 − σ_max(S)`` of ``I − Σ_k v_k v_kᵀ``
        (0 for orthonormal directions, where it is a projection; negative otherwise, as
        low as ``1 − C`` for parallel ones: the "SGD part" then climbs along them).
    """
    off = tf.abs(gram) * (1.0 - tf.eye(tf.shape(gram)[0], dtype=gram.dtype))
    symmetric = 0.5 * (gram + tf.transpose(gram))
    return tf.reduce_max(off), 1.0 - tf.reduce_max(tf.linalg.eigvalsh(symmetric))


# ------------------------------------------------------------------ eigen directions


def cross_gram(left: Sequence[tf.Tensor], right: Sequence[tf.Tensor], dtype: tf.DType) -> tf.Tensor:
    """``M_ij = Σ_variables <left[i], right[j]>`` for ``(C, *shape)`` tensors -> ``(C, C)``."""
    return tf.add_n(
        [
            tf.matmul(
                tf.reshape(tf.cast(a, dtype), [tf.shape(a)[0], -1]),
                tf.reshape(tf.cast(b, dtype), [tf.shape(b)[0], -1]),
                transpose_b=True,
            )
            for a, b in zip(left, right)
        ]
    )


def combine_rows(matrix: tf.Tensor, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Rows ``out[i] = Σ_j matrix[i, j] tensors[j]``, per ``(C, *shape)`` variable."""
    return [tf.tensordot(tf.cast(matrix, t.dtype), t, 1) for t in tensors]


def orthonormal_rows(
    tensors: Sequence[tf.Tensor], dtype: tf.DType, rtol: float = 1e-6
) -> tuple[list[tf.Tensor], tf.Tensor]:
    """An orthonormal basis of the span of the rows (flat over all variables).

    ``S = W diag(σ) Wᵀ`` is the eigendecomposition of the rows' Gram matrix; the rows of
    ``diag(σ)^{-1/2} Wᵀ T`` are orthonormal. Directions with ``σ ≤ rtol · σ_max`` (a
    rank-deficient block) become zero rows.

    Returns:
        ``(rows, alive)``: per-variable ``(C, *shape)`` rows and a boolean ``(C,)``.
    """
    gram = cross_gram(tensors, tensors, dtype)
    gram = tf.where(tf.math.is_finite(gram), gram, tf.zeros_like(gram))
    values, vectors = tf.linalg.eigh(0.5 * (gram + tf.transpose(gram)))
    alive = values > tf.reduce_max(values) * tf.constant(rtol, dtype)
    scale = tf.where(alive, tf.math.rsqrt(tf.where(alive, values, tf.ones_like(values))), 0.0)
    return combine_rows(tf.transpose(vectors) * scale[:, None], tensors), alive


def rayleigh_ritz(
    basis: Sequence[tf.Tensor], products: Sequence[tf.Tensor], dtype: tf.DType
) -> tuple[tf.Tensor, list[tf.Tensor], list[tf.Tensor]]:
    """Ritz pairs of an operator ``A`` on the span of orthonormal rows ``Q``, given ``Y = A Q``.

    ``H = Q A Qᵀ = S Θ Sᵀ``; the Ritz vectors are the rows of ``Sᵀ Q`` and their exact
    Rayleigh quotients ``u_kᵀ A u_k`` are ``Θ``. Sorted by decreasing ``|θ|`` (the order
    in which subspace iteration finds eigenvalues).

    Returns:
        ``(theta, ritz_vectors, ritz_products)``: ``(C,)`` and per-variable rows of
        ``Sᵀ Q`` and ``Sᵀ Y = A Sᵀ Q`` (the next subspace iterate's span).
    """
    block = cross_gram(basis, products, dtype)
    block = tf.where(tf.math.is_finite(block), block, tf.zeros_like(block))
    theta, vectors = tf.linalg.eigh(0.5 * (block + tf.transpose(block)))
    order = tf.argsort(tf.abs(theta), direction="DESCENDING", stable=True)
    theta, rotation = tf.gather(theta, order), tf.transpose(tf.gather(vectors, order, axis=1))
    return theta, combine_rows(rotation, basis), combine_rows(rotation, products)


def subspace_step(
    gradient: tf.Tensor,
    coefficients: tf.Tensor,
    direction: tf.Tensor,
    learning_rate: tf.Tensor,
) -> tf.Tensor:
    """One variable's step ``d = η g + Σ_k a_k v_k`` (``direction`` is ``(C, *shape)``)."""
    dtype = direction.dtype
    gradient = tf.cast(tf.convert_to_tensor(gradient), dtype)
    return tf.cast(learning_rate, dtype) * gradient + tf.tensordot(
        tf.cast(coefficients, dtype), direction, 1
    )


def newton_step(newton: tf.Tensor, direction: tf.Tensor) -> tf.Tensor:
    """One variable's Newton part ``Σ_k n_k v_k`` (``direction`` is ``(C, *shape)``)."""
    return tf.tensordot(tf.cast(newton, direction.dtype), direction, 1)
