"""K-FAC's curvature as structured operators in the flat layout (the optimizer protocol).

A Kronecker block is held in the eigenbases its update uses, so that its powers (``P⁻¹``,
``P^{-1/2}``) are closed-form and exact for that eigendecomposition; a diagonal variable
gets a ``DiagonalOperator`` (an isotropic one an ``IdentityOperator``). :func:`flat_operator`
puts them in the flat layout of :mod:`keras_curv._internal.flat`. ``docs/kfac.md``
("Diagnostics").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from keras_curv._internal.numerics import exact_cast
from keras_curv.curvature.operators import LinearOperator
from keras_curv.curvature.structured import (
    BlockDiagonalOperator,
    DiagonalOperator,
    IdentityOperator,
    PermutedOperator,
)
from keras_curv.optimizers import kfac_math as km
from keras_curv.optimizers.kfac_blocks import DepthwiseBlock, KroneckerBlock


class KroneckerBlockOperator(LinearOperator):
    r"""One Kronecker block ``(Qa Sa Qaᵀ) ⊗ (Qg Sg Qgᵀ)`` on its variables' flat layout.

    Acts on the block's variables (kernel, then bias) flattened row-major one after the
    other, arranged as :meth:`KroneckerBlock.to_matrix` arranges them (a ``(P, O)``
    matrix, ``(C, P, O)`` per channel for a depthwise convolution, the bias as the last,
    homogeneous, row). ``power(p)`` raises the scales.

    Args:
        block: The :class:`KroneckerBlock` (or :class:`DepthwiseBlock`).
        a_basis, g_basis: The factors' eigenvectors, or ``None`` for a diagonal factor.
        a_scale, g_scale: The eigenvalues (damped or not), ``(..., P)`` and ``(..., O)``.
    """

    def __init__(
        self,
        block: KroneckerBlock,
        a_basis: Any,
        a_scale: tf.Tensor,
        g_basis: Any,
        g_scale: tf.Tensor,
    ):
        self.block = block
        self.bases = (a_basis, g_basis)
        self.scales = (a_scale, g_scale)
        kernel = int(np.prod(block.kernel_shape))
        bias = block.g_dim * (block.channels if isinstance(block, DepthwiseBlock) else 1)
        self.sizes = [kernel, bias] if block.has_bias else [kernel]
        super().__init__(sum(self.sizes), block.dtype)

    def _matrices(self, rows: tf.Tensor) -> tf.Tensor:
        """``(k, dim)`` flat rows as ``(k, P, O)`` matrices (``(k, C, P, O)`` per channel):
        :meth:`KroneckerBlock.to_matrix` with a leading axis."""
        block, k = self.block, tf.shape(rows)[0]
        parts = tf.split(rows, self.sizes, axis=1)
        if isinstance(block, DepthwiseBlock):
            shape = [k, -1, block.channels, block.g_dim]
            kernel = tf.transpose(tf.reshape(parts[0], shape), [0, 2, 1, 3])
        else:
            kernel = tf.reshape(parts[0], [k, -1, block.g_dim])
        if not block.has_bias:
            return kernel
        # The bias is the homogeneous (last) row: (k, 1, O), or (k, C, 1, M) per channel.
        bias = tf.reshape(parts[1], tf.concat([tf.shape(kernel)[:-2], [1, block.g_dim]], 0))
        return tf.concat([kernel, bias], axis=-2)

    def _rows(self, matrices: tf.Tensor) -> tf.Tensor:
        """The inverse of :meth:`_matrices`."""
        k = tf.shape(matrices)[0]
        kernel = matrices[..., :-1, :] if self.block.has_bias else matrices
        if isinstance(self.block, DepthwiseBlock):
            kernel = tf.transpose(kernel, [0, 2, 1, 3])
        parts = [tf.reshape(kernel, [k, -1])]
        if self.block.has_bias:
            parts.append(tf.reshape(matrices[..., -1, :], [k, -1]))
        return tf.concat(parts, axis=1)

    def _matmat(self, block):
        (a_basis, g_basis), (a_scale, g_scale) = self.bases, self.scales
        product = km.eigen_kronecker_product(
            self._matrices(tf.transpose(block)), a_basis, a_scale, g_basis, g_scale
        )
        return tf.transpose(self._rows(product))

    def _matvec(self, v):
        return self._matmat(v[:, None])[:, 0]

    def power(self, p: float) -> LinearOperator:
        p = float(p)
        minimum = min(float(tf.reduce_min(s)) for s in self.scales)
        if (p < 0 and minimum <= 0) or (p != int(p) and minimum < 0):
            raise ValueError(
                f"K-FAC block {self.block.name!r} has a factor eigenvalue {minimum:.3g}: its "
                f"power {p:g} does not exist. Use damping > 0."
            )
        a_scale, g_scale = (tf.pow(s, tf.constant(p, s.dtype)) for s in self.scales)
        return KroneckerBlockOperator(self.block, self.bases[0], a_scale, self.bases[1], g_scale)


def kronecker_block_operator(
    block: KroneckerBlock, eigen: dict, damping: tf.Tensor | None
) -> KroneckerBlockOperator:
    """``(A + π√λ I) ⊗ (G + √λ/π I)`` from the stored eigendecompositions (``A ⊗ G`` if
    ``damping`` is ``None``), as :meth:`KroneckerBlock.solve` inverts it."""
    a_values, g_values = eigen["a_values"], eigen["g_values"]
    if damping is not None:
        root = tf.sqrt(exact_cast(damping, a_values.dtype))
        pi = tf.cast(km.pi_adjustment(a_values, g_values), a_values.dtype)[..., None]
        a_values, g_values = a_values + pi * root, g_values + root / pi
    return KroneckerBlockOperator(
        block, eigen.get("a_vectors"), a_values, eigen.get("g_vectors"), g_values
    )


def diagonal_operator(
    diagonal: tf.Tensor, damping: tf.Tensor | None, isotropic: bool
) -> LinearOperator:
    """``diag(d + λ)`` of one variable (``(mean d + λ) I`` if ``isotropic``)."""
    d = tf.reshape(diagonal, [-1])
    shift = 0 if damping is None else exact_cast(damping, d.dtype)
    if isotropic:
        return IdentityOperator(int(d.shape[0]), float(tf.reduce_mean(d) + shift), d.dtype)
    return DiagonalOperator(d + shift)


def flat_operator(
    pieces: Sequence[tuple[Sequence[int], LinearOperator]], sizes: Sequence[int]
) -> LinearOperator:
    """The block-diagonal operator of ``pieces`` in the flat layout of variables of ``sizes``.

    Args:
        pieces: ``(variable indices, operator)``: each operator acts on its variables
            flattened one after the other; every variable is in exactly one piece.
        sizes: The variables' sizes, in the flat layout's order.

    Returns:
        A ``BlockDiagonalOperator`` (pieces ordered by their first variable), wrapped in a
        ``PermutedOperator`` when a piece's variables are not adjacent in that order.
    """
    pieces = sorted(pieces, key=lambda piece: min(piece[0]))
    starts = np.cumsum([0, *sizes])
    order = np.concatenate(
        [np.arange(starts[i], starts[i + 1]) for indices, _ in pieces for i in indices]
    )
    inner = BlockDiagonalOperator([operator for _, operator in pieces])
    if np.array_equal(order, np.arange(order.size)):
        return inner
    return PermutedOperator(inner, order)
