r"""Operators built from operators: sums, scalings, products and principal blocks.

What ``A + B``, ``A - B``, ``c * A``, ``A @ B`` and ``A.restrict(ranges)`` return (see
:class:`~keras_curv.curvature.LinearOperator`). Each product of a composite calls its
parts' products, which count their own matvecs: the cost of ``P @ H @ P`` in Hessian
products is read off ``H.num_matvecs``.

A composite computes in the widest dtype of its parts (float64 if any part is); each
part receives the vector cast to its own dtype.

Example:
    >>> damped = hessian + 1e-3 * IdentityOperator(hessian.dim)
    >>> root = preconditioner.power(-0.5)
    >>> preconditioned = root @ hessian @ root      # symmetric: reads the same backwards
    >>> top_eigenpairs(preconditioned, 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from keras_curv.curvature.operators import LinearOperator


def _widest(operators: Sequence[LinearOperator]) -> tf.DType:
    return max((op.dtype for op in operators), key=lambda d: d.size)


def _same_dim(operators: Sequence[LinearOperator], what: str) -> int:
    dims = {op.dim for op in operators}
    if len(dims) != 1:
        raise ValueError(
            f"{what} needs operators of one dimension; got {sorted(dims)}. Restrict or "
            "pad one of them to the other's parameter space first."
        )
    return dims.pop()


def _apply(op: LinearOperator, x: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """``op`` on a vector or block ``x``, returned in ``dtype``."""
    out = op.matvec(x) if x.shape.rank == 1 else op.matmat(x)
    return tf.cast(out, dtype)


def as_operator(other: Any, symbol: str) -> LinearOperator:
    if isinstance(other, LinearOperator):
        return other
    raise TypeError(
        f"`A {symbol} x` needs an operator x; got {type(other).__name__}. For damping, add "
        "a scaled identity: `A + damping * IdentityOperator(A.dim)`."
    )


class SumOperator(LinearOperator):
    """``A_1 + ... + A_n`` (what ``A + B`` returns; nested sums are flattened)."""

    def __init__(self, *terms: LinearOperator):
        flat = []
        for term in terms:
            flat.extend(term.terms if isinstance(term, SumOperator) else [term])
        super().__init__(_same_dim(flat, "A sum"), _widest(flat))
        self.terms = flat
        self.symmetric = all(t.symmetric for t in flat)

    def _matvec(self, v):
        return tf.add_n([_apply(t, v, self.dtype) for t in self.terms])

    def _matmat(self, block):
        return tf.add_n([_apply(t, block, self.dtype) for t in self.terms])


class ScaledOperator(LinearOperator):
    """``c A`` for a finite number ``c`` (what ``c * A`` returns)."""

    def __init__(self, operator: LinearOperator, scale: Any):
        if isinstance(scale, LinearOperator) or isinstance(scale, bool):
            raise TypeError("`c * A` needs a number c; use `A @ B` for a product of operators.")
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise TypeError(f"`c * A` needs a number c; got {type(scale).__name__}.") from None
        if not math.isfinite(scale):
            raise ValueError(f"The scale of an operator must be finite; got {scale}.")
        super().__init__(operator.dim, operator.dtype)
        self.operator = operator
        self.scale = scale
        self.symmetric = operator.symmetric

    def _matvec(self, v):
        return tf.constant(self.scale, self.dtype) * _apply(self.operator, v, self.dtype)

    def _matmat(self, block):
        return tf.constant(self.scale, self.dtype) * _apply(self.operator, block, self.dtype)

    def power(self, p: float) -> LinearOperator:
        if self.scale <= 0:
            raise ValueError(f"A power needs a positive scale; this operator's is {self.scale}.")
        return ScaledOperator(self.operator.power(p), self.scale**p)


class ProductOperator(LinearOperator):
    """``A_1 A_2 ... A_n`` (what ``A @ B`` returns; nested products are flattened).

    Symmetric when the factors are symmetric and read the same backwards
    (``R @ H @ R``, the form ``P^{-1/2} H P^{-1/2}`` of a preconditioned Hessian).
    """

    def __init__(self, *factors: LinearOperator):
        flat = []
        for factor in factors:
            flat.extend(factor.factors if isinstance(factor, ProductOperator) else [factor])
        super().__init__(_same_dim(flat, "A product"), _widest(flat))
        self.factors = flat
        self.symmetric = all(f.symmetric for f in flat) and all(
            a is b for a, b in zip(flat, reversed(flat))
        )

    def _matvec(self, v):
        for factor in reversed(self.factors):
            v = _apply(factor, v, self.dtype)
        return v

    def _matmat(self, block):
        for factor in reversed(self.factors):
            block = _apply(factor, block, self.dtype)
        return block


def _check_ranges(ranges: Any, dim: int) -> list[tuple[int, int]]:
    checked = []
    for item in ranges:
        try:
            start, stop = (int(i) for i in item)
        except (TypeError, ValueError):
            raise ValueError(
                f"`ranges` must be (start, stop) pairs of flat indices; got {item!r}."
            ) from None
        if not 0 <= start < stop <= dim:
            raise ValueError(f"The range ({start}, {stop}) does not lie in [0, {dim}) or is empty.")
        checked.append((start, stop))
    if not checked:
        raise ValueError("`ranges` is empty: a block needs at least one index.")
    indices = np.concatenate([np.arange(a, b) for a, b in checked])
    if len(np.unique(indices)) != len(indices):
        raise ValueError(f"The ranges {checked} overlap.")
    return checked


class RestrictedOperator(LinearOperator):
    """``E^T A E``: ``A`` seen on the flat index ranges of a block (``A.restrict(ranges)``).

    The vector is zero-padded to ``A.dim``, ``A`` applied, and the block's entries
    sliced out; no sub-matrix is formed. Each product costs one product of ``A``, and
    for a model operator nothing is traced again: the block reuses ``A``'s traced product
    (``HessianOperator(..., variables=...)`` differentiates only the block, but traces a
    product of its own).

    Args:
        operator: ``A``.
        ranges: ``(start, stop)`` pairs of flat indices, e.g. one per variable of a layer
            (:func:`keras_curv._internal.flat.variable_ranges`).
    """

    def __init__(self, operator: LinearOperator, ranges: Any):
        self.ranges = _check_ranges(ranges, operator.dim)
        indices = np.concatenate([np.arange(a, b) for a, b in self.ranges])
        super().__init__(len(indices), operator.dtype)
        self.operator = operator
        self.symmetric = operator.symmetric
        indices = tf.constant(indices, tf.int64)
        full = tf.constant(operator.dim, tf.int64)

        # Traced once each: the layout changes cost no eager work per product.
        @tf.function(reduce_retracing=True)
        def pad(x):
            shape = tf.concat([[full], tf.shape(x, out_type=tf.int64)[1:]], 0)
            return tf.scatter_nd(indices[:, None], x, shape)

        @tf.function(reduce_retracing=True)
        def pick(x):
            return tf.gather(x, indices)

        self._pad, self._pick = pad, pick

    def _matvec(self, v):
        return self._pick(_apply(self.operator, self._pad(v), self.dtype))

    def _matmat(self, block):
        return self._pick(_apply(self.operator, self._pad(block), self.dtype))
