"""The math of ``Shampoo`` as pure functions of tensors (Gupta et al. 2018; Anil et al. 2020).

A weight is seen as a tensor ``G`` of rank ``p`` (its *preconditioner shape*, see
:func:`preconditioner_shape`), cut into blocks of at most ``block_size`` along every
axis (:func:`split_blocks`). Each block keeps one statistic per axis,

```
L_k ← β₂ L_k + (1 − β₂) G_(k) G_(k)ᵀ            (G_(k): the mode-k unfolding, n_k × Π n_j)
```

and is preconditioned by their inverse ``2p``-th roots, ``G ×₁ L₁^(−1/2p) ⋯ ×_p L_p^(−1/2p)``
(for a matrix: ``L^(−1/4) G R^(−1/4)``), whose norm is then grafted from a first-order
method's direction (:func:`graft`). ``docs/shampoo.md`` explains the choices.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from keras_curv._internal.numerics import exact_cast

# ------------------------------------------------------------------ layout


def preconditioner_shape(
    shape: Sequence[int], block_size: int, merge_small_axes: bool = True
) -> tuple[int, ...] | None:
    """The shape a weight of ``shape`` is preconditioned as, or ``None`` (grafting alone).

    Tensors of rank 0 and 1 (biases, normalisation scales) are not preconditioned.
    Matrices keep their shape. For rank ``>= 3`` (convolution kernels ``(kh, kw, in,
    out)``, ``(kw, in, out)``) with ``merge_small_axes``, the leading axes are merged
    while their product stays ``<= block_size`` and the last (output) axis is kept,
    as Distributed Shampoo's ``merge_small_dims`` does: ``(3, 3, 16, 32)`` becomes the
    ``(144, 32)`` matrix of the convolution, ``(3, 3, 256, 256)`` with ``block_size=1024``
    the rank-3 ``(9, 256, 256)``. Without merging every axis keeps its own statistic.

    Example:
        >>> preconditioner_shape((3, 3, 16, 32), 1024)
        (144, 32)
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2:
        return None
    if len(shape) == 2 or not merge_small_axes:
        return shape
    *leading, last = shape
    merged = [leading[0]]
    for n in leading[1:]:
        if merged[-1] * n <= block_size:
            merged[-1] *= n
        else:
            merged.append(n)
    return (*merged, last)


def block_sizes(length: int, block_size: int) -> list[int]:
    """The sizes an axis of ``length`` is cut into: ``block_size`` each, the last shorter."""
    sizes = [block_size] * (length // block_size)
    if length % block_size:
        sizes.append(length % block_size)
    return sizes


def block_shapes(shape: Sequence[int], block_size: int) -> list[tuple[int, ...]]:
    """The shapes of the blocks of a tensor of ``shape``, in :func:`split_blocks` order."""
    return list(itertools.product(*(block_sizes(n, block_size) for n in shape)))


def split_blocks(tensor: tf.Tensor, block_size: int) -> list[tf.Tensor]:
    """``tensor`` cut into blocks of at most ``block_size`` along every axis (row-major order)."""
    parts = [tensor]
    for axis, length in enumerate(tensor.shape):
        sizes = block_sizes(int(length), block_size)
        if len(sizes) > 1:
            parts = [piece for part in parts for piece in tf.split(part, sizes, axis=axis)]
    return parts


def merge_blocks(parts: Sequence[tf.Tensor], shape: Sequence[int], block_size: int) -> tf.Tensor:
    """The inverse of :func:`split_blocks`: the tensor of ``shape`` the blocks came from."""
    parts = list(parts)
    for axis in reversed(range(len(shape))):
        count = len(block_sizes(int(shape[axis]), block_size))
        if count > 1:
            parts = [tf.concat(parts[i : i + count], axis) for i in range(0, len(parts), count)]
    return parts[0]


def block_order(shape: Sequence[int], block_size: int) -> tf.Tensor:
    """The row-major flat indices of a tensor of ``shape``, block after block (in
    :func:`split_blocks` order): where each block's entries sit in the flat layout."""
    size = 1
    for n in shape:
        size *= int(n)
    indices = tf.reshape(tf.range(size, dtype=tf.int64), shape)
    return tf.concat([tf.reshape(b, [-1]) for b in split_blocks(indices, block_size)], 0)


# ------------------------------------------------------------------ statistics


def axis_statistics(block: tf.Tensor) -> list[tf.Tensor]:
    """``G_(k) G_(k)ᵀ`` for every axis ``k`` of ``block`` (``G Gᵀ`` and ``Gᵀ G`` for a matrix)."""
    rank = block.shape.rank
    if rank == 2:
        return [
            tf.matmul(block, block, transpose_b=True),
            tf.matmul(block, block, transpose_a=True),
        ]
    axes = list(range(rank))
    return [
        tf.tensordot(block, block, axes=[axes[:k] + axes[k + 1 :], axes[:k] + axes[k + 1 :]])
        for k in axes
    ]


def update_statistics(
    statistics: Sequence[Any], block: tf.Tensor, beta_2: float
) -> list[tf.Tensor]:
    """``L_k ← β₂ L_k + (1 − β₂) G_(k) G_(k)ᵀ`` for every axis of ``block``."""
    dtype = block.dtype
    beta = exact_cast(beta_2, dtype)
    return [
        beta * tf.convert_to_tensor(s) + (1 - beta) * c
        for s, c in zip(statistics, axis_statistics(block))
    ]


def inverse_root(statistic: Any, exponent: int, epsilon: float, correction: Any = 1.0) -> tf.Tensor:
    """``(L̂ + ε λ_max I)^(−1/exponent)`` of a symmetric PSD ``L̂ = L / correction``, by ``eigh``.

    The eigenvalues are clipped at 0 (rounding can make them slightly negative) and
    regularised by ``ε`` times the largest one, so the result is finite for any
    finite statistic: rank-deficient, all-zero (then ``ε I`` with ``λ_max := 1``),
    or of any scale. The powers are taken as ``λ_max^(−1/e) (λ/λ_max + ε)^(−1/e)``,
    which neither underflows nor overflows where ``ε λ_max`` would. A statistic with a
    non-finite entry is replaced by ``I`` (``eigh`` would raise).

    Args:
        statistic: ``L`` (``n × n``); only its lower triangle is read.
        exponent: ``e = 2p`` for a block of rank ``p``.
        epsilon: ``ε``, relative to the largest eigenvalue.
        correction: The bias correction ``1 − β₂ᵗ`` that ``L`` is divided by.

    Returns:
        The symmetric ``n × n`` inverse root, in the statistic's dtype.
    """
    statistic = tf.convert_to_tensor(statistic)
    dtype = statistic.dtype
    # eigh raises on non-finite input (and would stop training): the identity instead.
    finite = tf.reduce_all(tf.math.is_finite(statistic))
    statistic = tf.where(finite, statistic, tf.eye(tf.shape(statistic)[0], dtype=dtype))
    values, vectors = tf.linalg.eigh(statistic / tf.cast(correction, dtype))
    largest = tf.reduce_max(values)
    scale = tf.where(largest > 0, largest, tf.ones_like(largest))
    ratio = tf.maximum(values / scale, 0) + exact_cast(epsilon, dtype)
    power = exact_cast(-1.0 / exponent, dtype)
    roots = tf.pow(scale, power) * tf.pow(ratio, power)
    return tf.matmul(vectors * roots[None, :], vectors, transpose_b=True)


def precondition(block: tf.Tensor, roots: Sequence[Any]) -> tf.Tensor:
    """``G ×₁ R₁ ×₂ R₂ ⋯ ×_p R_p`` for symmetric ``R_k`` (``R₁ G R₂`` for a matrix)."""
    roots = [tf.convert_to_tensor(r) for r in roots]
    if block.shape.rank == 2:
        return tf.matmul(tf.matmul(roots[0], block), roots[1])
    # Contracting axis 0 and appending the new axis last: after p products the axes are
    # back in their order.
    out = block
    for root in roots:
        out = tf.tensordot(out, root, axes=[[0], [0]])
    return out


# ------------------------------------------------------------------ grafting


def adam_grafting(
    gradient: Any, second_moment: Any, step: Any, beta_2: float, epsilon: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """Adam's normalised gradient: ``v ← β₂ v + (1 − β₂) g²``, ``g / (√(v / (1 − β₂ᵗ)) + ε)``.

    Returns:
        ``(direction, v)``, in the gradient's dtype.
    """
    dtype = gradient.dtype
    beta = exact_cast(beta_2, dtype)
    v = beta * tf.cast(second_moment, dtype) + (1 - beta) * tf.square(gradient)
    return gradient / adam_denominator(v, step, beta_2, epsilon), v


def adam_denominator(second_moment: Any, step: Any, beta_2: float, epsilon: float) -> tf.Tensor:
    """``√(v / (1 − β₂ᵗ)) + ε``: what Adam grafting divides the gradient by."""
    v = tf.convert_to_tensor(second_moment)
    correction = 1 - tf.pow(exact_cast(beta_2, v.dtype), tf.cast(step, v.dtype))
    return tf.sqrt(v / correction) + exact_cast(epsilon, v.dtype)


def graft_ratio(direction: tf.Tensor, reference: tf.Tensor) -> tf.Tensor:
    """``‖reference‖ / ‖direction‖`` (Frobenius norms; 0 where ``direction`` is 0)."""
    return tf.math.divide_no_nan(tf.norm(reference), tf.norm(direction))


def graft(direction: tf.Tensor, reference: tf.Tensor) -> tf.Tensor:
    """``direction · ‖reference‖ / ‖direction‖``: the reference's norm, the direction's way."""
    return direction * graft_ratio(direction, reference)


def momentum(
    first_moment: Any, direction: Any, step: Any, beta_1: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """``m ← β₁ m + (1 − β₁) d``; the step is ``−lr`` times ``m / (1 − β₁ᵗ)``.

    Returns:
        ``(m / (1 − β₁ᵗ), m)``, in ``first_moment``'s dtype.
    """
    dtype = first_moment.dtype
    beta = exact_cast(beta_1, dtype)
    m = beta * tf.convert_to_tensor(first_moment) + (1 - beta) * tf.cast(direction, dtype)
    return m / (1 - tf.pow(beta, tf.cast(step, dtype))), m
